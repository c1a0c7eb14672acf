"""
Render the `shapes` dataset (see data/shapes/README.md for the world's rules).

    python data/shapes/prepare.py                      # 20,000 train + 1,000 val images at 32x32, a few seconds
    python data/shapes/prepare.py --image_size=64 --out_dir=data/shapes64
    python data/shapes/prepare.py --world=plan --out_dir=data/shapes_plan   # the plan world (plan_world.py)

Writes into out_dir:
    {split}_images.npy    uint8 (N, H, W, 3)       what the tokenizer, teacher and evaluator read
    {split}_captions.txt  one caption per line     readable, and the text the GPT is conditioned on
    {split}_scenes.jsonl  one scene record a line  the ground truth each caption and image came from
    render.json           the render settings
    preview.png           the first 32 train images with their captions, for a person to look at

The encode stage turns the rendered pairs into the prepared arrays of the data contract (data/common.py), once the
shapes tokenizer and teacher exist:

    python data/shapes/train_tokenizer.py              # -> out/vqgan_shapes/ckpt.pt
    python data/shapes/train_teacher.py                # -> out/teacher_shapes/teacher.pt
    python data/shapes/prepare.py --stage=encode       # (or --stage=all: render, then encode)
    python data/shapes/prepare.py --stage=encode --text_tokenizer=path/to/SmolLM2-135M   # to train from that LLM

and writes, next to the images:
    {split}_codes.bin     uint16 (N, T)            VQ codes, T = 8x8 = 64 at 32 px
    {split}_text.bin      uint16 (N, 28)           the caption's text-tokenizer ids, left-padded
    {split}_teacher.bin   float16 (N, D)           the teacher's L2-normalised global embedding of the image
    meta.json             sizes, and the identity (path, sha256) of the tokenizer and teacher that made them

and with --patch_targets=True (for train.py --align_target=patch|both; added to an encoded dir without redoing it):
    {split}_teacher_patch.bin  float16 (N, T, D_p)  the teacher's patch features on the code grid (teachers.py)
"""
import os
import sys
import json
import time
from dataclasses import dataclass, asdict, fields

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import configure  # noqa: E402
from utils import save_image_grid, atomic_write_bytes, pick_device  # noqa: E402
from data.common import load_split  # noqa: E402
from data.shapes.worlds import make_split, WORLDS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class RenderConfig:
    out_dir: str = HERE        # where the arrays go (default: next to this file, as nanoGPT's data/<name>/)
    image_size: int = 32       # 32 (default) or 64; any size >= 24 renders
    n_train: int = 20_000
    n_val: int = 1_000
    seed: int = 1337           # train uses seed, val uses seed + 1: disjoint, reproducible streams
    world: str = 'default'     # 'default' (world.py) or 'plan' (plan_world.py: captions that leave the layout open)


def render_dataset(cfg: RenderConfig, progress=True):
    """Render both splits into cfg.out_dir. Skips the work when the same settings were already rendered."""
    if cfg.image_size < 24:
        raise ValueError(f'image_size={cfg.image_size} is too small to draw shapes; use 32 or 64')
    if cfg.world not in WORLDS:
        raise ValueError(f'--world={cfg.world!r}: choose one of {", ".join(WORLDS)}')
    os.makedirs(cfg.out_dir, exist_ok=True)
    stamp_path = os.path.join(cfg.out_dir, 'render.json')
    stamp = asdict(cfg) | {'out_dir': None}
    if cfg.world == 'default':  # recorded only when not the default, so folders rendered before the option stay valid
        del stamp['world']
    if os.path.exists(stamp_path) and json.load(open(stamp_path)) == stamp:
        print(f'shapes already rendered in {cfg.out_dir} with these settings; skipping')
        return
    t0 = time.time()
    for split, n, seed in (('train', cfg.n_train, cfg.seed), ('val', cfg.n_val, cfg.seed + 1)):
        scenes, images, captions = make_split(n, seed, cfg.image_size, progress=progress, world=cfg.world)
        np.save(os.path.join(cfg.out_dir, f'{split}_images.npy.tmp.npy'), images)
        os.replace(os.path.join(cfg.out_dir, f'{split}_images.npy.tmp.npy'), os.path.join(cfg.out_dir, f'{split}_images.npy'))
        atomic_write_bytes(('\n'.join(captions) + '\n').encode(), os.path.join(cfg.out_dir, f'{split}_captions.txt'))
        atomic_write_bytes(''.join(json.dumps(s) + '\n' for s in scenes).encode(),
                           os.path.join(cfg.out_dir, f'{split}_scenes.jsonl'))
        if split == 'train':
            k = min(32, n)
            save_image_grid(images[:k], os.path.join(cfg.out_dir, 'preview.png'), nrow=1, scale=2,
                            captions=captions[:k], caption_width=6 * 70)
            # nrow=1 puts each image on its own row with its caption beside it
    atomic_write_bytes(json.dumps(stamp, indent=1).encode(), stamp_path)
    print(f'rendered {cfg.n_train} train + {cfg.n_val} val images at {cfg.image_size}x{cfg.image_size} '
          f'into {cfg.out_dir} in {time.time() - t0:.1f}s; preview: {os.path.join(cfg.out_dir, "preview.png")}')


# ----------------------------------------------------------------------------------------------------------------
# the encode stage: rendered pairs -> the prepared arrays train.py reads

SHAPES_TEXT_LEN = 28  # the longest shapes caption is 24 BPE tokens with SOT and EOT; 4 to spare


@dataclass
class PrepareConfig(RenderConfig):
    stage: str = 'render'                             # 'render' | 'encode' | 'all' (render, then encode)
    vqgan: str = 'out/vqgan_shapes/ckpt.pt'           # image tokenizer (data/shapes/train_tokenizer.py)
    teacher_kind: str = 'clip'                        # 'clip', 'clip_strong' or 'scene' (data/shapes/teachers.py)
    teacher: str = ''                                 # CLIP checkpoint; '' = the kind's (out/teacher_shapes/teacher.pt)
    text_len: int = SHAPES_TEXT_LEN                   # L: text block length of the GPT
    text_tokenizer: str = 'open_clip'                 # 'open_clip', or an LLM folder / tokenizer.json / hub id
    batch_size: int = 32                              # images per tokenizer / teacher forward pass (on a CPU
    #                                                   32 beats 256 ~2x per image: activations stay in cache)
    patch_targets: bool = False                       # also write {split}_teacher_patch.bin (REPA-style targets)
    device: str = 'auto'                              # 'auto' = cuda when available


def _require_file(path, what, command):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{what} {path!r} not found: make it with `{command}` (from the repository root), '
                                f'or pass its path with --{what.split()[0]}=PATH')


def encode_dataset(cfg: PrepareConfig, progress=True):
    """Write {split}_codes/_text/_teacher.bin and meta.json into cfg.out_dir from the rendered images and captions.
    Skips the work when meta.json already records the same tokenizer, teacher (sha256), text_len and renders.
    Returns the meta dict."""
    from data.common import tokenize_captions, open_for_write, write_meta, read_meta, array_path, load_text_tokenizer
    from vqgan import load_vqgan, encode_images, vqgan_identity
    from data.shapes import teachers
    from data.shapes.caption_r2 import caption_r2

    _require_file(cfg.vqgan, 'vqgan checkpoint', 'python data/shapes/train_tokenizer.py')
    teacher_path = teachers.teacher_checkpoint(cfg.teacher_kind, cfg.teacher)
    if teacher_path:
        _require_file(teacher_path, 'teacher checkpoint', 'python data/shapes/train_teacher.py' +
                      (' --preset=strong' if cfg.teacher_kind == 'clip_strong' else ''))
    render_path = os.path.join(cfg.out_dir, 'render.json')
    if not os.path.exists(render_path):
        raise FileNotFoundError(f'{render_path} not found: render the images first with '
                                f'`python data/shapes/prepare.py` (or --stage=all)')
    with open(render_path) as f:
        render = json.load(f)
    splits = {split: load_split(cfg.out_dir, split) for split in ('train', 'val')}  # (images memmap, captions)
    for split, (images, captions) in splits.items():
        if len(images) != len(captions):
            raise ValueError(f'{split}: {len(images)} images but {len(captions)} captions in {cfg.out_dir}; '
                             f're-render with `python data/shapes/prepare.py`')

    # The identity of what would be written; if meta.json already says exactly this, the arrays are up to date.
    vq_id = vqgan_identity(cfg.vqgan)
    device = pick_device(cfg.device)
    teacher = teachers.load_teacher(cfg.teacher_kind, cfg.teacher, device)
    teacher_sha = teacher.identity()['sha256']
    text_tok = load_text_tokenizer(cfg.text_tokenizer)
    wanted = dict(render=render, text_len=cfg.text_len, vqgan_sha256=vq_id['sha256'], teacher_sha256=teacher_sha,
                  text_tokenizer=text_tok.identity())
    if os.path.exists(os.path.join(cfg.out_dir, 'meta.json')):
        old = read_meta(cfg.out_dir)
        have = dict(render=old.get('render'), text_len=old.get('text_len'),
                    vqgan_sha256=old.get('vqgan', {}).get('sha256'),
                    teacher_sha256=old.get('teacher', {}).get('sha256'), text_tokenizer=old.get('text_tokenizer'))
        if have == wanted and all(os.path.exists(array_path(cfg.out_dir, s, a))
                                  for s in splits for a in ('codes', 'text', 'teacher')):
            print(f'{cfg.out_dir} is already encoded with this tokenizer and teacher; skipping')
            return encode_patch_targets(cfg, old, teacher, splits, progress) if cfg.patch_targets else old
        os.remove(os.path.join(cfg.out_dir, 'meta.json'))  # the arrays are about to change: never a stale meta

    vq = load_vqgan(cfg.vqgan)
    image_size = splits['train'][0].shape[1]
    if vq.image_size != image_size:
        raise ValueError(f'the tokenizer {cfg.vqgan} takes {vq.image_size}px images but {cfg.out_dir} holds '
                         f'{image_size}px ones: train a tokenizer on this data '
                         f'(python data/shapes/train_tokenizer.py --data_dir={cfg.out_dir})')
    print(f'encoding {cfg.out_dir}: tokenizer {cfg.vqgan} ({vq.grid[0]}x{vq.grid[1]} codes of {vq.codebook_size}), '
          f'teacher {cfg.teacher_kind} {teacher_path or ""} (D = {teacher.dim}), text_len {cfg.text_len}, on {device}')
    t0 = time.time()
    feats = {}
    for split, (images, captions) in splits.items():
        codes = encode_images(vq, images, cfg.batch_size, device, progress)           # (N, T) uint16
        feats[split] = teachers.embed_split(teacher, cfg.out_dir, split, images, cfg.batch_size, progress)  # (N, D)
        text = tokenize_captions(captions, cfg.text_len, tokenizer=text_tok)          # (N, L) uint16
        for name, array in (('codes', codes), ('text', text), ('teacher', feats[split])):
            out = open_for_write(cfg.out_dir, split, name, array.shape, array.dtype)
            out[:] = array
            out.flush()
            del out
    meta = dict(
        dataset='shapes',
        splits={split: len(images) for split, (images, _) in splits.items()},
        n_train=len(splits['train'][0]), n_val=len(splits['val'][0]),
        image_size=image_size, grid=list(vq.grid), image_tokens=vq.grid[0] * vq.grid[1],
        codebook_size=vq.codebook_size,
        text_len=cfg.text_len, **text_tok.meta(),
        teacher=teacher.identity(), teacher_dim=teacher.dim, teacher_kind=cfg.teacher_kind,
        teacher_caption_r2=caption_r2(splits['train'][1], feats['train'], splits['val'][1], feats['val']),
        vqgan=vq_id,
        captions={split: f'{split}_captions.txt' for split in splits},
        render=render,
        prepare_command=' '.join(['python data/shapes/prepare.py --stage=encode'] + [
            f'--{f.name}={getattr(cfg, f.name)}' for f in fields(cfg)
            if f.name != 'stage' and getattr(cfg, f.name) != getattr(PrepareConfig(), f.name)]),
    )
    write_meta(cfg.out_dir, meta)  # last: a run cut short leaves no meta.json, so nothing reads half-made arrays
    print(f'encoded {meta["n_train"]} train + {meta["n_val"]} val pairs in {time.time() - t0:.1f}s into {cfg.out_dir}')
    return encode_patch_targets(cfg, meta, teacher, splits, progress) if cfg.patch_targets else meta


def encode_patch_targets(cfg, meta, teacher, splits, progress=True):
    """Add {split}_teacher_patch.bin (float16 (N, T, D_p) on the code grid) and meta.json's `teacher_patch` to an
    encoded dir; skipped when they are there for this teacher. meta.json loses the record while the files change,
    so a cut-short run leaves no stale one. -> the new meta."""
    from data.common import open_patch_targets, write_meta
    from data.encode import announce_patch_targets, write_patch_targets, patch_meta, teacher_patch_dim
    from data.shapes import teachers
    rec, grid = meta.get('teacher_patch'), tuple(meta['grid'])
    scene = isinstance(teacher, teachers.SceneTeacher)
    expected = teachers.ScenePatchTeacher().identity() if scene else teacher.identity()
    def same(a, b):  # the same teacher, wherever its file now lies
        return a.get('sha256') is not None and all(a.get(k) == b.get(k) for k in ('name', 'sha256'))
    if isinstance(rec, dict) and same(rec.get('teacher', {}), expected) and \
            all(open_patch_targets(cfg.out_dir, s, meta) is not None for s in splits):
        print(f'{cfg.out_dir} already holds patch targets of this teacher; skipping')
        return meta
    dim = teachers.SCENE_DIM if scene else teacher_patch_dim(teacher)
    announce_patch_targets(cfg.out_dir, meta['splits'], meta['image_tokens'], dim)
    meta = {k: v for k, v in meta.items() if k != 'teacher_patch'}
    write_meta(cfg.out_dir, meta)
    sha, t0 = {}, time.time()
    for split, (images, _) in splits.items():
        array, ident, src, how = teachers.patch_split(teacher, cfg.out_dir, split, images, grid, cfg.batch_size,
                                                      progress)                            # (N, T, D_p) float16
        assert array.shape == (meta['splits'][split], meta['image_tokens'], dim), array.shape
        sha[split] = write_patch_targets(cfg.out_dir, split, array)
    meta = dict(meta, teacher_patch=patch_meta(ident, src, grid, dim, how, sha))
    write_meta(cfg.out_dir, meta)
    print(f'wrote patch targets ({ident["name"]}, {grid[0]}x{grid[1]} x {dim}) in {time.time() - t0:.1f}s')
    return meta


if __name__ == '__main__':
    config = configure(PrepareConfig(), sys.argv[1:])
    if config.stage not in ('render', 'encode', 'all'):
        raise SystemExit(f"--stage={config.stage!r}: choose 'render', 'encode' or 'all'")
    try:
        if config.stage in ('render', 'all'):
            render_dataset(RenderConfig(**{f.name: getattr(config, f.name) for f in fields(RenderConfig)}))
        if config.stage in ('encode', 'all'):
            encode_dataset(config)
    except (FileNotFoundError, ValueError) as e:  # bad input: the message says what to run; no traceback needed
        raise SystemExit(f'error: {e}')
