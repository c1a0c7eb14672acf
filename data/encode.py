"""
The shared encoder of the image-folder datasets (data/imagenet, data/folder): a list of (image file, caption) pairs
per split -> the prepared arrays of the data contract (data/common.py):

    {split}_codes.bin    uint16  [rows, T]   VQ codes of the centre crop          (vqgan.py: load_vqgan)
    {split}_teacher.bin  float16 [rows, D]   teacher embedding of the same crop   (teacher.py: Teacher.embed)
    {split}_text.bin     uint16  [rows, L]   the caption's BPE ids, left-padded   (data/common.py)
    {split}_captions.txt one caption per image       {split}_files.txt  one image path per image (relative to root)
    {split}_skipped.txt  'path<TAB>reason' per image that could not be read (empty when none)
    meta.json            sizes, counts, row layout, and which tokenizer / teacher / crop made the arrays

Row layout. Without flip, row i is image i (in the order of the captions / files list). With flip (train split),
rows [0, n) are the images and rows [n, 2n) their mirror images in the same order: row n + i holds the codes and
teacher features of image i flipped left-right and the same text as row i. Line i of the captions and files lists
belongs to rows i and n + i. This is DESIGN's "second set of rows"; LlamaGen keeps the two views side by side too.

Preprocessing (`center_crop`): LlamaGen's `center_crop_arr` (from ADM): halve the image with a box filter while its
short side is at least twice the target, then one bicubic resize that brings the short side to the target, then cut
the centred square. The teacher sees that same uint8 crop (Teacher.embed then resizes it to its own input size and
normalises it), so the codes and the teacher features describe exactly the same pixels; the flip is a flip of the
crop. The VQ input is the crop mapped to [-1, 1] (x / 127.5 - 1, as LlamaGen's Normalize(0.5, 0.5)).

At scale: `torchrun --nproc_per_node=8 data/imagenet/prepare.py ...`. The image list is cut into fixed shards of
`shard_size` images; shard s belongs to rank s % world_size. Each rank writes its rows straight into the final
memmaps (rank 0 creates them; rows sit at fixed positions, so no merge step) and, once a shard's rows are flushed,
drops a small done file for it, out_dir/shards/{split}/shard_NNNNNNN.json (written atomically). An interrupted run,
started again with the same settings, skips the done shards; other settings (image list, crop, flip, tokenizer or
teacher: shards/{split}/plan.json) start that split over. After a barrier rank 0 finishes each split (text array,
readable lists, skipped-image report; shards/{split}/finished.json replaces the done files), then writes meta.json
and prints a summary. Captions are not part of the plan: a new caption template re-tokenizes without re-encoding.

Unreadable images (missing, truncated, not an image) are never silent and never leave garbage rows: while encoding,
their rows stay empty and are recorded in the shard's done file with the reason; the finishing step removes those
rows (one pass that copies the kept rows into new files, only when something was skipped), lists the paths in
{split}_skipped.txt, counts them in meta.json and prints the count. So N is the number of readable images, and a
reader never sees a row that does not come from a real image.

Honest notes:
- Arrays are byte-identical whatever the number of ranks (rows have fixed places, and the batches inside a shard do
  not depend on the rank), given the same batch_size, hardware and thread count: a different batch size may move
  floats by one ulp, enough to flip a near-tie code or a float16 rounding.
- All ranks must see the same filesystem (one machine, or a shared disk): done files are how ranks learn about
  each other's work.
- On CUDA, PyTorch's default lets cuDNN convolutions use TF32; the codes are then those of that arithmetic, as in
  LlamaGen's own extraction script.
"""
import os
import sys
import json
import time
import shutil
import hashlib
import datetime
import functools
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.common import (ARRAYS, array_path, open_for_write, tokenize_captions, write_meta,  # noqa: E402
                         load_text_tokenizer)
from utils import atomic_write_bytes, pick_device  # noqa: E402

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')  # torchvision's set


@dataclass
class EncodeConfig:
    # The settings every image-folder prepare step shares; data/<name>/prepare.py extends this with its inputs.
    out_dir: str = ''                        # where the prepared arrays go (data/<name>/ by default)
    vqgan: str = 'weights/vq_ds16_c2i.pt'    # image tokenizer: LlamaGen's vq_ds16_*.pt or a train_tokenizer.py ckpt
    image_size: int = 256                    # side of the centre crop; codes grid = image_size / downsample
    teacher: str = ''                        # a saved teacher file (Teacher.save); when set, teacher_name is unused
    teacher_name: str = 'ViT-B-16'           # open_clip model name, or 'hf-hub:...' (e.g. BiomedCLIP)
    teacher_pretrained: str = 'laion2b_s34b_b88k'  # open_clip tag or a local weights file (unused for hf-hub names)
    teacher_cache_dir: str = ''              # where open_clip keeps downloaded weights ('' = its default)
    text_len: int = 77                       # caption tokens L (SOT and EOT included); longer captions are cut
    text_tokenizer: str = 'open_clip'        # 'open_clip', or an LLM folder / tokenizer.json / hub id (llm.py)
    flip: bool = False                       # add the mirror image of every train image as a second set of rows
    batch_size: int = 64                     # images per forward pass (the flip doubles it)
    shard_size: int = 1024                   # images per unit of work; the unit that is skipped when resuming
    num_workers: int = 4                     # image-decoding worker processes per rank (0: in the main process)
    device: str = 'auto'                     # 'auto': cuda:LOCAL_RANK when CUDA is there, else cpu
    stop_after_shards: int = 0               # >0: each rank stops after this many shards (simulates a crash; tests)


@dataclass
class SplitItems:
    """One split's inputs: image paths (relative to root) and one caption per image."""
    name: str            # 'train' or 'val'
    root: str            # the folder the paths are relative to
    paths: list          # list[str], one per image
    captions: list       # list[str], one per image
    flip: bool = False   # also encode every image mirrored, as rows [n, 2n)


# ----------------------------------------------------------------------------------------------------------------
# reading and cropping images

def load_rgb(path):
    """Open an image file fully (a truncated file raises here, not later) and return it as an RGB PIL image.
    16-bit greyscale (common for medical PNGs) is scaled to 8 bits rather than clipped."""
    from PIL import Image
    with Image.open(path) as im:
        im.load()
        if im.mode in ('I;16', 'I;16B', 'I;16L', 'I'):
            arr = np.asarray(im, dtype=np.float64)                         # (H, W) in 0..65535
            im = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), mode='L')
        return im.convert('RGB')


def center_crop(image, size):
    """PIL RGB image -> uint8 array (size, size, 3), the ADM / LlamaGen centre crop (see the module docstring)."""
    from PIL import Image
    # Big photos are first halved with a box filter (averages of 2x2 blocks: cheap, alias-free) while the short side
    # stays at least 2 * size, so the final bicubic resize never shrinks by more than 2x.
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)                                                # (H, W, 3), min(H, W) == size
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2    # odd leftovers go to the bottom / right
    return arr[top:top + size, left:left + size].copy()                   # writable, contiguous


def _describe(fn):
    """A stable text for a preprocessing function, for the fingerprint and meta.json: 'center_crop(size=256)'."""
    if isinstance(fn, functools.partial):
        args = [repr(a) for a in fn.args] + [f'{k}={v!r}' for k, v in sorted(fn.keywords.items())]
        return f'{_describe(fn.func)}({", ".join(args)})'
    return getattr(fn, '__qualname__', repr(fn))


class _ImageReader(torch.utils.data.Dataset):
    """Item i -> (i, uint8 crop (S, S, 3) or None, None or the reason it could not be read). Runs in the workers."""

    def __init__(self, root, paths, preprocess):
        self.root, self.paths, self.preprocess = root, paths, preprocess

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return i, np.asarray(self.preprocess(load_rgb(os.path.join(self.root, self.paths[i])))), None
        except Exception as e:  # any failure to decode is this image's problem: recorded, reported, never fatal
            return i, None, f'{type(e).__name__}: {e}'.replace('\n', ' ').replace('\t', ' ')


def _collate(samples):
    """-> (kept indices (b,), uint8 crops (b, S, S, 3) or None, [(index, reason)] of the unreadable ones)."""
    good = [(i, img) for i, img, err in samples if err is None]
    bad = [(i, err) for i, img, err in samples if err is not None]
    idx = np.array([i for i, _ in good], dtype=np.int64)
    return idx, (np.stack([img for _, img in good]) if good else None), bad


# ----------------------------------------------------------------------------------------------------------------
# the process group (torchrun) and its few collective steps

class Ranks:
    """rank / world_size / device of this process; a process group under torchrun (NCCL on CUDA, gloo on CPU)."""

    def __init__(self, device='auto'):
        self.distributed = 'RANK' in os.environ
        self.rank = int(os.environ.get('RANK', 0))
        self.world_size = int(os.environ.get('WORLD_SIZE', 1))
        self.local_rank = int(os.environ.get('LOCAL_RANK', 0))
        self.device = pick_device(device)
        if self.device == 'cuda':
            self.device = f'cuda:{self.local_rank}'
            torch.cuda.set_device(self.local_rank)
        if self.distributed:
            # a long timeout: ranks with no shards left wait at the barrier for the slowest one (e.g. after a resume)
            dist.init_process_group('nccl' if self.device.startswith('cuda') else 'gloo',
                                    timeout=datetime.timedelta(hours=12))

    @property
    def master(self):
        return self.rank == 0

    def barrier(self):
        if self.distributed:
            if self.device.startswith('cuda'):
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def sum(self, value):
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def close(self):
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# progress on disk: a fingerprint of the settings, one done file per shard, a finished record per split

def _progress_dir(out_dir, split):
    return os.path.join(out_dir, 'shards', split)


def _shard_file(out_dir, split, s):
    return os.path.join(_progress_dir(out_dir, split), f'shard_{s:07d}.json')


def _read_json(path):
    with open(path) as f:
        return json.load(f)


def _write_json(path, obj):
    atomic_write_bytes(json.dumps(obj, indent=1).encode(), path)


def _fingerprint(items, cfg, preprocess, vq_id, teacher_id, widths):
    """Everything that decides the codes / teacher rows. Captions are not in it: the text is rebuilt at every finish,
    so a new caption template costs no re-encoding."""
    h = hashlib.sha256(os.path.abspath(items.root).encode())
    for p in items.paths:
        h.update(b'\0' + p.encode())
    return dict(n_images=len(items.paths), images_sha256=h.hexdigest(), flip=bool(items.flip),
                shard_size=cfg.shard_size, preprocess=_describe(preprocess), vqgan_sha256=vq_id['sha256'],
                teacher={k: teacher_id.get(k) for k in ('name', 'pretrained', 'sha256')}, widths=widths)


def _arrays_have_size(out_dir, split, shape_of):
    return all(os.path.exists(array_path(out_dir, split, name)) and os.path.getsize(array_path(out_dir, split, name))
               == int(np.prod(shape)) * np.dtype(ARRAYS[name]).itemsize for name, shape in shape_of.items())


def _plan_split(out_dir, split, plan, shape_of, n_shards):
    """Rank 0, before any rank encodes: keep the progress that still matches, wipe the rest, create the arrays.
    Returns True when the split was already finished with these settings."""
    pdir = _progress_dir(out_dir, split)
    os.makedirs(pdir, exist_ok=True)
    plan_path, finished_path = os.path.join(pdir, 'plan.json'), os.path.join(pdir, 'finished.json')
    same = os.path.exists(plan_path) and _read_json(plan_path) == plan
    if same and os.path.exists(finished_path):
        return True
    all_done = same and all(os.path.exists(_shard_file(out_dir, split, s)) for s in range(n_shards))
    if not same or not (all_done or _arrays_have_size(out_dir, split, shape_of)):
        # other settings, or arrays missing / resized since the shards were marked done: start the split over
        shutil.rmtree(pdir)
        os.makedirs(pdir)
        _write_json(plan_path, plan)
    if not all_done:
        for name, shape in shape_of.items():  # created at full size once here, so the other ranks only reopen (r+)
            open_for_write(out_dir, split, name, shape).flush()
    return False


# ----------------------------------------------------------------------------------------------------------------
# the work: encode this rank's shards

def _encode_shards(items, shards, cfg, preprocess, vq, teacher, shape_of, ranks, progress):
    """Encode the given shards of one split into the memmaps; -> number of shards finished."""
    from tqdm import tqdm
    n, S = len(items.paths), cfg.shard_size
    batches, last_batch_of = [], {}
    for s in shards:
        lo, hi = s * S, min(n, (s + 1) * S)
        for b in range(lo, hi, cfg.batch_size):
            batches.append(list(range(b, min(b + cfg.batch_size, hi))))
        last_batch_of[len(batches) - 1] = s
    if not batches:
        return 0
    arrays = {name: open_for_write(cfg.out_dir, items.name, name, shape) for name, shape in shape_of.items()}
    loader = torch.utils.data.DataLoader(_ImageReader(items.root, items.paths, preprocess), batch_sampler=batches,
                                         num_workers=cfg.num_workers, collate_fn=_collate)
    bar = tqdm(total=sum(len(b) for b in batches), unit='img', disable=not progress,
               desc=f'{items.name} (rank 0 of {ranks.world_size})')
    unreadable, finished = [], 0
    for j, (idx, crops, bad) in enumerate(loader):
        unreadable += [(i, items.paths[i], reason) for i, reason in bad]
        if crops is not None:
            if crops.shape[1:] != (cfg.image_size, cfg.image_size, 3):
                raise ValueError(f'the preprocessing {_describe(preprocess)} returned crops of shape {crops.shape[1:]}'
                                 f', expected ({cfg.image_size}, {cfg.image_size}, 3)')
            x = torch.from_numpy(crops).permute(0, 3, 1, 2)                      # (b, 3, S, S) uint8
            rows = [idx]
            if items.flip:
                x = torch.cat([x, x.flip(-1)])                                    # (2b, 3, S, S): mirrored second
                rows.append(idx + n)
            rows = np.concatenate(rows)
            x = x.to(ranks.device)
            codes = vq.encode(x.float() / 127.5 - 1.0)                            # (b', T) long
            feats = teacher.embed(x, batch_size=len(x))                          # (b', D) float32, unit norm
            arrays['codes'][rows] = codes.cpu().numpy().astype(np.uint16)
            arrays['teacher'][rows] = feats.cpu().numpy().astype(np.float16)
        bar.update(len(batches[j]))
        if j in last_batch_of:  # the shard is complete: make its rows durable, then say so
            for a in arrays.values():
                a.flush()
            s = last_batch_of[j]
            _write_json(_shard_file(cfg.out_dir, items.name, s), dict(shard=s, unreadable=unreadable))
            unreadable, finished = [], finished + 1
    bar.close()
    del loader, arrays
    return finished


# ----------------------------------------------------------------------------------------------------------------
# finishing a split (rank 0): drop unreadable rows, write text and the readable lists

def _compact(out_dir, split, name, width, keep, n, copies, chunk=65536):
    """Rewrite {split}_{name}.bin keeping rows keep (+ c * n for every copy c); atomic per file, and idempotent:
    a file already at the kept size is left alone (a finish interrupted halfway resumes here)."""
    path, dtype = array_path(out_dir, split, name), np.dtype(ARRAYS[name])
    full, kept = copies * n * width * dtype.itemsize, copies * len(keep) * width * dtype.itemsize
    size = os.path.getsize(path) if os.path.exists(path) else -1
    if size == kept:
        return
    if size != full:
        raise RuntimeError(f'{path} has {size} bytes, expected {full} (all rows) or {kept} (readable rows only); '
                           f'delete {_progress_dir(out_dir, split)} to encode the split again')
    src = np.memmap(path, dtype=dtype, mode='r', shape=(copies * n, width))
    tmp = os.path.join(out_dir, f'.tmp_{split}_{name}.bin')
    dst = np.memmap(tmp, dtype=dtype, mode='w+', shape=(copies * len(keep), width))
    for c in range(copies):
        for a in range(0, len(keep), chunk):
            part = keep[a:a + chunk]                                             # (k,) rows of copy c to keep
            dst[c * len(keep) + a:c * len(keep) + a + len(part)] = src[part + c * n]
    dst.flush()
    del src, dst
    os.replace(tmp, path)


def _finish_split(items, cfg, plan, shape_of, n_shards):
    """-> dict of this split's counts. Safe to run again: every step checks what is already on disk."""
    out, split, n = cfg.out_dir, items.name, len(items.paths)
    pdir = _progress_dir(out, split)
    finished_path = os.path.join(pdir, 'finished.json')
    if os.path.exists(finished_path):
        unreadable = _read_json(finished_path)['unreadable']
    else:
        unreadable = []
        for s in range(n_shards):
            unreadable += _read_json(_shard_file(out, split, s))['unreadable']
    bad = np.array(sorted(i for i, _, _ in unreadable), dtype=np.int64)
    keep = np.setdiff1d(np.arange(n), bad)                                       # (n_kept,) sorted
    atomic_write_bytes(''.join(f'{p}\t{why}\n' for _, p, why in sorted(unreadable)).encode(),
                       os.path.join(out, f'{split}_skipped.txt'))
    if len(keep) == 0:
        raise RuntimeError(f'none of the {n} {split} images could be read (first error: {unreadable[0][2]}); see '
                           f'{os.path.join(out, f"{split}_skipped.txt")} and check the image paths')
    copies = 2 if items.flip else 1
    for name, shape in shape_of.items():
        _compact(out, split, name, shape[1], keep, n, copies)
    captions = [' '.join(items.captions[i].split()) for i in keep]               # one line each, whitespace folded
    unique, inverse = np.unique(np.array(captions, dtype=object), return_inverse=True)  # ImageNet: 1000 strings
    text = tokenize_captions(list(unique), cfg.text_len, tokenizer=load_text_tokenizer(cfg.text_tokenizer))
    text = text[inverse]                                                         # (n_kept, L)
    text_rows = open_for_write(out, split, 'text', (copies * len(keep), cfg.text_len), text.dtype)
    text_rows[:] = np.concatenate([text] * copies)
    text_rows.flush()
    del text_rows
    atomic_write_bytes(''.join(c + '\n' for c in captions).encode(), os.path.join(out, f'{split}_captions.txt'))
    atomic_write_bytes(''.join(items.paths[i] + '\n' for i in keep).encode(), os.path.join(out, f'{split}_files.txt'))
    if not os.path.exists(finished_path):
        _write_json(finished_path, dict(plan=plan, unreadable=unreadable))
        for s in range(n_shards):  # their content now lives in finished.json
            os.remove(_shard_file(out, split, s))
    return dict(rows=copies * len(keep), images=len(keep), skipped=len(unreadable), flip=bool(items.flip),
                listed=n)


# ----------------------------------------------------------------------------------------------------------------
# the whole prepare step

def load_teacher(cfg, device):
    """The frozen teacher of cfg: a saved file (cfg.teacher) or an open_clip model by name."""
    from teacher import Teacher
    if cfg.teacher:
        return Teacher.load(cfg.teacher, device=device, cache_dir=cfg.teacher_cache_dir or None)
    hub = cfg.teacher_name.startswith(('hf-hub:', 'local-dir:'))  # these bring their own weights: no tag
    return Teacher(cfg.teacher_name, pretrained=None if hub else cfg.teacher_pretrained or None, device=device,
                   cache_dir=cfg.teacher_cache_dir or None)


def command_line(cfg, script):
    """The command that reproduces cfg: `python SCRIPT --key=value` for every setting off its default."""
    default = type(cfg)()
    return ' '.join([f'python {script}'] + [f'--{k}={v}' for k, v in asdict(cfg).items()
                                            if v != getattr(default, k) and k != 'stop_after_shards'])


def prepare(cfg, splits, dataset, script, preprocess=None, source=None, progress=True):
    """Encode every SplitItems of `splits` into cfg.out_dir and write meta.json (see the module docstring).

    Run it in every process of a torchrun job, or in a single process. script: the prepare script (for the command
    recorded in meta.json). preprocess: PIL RGB image -> uint8 (image_size, image_size, 3), default center_crop at
    cfg.image_size. source: extra facts for meta.json.
    Returns dict(meta=the meta.json dict on rank 0 (None on other ranks or when interrupted), encoded_shards={split:
    shards this rank encoded}, interrupted=bool)."""
    from vqgan import load_vqgan, vqgan_identity
    preprocess = preprocess or functools.partial(center_crop, size=cfg.image_size)
    if not cfg.out_dir:
        raise ValueError('out_dir is empty: say where the prepared arrays go (--out_dir=data/<name>)')
    if cfg.shard_size < 1 or cfg.batch_size < 1:
        raise ValueError(f'shard_size={cfg.shard_size} and batch_size={cfg.batch_size} must be positive')
    load_text_tokenizer(cfg.text_tokenizer)  # a bad --text_tokenizer fails now, not after the images are encoded
    t0 = time.time()
    ranks = Ranks(cfg.device)
    try:
        if ranks.master:
            os.makedirs(cfg.out_dir, exist_ok=True)
        vq = load_vqgan(cfg.vqgan, image_size=cfg.image_size).to(ranks.device)
        if vq.codebook_size > 65536:
            raise ValueError(f'the tokenizer has {vq.codebook_size} codes: more than uint16 codes can hold')
        # rank 0 builds the teacher first: a named model may download its weights, and one download is enough
        teacher = load_teacher(cfg, ranks.device) if ranks.master else None
        ranks.barrier()
        teacher = teacher or load_teacher(cfg, ranks.device)
        vq_id = vqgan_identity(cfg.vqgan, image_size=cfg.image_size)
        teacher_id = teacher.identity()
        if teacher_id.get('path'):
            teacher_id['path'] = os.path.abspath(teacher_id['path'])
        T = vq.grid[0] * vq.grid[1]
        progress = progress and ranks.master

        plans = {}
        for items in splits:  # rank 0 reconciles what is on disk with these settings before anyone writes
            n = len(items.paths)
            if n == 0 or len(items.captions) != n:
                raise ValueError(f'split {items.name!r}: {n} images and {len(items.captions)} captions; need the '
                                 f'same number, at least one')
            copies = 2 if items.flip else 1
            shape_of = {'codes': (copies * n, T), 'teacher': (copies * n, teacher.dim)}
            n_shards = -(-n // cfg.shard_size)
            plan = _fingerprint(items, cfg, preprocess, vq_id, teacher_id, dict(codes=T, teacher=teacher.dim))
            plans[items.name] = (plan, shape_of, n_shards)
            if ranks.master and not _plan_split(cfg.out_dir, items.name, plan, shape_of, n_shards):
                if os.path.exists(os.path.join(cfg.out_dir, 'meta.json')):
                    os.remove(os.path.join(cfg.out_dir, 'meta.json'))  # the arrays are about to change
        ranks.barrier()

        def my_undone_shards(items):
            if os.path.exists(os.path.join(_progress_dir(cfg.out_dir, items.name), 'finished.json')):
                return []
            return [s for s in range(ranks.rank, plans[items.name][2], ranks.world_size)
                    if not os.path.exists(_shard_file(cfg.out_dir, items.name, s))]

        encoded, budget = {}, cfg.stop_after_shards or None
        for items in splits:
            todo = my_undone_shards(items)[:budget]
            if progress:
                print(f'{items.name}: {len(items.paths):,} images{" (+ mirrored rows)" if items.flip else ""} in '
                      f'{plans[items.name][2]} shards of {cfg.shard_size}; rank 0 of {ranks.world_size} has '
                      f'{len(todo)} to encode')
            encoded[items.name] = _encode_shards(items, todo, cfg, preprocess, vq, teacher, plans[items.name][1],
                                                 ranks, progress)
            budget = None if budget is None else budget - encoded[items.name]
        # only a complete set of shards is finished: every rank counts what it left undone (stop_after_shards)
        left = ranks.sum(sum(len(my_undone_shards(items)) for items in splits))
        if left:
            if ranks.master:
                print(f'stopped with {left} shards still to encode; run the same command again to resume')
            return dict(meta=None, encoded_shards=encoded, interrupted=True)
        meta = None
        if ranks.master:
            counts = {items.name: _finish_split(items, cfg, *plans[items.name]) for items in splits}
            meta = dict(
                dataset=dataset,
                splits={k: c['rows'] for k, c in counts.items()},
                **{f'n_{k}': c['rows'] for k, c in counts.items()},
                images={k: c['images'] for k, c in counts.items()},
                skipped={k: c['skipped'] for k, c in counts.items()},
                flip={k: c['flip'] for k, c in counts.items()},
                row_layout='row i is image i (line i of {split}_captions.txt and {split}_files.txt); with flip, '
                           'row images[split] + i is image i mirrored left-right, with the same text',
                image_size=cfg.image_size, grid=list(vq.grid), image_tokens=T, codebook_size=vq.codebook_size,
                text_len=cfg.text_len, **load_text_tokenizer(cfg.text_tokenizer).meta(),
                captions={k: f'{k}_captions.txt' for k in counts}, files={k: f'{k}_files.txt' for k in counts},
                teacher=teacher_id, teacher_dim=teacher.dim, vqgan=vq_id,
                preprocess=_describe(preprocess) + ': short side resized, centre square; the teacher embeds the '
                                                   'same crop',
                source=source or {}, config=asdict(cfg), prepare_command=command_line(cfg, script))
            write_meta(cfg.out_dir, meta)
            for k, c in counts.items():
                skipped = (f', {c["skipped"]} unreadable images skipped (listed in '
                           f'{os.path.join(cfg.out_dir, f"{k}_skipped.txt")})') if c['skipped'] else ', none skipped'
                print(f'{k}: {c["images"]:,} of {c["listed"]:,} images -> {c["rows"]:,} rows'
                      f'{" (with flips)" if c["flip"] else ""}{skipped}')
            print(f'prepared {dataset} in {cfg.out_dir} in {time.time() - t0:.1f}s: codes {T} per image '
                  f'({vq.grid[0]}x{vq.grid[1]}, K={vq.codebook_size}), text_len {cfg.text_len}, teacher '
                  f'{teacher_id["name"]} (D={teacher.dim})')
        return dict(meta=meta, encoded_shards=encoded, interrupted=False)
    finally:
        ranks.close()


# ----------------------------------------------------------------------------------------------------------------
# patch targets: the teacher's patch features on the code grid, for train.py --align_target=patch|both (REPA-style
# alignment; docs/global-vs-patch.md). Written by the shapes encode step (data/shapes/prepare.py --patch_targets=True);
# the image-folder path above does not write them: at ImageNet scale they would take 1.28M x 256 x 768 x 2 bytes
# ~ 500 GB, and the way out there is running the teacher inside the training step, as LlamaGen-REPA does.

PATCH_DTYPE = np.float16


def resample_patch_grid(tokens, src_grid, dst_grid):
    """Patch tokens float (N, h*w, D) in raster order on src_grid (h, w) -> float32 (N, H*W, D) on dst_grid (H, W),
    each vector L2-normalised. Resampling is average pooling (F.adaptive_avg_pool2d): code cell (r, c) takes the mean
    of the teacher patches its area covers (exactly k x k of them when the teacher grid is k times finer; when it is
    coarser, the one or two it falls in). The same grid passes through unchanged apart from the normalisation."""
    import torch.nn.functional as F
    tokens = torch.as_tensor(tokens).float()
    N, n, D = tokens.shape
    (h, w), (H, W) = src_grid, dst_grid
    if n != h * w:
        raise ValueError(f'{n} patch tokens do not fill a {h}x{w} grid')
    if (h, w) != (H, W):
        x = tokens.transpose(1, 2).reshape(N, D, h, w)                    # (N, D, h, w)
        tokens = F.adaptive_avg_pool2d(x, (H, W)).flatten(2).transpose(1, 2)  # (N, H*W, D)
    return F.normalize(tokens, dim=-1)                                      # (N, T, D)


def _is_vit_teacher(teacher):
    return isinstance(getattr(teacher, 'grid', None), int)  # teacher.ViTTeacher: a square grid of its own


def teacher_patch_grid(teacher):
    """(h, w) of a teacher's patch tokens: a ViTTeacher's grid, or a CLIP's vision-tower grid (image / patch size)."""
    if _is_vit_teacher(teacher):
        return (teacher.grid, teacher.grid)
    grid = getattr(getattr(teacher.model, 'visual', None), 'grid_size', None)
    if grid is None:
        raise ValueError(f'the teacher {teacher.name} has no patch grid (its vision tower is not a ViT)')
    return tuple(int(g) for g in grid)


def teacher_patch_dim(teacher):
    """Width of a teacher's patch tokens: a ViTTeacher's embedding width, a CLIP's vision-tower width."""
    if _is_vit_teacher(teacher):
        return teacher.dim
    teacher_patch_grid(teacher)  # a clear error for a teacher without patch tokens
    return teacher.model.visual.transformer.width


def embed_patch_dataset(teacher, images, grid, batch_size=256, progress=True, with_global=False):
    """uint8 (N, H, W, 3) images -> float16 (N, T, D_p) patch targets on the code grid: the teacher's last-block
    patch tokens after its final LayerNorm, before the projection (Teacher.embed(return_tokens=True); the CLS token
    left out), resampled to `grid` (resample_patch_grid), unit norm. with_global=True also returns the global
    embeddings float16 (N, D) of the same forward passes (embed_dataset's array), so a costly teacher runs once."""
    from teacher import image_batches
    src = teacher_patch_grid(teacher)
    out, emb = None, np.empty((len(images), teacher.dim), dtype=np.float16) if with_global else None
    with torch.inference_mode():  # the features only go to numpy
        for i, x in image_batches(images, batch_size, f'patch tokens {teacher.name}', progress):  # (b, 3, H, W)
            glob, tokens = teacher.embed(x, batch_size=batch_size, return_tokens=True)    # (b, D), (b, h*w, width)
            cells = resample_patch_grid(tokens.cpu(), src, grid).numpy()                    # (b, T, width)
            if out is None:
                out = np.empty((len(images), *cells.shape[1:]), dtype=PATCH_DTYPE)
            out[i:i + len(x)] = cells
            if with_global:
                emb[i:i + len(x)] = glob.cpu().numpy()
    return (emb, out) if with_global else out


def resample_note(src_grid, grid):
    """meta.json's words for how resample_patch_grid took a teacher's patch grid to the code grid."""
    if tuple(src_grid) == tuple(grid):
        return 'none: the teacher grid is the code grid'
    return (f'average pooling {src_grid[0]}x{src_grid[1]} -> {grid[0]}x{grid[1]} (F.adaptive_avg_pool2d), '
            f'then L2-normalised')


def patch_targets_nbytes(n_rows, image_tokens, dim):
    return n_rows * image_tokens * dim * np.dtype(PATCH_DTYPE).itemsize


def announce_patch_targets(out_dir, rows, image_tokens, dim):
    """Print what the patch memmaps will take on disk, before anything is computed or written."""
    total = sum(patch_targets_nbytes(n, image_tokens, dim) for n in rows.values())
    each = ', '.join(f'{s} ({n:,}, {image_tokens}, {dim})' for s, n in rows.items())
    print(f'patch targets for {out_dir}: {each} float16 = {total / 2**20:,.1f} MiB '
          f'(N x T x D x 2 bytes; ImageNet at 256 codes and D = 768 would take ~500 GB)')
    return total


def write_patch_targets(out_dir, split, array):
    """Write {split}_teacher_patch.bin (float16 (N, T, D)) and return its sha256."""
    from utils import file_sha256
    if array.ndim != 3 or array.dtype != PATCH_DTYPE:
        raise ValueError(f'patch targets are float16 (N, T, D), got {array.dtype} {array.shape}')
    out = open_for_write(out_dir, split, 'teacher_patch', array.shape, PATCH_DTYPE)
    out[:] = array
    out.flush()
    del out
    return file_sha256(array_path(out_dir, split, 'teacher_patch'))


def patch_meta(teacher_identity, source_grid, grid, dim, resample, sha256):
    """meta.json's `teacher_patch` record: which teacher, its patch grid and the code grid, width, dtype, how the
    grid was resampled, and each split file's sha256."""
    return dict(teacher=teacher_identity, source_grid=list(source_grid), grid=list(grid), dim=int(dim),
                dtype=np.dtype(PATCH_DTYPE).name, resample=resample, layout='(N, T, D) raster order, L2-normalised',
                files={s: f'{s}_teacher_patch.bin' for s in sha256}, sha256=dict(sha256))
