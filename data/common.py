"""
The prepared-data contract shared by every dataset (see data/<name>/prepare.py) and by train.py / sample.py.

A prepared dataset folder holds, for each split, plain memmapped arrays (nanoGPT's .bin idea, so training reads a
batch with no decoding):

    {split}_codes.bin    uint16  [N, T]   VQ codes of each image, raster order (T = grid_h * grid_w)
    {split}_text.bin     uint16  [N, L]   the caption's text-tokenizer ids, left-padded with the pad id
                                          (uint32 when the tokenizer has more than 65,536 ids: meta text_dtype)
    {split}_teacher.bin  float16 [N, D]   the frozen teacher's L2-normalised global embedding of the same image
    meta.json            sizes, shapes, dtypes, and which tokenizer / teacher made the arrays (name, path, sha256)

and, optionally (train.py --align_target=patch|both needs them; docs/global-vs-patch.md):

    {split}_teacher_patch.bin  float16 [N, T, D_p]  the teacher's patch features on the code grid (T cells, raster
                                                    order), each L2-normalised; meta.json's `teacher_patch` records
                                                    teacher, grid, dim, dtype, resampling and each file's sha256

Before encoding, a dataset whose images fit in one array (shapes) keeps them as

    {split}_images.npy   uint8   [N, H, W, 3]  the images the tokenizer and teacher are trained on and encode
    {split}_captions.txt one caption per line (and, for shapes, {split}_scenes.jsonl: the ground truth of each)

Text layout: [PAD ... PAD, SOT, t_1 .. t_k, EOT]. Left padding keeps the last text token right before the image, so
the model sees the same relative positions whatever the caption length. The empty caption [PAD ... SOT, EOT] is the
unconditional prompt used for classifier-free guidance.

Text tokenizers (`--text_tokenizer=` of the prepare steps; meta.json records which one as `text_tokenizer`):
    open_clip        CLIP's BPE that ships with open_clip (the default): SOT/EOT are its start/end tokens
    DIR or FILE      an LLM's tokenizer.json (read with the `tokenizers` package), to train from that LLM
                     (train.py --init_from=llm:DIR): SOT/EOT are its bos/eos tokens (tokenizer_config.json or
                     config.json beside it). A Hugging Face hub id is fetched like llm.py fetches a checkpoint.
Either way the pad gets an id of its own just past the vocabulary (so it never collides with a real token).
"""
import os
import json
import warnings
from dataclasses import dataclass, fields
from typing import Any
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

TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'config.json')  # what an LLM tokenizer is read from


@dataclass
class TextTokenizer:
    """A caption tokenizer plus the ids of the text layout. `backend` encodes/decodes; the rest is its identity."""
    kind: str                 # 'open_clip' or 'tokenizers'
    path: Any                 # the tokenizer.json read (None for open_clip)
    sha256: Any               # of that file (None for open_clip: the wheel fixes it)
    vocab_size: int           # ids the tokenizer itself can produce
    pad_id: int               # the left pad: vocab_size, an id no token has
    sot_id: int
    eot_id: int
    backend: Any = None

    def encode(self, text):
        if self.kind == 'open_clip':
            return self.backend.encode(text)
        return self.backend.encode(text, add_special_tokens=False).ids  # SOT/EOT are added by tokenize_captions

    def decode(self, ids):
        return self.backend.decode(ids).strip()

    def identity(self):
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != 'backend'}

    def meta(self):
        """The meta.json entries train.py and sample.py read."""
        vocab = max(self.vocab_size, self.pad_id + 1)
        return dict(text_tokenizer=self.identity(), text_vocab_size=vocab, text_pad_id=self.pad_id,
                    text_sot_id=self.sot_id, text_eot_id=self.eot_id,
                    text_dtype='uint16' if vocab <= 1 << 16 else 'uint32')


_open_clip = None


def open_clip_tokenizer():
    """The default: open_clip's BPE (its vocabulary ships in the wheel, so it works offline)."""
    global _open_clip
    if _open_clip is None:
        from open_clip.tokenizer import SimpleTokenizer
        _open_clip = TextTokenizer('open_clip', None, None, TEXT_PAD_ID, TEXT_PAD_ID, TEXT_SOT_ID, TEXT_EOT_ID,
                                   SimpleTokenizer())
    return _open_clip


def _special_id(tok, folder, name):
    """The id of the LLM's bos/eos token: tokenizer_config.json's bos_token/eos_token, else config.json's
    bos_token_id/eos_token_id (the first one when it lists several)."""
    def read(file):
        path = os.path.join(folder, file)
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            return json.load(f)
    token = read('tokenizer_config.json').get(f'{name}_token')
    token = token.get('content') if isinstance(token, dict) else token
    if token is not None and tok.token_to_id(token) is not None:
        return tok.token_to_id(token)
    found = read('config.json').get(f'{name}_token_id')
    found = found[0] if isinstance(found, list) and found else found
    if not isinstance(found, int):
        raise ValueError(f'{folder} does not say which token is {name}: put tokenizer_config.json (with '
                         f'{name}_token) or config.json (with {name}_token_id) next to tokenizer.json')
    return found


def load_text_tokenizer(spec='open_clip'):
    """'open_clip', an LLM folder holding tokenizer.json, the tokenizer.json file itself, or a hub id."""
    if spec in ('open_clip', '', 'open_clip bpe'):
        return open_clip_tokenizer()
    path = spec
    if not os.path.exists(path):
        from llm import resolve_llm_dir  # a hub id: fetched (or found in the cache), with a clear offline error
        path = resolve_llm_dir(spec, files=TOKENIZER_FILES)
    file = os.path.join(path, 'tokenizer.json') if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise FileNotFoundError(f'{file} not found: --text_tokenizer takes open_clip, or an LLM folder with a '
                                f'tokenizer.json (or that file)')
    from tokenizers import Tokenizer
    from utils import file_sha256
    tok = Tokenizer.from_file(file)
    vocab = tok.get_vocab_size(with_added_tokens=True)
    folder = os.path.dirname(os.path.abspath(file))
    return TextTokenizer('tokenizers', os.path.abspath(file), file_sha256(file), vocab, vocab,
                         _special_id(tok, folder, 'bos'), _special_id(tok, folder, 'eos'), tok)


def text_tokenizer_of(meta, override_path=''):
    """The tokenizer a prepared dataset (its meta.json, or a checkpoint's data_meta) was made with. A tokenizers file
    that is missing or changed (sha256) is refused: the ids would mean other words. override_path: another copy."""
    recorded = meta.get('text_tokenizer')
    if not isinstance(recorded, dict) or recorded.get('kind') == 'open_clip':  # older meta.json: the string
        return open_clip_tokenizer()                                             # 'open_clip bpe'
    path = override_path or recorded['path']
    if not os.path.isfile(path):
        raise FileNotFoundError(f'text tokenizer {path} not found (recorded when the data was prepared); pass '
                                f'--text_tokenizer=PATH to a copy of that tokenizer.json')
    tok = load_text_tokenizer(path)
    if tok.identity() != recorded | {'path': tok.path}:
        raise ValueError(f'text tokenizer {path} is not the one the data was prepared with (sha256 {tok.sha256[:12]}.. '
                         f'vs {recorded["sha256"][:12]}.., or other ids); pass --text_tokenizer=PATH to that file')
    return tok


def tokenize_captions(captions, text_len, warn=True, tokenizer=None):
    """Captions -> uint16 (N, text_len) (uint32 for a vocabulary past 65,536): [PAD.., SOT, ids.., EOT], with
    `tokenizer` (default: open_clip's BPE). Longer captions are truncated (EOT kept) with a warning that says by how
    much, so a too-small text_len is noticed."""
    tok = tokenizer or open_clip_tokenizer()
    if text_len < 2:
        raise ValueError(f'text_len={text_len} cannot hold SOT and EOT; use at least 2')
    out = np.full((len(captions), text_len), tok.pad_id, dtype=tok.meta()['text_dtype'])
    n_cut, longest = 0, 0
    for i, cap in enumerate(captions):
        ids = tok.encode(cap)
        longest = max(longest, len(ids) + 2)
        if len(ids) > text_len - 2:
            ids = ids[:text_len - 2]
            n_cut += 1
        ids = [tok.sot_id] + ids + [tok.eot_id]
        out[i, text_len - len(ids):] = ids
    if n_cut and warn:
        warnings.warn(f'{n_cut} of {len(captions)} captions are longer than text_len={text_len} tokens (longest '
                      f'{longest}) and were truncated; raise text_len to keep them whole', stacklevel=2)
    return out


def empty_caption_tokens(text_len, tokenizer=None):
    """The unconditional prompt: uint16 (text_len,) = [PAD.., SOT, EOT]."""
    return tokenize_captions([''], text_len, tokenizer=tokenizer)[0]


def decode_text(tokens, tokenizer=None):
    """(L,) ids -> the caption string (pads, SOT and EOT dropped)."""
    tok = tokenizer or open_clip_tokenizer()
    return tok.decode([int(t) for t in tokens if int(t) not in (tok.pad_id, tok.sot_id, tok.eot_id)])


# ----------------------------------------------------------------------------------------------------------------
# arrays on disk

ARRAYS = {'codes': np.uint16, 'text': np.uint16, 'teacher': np.float16}


def array_path(data_dir, split, name):
    return os.path.join(data_dir, f'{split}_{name}.bin')


def open_for_write(data_dir, split, name, shape, dtype=None):
    """A writable memmap [N, width] for one array (created, or reopened when it exists with the right size), so
    several processes can each fill their own rows of the same file. dtype: ARRAYS[name] unless given."""
    path = array_path(data_dir, split, name)
    dtype = np.dtype(dtype or ARRAYS[name])
    nbytes = int(np.prod(shape)) * dtype.itemsize
    mode = 'r+' if os.path.exists(path) and os.path.getsize(path) == nbytes else 'w+'
    return np.memmap(path, dtype=dtype, mode=mode, shape=tuple(shape))


def write_split(data_dir, split, arrays, captions=None):
    """Write a split's arrays (a dict name -> array, all of one split) and, if given, its captions file."""
    for name, array in arrays.items():
        out = open_for_write(data_dir, split, name, array.shape, array.dtype)
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
        self.n, self.split_name = self.meta['splits'][split], split
        widths = {'codes': self.meta['image_tokens'], 'text': self.meta['text_len'], 'teacher': self.meta['teacher_dim']}
        for name, width in widths.items():
            path = array_path(data_dir, split, name)
            dtype = np.dtype(self.meta.get('text_dtype', 'uint16') if name == 'text' else ARRAYS[name])
            expected = self.n * width * dtype.itemsize
            if not os.path.exists(path) or os.path.getsize(path) != expected:
                raise FileNotFoundError(f'{path} is missing or has the wrong size (expected {expected} bytes for '
                                        f'[{self.n}, {width}] {dtype.name}); re-run the prepare step')
            setattr(self, name, np.memmap(path, dtype=dtype, mode='r', shape=(self.n, width)))

        self.teacher_patch = open_patch_targets(data_dir, split, self.meta)  # (N, T, D_p) float16, or None

    def __len__(self):
        return self.n


PATCH_ARRAY = 'teacher_patch'  # {split}_teacher_patch.bin


def open_patch_targets(data_dir, split, meta):
    """The read-only (N, T, D_p) float16 memmap of a split's patch targets, or None when meta.json records none or
    the file is missing / of the wrong size (require_patch_targets then says how to make it)."""
    rec = meta.get('teacher_patch')
    if not isinstance(rec, dict) or split not in meta.get('splits', {}):
        return None
    shape = (meta['splits'][split], meta['image_tokens'], rec['dim'])
    path = array_path(data_dir, split, PATCH_ARRAY)
    if not os.path.exists(path) or os.path.getsize(path) != int(np.prod(shape)) * np.dtype(rec['dtype']).itemsize:
        return None
    return np.memmap(path, dtype=np.dtype(rec['dtype']), mode='r', shape=shape)


def patch_encode_command(data_dir, meta):
    """The command that adds patch targets to data_dir (the shapes encode step; other datasets have none yet)."""
    if meta.get('dataset') == 'shapes':
        base = meta.get('prepare_command') or 'python data/shapes/prepare.py --stage=encode'
        if '--out_dir=' not in base:
            base += f' --out_dir={data_dir}'
        return f'`{base} --patch_targets=True`'
    return (f'the encode step of {data_dir} with patch targets (only data/shapes/prepare.py --stage=encode '
            f'--patch_targets=True writes them so far; docs/global-vs-patch.md)')


def require_patch_targets(data_dir, meta, splits):
    """Raise PreparedDataError naming the encode command unless every split has its patch targets."""
    missing = [s.split_name for s in splits if s.teacher_patch is None]
    if missing:
        raise PreparedDataError(f'--align_target=patch|both needs the teacher\'s patch targets '
                                f'({", ".join(f"{s}_{PATCH_ARRAY}.bin" for s in missing)}), which {data_dir} does not '
                                f'hold: make them with {patch_encode_command(data_dir, meta)}')


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
    for what in ('vqgan', 'teacher', 'text_tokenizer'):  # the files the arrays were made with must be unchanged
        if not isinstance(meta.get(what), dict):  # older meta.json: text_tokenizer 'open_clip bpe'
            continue
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
    """Turns row indices of a split into device tensors: text (B, L) long, codes (B, T) long, teacher (B, D) float;
    with align_target 'patch' or 'both' also teacher_patch (B, T, D_p) float (and teacher None for 'patch'), so
    model(*batches.get(rows)) feeds the forward. shuffle_teacher: every row reads the targets of another row, the
    global and the patch ones alike (whole images move; the cells of an image stay together)."""

    def __init__(self, split, device, uncond_text, shuffle_teacher, align_target='global'):
        self.split, self.device, self.uncond_text = split, device, uncond_text.cpu().numpy()
        self.teacher_rows = derangement(len(split)) if shuffle_teacher else None
        self.align_target = align_target

    def get(self, rows, drop=None):
        text = np.array(self.split.text[rows], dtype=np.int64)                   # (B, L)
        if drop is not None and drop.any():
            text[drop] = self.uncond_text                                        # empty caption [PAD.., SOT, EOT]
        codes = np.array(self.split.codes[rows], dtype=np.int64)                 # (B, T)
        teacher_rows = rows if self.teacher_rows is None else self.teacher_rows[rows]
        teacher = np.array(self.split.teacher[teacher_rows], dtype=np.float32)   # (B, D)
        arrays = [text, codes, teacher]
        if self.align_target != 'global':                                        # REPA-style targets
            arrays.append(np.array(self.split.teacher_patch[teacher_rows], dtype=np.float32))  # (B, T, D_p)
        out = [torch.from_numpy(a) for a in arrays]
        if 'cuda' in str(self.device):
            out = [t.pin_memory().to(self.device, non_blocking=True) for t in out]
        if self.align_target == 'patch':
            out[2] = None                                                        # no global loss
        return out
