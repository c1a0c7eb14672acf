"""
Render the `shapes` dataset (see data/shapes/README.md for the world's rules).

    python data/shapes/prepare.py                      # 20,000 train + 1,000 val images at 32x32, a few seconds
    python data/shapes/prepare.py --image_size=64 --out_dir=data/shapes64

Writes into out_dir:
    {split}_images.npy    uint8 (N, H, W, 3)       what the tokenizer, teacher and evaluator read
    {split}_captions.txt  one caption per line     readable, and the text the GPT is conditioned on
    {split}_scenes.jsonl  one scene record a line  the ground truth each caption and image came from
    render.json           the render settings
    preview.png           the first 32 train images with their captions, for a person to look at
"""
import os
import sys
import json
import time
from dataclasses import dataclass, asdict

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import configure  # noqa: E402
from utils import save_image_grid, atomic_write_bytes  # noqa: E402
from data.shapes.world import make_split  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass
class RenderConfig:
    out_dir: str = HERE        # where the arrays go (default: next to this file, as nanoGPT's data/<name>/)
    image_size: int = 32       # 32 (default) or 64; any size >= 24 renders
    n_train: int = 20_000
    n_val: int = 1_000
    seed: int = 1337           # train uses seed, val uses seed + 1: disjoint, reproducible streams


def render_dataset(cfg: RenderConfig, progress=True):
    """Render both splits into cfg.out_dir. Skips the work when the same settings were already rendered."""
    if cfg.image_size < 24:
        raise ValueError(f'image_size={cfg.image_size} is too small to draw shapes; use 32 or 64')
    os.makedirs(cfg.out_dir, exist_ok=True)
    stamp_path = os.path.join(cfg.out_dir, 'render.json')
    stamp = asdict(cfg) | {'out_dir': None}
    if os.path.exists(stamp_path) and json.load(open(stamp_path)) == stamp:
        print(f'shapes already rendered in {cfg.out_dir} with these settings; skipping')
        return
    t0 = time.time()
    for split, n, seed in (('train', cfg.n_train, cfg.seed), ('val', cfg.n_val, cfg.seed + 1)):
        scenes, images, captions = make_split(n, seed, cfg.image_size, progress=progress)
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


def load_split(data_dir, split):
    """(images uint8 (N, H, W, 3), captions list[str]) of a rendered split, with a clear error if missing."""
    path = os.path.join(data_dir, f'{split}_images.npy')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: render the dataset first with `python data/shapes/prepare.py`')
    images = np.load(path, mmap_mode='r')
    with open(os.path.join(data_dir, f'{split}_captions.txt')) as f:
        captions = f.read().splitlines()
    return images, captions


def load_scenes(data_dir, split):
    with open(os.path.join(data_dir, f'{split}_scenes.jsonl')) as f:
        return [json.loads(line) for line in f]


# The encode step (VQ codes, text tokens and teacher features, per the data contract) is not built yet.

if __name__ == '__main__':
    render_dataset(configure(RenderConfig(), sys.argv[1:]))
