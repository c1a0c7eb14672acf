"""Patch-wise (REPA-style) alignment targets end to end: resampling a teacher's patch grid to the code grid, the
shapes patch oracle, the encode step writing {split}_teacher_patch.bin with its meta.json record, Batches (and the
shuffled control) reading them, and train.py with --align_target=patch|both, including the clear error for a data
dir without them. Tiny random tokenizer / teacher / data, a few seconds each."""
import os
import shutil

import numpy as np
import pytest
import torch

import train
from conftest import TINY, TINY_GPT_ARGS
from data.common import PreparedSplit, Batches, derangement, read_meta, write_meta
from data.encode import resample_patch_grid, write_patch_targets, patch_meta
from data.shapes import teachers
from data.shapes.world import render
from utils import file_sha256
from conftest import encode_tiny_shapes, tiny_shapes_vqgan

PATCH_DIM = 6


# ----------------------------------------------------------------------------------------------------------------
# resampling and the oracle

def test_resampling_averages_the_teacher_patches_each_code_cell_covers():
    """16x16 -> 8x8: each code cell is the mean of its 2x2 teacher patches (then unit norm), in raster order; the
    same grid only normalises; a coarser grid (2x2 -> 4x4) gives each code cell the patch it falls in."""
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((3, 16 * 16, 5)).astype(np.float32)
    out = resample_patch_grid(tokens, (16, 16), (8, 8)).numpy()
    blocks = tokens.reshape(3, 8, 2, 8, 2, 5).mean((2, 4)).reshape(3, 64, 5)     # by hand: 2x2 block means
    np.testing.assert_allclose(out, blocks / np.linalg.norm(blocks, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
    same = resample_patch_grid(tokens, (16, 16), (16, 16)).numpy()
    np.testing.assert_allclose(same, tokens / np.linalg.norm(tokens, axis=-1, keepdims=True), rtol=1e-5, atol=1e-6)
    coarse = rng.standard_normal((1, 4, 5)).astype(np.float32)
    up = resample_patch_grid(coarse, (2, 2), (4, 4)).numpy().reshape(4, 4, 5)
    want = coarse.reshape(2, 2, 5) / np.linalg.norm(coarse.reshape(2, 2, 5), axis=-1, keepdims=True)
    np.testing.assert_allclose(up, want.repeat(2, 0).repeat(2, 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='4x4'):
        resample_patch_grid(tokens[:, :15], (4, 4), (8, 8))


def test_patch_oracle_reads_each_code_cell_off_the_scene():
    """A large red circle in the centre on a striped navy background, at 32 px / 8x8 codes: the code cells inside
    its bounding box show it, the corners are empty, every cell names the background, the stripe column follows
    the rendered light bands; and the targets are unit vectors through the fixed projection."""
    scene = dict(objects=[dict(shape='circle', color='red', size='large', cell=4)], bg_color='navy',
                 bg_texture='striped', name_bg_color=True, name_bg_texture=True)
    x = teachers.patch_onehot(scene, (8, 8), 32).reshape(8, 8, -1)
    circle = 1 + teachers.SHAPES.index('circle')
    assert x[3, 3, circle] == x[4, 4, circle] == 1 and x[3, 3, 0] == 0           # inside the box (12.4..19.6 px)
    assert x[0, 0, 0] == x[7, 7, 0] == 1 and x[0, 0, 1:teachers.CELL_FEATURES].sum() == 0  # corners: empty
    assert (x[..., teachers.CELL_FEATURES + list(teachers.BG_COLORS).index('navy')] == 1).all()
    image = render(scene, 32).astype(int)
    lifted = image[:, 0].sum(-1) > image[:, 0].sum(-1).min()                    # (32,) light rows in the left column
    np.testing.assert_allclose(x[:, 0, -1], lifted.reshape(8, 4).mean(1))
    oracle = teachers.ScenePatchTeacher()
    e = oracle.embed([scene], (8, 8), 32)
    assert e.shape == (1, 64, teachers.SCENE_DIM)
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1, rtol=1e-5)
    np.testing.assert_allclose(e[0, 0], e[0, 7], rtol=1e-6)                      # same content, same target
    assert oracle.identity() == teachers.ScenePatchTeacher().identity() != teachers.ScenePatchTeacher(seed=1).identity()


# ----------------------------------------------------------------------------------------------------------------
# the shapes encode step

@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
    """A tiny encoded shapes dir (conftest.encode_tiny_shapes: 4x4 CLIP patches), without patch targets:
    (PrepareConfig, folder)."""
    cfg, _, d = encode_tiny_shapes(str(tmp_path_factory.mktemp('patch_encode')))
    return cfg, d


def test_a_dir_without_patch_targets_names_the_encode_command(shapes_dir, tmp_path, capsys):
    _, d = shapes_dir
    with pytest.raises(SystemExit):
        train.main([f'--data_dir={d}', f'--out_dir={tmp_path / "out"}', '--align_target=patch', '--max_iters=1'])
    err = capsys.readouterr().err
    assert 'train_teacher_patch.bin' in err and 'data/shapes/prepare.py --stage=encode' in err
    assert f'--out_dir={d}' in err and '--patch_targets=True' in err and 'Traceback' not in err
    assert not (tmp_path / 'out').exists()


def test_encode_adds_the_patch_memmaps_with_their_meta(shapes_dir, capsys):
    """--patch_targets=True on an encoded dir adds {split}_teacher_patch.bin without re-encoding: float16 (N, 64, 32)
    equal to the CLIP's patch tokens resampled 4x4 -> 8x8, meta.json names teacher, grids, dtype and sha256, the
    size is printed before writing, and a second call skips."""
    from dataclasses import replace
    from teacher import Teacher
    from data.shapes.prepare import encode_dataset
    cfg, d = shapes_dir
    codes_before = os.path.getmtime(os.path.join(d, 'train_codes.bin'))
    meta = encode_dataset(replace(cfg, patch_targets=True), progress=False)
    out = capsys.readouterr().out
    assert 'skipping' in out and out.index('patch targets for') < out.index('wrote patch targets')
    assert f'{(12 + 6) * 64 * 32 * 2 / 2**20:,.1f} MiB' in out
    assert os.path.getmtime(os.path.join(d, 'train_codes.bin')) == codes_before     # the codes were not redone
    rec = meta['teacher_patch']
    assert rec['teacher'] == meta['teacher'] and rec['grid'] == [8, 8] and rec['source_grid'] == [4, 4]
    assert rec['dtype'] == 'float16' and rec['dim'] == 32 and 'average pooling' in rec['resample']
    assert read_meta(d)['teacher_patch'] == rec
    teacher = Teacher.load(cfg.teacher)
    for split, n in (('train', 12), ('val', 6)):
        path = os.path.join(d, f'{split}_teacher_patch.bin')
        assert os.path.getsize(path) == n * 64 * 32 * 2 and rec['sha256'][split] == file_sha256(path)
        got = PreparedSplit(d, split).teacher_patch
        assert got.shape == (n, 64, 32) and got.dtype == np.float16
        images = torch.from_numpy(np.load(os.path.join(d, f'{split}_images.npy'))).permute(0, 3, 1, 2)
        _, tokens = teacher.embed(images, return_tokens=True)                       # (n, 16, 32)
        want = resample_patch_grid(tokens, (4, 4), (8, 8)).numpy().astype(np.float16)
        np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-3)
    encode_dataset(replace(cfg, patch_targets=True), progress=False)
    assert 'already holds patch targets' in capsys.readouterr().out
    moved = os.path.join(os.path.dirname(cfg.teacher), 'moved_teacher.pt')   # the same file elsewhere: still the same
    shutil.copy(cfg.teacher, moved)
    encode_dataset(replace(cfg, patch_targets=True, teacher=moved), progress=False)
    assert 'already holds patch targets' in capsys.readouterr().out


def test_encode_with_the_scene_teacher_writes_the_patch_oracle(tmp_path):
    from data.common import load_scenes
    from data.shapes.prepare import RenderConfig, PrepareConfig, render_dataset, encode_dataset
    d = str(tmp_path / 'plan')
    render_dataset(RenderConfig(out_dir=d, n_train=10, n_val=5, world='plan'), progress=False)
    tiny_shapes_vqgan(str(tmp_path / 'vq.pt'))
    meta = encode_dataset(PrepareConfig(out_dir=d, n_train=10, n_val=5, world='plan', vqgan=str(tmp_path / 'vq.pt'),
                                        teacher_kind='scene', text_len=36, device='cpu', patch_targets=True),
                          progress=False)
    assert meta['teacher_patch']['teacher'] == teachers.ScenePatchTeacher().identity()
    for split in ('train', 'val'):
        want = teachers.ScenePatchTeacher().embed(load_scenes(d, split), (8, 8), 32).astype(np.float16)
        assert np.array_equal(np.asarray(PreparedSplit(d, split).teacher_patch), want)


# ----------------------------------------------------------------------------------------------------------------
# reading them for training, and train.py

def add_tiny_patch_targets(data_dir, seed=1):
    """Give the 12-caption tiny dataset patch targets: each caption fixes one (T, PATCH_DIM) grid of unit vectors."""
    meta = read_meta(data_dir)
    T = meta['image_tokens']
    table = np.random.default_rng(seed).standard_normal((12, T, PATCH_DIM))
    table /= np.linalg.norm(table, axis=-1, keepdims=True)
    sha = {}
    for split in ('train', 'val'):
        with open(os.path.join(data_dir, f'{split}_captions.txt')) as f:
            captions = f.read().splitlines()
        order = sorted(set(captions))
        rows = table[[order.index(c) for c in captions]].astype(np.float16)
        sha[split] = write_patch_targets(data_dir, split, rows)
    meta['teacher_patch'] = patch_meta(dict(name='caption-patch-table', sha256=None), (TINY['grid'],) * 2,
                                       meta['grid'], PATCH_DIM, 'none', sha)
    write_meta(data_dir, meta)
    return data_dir


def run_args(data_dir, out_dir, *extra):
    return [f'--data_dir={data_dir}', f'--out_dir={out_dir}', *TINY_GPT_ARGS, '--batch_size=8', '--warmup_iters=2',
            '--eval_samples=0', '--eval_rows=24', *extra]


def test_batches_shuffle_whole_images_for_global_and_patch_targets_alike(tiny_data_copy):
    """--shuffle_teacher moves every row's global and patch targets to the same other row (a derangement), the
    cells of an image together; 'patch' gives no global target, 'global' no patch one."""
    d = add_tiny_patch_targets(tiny_data_copy)
    split = PreparedSplit(d, 'train')
    rows, uncond = np.arange(10, 20), torch.zeros(TINY['text_len'], dtype=torch.long)
    text, codes, teacher, cells = Batches(split, 'cpu', uncond, True, 'both').get(rows)
    moved = derangement(len(split))[rows]
    assert (moved != rows).all()
    assert torch.equal(teacher, torch.from_numpy(np.asarray(split.teacher[moved], dtype=np.float32)))
    assert torch.equal(cells, torch.from_numpy(np.asarray(split.teacher_patch[moved], dtype=np.float32)))
    assert cells.shape == (10, TINY['grid'] ** 2, PATCH_DIM)
    plain = Batches(split, 'cpu', uncond, False, 'patch').get(rows)
    assert plain[2] is None and torch.equal(plain[3], torch.from_numpy(
        np.asarray(split.teacher_patch[rows], dtype=np.float32)))
    assert len(Batches(split, 'cpu', uncond, False).get(rows)) == 3


@pytest.mark.parametrize('target', ['patch', 'both'])
def test_training_with_patch_targets_lowers_their_loss(tiny_data_copy, tmp_path, target):
    """60 steps pull the patch projections towards the cells (val alignment, the sum of the terms with 'both',
    falls); the model config records the target and the patch width; 'patch' builds no global projector."""
    d = add_tiny_patch_targets(tiny_data_copy)
    history = train.main(run_args(d, tmp_path, f'--align_target={target}', '--max_iters=60', '--eval_interval=60',
                                  '--learning_rate=1e-2', '--patch_projector=repa', '--patch_projector_hidden=32'))
    evals = [h for h in history if h['kind'] == 'eval']
    assert evals[-1]['val_align'] < evals[0]['val_align'] - 0.3 and evals[-1]['val_ce'] < evals[0]['val_ce'] - 1.0
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    c = ckpt['model_config']
    assert c['align_target'] == target and c['patch_dim'] == PATCH_DIM and c['patch_projector'] == 'repa'
    assert any(k.startswith('patch_projector.fc3') for k in ckpt['model'])
    assert any(k.startswith('projector.') for k in ckpt['model']) == (target == 'both')


def test_patch_weight_zero_freezes_the_patch_head(tiny_data_copy, tmp_path):
    d = add_tiny_patch_targets(tiny_data_copy)
    train.main(run_args(d, tmp_path, '--align_target=both', '--patch_weight=0', '--max_iters=4', '--eval_interval=4'))
    cfg = train.configure(train.TrainConfig(), run_args(d, tmp_path, '--align_target=both'))
    torch.manual_seed(cfg.seed)
    from model import GPT
    initial = GPT(train.gpt_config(cfg, read_meta(d))).state_dict()
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    for name, value in ckpt['model'].items():
        if name.startswith('patch_projector.'):
            assert torch.equal(value, initial[name]), name
    assert not torch.equal(ckpt['model']['projector.fc1.weight'], initial['projector.fc1.weight'])


def test_a_checkpoint_from_before_align_target_resumes(tiny_data, tmp_path):
    """A model_config saved without the patch fields is the global model it always was: it resumes."""
    train.main(run_args(tiny_data, tmp_path, '--max_iters=2', '--eval_interval=2'))
    path = tmp_path / 'ckpt.pt'
    ckpt = torch.load(path, weights_only=True)
    for k in ('align_target', 'patch_dim', 'patch_projector', 'patch_projector_hidden'):
        del ckpt['model_config'][k]
    for k in ('align_target', 'patch_weight', 'patch_projector', 'patch_projector_hidden'):
        del ckpt['config'][k]
    torch.save(ckpt, path)
    history = train.main([f'--out_dir={tmp_path}', '--init_from=resume', '--max_iters=4'])
    assert history[-1]['iter'] == 4
