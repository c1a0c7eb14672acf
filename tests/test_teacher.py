"""Tests of teacher.py on tiny random open_clip models and a few rendered shapes scenes (CPU, no network)."""
import os
import sys
import math
import time
import socket
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from teacher import (Teacher, TeacherWeightsUnavailable, TrainConfig, build_clip, clip_loss, clip_model_kwargs,  # noqa: E402
                     embed_dataset, main, preprocess_uint8, retrieval_metrics, save_clip, train_clip)
from utils import atomic_torch_save, file_sha256  # noqa: E402
from data.shapes.world import make_split  # noqa: E402

BASE = 'ViT-S-32'  # any open_clip name: the tiny overrides below replace its towers
TINY = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=4, layers=2, width=64, head_width=32),
            text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=1))
TINY_TRAIN = TrainConfig(embed_dim=32, vision_layers=2, vision_width=64, text_layers=1, text_width=64,
                         batch_size=32, max_iters=30, lr=3e-3, warmup_iters=2, eval_interval=0)


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    # these models are tiny: on a shared 2-core machine, syncing two threads costs far more than it saves
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def teacher():
    torch.manual_seed(0)
    return Teacher(BASE, **TINY)


@pytest.fixture(scope='module')
def shapes():
    _, images, captions = make_split(32, seed=7, image_size=32)
    return images, captions   # uint8 (32, 32, 32, 3), 32 strings: one contrastive batch


@pytest.fixture(scope='module')
def trained(shapes):
    """A tiny CLIP trained briefly on 32 shapes pairs, with its loss on those pairs before and after."""
    import open_clip
    images, captions = shapes
    torch.manual_seed(0)
    kwargs = clip_model_kwargs(TINY_TRAIN, image_size=32)
    model, _ = build_clip(BASE, **kwargs)
    x = preprocess_uint8(torch.from_numpy(images).permute(0, 3, 1, 2), model.visual.preprocess_cfg)
    tokens = open_clip.get_tokenizer(BASE, context_length=TINY_TRAIN.context_length)(captions)
    model.eval()
    with torch.no_grad():
        before = clip_loss(model, x, tokens).item()
    train_clip(model, x, tokens, TINY_TRAIN, progress=False, log=None)
    with torch.no_grad():
        after = clip_loss(model, x, tokens).item()
    return dict(model=model, kwargs=kwargs, x=x, tokens=tokens, before=before, after=after)


def random_uint8(b, h, w, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (b, 3, h, w), dtype=np.uint8))


def to_pil(x):
    return [Image.fromarray(xi.permute(1, 2, 0).numpy()) for xi in x]


def test_embed_equals_normalized_encode_image(teacher):
    x = random_uint8(5, 32, 32)
    with torch.no_grad():  # reference: open_clip's own transform on PIL images, then encode_image
        ref = F.normalize(teacher.model.encode_image(torch.stack([teacher.preprocess(im) for im in to_pil(x)])), dim=-1)
    emb = teacher.embed(x)
    assert emb.dtype == torch.float32 and emb.shape == (5, teacher.dim) == (5, 32)
    torch.testing.assert_close(emb, ref, rtol=0, atol=1e-6)      # no resize: the tensor path is exact
    torch.testing.assert_close(teacher.embed(to_pil(x)), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(5))


@pytest.mark.parametrize('hw', [(64, 64), (48, 40), (20, 28)])
def test_tensor_preprocessing_matches_open_clip_transform(teacher, hw):
    x = random_uint8(3, *hw, seed=1)
    ours = preprocess_uint8(x, teacher.preprocess_cfg)
    ref = torch.stack([teacher.preprocess(im) for im in to_pil(x)])
    assert ours.shape == ref.shape == (3, 3, 32, 32)
    std = torch.tensor(teacher.preprocess_cfg['std']).view(1, 3, 1, 1)
    grey_levels = ((ours - ref) * std * 255).abs()                # back to 0..255 units
    assert grey_levels.max() < 1.01                               # torch and PIL bicubic round a half-level apart
    assert grey_levels.mean() < 0.05


def test_batch_size_invariance_and_tokens(teacher):
    x = random_uint8(7, 32, 32, seed=2)
    full = teacher.embed(x, batch_size=64)
    torch.testing.assert_close(teacher.embed(x, batch_size=2), full, rtol=0, atol=1e-5)
    emb, tokens = teacher.embed(x, batch_size=3, return_tokens=True)
    torch.testing.assert_close(emb, full, rtol=0, atol=1e-5)
    assert tokens.shape == (7, (32 // 4) ** 2, 64)                # patch tokens, CLS left out, before projection


def test_frozen_no_grad_flows(teacher):
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    student = torch.nn.Linear(teacher.dim, teacher.dim)
    x = random_uint8(4, 32, 32, seed=3)
    with torch.enable_grad():
        target = teacher.embed(x)
        assert not target.requires_grad
        loss = (1 - F.cosine_similarity(student(target), target, dim=-1)).mean()
        loss.backward()
    assert student.weight.grad is not None and student.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())


def test_bad_inputs_are_named(teacher):
    x = random_uint8(2, 32, 32)
    with pytest.raises(TypeError, match='numpy'):
        teacher.embed(x.numpy())
    with pytest.raises(TypeError, match='uint8'):
        teacher.embed(x.float())
    with pytest.raises(ValueError, match='permute'):
        teacher.embed(x.permute(0, 2, 3, 1))
    with pytest.raises(FileNotFoundError, match='known tag'):
        Teacher(BASE, pretrained='no_such_tag', **TINY)


def test_embed_dataset_dtype_shape(teacher, tmp_path):
    images = np.random.default_rng(4).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / 'imgs.npy', images)
    mm = np.load(tmp_path / 'imgs.npy', mmap_mode='r')               # the prepare step reads memmaps
    out = embed_dataset(teacher, mm, batch_size=4, progress=False)
    assert out.dtype == np.float16 and out.shape == (10, teacher.dim)
    ref = teacher.embed(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(out.astype(np.float32), ref, atol=2e-3)
    with pytest.raises(ValueError, match='uint8'):
        embed_dataset(teacher, images.astype(np.float32), progress=False)


def test_training_lowers_contrastive_loss(trained):
    # 30 steps on one batch of 32 pairs: the loss falls by over a nat and well below chance level (ln 32 = 3.47)
    before, after = trained['before'], trained['after']
    assert after < before - 1.0 and after < math.log(32) - 0.5, (before, after)


def test_save_load_round_trip(trained, shapes, tmp_path):
    model = trained['model']
    path = str(tmp_path / 'teacher.pt')
    save_clip(path, model, BASE, trained['kwargs'], metrics={'top1': 0.5})
    loaded = Teacher.load(path)
    images = torch.from_numpy(shapes[0][:8]).permute(0, 3, 1, 2)    # (8, 3, 32, 32) uint8
    with torch.no_grad():
        ref = F.normalize(model.encode_image(trained['x'][:8]), dim=-1)   # the trained model, in memory
    torch.testing.assert_close(loaded.embed(images), ref, rtol=0, atol=1e-6)
    assert loaded.checkpoint_info['metrics'] == {'top1': 0.5} and loaded.dim == 32
    ident = loaded.identity()
    assert ident == dict(name=BASE, pretrained=None, path=path, sha256=file_sha256(path), dim=32)
    loaded.save(str(tmp_path / 'again.pt'))                          # Teacher.save -> load gives the same teacher
    torch.testing.assert_close(Teacher.load(str(tmp_path / 'again.pt')).embed(images), ref, rtol=0, atol=1e-6)


def test_local_checkpoint_file_as_pretrained(trained, tmp_path):
    model = trained['model']
    path = str(tmp_path / 'open_clip_pytorch_model.bin')
    torch.save(model.state_dict(), path)                              # open_clip's own checkpoint format
    t = Teacher(BASE, pretrained=path, **trained['kwargs'])
    x = random_uint8(3, 32, 32, seed=5)
    with torch.no_grad():
        ref = F.normalize(model.encode_image(preprocess_uint8(x, t.preprocess_cfg)), dim=-1)
    torch.testing.assert_close(t.embed(x), ref, rtol=0, atol=1e-6)
    assert t.identity()['sha256'] == file_sha256(path)


def test_load_rejects_foreign_checkpoints(trained, tmp_path):
    atomic_torch_save({'kind': 'vqgan', 'state_dict': {}}, str(tmp_path / 'a.pt'))
    with pytest.raises(ValueError, match='not a teacher'):
        Teacher.load(str(tmp_path / 'a.pt'))
    path = str(tmp_path / 'b.pt')
    save_clip(path, trained['model'], BASE, trained['kwargs'])
    ckpt = torch.load(path, weights_only=True)
    atomic_torch_save(ckpt | {'surprise': 1}, path)
    with pytest.raises(ValueError, match='surprise'):
        Teacher.load(path)


def test_named_model_without_network_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub.constants

    def no_network(*args, **kwargs):
        raise OSError('network disabled in tests')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)   # the hub refuses every request
    for target in ('connect', 'connect_ex'):                                  # and nothing below it gets out
        monkeypatch.setattr(socket.socket, target, no_network)
    monkeypatch.setattr(socket, 'create_connection', no_network)
    monkeypatch.setattr(socket, 'getaddrinfo', no_network)
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    cases = [('ViT-B-16', 'laion2b_s34b_b88k', "pretrained='weights/ViT-B-16-laion2b_s34b_b88k/"),
             ('ViT-L-14', 'openai', 'quick_gelu=True'),
             ('hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224', None, "Teacher('local-dir:")]
    for name, tag, fix in cases:
        t0 = time.time()
        with pytest.raises(TeacherWeightsUnavailable) as err:
            Teacher(name, tag, cache_dir=str(tmp_path))                       # an empty cache: nothing to find
        assert time.time() - t0 < 5
        assert 'hf download' in str(err.value) and fix in str(err.value)


def test_retrieval_metrics_definitions(trained, shapes):
    images, captions = shapes
    m = retrieval_metrics(trained['model'], trained['x'], trained['tokens'], captions, group=16)
    assert m['n'] == 32 and m['group'] == 16
    assert m['top1'] <= m['top1_same_text'] <= 1                     # identical captions can only add hits
    assert m['top1_in_group'] > 1 / 16                               # trained on these pairs: above chance


def test_cli_trains_saves_and_loads(tmp_path, capsys):
    from data.shapes.prepare import RenderConfig, render_dataset
    render_dataset(RenderConfig(out_dir=str(tmp_path / 'data'), n_train=64, n_val=100), progress=False)
    argv = [f'--data_dir={tmp_path / "data"}', f'--out_dir={tmp_path / "out"}', '--max_iters=3', '--batch_size=32',
            '--embed_dim=16', '--vision_layers=1', '--text_layers=1', '--vision_width=32', '--text_width=32']
    main(argv)
    out = capsys.readouterr().out
    assert 'val image->text top-1' in out and 'background read from the embedding' in out
    t = Teacher.load(str(tmp_path / 'out' / 'teacher.pt'))
    assert t.dim == 16 and t.checkpoint_info['train_config']['max_iters'] == 3
    assert {'top1', 'top1_same_text', 'top1_in_group', 'probe_bg_color'} <= set(t.checkpoint_info['metrics'])
