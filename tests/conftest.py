"""
Shared fixtures: a tiny prepared dataset in the format of data/common.py, made in a fraction of a second.

Twelve captions ("a red circle", ...) each fix one 4x4 grid of codes (from a codebook of 32) and one teacher
embedding (D = 8), so the data is random but learnable: a GPT can drive the loss to ~0 and an aligned projector can
reach the teacher vector. The tokenizer named in meta.json is a real (tiny, untrained) VQModel checkpoint, 16x16
images -> 4x4 codes, so sample.py can decode what a GPT trained on this data writes.
"""
import os
import sys
import shutil
import socket

import numpy as np
import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

COLORS = ('red', 'green', 'blue', 'yellow')
SHAPES = ('circle', 'square', 'triangle')
CAPTIONS = [f'a {c} {s}' for c in COLORS for s in SHAPES]  # 12 captions
TINY = dict(n_train=96, n_val=24, grid=4, codebook_size=32, text_len=8, teacher_dim=8, image_size=16)
# a tiny GPT for these data: python train.py ... plus these flags
TINY_GPT_ARGS = ['--n_layer=2', '--n_head=2', '--n_embd=32', '--peak_flops=1e11']


def tiny_vqgan(path, seed=0):
    """Save an untrained tiny tokenizer (16x16 images, 4x4 codes of 32) in this project's checkpoint format."""
    from vqgan import VQConfig, VQModel, save_vqgan
    torch.manual_seed(seed)
    cfg = VQConfig(image_size=TINY['image_size'], codebook_size=TINY['codebook_size'], codebook_embed_dim=4, ch=8,
                   ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=8, norm_groups=4)
    save_vqgan(VQModel(cfg), path)
    return path


# untrained 32 px stand-ins for the shapes encode tests: a CLIP tower with a 4x4 patch grid, and a tokenizer
TINY_SHAPES_TEACHER = dict(embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, layers=1, width=32, head_width=16),
                           text_cfg=dict(context_length=16, width=32, heads=2, layers=1))


def tiny_shapes_vqgan(path):
    """Save an untrained 32 px tokenizer (8x8 codes of 64), seeded, in this project's checkpoint format."""
    from vqgan import VQConfig, VQModel, save_vqgan
    torch.manual_seed(0)
    save_vqgan(VQModel(VQConfig(image_size=32, codebook_size=64, codebook_embed_dim=4, ch=16, ch_mult=(1, 1, 2),
                                num_res_blocks=1, z_channels=16, norm_groups=8)), path)
    return path


def encode_tiny_shapes(root):
    """Render 12 + 6 shapes scenes into root/shapes and encode them with the tiny tokenizer and CLIP above (no patch
    targets): (PrepareConfig, meta, folder)."""
    from teacher import Teacher
    from data.shapes.prepare import RenderConfig, PrepareConfig, render_dataset, encode_dataset
    d = os.path.join(root, 'shapes')
    render_dataset(RenderConfig(out_dir=d, n_train=12, n_val=6), progress=False)
    tiny_shapes_vqgan(os.path.join(root, 'vq.pt'))
    Teacher('ViT-S-32', **TINY_SHAPES_TEACHER).save(os.path.join(root, 'teacher.pt'))
    cfg = PrepareConfig(out_dir=d, n_train=12, n_val=6, vqgan=os.path.join(root, 'vq.pt'),
                        teacher=os.path.join(root, 'teacher.pt'), device='cpu', batch_size=5)
    return cfg, encode_dataset(cfg, progress=False), d


def make_tiny_dataset(data_dir, vqgan_path, text_tokenizer=None):
    """Write {train,val}_{codes,text,teacher}.bin, captions and meta.json for the 12-caption world, the captions in
    text_tokenizer (a data.common.TextTokenizer; default open_clip's BPE)."""
    from data.common import tokenize_captions, write_split, write_meta, open_clip_tokenizer
    from vqgan import vqgan_identity
    text_tokenizer = text_tokenizer or open_clip_tokenizer()
    os.makedirs(data_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    T, K, D = TINY['grid'] ** 2, TINY['codebook_size'], TINY['teacher_dim']
    code_table = rng.integers(0, K, size=(len(CAPTIONS), T)).astype(np.uint16)           # caption -> codes
    teacher_table = rng.standard_normal((len(CAPTIONS), D))
    teacher_table /= np.linalg.norm(teacher_table, axis=1, keepdims=True)               # caption -> unit vector
    splits = {}
    for split, n, offset in (('train', TINY['n_train'], 0), ('val', TINY['n_val'], 5)):
        which = (np.arange(n) + offset) % len(CAPTIONS)
        captions = [CAPTIONS[k] for k in which]
        write_split(data_dir, split, dict(codes=code_table[which],
                                          text=tokenize_captions(captions, TINY['text_len'], tokenizer=text_tokenizer),
                                          teacher=teacher_table[which].astype(np.float16)), captions)
        splits[split] = n
    meta = dict(dataset='tiny', splits=splits, n_train=splits['train'], n_val=splits['val'],
                image_size=TINY['image_size'], grid=[TINY['grid']] * 2, image_tokens=T, codebook_size=K,
                text_len=TINY['text_len'], **text_tokenizer.meta(),
                teacher=dict(name='caption-table', pretrained=None, path=None, sha256=None, dim=D), teacher_dim=D,
                vqgan=vqgan_identity(vqgan_path), captions={s: f'{s}_captions.txt' for s in splits})
    write_meta(data_dir, meta)
    return data_dir


@pytest.fixture(scope='session')
def tiny_data(tmp_path_factory):
    """A prepared tiny dataset folder (read-only for tests: copy it with tiny_data_copy to change it)."""
    root = tmp_path_factory.mktemp('tiny_data')
    vq = tiny_vqgan(str(root / 'vqgan.pt'))
    return make_tiny_dataset(str(root / 'tiny'), vq)


@pytest.fixture
def tiny_data_copy(tiny_data, tmp_path):
    """A private copy of the tiny dataset that a test may modify."""
    return shutil.copytree(tiny_data, str(tmp_path / 'tiny'))


@pytest.fixture(scope='module')
def one_thread():
    """Tiny models on a shared 2-core machine: syncing two threads costs far more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def shapes32():
    """32 rendered shapes scenes at 32 px: uint8 (32, 32, 32, 3) images and 32 captions, one contrastive batch."""
    from data.shapes.world import make_split
    _, images, captions = make_split(32, seed=7, image_size=32)
    return images, captions


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]
