"""
Prepare any folder of captioned images (the form of the paper's medical sets, MIMIC-CXR and DeepEyeNet: an image
and its report) -> the arrays of data/common.py: VQ codes of the centre crop, caption tokens, teacher embeddings.

    python data/folder/prepare.py --captions=/data/mimic/captions.jsonl --vqgan=weights/vq_ds16_t2i.pt \
        --image_size=512 --teacher_name=hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224
    torchrun --nproc_per_node=8 data/folder/prepare.py --captions=... --val_captions=...

Captions file, one record per image, paths relative to image_root (default: the captions file's folder):
    JSONL:  {"path": "p10/s5001/view1.jpg", "caption": "No acute cardiopulmonary process."}   (one object per line)
    CSV:    a header row with the columns path and caption (other columns are ignored), then one row per image
A path may appear on several lines (several captions of one image: one row each). Whitespace in captions, newlines
included, is folded to single spaces. The val split is a separate captions file (--val_captions), or a seeded random
hold-out of val_fraction of the records (rows keep the file's order within each split).
The teacher is any open_clip model by name: BiomedCLIP for medical images (needs `pip install transformers`), a CLIP
ViT for natural ones, or a saved teacher file (--teacher=path). The paper's medical setting uses 512 px crops, which
gives 32x32 codes with a VQ-16 tokenizer.
Work is sharded over the torchrun ranks and resumable; unreadable or missing images are skipped and listed
({split}_skipped.txt, meta.json; see data/encode.py).
"""
import os
import csv
import sys
import json
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import configure  # noqa: E402
from data.encode import EncodeConfig, SplitItems, prepare  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class FolderConfig(EncodeConfig):
    out_dir: str = HERE            # where the arrays go (data/folder/ by default; one folder per dataset)
    vqgan: str = ''                # image tokenizer checkpoint (required): LlamaGen's vq_ds16_t2i.pt, or your own
    captions: str = ''             # the train captions file: .jsonl ({"path", "caption"}) or .csv (path,caption)
    image_root: str = ''           # the folder the paths are relative to ('' = the captions file's folder)
    val_captions: str = ''         # a separate captions file for the val split (same image_root)
    val_fraction: float = 0.01     # without val_captions: hold out this fraction as val (at least one record; 0: none)
    seed: int = 0                  # the seed of that hold-out draw


def read_captions(path):
    """-> (paths, captions) from a .jsonl or .csv captions file, with errors that name the line and the fix."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'captions file {path!r} does not exist')
    paths, captions = [], []
    if path.lower().endswith(('.jsonl', '.json')):
        with open(path, encoding='utf-8') as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f'{path}:{lineno} is not a JSON object ({e}); write one '
                                     f'{{"path": ..., "caption": ...}} per line') from e
                if not isinstance(rec, dict) or 'path' not in rec or 'caption' not in rec:
                    raise ValueError(f'{path}:{lineno} needs the keys "path" and "caption", got {str(rec)[:80]}')
                paths.append(str(rec['path']))
                captions.append(' '.join(str(rec['caption']).split()))
    elif path.lower().endswith('.csv'):
        with open(path, newline='', encoding='utf-8') as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {'path', 'caption'} <= set(reader.fieldnames):
                raise ValueError(f'{path}: the CSV header must name the columns path and caption, found '
                                 f'{reader.fieldnames}')
            for row in reader:
                paths.append(row['path'])
                captions.append(' '.join((row['caption'] or '').split()))
    else:
        raise ValueError(f'{path}: captions must be a .jsonl file ({{"path", "caption"}} per line) or a .csv file '
                         f'with a path,caption header')
    if not paths:
        raise ValueError(f'{path} holds no records')
    return paths, captions


def _check_root(root, paths, what):
    """Catch a wrong image_root at once (instead of every image being skipped as missing)."""
    sample = paths[:100]
    if not any(os.path.exists(os.path.join(root, p)) for p in sample):
        raise FileNotFoundError(f'none of the first {len(sample)} {what} images exist under {root!r} (e.g. '
                                f'{os.path.join(root, sample[0])!r}); set --image_root to the folder the paths in '
                                f'the captions file are relative to')


def prepare_folder(cfg: FolderConfig, progress=True):
    if not cfg.captions:
        raise ValueError('--captions is required: a .jsonl or .csv file of (path, caption) records')
    if not cfg.vqgan:
        raise ValueError('--vqgan is required: the image tokenizer checkpoint (LlamaGen vq_ds16_t2i.pt, or one '
                         'trained with `python data/shapes/train_tokenizer.py`)')
    root = cfg.image_root or os.path.dirname(os.path.abspath(cfg.captions))
    paths, captions = read_captions(cfg.captions)
    _check_root(root, paths, 'train')
    splits = []
    if cfg.val_captions:
        val_paths, val_captions = read_captions(cfg.val_captions)
        _check_root(root, val_paths, 'val')
        splits.append(SplitItems('train', root, paths, captions, flip=cfg.flip))
        splits.append(SplitItems('val', root, val_paths, val_captions))
    elif cfg.val_fraction > 0:
        n_val = max(1, round(cfg.val_fraction * len(paths)))
        if n_val >= len(paths):
            raise ValueError(f'val_fraction={cfg.val_fraction} of {len(paths)} records leaves no train images')
        is_val = np.zeros(len(paths), dtype=bool)
        is_val[np.random.default_rng(cfg.seed).permutation(len(paths))[:n_val]] = True
        pick = lambda mask: ([p for p, m in zip(paths, mask) if m], [c for c, m in zip(captions, mask) if m])  # noqa
        splits.append(SplitItems('train', root, *pick(~is_val), flip=cfg.flip))
        splits.append(SplitItems('val', root, *pick(is_val)))
    else:
        splits.append(SplitItems('train', root, paths, captions, flip=cfg.flip))
    source = dict(captions=os.path.abspath(cfg.captions), image_root=os.path.abspath(root),
                  val_captions=os.path.abspath(cfg.val_captions) if cfg.val_captions else None,
                  val_fraction=None if cfg.val_captions else cfg.val_fraction, seed=cfg.seed)
    return prepare(cfg, splits, 'folder', 'data/folder/prepare.py', source=source, progress=progress)


if __name__ == '__main__':
    cfg = configure(FolderConfig(), sys.argv[1:])
    if int(os.environ.get('RANK', 0)) == 0:
        print(cfg)
    prepare_folder(cfg)
