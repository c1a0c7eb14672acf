"""
The prepared-data contract shared by every dataset (see data/<name>/prepare.py) and by train.py / sample.py.

A prepared dataset folder holds, for each split, plain memmapped arrays (nanoGPT's .bin idea, so training reads a
batch with no decoding):

    {split}_codes.bin    uint16  [N, T]   VQ codes of each image, raster order (T = grid_h * grid_w)
    {split}_text.bin     uint16  [N, L]   open_clip BPE ids of the caption, left-padded with TEXT_PAD_ID
    {split}_teacher.bin  float16 [N, D]   the frozen teacher's L2-normalised global embedding of the same image
    meta.json            sizes, shapes, dtypes, and which tokenizer / teacher made the arrays (name, path, sha256)

Before encoding, a dataset whose images fit in one array (shapes) keeps them as

    {split}_images.npy   uint8   [N, H, W, 3]  the images the tokenizer and teacher are trained on and encode
    {split}_captions.txt one caption per line (and, for shapes, {split}_scenes.jsonl: the ground truth of each)

Text layout: [PAD ... PAD, SOT, t_1 .. t_k, EOT]. Left padding keeps the last text token right before the image, so
the model sees the same relative positions whatever the caption length. The empty caption [PAD ... SOT, EOT] is the
unconditional prompt used for classifier-free guidance.
"""
import os
import json
import warnings
from functools import lru_cache

import numpy as np
import torch

from utils import file_sha256

# open_clip's BPE vocabulary has 49408 entries, SOT=49406 and EOT=49407; id 0 is a real token ('!'), so the pad gets
# its own id just past the vocabulary. The GPT's text embedding table therefore has 49409 rows.
TEXT_SOT_ID = 49406
TEXT_EOT_ID = 49407
TEXT_PAD_ID = 49408
TEXT_VOCAB_SIZE = 49409

_bpe = None


def _tokenizer():
    global _bpe
    if _bpe is None:
        from open_clip.tokenizer import SimpleTokenizer  # ships its vocabulary in the wheel: works offline
        _bpe = SimpleTokenizer()
    return _bpe


def tokenize_captions(captions, text_len, warn=True):
    """Captions -> uint16 (N, text_len): [PAD.., SOT, bpe.., EOT]. Longer captions are truncated (EOT kept) with a
    warning that says by how much, so a too-small text_len is noticed."""
    if text_len < 2:
        raise ValueError(f'text_len={text_len} cannot hold SOT and EOT; use at least 2')
    out = np.full((len(captions), text_len), TEXT_PAD_ID, dtype=np.uint16)
    n_cut, longest = 0, 0
    for i, cap in enumerate(captions):
        ids = _tokenizer().encode(cap)
        longest = max(longest, len(ids) + 2)
        if len(ids) > text_len - 2:
            ids = ids[:text_len - 2]
            n_cut += 1
        ids = [TEXT_SOT_ID] + ids + [TEXT_EOT_ID]
        out[i, text_len - len(ids):] = ids
    if n_cut and warn:
        warnings.warn(f'{n_cut} of {len(captions)} captions are longer than text_len={text_len} tokens (longest '
                      f'{longest}) and were truncated; raise text_len to keep them whole', stacklevel=2)
    return out


def empty_caption_tokens(text_len):
    """The unconditional prompt: uint16 (text_len,) = [PAD.., SOT, EOT]."""
    return tokenize_captions([''], text_len)[0]


def decode_text(tokens):
    """uint16 (L,) -> the caption string (pads, SOT and EOT dropped)."""
    ids = [int(t) for t in tokens if int(t) not in (TEXT_PAD_ID, TEXT_SOT_ID, TEXT_EOT_ID)]
    return _tokenizer().decode(ids).strip()


# ----------------------------------------------------------------------------------------------------------------
# arrays on disk

ARRAYS = {'codes': np.uint16, 'text': np.uint16, 'teacher': np.float16}


def array_path(data_dir, split, name):
    return os.path.join(data_dir, f'{split}_{name}.bin')


def open_for_write(data_dir, split, name, shape):
    """A writable memmap [N, width] for one array (created, or reopened when it exists with the right size), so
    several processes can each fill their own rows of the same file."""
    path = array_path(data_dir, split, name)
    dtype = np.dtype(ARRAYS[name])
    nbytes = int(np.prod(shape)) * dtype.itemsize
    mode = 'r+' if os.path.exists(path) and os.path.getsize(path) == nbytes else 'w+'
    return np.memmap(path, dtype=dtype, mode=mode, shape=tuple(shape))


def write_split(data_dir, split, arrays, captions=None):
    """Write a split's arrays (a dict name -> array, all of one split) and, if given, its captions file."""
    for name, array in arrays.items():
        out = open_for_write(data_dir, split, name, array.shape)
        out[:] = array
        out.flush()
    if captions is not None:
        with open(os.path.join(data_dir, f'{split}_captions.txt'), 'w') as f:
            f.write('\n'.join(captions) + '\n')


def write_meta(data_dir, meta):
    tmp = os.path.join(data_dir, '.tmp_meta.json')
    with open(tmp, 'w') as f:
        json.dump(meta, f, indent=1)
    os.replace(tmp, os.path.join(data_dir, 'meta.json'))


def read_meta(data_dir, prepare_hint=None):
    path = os.path.join(data_dir, 'meta.json')
    if not os.path.exists(path):
        hint = prepare_hint or f'python {os.path.join(data_dir, "prepare.py")}'
        raise FileNotFoundError(f'{path} not found: the dataset in {data_dir} is not prepared. Run `{hint}` first.')
    with open(path) as f:
        return json.load(f)


class PreparedSplit:
    """Read-only view of one split's arrays: .codes (N, T) uint16, .text (N, L) uint16, .teacher (N, D) float16."""

    def __init__(self, data_dir, split, meta=None):
        self.meta = meta or read_meta(data_dir)
        if split not in self.meta['splits']:
            raise ValueError(f'split {split!r} not in {data_dir} (has {list(self.meta["splits"])})')
        self.n = self.meta['splits'][split]
        widths = {'codes': self.meta['image_tokens'], 'text': self.meta['text_len'], 'teacher': self.meta['teacher_dim']}
        for name, width in widths.items():
            path = array_path(data_dir, split, name)
            expected = self.n * width * np.dtype(ARRAYS[name]).itemsize
            if not os.path.exists(path) or os.path.getsize(path) != expected:
                raise FileNotFoundError(f'{path} is missing or has the wrong size (expected {expected} bytes for '
                                        f'[{self.n}, {width}] {np.dtype(ARRAYS[name]).name}); re-run the prepare step')
            setattr(self, name, np.memmap(path, dtype=ARRAYS[name], mode='r', shape=(self.n, width)))

    def __len__(self):
        return self.n


# ----------------------------------------------------------------------------------------------------------------
# images and captions before encoding

def load_split(data_dir, split):
    """(images uint8 (N, H, W, 3) memmap, captions list[str]) of one split, with a clear error if missing."""
    path = os.path.join(data_dir, f'{split}_images.npy')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: make the images first (for shapes: '
                                f'`python data/shapes/prepare.py`)')
    images = np.load(path, mmap_mode='r')
    with open(os.path.join(data_dir, f'{split}_captions.txt')) as f:
        captions = f.read().splitlines()
    return images, captions


def load_scenes(data_dir, split):
    """The ground-truth scene record of every image of a split (shapes), one dict per image."""
    with open(os.path.join(data_dir, f'{split}_scenes.jsonl')) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------------------------
# reading the prepared arrays for training (train.py): checks, the order of the rows, batches

class PreparedDataError(Exception):
    """Prepared arrays that are missing, incomplete or stale; the message names the command that remakes them."""


def prepare_command(data_dir):
    """The command that makes the prepared arrays of data_dir (with what it needs first, for shapes)."""
    if os.path.basename(os.path.normpath(data_dir)) == 'shapes':
        return ('`python data/shapes/prepare.py --stage=all` (it reads the tokenizer and teacher made by '
                '`python data/shapes/train_tokenizer.py` and `python data/shapes/train_teacher.py`)')
    script = os.path.join(data_dir, 'prepare.py')
    return f'`python {os.path.relpath(script)}`' if os.path.exists(script) else \
        'the prepare step of this dataset (data/common.py describes the arrays)'


def open_prepared(data_dir):
    """-> (meta, train PreparedSplit, val PreparedSplit), after checking that meta.json is complete and that the
    tokenizer and teacher files it names are still the ones the arrays were made with. The errors name the command
    that remakes the arrays (the prepare_command recorded in meta.json, when there is one)."""
    command = prepare_command(data_dir)
    if not os.path.exists(os.path.join(data_dir, 'meta.json')):
        raise PreparedDataError(f'{data_dir} is not prepared (no meta.json): run {command}')
    meta = read_meta(data_dir)
    if meta.get('prepare_command'):  # the exact command that made these arrays
        command = f'`{meta["prepare_command"]}`'
    missing = [k for k in ('splits', 'image_tokens', 'codebook_size', 'text_len', 'teacher_dim', 'vqgan', 'teacher')
               if k not in meta]
    if missing or not {'train', 'val'} <= set(meta['splits']):
        raise PreparedDataError(f'{data_dir}/meta.json lacks {missing or "a train and a val split"}: re-run {command}')
    for what in ('vqgan', 'teacher'):
        path, sha = meta[what].get('path'), meta[what].get('sha256')
        if path and sha and os.path.isfile(path) and file_sha256(path) != sha:
            raise PreparedDataError(f'{data_dir} was prepared with the {what} file {path} of sha256 {sha[:12]}.., '
                                    f'but that file now has sha256 {file_sha256(path)[:12]}.. (retrained?): '
                                    f're-run {command}')
    try:
        return meta, PreparedSplit(data_dir, 'train', meta), PreparedSplit(data_dir, 'val', meta)
    except FileNotFoundError as e:
        raise PreparedDataError(f'{e}: {command}') from None


# The order: a global stream of rows, epoch e a permutation drawn from (seed, e). Optimizer step `it` takes the next
# global batch of batch_size * grad_accum * world_size rows and rank r its own contiguous slice, so 2 ranks see the
# rows 1 rank sees with the same global batch, and a resumed run picks up the same order.

@lru_cache(maxsize=2)
def epoch_permutation(seed, epoch, n):
    """The order of the n training rows in epoch `epoch`: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, 0, epoch]).permutation(n)


def global_batch_rows(it, global_batch, n, seed):
    """Row indices (global_batch,) of optimizer step `it`: positions it*G .. it*G+G-1 of the endless stream of
    epochs (a batch may straddle two epochs)."""
    pos = np.arange(it * global_batch, (it + 1) * global_batch)
    epoch, offset = pos // n, pos % n
    return np.array([epoch_permutation(seed, int(e), n)[o] for e, o in zip(epoch, offset)], dtype=np.int64)


def uncond_rows(it, global_batch, p_uncond, seed):
    """bool (global_batch,): which rows of step `it` get the empty caption (prompt dropout for CFG)."""
    return np.random.default_rng([seed, 1, it]).random(global_batch) < p_uncond


def step_seed(seed, rank, it):
    """The torch seed of rank `rank` at step `it` (dropout and anything else random that is not the data)."""
    return int(np.random.SeedSequence([seed, 3, rank, it]).generate_state(1)[0])


def derangement(n, seed=0):
    """A permutation of range(n) with no fixed point (each row points to another row): shuffle, then map every
    element to the next one around the cycle."""
    order = np.random.default_rng([seed, 2, n]).permutation(n)
    target = np.empty(n, dtype=np.int64)
    target[order] = np.roll(order, -1)
    return target


class Batches:
    """Turns row indices of a split into device tensors: text (B, L) long, codes (B, T) long, teacher (B, D) float."""

    def __init__(self, split, device, uncond_text, shuffle_teacher):
        self.split, self.device, self.uncond_text = split, device, uncond_text.cpu().numpy()
        self.teacher_rows = derangement(len(split)) if shuffle_teacher else None

    def get(self, rows, drop=None):
        text = np.array(self.split.text[rows], dtype=np.int64)                   # (B, L)
        if drop is not None and drop.any():
            text[drop] = self.uncond_text                                        # empty caption [PAD.., SOT, EOT]
        codes = np.array(self.split.codes[rows], dtype=np.int64)                 # (B, T)
        teacher_rows = rows if self.teacher_rows is None else self.teacher_rows[rows]
        teacher = np.array(self.split.teacher[teacher_rows], dtype=np.float32)   # (B, D)
        out = [torch.from_numpy(a) for a in (text, codes, teacher)]
        if 'cuda' in str(self.device):
            return [t.pin_memory().to(self.device, non_blocking=True) for t in out]
        return out
