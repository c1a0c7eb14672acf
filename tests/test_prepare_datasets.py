"""Tests for data/encode.py, data/imagenet/prepare.py and data/folder/prepare.py on a tiny generated world: a few
classes of PNGs of various sizes and modes (plus a garbage and a truncated file), a tiny random tokenizer and teacher
saved to files. Checks the arrays against the contract and against direct model calls, torchrun (gloo, 2 processes)
against one process byte for byte, resumption after an interruption, and both captions-file formats."""
import os
import sys
import json
import socket
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402
from data.common import PreparedSplit, decode_text, read_meta, tokenize_captions  # noqa: E402
from data.encode import center_crop, load_rgb  # noqa: E402
from data.imagenet.prepare import ImageNetConfig, prepare_imagenet, list_image_folder, read_class_names  # noqa: E402
from data.folder.prepare import FolderConfig, prepare_folder, read_captions  # noqa: E402
from teacher import Teacher  # noqa: E402
from utils import REPO_ROOT, uint8_to_float  # noqa: E402
from vqgan import VQConfig, VQModel, load_vqgan, save_vqgan  # noqa: E402

S = 32                                               # crop side; the tiny tokenizer gives 8x8 codes
SIZES = [(40, 50), (64, 33), (32, 32), (100, 80), (17, 30), (130, 64)]   # (W, H): down-, up-scaled and as-is
MODES = ['RGB', 'L', 'RGBA', 'P', 'RGB', 'RGB']
BAD = {'n01443537/garbage.png', 'n01484850/truncated.png'}


def _write_images(folder, names, rng):
    os.makedirs(folder, exist_ok=True)
    for k, name in enumerate(names):
        W, H = SIZES[k % len(SIZES)]
        img = Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
        mode = MODES[k % len(MODES)]
        img = img.quantize(16) if mode == 'P' else img.convert(mode)
        img.save(os.path.join(folder, name))


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """One intra-op thread, as torchrun gives each of its processes: the same arithmetic in both, and no thread
    contention on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    """Tiny tokenizer and teacher files, an ImageNet-style train and val tree and a flat captioned folder."""
    d = tmp_path_factory.mktemp('world')
    torch.manual_seed(0)
    vq = VQModel(VQConfig(image_size=S, codebook_size=64, codebook_embed_dim=4, ch=16, ch_mult=(1, 1, 2),
                          num_res_blocks=1, z_channels=16, norm_groups=8))
    save_vqgan(vq, str(d / 'vq.pt'))
    teacher = Teacher('ViT-S-32', embed_dim=16, vision_cfg=dict(image_size=S, patch_size=8, layers=1, width=32,
                      head_width=16), text_cfg=dict(context_length=16, width=32, heads=2, layers=1))
    teacher.save(str(d / 'teacher.pt'))
    rng = np.random.default_rng(0)
    wnids = open(os.path.join(REPO_ROOT, 'data', 'imagenet', 'wnids.txt')).read().split()[:3]
    for c, wnid in enumerate(wnids):
        _write_images(str(d / 'train' / wnid), [f'img{k}.png' for k in range(5 - (c == 2))], rng)
        _write_images(str(d / 'val' / wnid), ['v0.png'], rng)
    (d / 'train' / 'n01443537' / 'garbage.png').write_bytes(b'this is not a PNG file')
    good = (d / 'train' / 'n01440764' / 'img3.png').read_bytes()
    (d / 'train' / 'n01484850' / 'truncated.png').write_bytes(good[:len(good) // 2])
    _write_images(str(d / 'photos' / 'sub'), [f'p{k}.png' for k in range(6)], rng)
    return dict(dir=d, vq=str(d / 'vq.pt'), teacher=str(d / 'teacher.pt'), wnids=wnids)


def imagenet_args(world, out_dir, *extra):
    return [f'--train_dir={world["dir"] / "train"}', f'--val_dir={world["dir"] / "val"}', f'--vqgan={world["vq"]}',
            f'--teacher={world["teacher"]}', f'--image_size={S}', '--shard_size=4', '--batch_size=3',
            '--num_workers=0', '--device=cpu', '--flip=True', f'--out_dir={out_dir}', *extra]


def run_imagenet(world, out_dir, *extra):
    return prepare_imagenet(configure(ImageNetConfig(), imagenet_args(world, out_dir, *extra)), progress=False)


def array_bytes(out_dir):
    """Every array and list file of a prepared folder -> bytes, for byte-for-byte comparisons."""
    return {f: open(os.path.join(out_dir, f), 'rb').read() for f in sorted(os.listdir(out_dir))
            if f.endswith(('.bin', '.txt'))}


@pytest.fixture(scope='module')
def reference(world):
    """One single-process ImageNet preparation (with flips) that the other tests compare against."""
    out = str(world['dir'] / 'ref')
    result = run_imagenet(world, out)
    return dict(out=out, result=result)


def test_center_crop_follows_the_adm_procedure():
    """ImageNet FID references use ADM's centre crop; our crops must be the same pixels."""
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (S, S, 3), dtype=np.uint8)
    # 4x bigger made of constant 4x4 blocks: two box halvings give the small image back exactly, then no resize
    big = np.repeat(np.repeat(small, 4, axis=0), 4, axis=1)                   # (4S, 4S, 3)
    assert np.array_equal(center_crop(Image.fromarray(big), S), small)
    # short side already S: no resize, the centre columns with the odd leftover on the right
    wide = rng.integers(0, 256, (S, S + 7, 3), dtype=np.uint8)
    assert np.array_equal(center_crop(Image.fromarray(wide), S), wide[:, 3:3 + S])
    tall = rng.integers(0, 256, (S + 5, S, 3), dtype=np.uint8)
    assert np.array_equal(center_crop(Image.fromarray(tall), S), tall[2:2 + S])
    up = center_crop(Image.fromarray(rng.integers(0, 256, (9, 20, 3), dtype=np.uint8)), S)  # upscaled
    assert up.shape == (S, S, 3) and up.dtype == np.uint8


def test_class_name_files():
    """The 1000 class names and wnids are in the same order, one per line, so prompts match labels."""
    names = read_class_names()
    wnids = open(os.path.join(REPO_ROOT, 'data', 'imagenet', 'wnids.txt')).read().split()
    classes = open(os.path.join(REPO_ROOT, 'data', 'imagenet', 'classes.txt')).read().splitlines()
    assert len(names) == len(wnids) == len(classes) == 1000 and wnids == sorted(set(wnids))
    assert classes[:3] == ['tench', 'goldfish', 'great white shark'] and names['n01440764'] == 'tench'
    assert all(c and c == c.strip() and '_' not in c for c in classes)


def test_imagenet_arrays_match_contract_and_direct_encoding(world, reference):
    """The prepared arrays have the contract's shapes and equal direct tokenizer / teacher calls."""
    out, meta = reference['out'], read_meta(reference['out'])
    assert reference['result']['meta'] == meta and not reference['result']['interrupted']
    train_dir = world['dir'] / 'train'
    listed, _ = list_image_folder(str(train_dir), read_class_names(), '{}')
    kept = [p for p in listed if p not in BAD]
    n = len(kept)
    assert len(listed) == 16 and n == 14
    assert meta['images'] == {'train': n, 'val': 3} and meta['splits'] == {'train': 2 * n, 'val': 3}
    assert meta['n_train'] == 2 * n and meta['skipped'] == {'train': 2, 'val': 0}
    assert meta['flip'] == {'train': True, 'val': False}
    assert meta['grid'] == [8, 8] and meta['image_tokens'] == 64 and meta['codebook_size'] == 64
    assert meta['text_len'] == 16 and meta['teacher_dim'] == 16 and meta['image_size'] == S
    assert meta['vqgan']['sha256'] and meta['teacher']['sha256']

    split = PreparedSplit(out, 'train')
    assert split.codes.shape == (2 * n, 64) and split.codes.dtype == np.uint16
    assert split.text.shape == (2 * n, 16) and split.text.dtype == np.uint16
    assert split.teacher.shape == (2 * n, 16) and split.teacher.dtype == np.float16
    assert open(os.path.join(out, 'train_files.txt')).read().splitlines() == kept
    skipped = [line.split('\t') for line in open(os.path.join(out, 'train_skipped.txt')).read().splitlines()]
    assert {p for p, _ in skipped} == BAD and all(why for _, why in skipped)
    assert open(os.path.join(out, 'val_skipped.txt')).read() == ''
    assert sorted(os.listdir(os.path.join(out, 'shards', 'train'))) == ['finished.json', 'plan.json']

    # every row against the tokenizer and teacher called directly on the same crop (and its mirror image)
    vq, teacher = load_vqgan(world['vq'], image_size=S), Teacher.load(world['teacher'])
    crops = np.stack([center_crop(load_rgb(str(train_dir / p)), S) for p in kept])   # (n, S, S, 3) uint8
    mirrored = crops[:, :, ::-1].copy()
    for half, imgs in ((0, crops), (n, mirrored)):
        assert np.array_equal(split.codes[half:half + n], vq.encode(uint8_to_float(imgs)).numpy())
        feats = teacher.embed(torch.from_numpy(imgs).permute(0, 3, 1, 2)).numpy()        # (n, D) float32
        np.testing.assert_allclose(split.teacher[half:half + n].astype(np.float32), feats, atol=2e-3)
    norms = np.linalg.norm(split.teacher.astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    names = read_class_names()
    captions = open(os.path.join(out, 'train_captions.txt')).read().splitlines()
    assert captions == [f'a photo of a {names[p.split("/")[0]]}.' for p in kept]
    assert np.array_equal(split.text[:n], tokenize_captions(captions, 16))
    assert decode_text(split.text[0]) == 'a photo of a tench .'                       # BPE spells '.' apart
    assert np.array_equal(split.text[:n], split.text[n:])                             # mirrored rows: same text
    val = PreparedSplit(out, 'val')
    assert val.codes.shape == (3, 64) and decode_text(val.text[2]) == 'a photo of a great white shark .'


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_bytes(world, reference):
    """Preparation split over 2 ranks writes the bytes 1 rank writes."""
    out = str(world['dir'] / 'torchrun2')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
           os.path.join('data', 'imagenet', 'prepare.py'), *imagenet_args(world, out)]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert 'rank 0 of 2 has 2 to encode' in proc.stdout            # 4 train shards: two per rank
    assert array_bytes(out) == array_bytes(reference['out'])
    meta, ref_meta = read_meta(out), read_meta(reference['out'])
    for m in (meta, ref_meta):
        m['config'].pop('out_dir'), m.pop('prepare_command')
    assert meta == ref_meta


def test_interrupted_preparation_resumes_to_the_same_bytes(world, reference):
    """An interrupted preparation resumes from its shards to the bytes of an uninterrupted one."""
    out = str(world['dir'] / 'resumed')
    first = run_imagenet(world, out, '--stop_after_shards=1')
    assert first['interrupted'] and first['meta'] is None and first['encoded_shards'] == {'train': 1, 'val': 0}
    assert not os.path.exists(os.path.join(out, 'meta.json'))
    assert sorted(f for f in os.listdir(os.path.join(out, 'shards', 'train')) if f.startswith('shard_')) == \
        ['shard_0000000.json']
    # a crash in the middle of shard 1 would leave some of its rows written but no done file: scribble on them
    codes = np.memmap(os.path.join(out, 'train_codes.bin'), dtype=np.uint16, mode='r+')
    codes[4 * 64:6 * 64] = 65535
    codes.flush()
    del codes
    second = run_imagenet(world, out, '--num_workers=2')                 # decoding in worker processes: same bytes
    assert not second['interrupted'] and second['encoded_shards'] == {'train': 3, 'val': 1}  # shard 0 skipped
    assert array_bytes(out) == array_bytes(reference['out'])
    again = run_imagenet(world, out)                                      # finished: nothing is encoded again
    assert again['encoded_shards'] == {'train': 0, 'val': 0} and array_bytes(out) == array_bytes(reference['out'])
    # other settings (no flip) cannot reuse the train rows: that split starts over (val has no flip: kept)
    plain = run_imagenet(world, out, '--flip=False')
    assert plain['encoded_shards'] == {'train': 4, 'val': 0} and plain['meta']['splits']['train'] == 14
    assert np.array_equal(PreparedSplit(out, 'train').codes, PreparedSplit(reference['out'], 'train').codes[:14])


def test_folder_with_jsonl_and_csv_captions(world):
    """Both caption formats give the same prepared folder; unreadable images are skipped and listed."""
    d = world['dir']
    records = [(f'sub/p{k}.png', f'photo number {k}\nsecond  line') for k in range(6)] + [('sub/missing.png', 'gone')]
    with open(d / 'photos' / 'captions.jsonl', 'w') as f:
        f.writelines(json.dumps(dict(path=p, caption=c, extra=1)) + '\n' for p, c in records)
    common = [f'--vqgan={world["vq"]}', f'--teacher={world["teacher"]}', f'--image_size={S}', '--shard_size=2',
              '--batch_size=2', '--num_workers=0', '--device=cpu']
    out = str(d / 'folder_jsonl')
    result = prepare_folder(configure(FolderConfig(), common + [
        f'--captions={d / "photos" / "captions.jsonl"}', '--val_fraction=0.3', f'--out_dir={out}']), progress=False)
    meta = result['meta']
    assert meta['images']['train'] + meta['images']['val'] == 6 and sum(meta['skipped'].values()) == 1
    assert meta['images']['val'] + meta['skipped']['val'] == 2                   # round(0.3 * 7) records held out
    assert meta['text_len'] == 77 and meta['flip'] == {'train': False, 'val': False}
    files = {s: open(os.path.join(out, f'{s}_files.txt')).read().splitlines() for s in ('train', 'val')}
    assert len(files['val']) == meta['images']['val'] == meta['splits']['val']
    assert sorted(files['train'] + files['val']) == sorted(p for p, _ in records[:6])
    for s in ('train', 'val'):
        assert files[s] == sorted(files[s], key=lambda p: int(p[5:-4]))          # the file's order is kept
        caps = open(os.path.join(out, f'{s}_captions.txt')).read().splitlines()
        assert caps == [f'photo number {p[5:-4]} second line' for p in files[s]]  # whitespace folded
    vq = load_vqgan(world['vq'], image_size=S)
    crop = center_crop(load_rgb(str(d / 'photos' / files['val'][0])), S)
    assert np.array_equal(PreparedSplit(out, 'val').codes[0], vq.encode(uint8_to_float(crop[None]))[0].numpy())

    # CSV captions (images found through image_root) with a separate val file
    with open(d / 'train.csv', 'w') as f:
        f.write('id,path,caption\n' + ''.join(f'{k},sub/p{k}.png,"a photo, number {k}"\n' for k in range(4)))
    with open(d / 'val.csv', 'w') as f:
        f.write('path,caption\nsub/p5.png,the last one\n')
    out = str(d / 'folder_csv')
    meta = prepare_folder(configure(FolderConfig(), common + [
        f'--captions={d / "train.csv"}', f'--val_captions={d / "val.csv"}', f'--image_root={d / "photos"}',
        f'--out_dir={out}', '--text_len=8']), progress=False)['meta']
    assert meta['splits'] == {'train': 4, 'val': 1} and meta['skipped'] == {'train': 0, 'val': 0}
    split = PreparedSplit(out, 'train')
    assert split.text.shape == (4, 8) and decode_text(split.text[2]) == 'a photo , number 2'
    assert open(os.path.join(out, 'val_captions.txt')).read() == 'the last one\n'


def test_bad_inputs_name_the_fix(world, tmp_path):
    """Malformed caption files and missing flags get errors that name the fix."""
    bad_csv = tmp_path / 'c.csv'
    bad_csv.write_text('file,text\na.png,hi\n')
    with pytest.raises(ValueError, match='path and caption'):
        read_captions(str(bad_csv))
    good_csv = tmp_path / 'ok.csv'
    good_csv.write_text('path,caption\nnowhere/a.png,hi\n')
    with pytest.raises(FileNotFoundError, match='image_root'):
        prepare_folder(configure(FolderConfig(), [f'--captions={good_csv}', f'--vqgan={world["vq"]}']))
    (tmp_path / 'cats').mkdir()
    with pytest.raises(ValueError, match='data/folder/prepare.py'):
        list_image_folder(str(tmp_path), read_class_names(), '{}')
