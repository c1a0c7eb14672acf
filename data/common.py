"""
The prepared-data contract shared by every dataset (see data/<name>/prepare.py) and by train.py / sample.py.

A prepared dataset folder holds, for each split, plain memmapped arrays (nanoGPT's .bin idea, so training reads a
batch with no decoding):

    {split}_codes.bin    uint16  [N, T]   VQ codes of each image, raster order (T = grid_h * grid_w)
    {split}_text.bin     uint16  [N, L]   open_clip BPE ids of the caption, left-padded with TEXT_PAD_ID
    {split}_teacher.bin  float16 [N, D]   the frozen teacher's L2-normalised global embedding of the same image
    meta.json            sizes, shapes, dtypes, and which tokenizer / teacher made the arrays (name, path, sha256)

Text layout: [PAD ... PAD, SOT, t_1 .. t_k, EOT]. Left padding keeps the last text token right before the image, so
the model sees the same relative positions whatever the caption length. The empty caption [PAD ... SOT, EOT] is the
unconditional prompt used for classifier-free guidance.
"""
import os
import json
import warnings

import numpy as np

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
