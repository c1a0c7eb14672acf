"""
The `shapes` evaluator: a small CNN that reads each of the 9 grid cells of an image, and the metrics built on it.
It knows nothing of the ARRA teacher; it is trained only on freshly rendered scenes of world.py.

    python data/shapes/evaluate.py --train                          # (re)train it: ~1-2 min on 2 CPU cores
    python data/shapes/evaluate.py --real                           # sanity check: val images vs their captions
    python data/shapes/evaluate.py --samples_dir=out/samples_fid    # PNGs + prompts.txt written by sample.py
    python data/shapes/evaluate.py --samples_dir=DIR --inception=pt_inception-2015-12-05-6726825d.pth

What it measures (evaluate_samples, one flat dict of floats):
- prompt_acc: the fraction of images that show everything the prompt names: each named object with its shape,
  colour and size in its cell, no object in any other cell, and the named background colour / texture (if named)
  in every background cell. Next to it, per attribute: obj_shape_acc, obj_color_acc, obj_size_acc (over named
  objects), count_acc (as many objects as named), position_acc (the occupied cells are exactly the named ones),
  bg_color_acc, bg_texture_acc (over the images that name them). chance_levels() gives what a generator that
  ignores its prompt would score.
- coherence_bg_color / coherence_bg_texture: over the images whose prompt leaves the property open, the fraction
  whose background cells all read the same value. Background cells are the cells the evaluator sees as empty (all
  9 if fewer than 2 are): a large object hides about half of its cell, so the reading there rests on its border
  pixels, while with at most two objects >= 7 cells are empty and every row and column keeps at least one.
- frechet_evaluator: the Frechet distance between generated and real val images in the evaluator's penultimate
  features (9 cells x feat_dim); fid_inception: the usual FID with fid.py's Inception when --inception is given.
- For prompts of the plan world (plan_world.py: open cells, counts, relations; detected from the prompts, or
  world_name='plan'), plan_prompt_metrics replaces prompt_metrics: count_acc, objects_acc (every object of the
  caption there and nothing else), named_cell_acc, relation_acc, bg_*_acc and prompt_acc (all of it at once); the
  Frechet reference is then the plan world's val split. The reader is the same: it reads cells, not captions.
- geneval_*: accuracy in GenEval's six task groups (Ghosh et al. 2023, the field's standard prompt-following
  benchmark) where our prompts allow, and geneval_overall, their mean (geneval_metrics says how each group maps).

How the evaluator works: the image is resized to 3*cell_px pixels a side and cut into its 9 cells; one shared CNN
reads each cell crop alone (shape: none + 5, colour 7, size 2, background colour 4, texture 2). Because a cell's
prediction sees only that cell's pixels, never the rest of the image, a per-cell background reading reflects the
cell itself, which is what makes the coherence measure meaningful (an image-level network could copy one global
guess into all 9 cells). Training renders scenes with a seed of its own (not the dataset's 1337 / 1338), adds
a one-pixel jitter, a light blur and noise so slightly blurry or shifted generated images still read, and, since
7 of 9 cells are empty, trains on the object cells plus a random part of the empty ones.
"""
import itertools
import os
import re
import sys
import json
import time
from dataclasses import dataclass, asdict, replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.shapes import world, worlds  # noqa: E402
from data.shapes.world import SHAPES, COLORS, SIZES, CELL_NAMES, BG_COLORS, BG_TEXTURES  # noqa: E402
from data.shapes.plan_world import RELATIONS, NUMBER_WORDS, PLURALS, relation_holds  # noqa: E402

CHECKPOINT_KIND = 'shapes-evaluator'
VAL_SEED = 1338        # data/shapes/prepare.py renders val with seed + 1 = 1338 by default: the real reference
COLOR_NAMES, BG_COLOR_NAMES = tuple(COLORS), tuple(BG_COLORS)
HEADS = dict(shape=1 + len(SHAPES), color=len(COLORS), size=len(SIZES), bg_color=len(BG_COLORS),
             bg_texture=len(BG_TEXTURES))  # shape class 0 = empty cell


@dataclass
class EvalConfig:
    train: bool = False          # retrain the evaluator even when its checkpoint exists
    real: bool = False           # evaluate the real val split against its own captions (sanity check)
    samples_dir: str = ''        # folder of sample PNGs + prompts.txt (or prompts.jsonl) to evaluate
    vqgan: str = ''              # with --real: score this tokenizer's reconstructions of the val images instead
                                 # (encode -> decode): the ceiling of any GPT trained on its codes
    inception: str = ''          # pytorch-fid Inception weights file; '' = skip the Inception FID
    json_out: str = ''           # also write the metrics to this JSON file
    ckpt: str = ''               # '' = out/evaluator_shapes/evaluator.pt (evaluator_64px.pt for 64 px, ...)
    image_size: int = 32         # the images it reads (32 or 64); one checkpoint per size
    n_train: int = 20_000        # freshly rendered training scenes
    steps: int = 800             # optimisation steps
    batch_size: int = 128        # images per step (their object cells + keep_empty of the empty ones)
    keep_empty: float = 0.15     # fraction of empty cells trained on per step: 7 of 9 cells are empty
    lr: float = 4e-3             # peak AdamW learning rate (warmup 5%, cosine to 10%)
    cell_px: int = 12            # each cell is resized to cell_px x cell_px (32 px images have ~10.7 px cells)
    width: int = 32              # channels of the first conv layers (doubled at the second stride-2 layer)
    feat_dim: int = 32           # penultimate per-cell features; the Frechet features are 9 x feat_dim
    seed: int = 4242             # training scenes and init: not the dataset's train (1337) / val (1338) seeds
    n_real: int = 1000           # real val images: the Frechet reference (and, with --real, the images evaluated)
    world: str = ''              # 'default' or 'plan': the world of --real and of the reference ('' = the prompts')
    device: str = 'auto'         # 'auto' = cuda when available


def default_ckpt(image_size):
    from utils import REPO_ROOT
    name = 'evaluator.pt' if image_size == 32 else f'evaluator_{image_size}px.pt'
    return os.path.join(REPO_ROOT, 'out', 'evaluator_shapes', name)


# -----------------------------------------------------------------------------------------------------------------
# The network


class CellReader(nn.Module):
    """Reads the 9 cells of an image independently with one shared CNN."""

    def __init__(self, cell_px=12, width=32, feat_dim=32):
        super().__init__()
        if cell_px % 4:
            raise ValueError(f'cell_px must be a multiple of 4 (two stride-2 layers), got {cell_px}')
        self.cell_px = cell_px
        w = width

        def block(c_in, c_out, kernel=3, stride=1, padding=1):
            return [nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        # A 2x2 stride-2 stem first: small convolutions are slow on CPU, so most layers work at c/2 and c/4 px.
        self.body = nn.Sequential(*block(3, w, 2, 2, 0), *block(w, w),                     # (M, w, c/2, c/2)
                                  *block(w, 2 * w, stride=2), *block(2 * w, 2 * w),         # (M, 2w, c/4, c/4)
                                  nn.Flatten(), nn.Linear(2 * w * (cell_px // 4) ** 2, feat_dim), nn.ReLU())
        self.head = nn.Linear(feat_dim, sum(HEADS.values()))  # all five classifiers in one matrix

    def cells(self, images):
        """float (B, 3, H, W) in [0, 1] -> the 9 cell crops (B * 9, 3, c, c), raster order (cell = 3 * row + col)."""
        c = self.cell_px
        x = F.interpolate(images, size=(3 * c, 3 * c), mode='bilinear', align_corners=False, antialias=True)
        B = x.shape[0]
        x = x.view(B, 3, 3, c, 3, c).permute(0, 2, 4, 1, 3, 5)   # (B, row, col, 3, c, c)
        return x.reshape(B * 9, 3, c, c) * 2 - 1                  # centred inputs

    def read(self, cells):
        """(M, 3, c, c) cell crops -> features (M, feat_dim), {head: logits (M, K)}."""
        feats = self.body(cells)                                  # (M, feat_dim)
        logits = torch.split(self.head(feats), list(HEADS.values()), dim=1)
        return feats, dict(zip(HEADS, logits))

    def forward(self, images):
        """float (B, 3, H, W) in [0, 1] -> features (B, 9, feat_dim), {head: logits (B, 9, K)}."""
        B = images.shape[0]
        feats, logits = self.read(self.cells(images))
        return feats.view(B, 9, -1), {k: v.view(B, 9, -1) for k, v in logits.items()}


def cell_labels(scenes):
    """Per-cell targets {head: int64 (N, 9)} of scenes; colour and size are -1 (ignored) in empty cells."""
    n = len(scenes)
    lab = {k: np.full((n, 9), -1, dtype=np.int64) for k in HEADS}
    lab['shape'][:] = 0
    for i, s in enumerate(scenes):
        lab['bg_color'][i] = BG_COLOR_NAMES.index(s['bg_color'])    # a rendered background is the same everywhere
        lab['bg_texture'][i] = BG_TEXTURES.index(s['bg_texture'])
        for o in s['objects']:
            lab['shape'][i, o['cell']] = 1 + SHAPES.index(o['shape'])
            lab['color'][i, o['cell']] = COLOR_NAMES.index(o['color'])
            lab['size'][i, o['cell']] = SIZES.index(o['size'])
    return {k: torch.from_numpy(v) for k, v in lab.items()}


def to_float(images_uint8):
    """uint8 (B, H, W, 3) numpy -> float (B, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).float() / 255


# -----------------------------------------------------------------------------------------------------------------
# Training, saving, loading


def augment(x, gen):
    """Generated images are rarely pixel-exact renders, so each training image gets: a shift of up to image_size / 32
    pixels (edge pixels repeat), a blur of random strength (a blend with its 3x3 box blur) and Gaussian noise of
    random strength up to 0.05."""
    B, _, H, W = x.shape
    s = max(1, H // 32)
    padded = F.pad(x, (s, s, s, s), mode='replicate')            # (B, 3, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * s + 1, (2, B), generator=gen)
    x = torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode='replicate'), 3, stride=1)  # (B, 3, H, W)
    alpha = torch.rand(B, 1, 1, 1, generator=gen)
    x = (1 - alpha) * x + alpha * blurred
    sigma = 0.05 * torch.rand(B, 1, 1, 1, generator=gen)
    return (x + sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)


def train_evaluator(cfg: EvalConfig, progress=True):
    """Render cfg.n_train scenes, train a CellReader on them and return it (eval mode) with its val accuracy."""
    from tqdm import tqdm
    from utils import pick_device
    t0 = time.time()
    device = pick_device(cfg.device)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    scenes, images, _ = world.make_split(cfg.n_train, cfg.seed, cfg.image_size, progress=progress)
    labels = cell_labels(scenes)                                  # {head: (N, 9)}
    model = CellReader(cfg.cell_px, cfg.width, cfg.feat_dim).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    warmup = max(1, cfg.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min((i + 1) / warmup, 0.55 + 0.45 * np.cos(
        np.pi * min(1.0, max(0, i - warmup) / max(1, cfg.steps - warmup)))))
    model.train()
    bar = tqdm(range(cfg.steps), desc='train shapes evaluator', disable=not progress)
    for step in bar:
        idx = torch.randint(0, cfg.n_train, (cfg.batch_size,), generator=gen)
        x = augment(to_float(images[idx.numpy()]), gen).to(device)       # (B, 3, H, W)
        y = {k: v[idx].reshape(-1).to(device) for k, v in labels.items()}  # {head: (B * 9,)}
        keep = (y['shape'] > 0) | (torch.rand(len(y['shape']), generator=gen).to(device) < cfg.keep_empty)
        _, logits = model.read(model.cells(x)[keep])                       # {head: (M, K)}
        loss = sum(F.cross_entropy(logits[k], y[k][keep], ignore_index=-1) for k in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f'{loss.item():.4f}')
    model.eval()
    train_seconds = time.time() - t0
    val_scenes, val_images, _ = world.make_split(1000, VAL_SEED, cfg.image_size)
    acc = cell_accuracy(model, val_images, val_scenes)
    return model, dict(val_accuracy=acc, train_seconds=train_seconds)


def save_evaluator(model, cfg, info, path):
    from utils import atomic_torch_save
    atomic_torch_save(dict(kind=CHECKPOINT_KIND, model=model.state_dict(), config=asdict(cfg), **info), path)


def load_evaluator(path):
    """A trained CellReader (eval mode) with .config (dict) and .info (val accuracy, training time)."""
    from utils import load_checkpoint
    ck = load_checkpoint(path, kind='python data/shapes/evaluate.py --train')
    if not isinstance(ck, dict) or ck.get('kind') != CHECKPOINT_KIND:
        raise RuntimeError(f'{path!r} is not a shapes evaluator checkpoint; retrain with '
                           f'`python data/shapes/evaluate.py --train`')
    c = ck['config']
    model = CellReader(c['cell_px'], c['width'], c['feat_dim'])
    model.load_state_dict(ck['model'])
    model.eval().requires_grad_(False)
    model.config = c
    model.info = dict(val_accuracy=ck['val_accuracy'], train_seconds=ck['train_seconds'])
    return model


def get_evaluator(cfg: EvalConfig = None, progress=True):
    """The evaluator of cfg.ckpt (default path for cfg.image_size): loaded when present, else trained and saved."""
    cfg = cfg or EvalConfig()
    path = cfg.ckpt or default_ckpt(cfg.image_size)
    if os.path.exists(path) and not cfg.train:
        return load_evaluator(path)
    print(f'training the shapes evaluator on {cfg.n_train} fresh {cfg.image_size}px scenes -> {path}')
    model, info = train_evaluator(cfg, progress)
    save_evaluator(model, cfg, info, path)
    acc = ', '.join(f'{k} {v:.4f}' for k, v in info['val_accuracy'].items())
    print(f'trained in {info["train_seconds"]:.0f}s; val per-cell accuracy: {acc}')
    model.config, model.info = asdict(cfg), info
    return model


# -----------------------------------------------------------------------------------------------------------------
# Reading images


@torch.no_grad()
def read_images(evaluator, images, batch_size=250, progress=False):
    """uint8 (N, H, W, 3) -> {head: predicted class int (N, 9)} plus 'features' float64 (N, 9 * feat_dim)."""
    from tqdm import tqdm
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f'expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}')
    size = getattr(evaluator, 'config', {}).get('image_size')
    if size and images.shape[1:3] != (size, size):
        raise ValueError(f'the evaluator was trained on {size}px images but these are {images.shape[1]}x'
                         f'{images.shape[2]}: train one for this size with `python data/shapes/evaluate.py '
                         f'--train --image_size={images.shape[1]}`')
    device = next(evaluator.parameters()).device
    out = {k: [] for k in (*HEADS, 'features')}
    for i in tqdm(range(0, len(images), batch_size), desc='read images', disable=not progress):
        feats, logits = evaluator(to_float(images[i:i + batch_size]).to(device))   # (B, 9, d), {(B, 9, K)}
        out['features'].append(feats.flatten(1).double().cpu())                    # (B, 9 * d)
        for k, v in logits.items():
            out[k].append(v.argmax(-1).cpu())                                       # (B, 9)
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def cell_accuracy(evaluator, images, scenes):
    """Per-cell reading accuracy on rendered images: occupancy (object or empty) and background colour / texture
    over all cells; shape, colour and size over the cells that hold an object."""
    pred, lab = read_images(evaluator, images), {k: v.numpy() for k, v in cell_labels(scenes).items()}
    obj = lab['shape'] > 0
    acc = dict(occupancy=float(((pred['shape'] > 0) == obj).mean()))
    for k in HEADS:
        m = obj if k in ('shape', 'color', 'size') else np.ones_like(obj)
        acc[k] = float((pred[k][m] == lab[k][m]).mean())
    return acc


# -----------------------------------------------------------------------------------------------------------------
# Captions


_OBJECT = re.compile(rf"a ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) in the "
                     rf"({'|'.join(CELL_NAMES)})")


def parse_caption(text):
    """The inverse of world.caption: {objects: [{shape, color, size, cell}], bg_color: str|None, bg_texture: str|None}.
    Raises ValueError for text outside the caption grammar."""
    def fail(why):
        raise ValueError(f'{text!r} is not a shapes caption ({why}); captions read like "a large red circle in the '
                         f'top left and a small blue square in the center on a striped gray background"')
    body, bg_color, bg_texture = split_background(text, fail)
    objects = []
    for part in body.split(' and '):
        o = _OBJECT.fullmatch(part)
        if not o:
            fail(f'cannot read {part!r} as "a <size> <colour> <shape> in the <cell>"')
        objects.append(dict(shape=o[3], color=o[2], size=o[1], cell=CELL_NAMES.index(o[4])))
    if len({o['cell'] for o in objects}) < len(objects):
        fail('two objects in one cell')
    return dict(objects=objects, bg_color=bg_color, bg_texture=bg_texture)


def split_background(text, fail):
    """'<objects> on a striped gray background' -> ('<objects>', 'gray', 'striped'); None for what is not named.
    fail(why) raises the caller's error."""
    if not isinstance(text, str):
        raise TypeError(f'a caption is a str, got {type(text).__name__}')
    m = re.fullmatch(r'(.*?)(?: on a (\S+(?: \S+)?) background)?', text.strip())
    bg_color = bg_texture = None
    if m.group(2):
        words = m.group(2).split()
        if words[0] in BG_TEXTURES:
            bg_texture = words.pop(0)
        if words and words[0] in BG_COLORS:
            bg_color = words.pop(0)
        if words:
            fail(f'background {m.group(2)!r} is not "[{"|".join(BG_TEXTURES)}] [{"|".join(BG_COLORS)}]"')
    return m.group(1), bg_color, bg_texture


def named_background(text):
    """(bg_color, bg_texture) a caption of either world names (None where it is silent)."""
    def fail(why):
        raise ValueError(f'{text!r} is not a shapes caption ({why})')
    return split_background(text, fail)[1:]


# -----------------------------------------------------------------------------------------------------------------
# Metrics


def background_cells(shape_pred):
    """bool (N, 9): the cells read as empty; images with fewer than 2 empty cells fall back to all 9."""
    empty = shape_pred == 0
    return empty | (empty.sum(1, keepdims=True) < 2)


def prompt_metrics(pred, prompts):
    """Prompt accuracy and per-attribute accuracies of read images (read_images) against their prompts."""
    parsed = [parse_caption(p) for p in prompts]
    bg = background_cells(pred['shape'])
    hits = {k: [] for k in ('shape', 'color', 'size')}
    count, pos, bgc, bgt, full = [], [], [], [], []
    for i, p in enumerate(parsed):
        ok_obj = True
        for o in p['objects']:
            c = o['cell']
            present = pred['shape'][i, c] > 0
            hits['shape'].append(pred['shape'][i, c] == 1 + SHAPES.index(o['shape']))
            hits['color'].append(present and pred['color'][i, c] == COLOR_NAMES.index(o['color']))
            hits['size'].append(present and pred['size'][i, c] == SIZES.index(o['size']))
            ok_obj &= bool(hits['shape'][-1] and hits['color'][-1] and hits['size'][-1])
        occupied = np.flatnonzero(pred['shape'][i] > 0)
        count.append(len(occupied) == len(p['objects']))
        pos.append(set(occupied.tolist()) == {o['cell'] for o in p['objects']})
        full.append(ok_obj and pos[-1] and _check_background(pred, i, p, bg[i], bgc, bgt))
    mean = lambda xs: float(np.mean(xs)) if len(xs) else float('nan')  # noqa: E731
    return dict(prompt_acc=mean(full), obj_shape_acc=mean(hits['shape']), obj_color_acc=mean(hits['color']),
                obj_size_acc=mean(hits['size']), count_acc=mean(count), position_acc=mean(pos),
                bg_color_acc=mean(bgc), bg_texture_acc=mean(bgt), n_images=float(len(parsed)),
                n_bg_color_named=float(len(bgc)), n_bg_texture_named=float(len(bgt)))


def _check_background(pred, i, parsed, bg_cells, bgc, bgt):
    """Whether image i shows the background its caption names (if any) in every background cell; appends the colour
    and texture verdicts to the lists bgc and bgt when the caption names them."""
    ok = True
    if parsed['bg_color'] is not None:
        bgc.append(bool((pred['bg_color'][i][bg_cells] == BG_COLOR_NAMES.index(parsed['bg_color'])).all()))
        ok &= bgc[-1]
    if parsed['bg_texture'] is not None:
        bgt.append(bool((pred['bg_texture'][i][bg_cells] == BG_TEXTURES.index(parsed['bg_texture'])).all()))
        ok &= bgt[-1]
    return ok


def coherence_metrics(pred, prompts=None):
    """Over the images whose prompt leaves the background colour (texture) open - all images when prompts is None -
    the fraction whose background cells all read the same colour (texture)."""
    bg = background_cells(pred['shape'])
    named = None if prompts is None else [dict(zip(('bg_color', 'bg_texture'), named_background(p))) for p in prompts]
    out = {}
    for prop in ('bg_color', 'bg_texture'):
        open_ = np.ones(len(bg), dtype=bool) if named is None else np.array([n[prop] is None for n in named])
        agree = [len(set(pred[prop][i][bg[i]].tolist())) == 1 for i in np.flatnonzero(open_)]
        out[f'coherence_{prop}'] = float(np.mean(agree)) if agree else float('nan')
        out[f'n_{prop}_open'] = float(len(agree))
    return out


def chance_levels():
    """What a generator that draws perfect scenes of this world but ignores its prompt scores (equivalently: real
    images against shuffled captions), from the world's rules: 1 or 2 objects (equally likely) in distinct cells,
    attributes uniform, each background property named with probability P_NAME_BG."""
    p_n = {1: 0.5, 2: 0.5}
    n_cells = {1: 9, 2: 36}                                   # C(9, n): the possible sets of occupied cells
    p_attr = 1 / (len(SHAPES) * len(COLORS) * len(SIZES))     # one object's shape, colour and size all agree
    p_occupied = sum(n * p for n, p in p_n.items()) / 9       # a given cell holds an object
    q = world.P_NAME_BG
    p_bgc, p_bgt = 1 / len(BG_COLORS), 1 / len(BG_TEXTURES)
    p_objects = sum(p_n[n] ** 2 / n_cells[n] * p_attr ** n for n in p_n)
    return dict(prompt_acc=p_objects * (1 - q + q * p_bgc) * (1 - q + q * p_bgt),
                obj_shape_acc=p_occupied / len(SHAPES), obj_color_acc=p_occupied / len(COLORS),
                obj_size_acc=p_occupied / len(SIZES), count_acc=sum(p ** 2 for p in p_n.values()),
                position_acc=sum(p ** 2 / n_cells[n] for n, p in p_n.items()),
                bg_color_acc=p_bgc, bg_texture_acc=p_bgt)


# -----------------------------------------------------------------------------------------------------------------
# The plan world (plan_world.py): captions with open cells, counts and relations


_LOOKS = rf"({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_PLAN_OBJECT = re.compile(rf"a {_LOOKS}(?: in the ({'|'.join(CELL_NAMES)}))?")
_PLAN_COUNT = re.compile(rf"({'|'.join(NUMBER_WORDS.values())}) ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) "
                         rf"({'|'.join(PLURALS.values())})")
_PLAN_RELATION = re.compile(rf"a {_LOOKS} ({'|'.join(RELATIONS)}) a {_LOOKS}")
_NUMBER = {w: k for k, w in NUMBER_WORDS.items()}
_SINGULAR = {p: s for s, p in PLURALS.items()}


def parse_plan_caption(text):
    """The inverse of plan_world.caption, a superset of parse_caption's grammar: {objects: [{shape, color, size,
    cell}] with cell None where the caption leaves it open (a counted group gives one entry per object), relations:
    [(i, j, relation)] over object indices ('object i is above object j'), bg_color, bg_texture}."""
    def fail(why):
        raise ValueError(f'{text!r} is not a plan-world caption ({why}); clauses read like "a large red circle [in the '
                         f'top left]", "two small blue squares" or "a large red circle above a small blue square"')
    body, bg_color, bg_texture = split_background(text, fail)
    objects, relations = [], []
    for part in body.split(' and '):
        if m := _PLAN_OBJECT.fullmatch(part):
            objects.append(dict(shape=m[3], color=m[2], size=m[1], cell=CELL_NAMES.index(m[4]) if m[4] else None))
        elif m := _PLAN_COUNT.fullmatch(part):
            objects += [dict(shape=_SINGULAR[m[4]], color=m[3], size=m[2], cell=None) for _ in range(_NUMBER[m[1]])]
        elif m := _PLAN_RELATION.fullmatch(part):
            relations.append((len(objects), len(objects) + 1, m[4]))
            objects += [dict(shape=m[3], color=m[2], size=m[1], cell=None),
                        dict(shape=m[7], color=m[6], size=m[5], cell=None)]
        else:
            fail(f'cannot read the clause {part!r}')
    named = [o['cell'] for o in objects if o['cell'] is not None]
    if len(set(named)) < len(named) or len(objects) > 9:
        fail('more objects than free cells')
    return dict(objects=objects, relations=relations, bg_color=bg_color, bg_texture=bg_texture)


def _reads_as(pred, i, cell, spec):
    """Whether cell `cell` of image i reads as the caption's object `spec` (and is its named cell, if any)."""
    return (spec['cell'] in (None, cell) and pred['shape'][i, cell] == 1 + SHAPES.index(spec['shape'])
            and pred['color'][i, cell] == COLOR_NAMES.index(spec['color'])
            and pred['size'][i, cell] == SIZES.index(spec['size']))


def plan_prompt_metrics(pred, prompts):
    """The plan world's measures of read images against their prompts (captions of either world):
    count_acc: as many objects as the caption has (a counted group and a relation included);
    objects_acc: every object of the caption is there and nothing else, i.e. a one-to-one matching of the caption's
      objects onto the occupied cells, each cell showing its object's shape, colour and size (in its cell if named);
    named_cell_acc: over objects whose cell the caption names, that cell shows the object;
    relation_acc: over captions with a relation, two occupied cells show its two objects and satisfy it;
    bg_color_acc / bg_texture_acc: as in prompt_metrics;
    prompt_acc: one matching that satisfies every object and every relation, and the named background."""
    parsed = [parse_plan_caption(p) for p in prompts]
    bg = background_cells(pred['shape'])
    out = {k: [] for k in ('prompt_acc', 'count_acc', 'objects_acc', 'named_cell_acc', 'relation_acc')}
    bgc, bgt = [], []
    for i, p in enumerate(parsed):
        specs, occupied = p['objects'], np.flatnonzero(pred['shape'][i] > 0).tolist()
        candidates = itertools.permutations(occupied) if len(occupied) == len(specs) else ()  # <= 3! orderings
        matchings = [m for m in candidates if all(_reads_as(pred, i, c, s) for s, c in zip(specs, m))]
        out['count_acc'].append(len(occupied) == len(specs))
        out['objects_acc'].append(bool(matchings))
        out['named_cell_acc'] += [_reads_as(pred, i, s['cell'], s) for s in specs if s['cell'] is not None]
        out['relation_acc'] += [any(_reads_as(pred, i, ca, specs[a]) and _reads_as(pred, i, cb, specs[b]) and
                                    relation_holds(rel, ca, cb) for ca, cb in itertools.permutations(occupied, 2))
                                for a, b, rel in p['relations']]
        planned = any(all(relation_holds(rel, m[a], m[b]) for a, b, rel in p['relations']) for m in matchings)
        out['prompt_acc'].append(_check_background(pred, i, p, bg[i], bgc, bgt) and planned)
    mean = lambda xs: float(np.mean(xs)) if len(xs) else float('nan')  # noqa: E731
    return {k: mean(v) for k, v in out.items()} | dict(
        bg_color_acc=mean(bgc), bg_texture_acc=mean(bgt), n_images=float(len(parsed)),
        n_named_cells=float(len(out['named_cell_acc'])), n_relations=float(len(out['relation_acc'])),
        n_bg_color_named=float(len(bgc)), n_bg_texture_named=float(len(bgt)))


GENEVAL_GROUPS = ('single_object', 'two_object', 'counting', 'colors', 'position', 'color_attr')
_COUNT_CLAUSE = re.compile(rf"(?:^| and )({'|'.join(NUMBER_WORDS.values())}) ({'|'.join(SIZES)}) "
                           rf"({'|'.join(COLORS)}) ({'|'.join(PLURALS.values())})(?= and |$)")


def geneval_metrics(pred, prompts):
    """GenEval's six task groups on read images (read_images) against prompts of either world, as far as our prompts
    allow. A prompt joins the group its caption matches, and an object 'is there' when some occupied cell reads its
    shape (and colour, where the group asks for it); like GenEval, extra objects are not penalised outside counting
    and sizes are not checked (prompt_acc checks everything):
      counting       a counted group ('two small red circles', plan world): the image shows exactly as many objects
                     of each counted shape as the caption has
      single_object  one object: an object of its shape is there         colors      ... and of its colour
      two_object     two objects (no count): both shapes are there, in two different cells
      color_attr     two objects of different colours: each is there with its own colour, in two different cells
      position       two or more objects placed by the caption: each relation holds between two cells showing its
                     two objects (plan world: GenEval's relative positions), or, without a relation, both objects
                     of a two-object caption stand in their named cells (absolute positions, both named)
    -> geneval_<group> (nan where no prompt belongs to a group), n_geneval_<group>, and geneval_overall: the mean of
    the groups that have prompts (GenEval's overall is the mean of its six; the default world has no counting)."""
    out = {g: [] for g in GENEVAL_GROUPS}
    for i, text in enumerate(prompts):
        p = parse_plan_caption(text)
        objs, rels = p['objects'], p['relations']
        occupied = np.flatnonzero(pred['shape'][i] > 0).tolist()

        def there(spec, cell, keys):
            return (pred['shape'][i, cell] == 1 + SHAPES.index(spec['shape']) and
                    ('color' not in keys or pred['color'][i, cell] == COLOR_NAMES.index(spec['color'])) and
                    ('cell' not in keys or spec['cell'] in (None, cell)))

        def matched(specs, keys, check=lambda cells: True):  # distinct occupied cells showing the specs, in order
            return any(all(there(s, c, keys) for s, c in zip(specs, cells)) and check(cells)
                       for cells in itertools.permutations(occupied, len(specs)))
        counted = [_SINGULAR[m[4]] for m in _COUNT_CLAUSE.finditer(_clauses(text))]
        if counted:
            out['counting'].append(all(sum(pred['shape'][i, c] == 1 + SHAPES.index(s) for c in occupied) ==
                                       sum(o['shape'] == s for o in objs) for s in set(counted)))
            continue
        if len(objs) == 1:
            out['single_object'].append(matched(objs, ('shape',)))
            out['colors'].append(matched(objs, ('shape', 'color')))
        if len(objs) == 2:
            out['two_object'].append(matched(objs, ('shape',)))
            if objs[0]['color'] != objs[1]['color']:
                out['color_attr'].append(matched(objs, ('shape', 'color')))
        if rels:
            out['position'].append(all(matched([objs[a], objs[b]], ('shape', 'color'),
                                               lambda cells, r=r: relation_holds(r, *cells)) for a, b, r in rels))
        elif len(objs) == 2 and all(o['cell'] is not None for o in objs):
            out['position'].append(matched(objs, ('shape', 'color', 'cell')))
    scores = {f'geneval_{g}': float(np.mean(v)) if v else float('nan') for g, v in out.items()}
    present = [s for s in scores.values() if not np.isnan(s)]
    return scores | {f'n_geneval_{g}': float(len(v)) for g, v in out.items()} | dict(
        geneval_overall=float(np.mean(present)) if present else float('nan'))


def _clauses(text):
    """A caption without its background phrase (the clauses only)."""
    def fail(why):
        raise ValueError(f'{text!r} is not a shapes caption ({why})')
    return split_background(text, fail)[0]


def caption_world(prompts):
    """'default' when every prompt is a default-world caption, else 'plan' (whose grammar contains the default's)."""
    try:
        for p in prompts:
            parse_caption(p)
        return 'default'
    except ValueError:
        return 'plan'


_REAL_CACHE = {}


def real_val_images(image_size=32, n=1000, world_name='default'):
    """The first n images of a world's default val split (seed 1338), rendered here so no prepared files are
    needed."""
    key = (image_size, n, world_name)
    if key not in _REAL_CACHE:
        _REAL_CACHE[key] = worlds.make_split(n, VAL_SEED, image_size, world=world_name)[1]
    return _REAL_CACHE[key]


def evaluate_samples(images_uint8, prompts, evaluator=None, real_images=None, inception=None, progress=False,
                     world_name=None):
    """All metrics of generated images uint8 (N, H, W, 3) given their prompts: a flat dict of floats (nan where a
    metric has no images, e.g. coherence when every prompt names the background). real_images: the Frechet
    reference (default: 1000 real val images of the world); inception: a weights path or a loaded fid.py Inception
    model; world_name: 'default' (prompt_metrics) or 'plan' (plan_prompt_metrics); None = caption_world(prompts)."""
    import fid
    images = np.asarray(images_uint8)
    if len(images) != len(prompts):
        raise ValueError(f'{len(images)} images but {len(prompts)} prompts: give one prompt per image')
    if len(images) < 2:
        raise ValueError('need at least 2 images (the Frechet distance needs a covariance)')
    evaluator = evaluator or get_evaluator(EvalConfig(image_size=images.shape[1]))
    world_name = world_name or caption_world(prompts)
    real = real_val_images(images.shape[1], world_name=world_name) if real_images is None else np.asarray(real_images)
    pred = read_images(evaluator, images, progress=progress)
    scores = prompt_metrics if world_name == 'default' else plan_prompt_metrics
    metrics = scores(pred, prompts) | coherence_metrics(pred, prompts) | geneval_metrics(pred, prompts)
    real_feats = read_images(evaluator, real)['features']
    metrics['frechet_evaluator'] = fid.frechet_distance(*fid.compute_statistics(pred['features']),
                                                        *fid.compute_statistics(real_feats))
    if inception is not None:
        model = fid.load_inception(inception) if isinstance(inception, (str, os.PathLike)) else inception
        metrics['fid_inception'] = fid.frechet_distance(*fid.activation_statistics(images, model, progress=progress),
                                                        *fid.activation_statistics(real, model, progress=progress))
    return metrics


# -----------------------------------------------------------------------------------------------------------------
# Command line


def load_samples_dir(folder):
    """(uint8 (N, H, W, 3), prompts) from a folder of PNGs and prompts.jsonl ({"file", "prompt"} or {"prompt"} per
    line) or prompts.txt: one line per image in sorted file order, or, for sample.py's p<prompt>_s<sample>.png
    files, one line per prompt."""
    from PIL import Image
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'--samples_dir={folder!r} is not a folder (make one with sample.py --out_dir=...)')
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith('.png'))
    if not files:
        raise ValueError(f'{folder!r} holds no PNG files')
    jsonl, txt = os.path.join(folder, 'prompts.jsonl'), os.path.join(folder, 'prompts.txt')
    if os.path.exists(jsonl):
        with open(jsonl) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        if all('file' in r for r in rows):
            by_file = {os.path.basename(r['file']): r['prompt'] for r in rows}
            files = sorted(by_file)
            prompts = [by_file[f] for f in files]
        else:
            prompts = [r['prompt'] for r in rows]
    elif os.path.exists(txt):
        with open(txt) as f:
            prompts = f.read().splitlines()
        named = [re.fullmatch(r'p(\d+)_s(\d+)\.png', f) for f in files]
        if all(named) and len(prompts) != len(files):
            prompts = [prompts[int(m[1])] for m in named]
    else:
        raise FileNotFoundError(f'{folder!r} has no prompts.txt or prompts.jsonl saying what each image was asked for')
    if len(prompts) != len(files):
        raise ValueError(f'{folder!r}: {len(files)} PNGs but {len(prompts)} prompts')
    images = [np.asarray(Image.open(os.path.join(folder, f)).convert('RGB')) for f in files]
    if len({im.shape for im in images}) > 1:
        raise ValueError(f'{folder!r}: images of different sizes {sorted({im.shape for im in images})}')
    return np.stack(images), prompts


@torch.no_grad()
def reconstruct(images_uint8, vqgan_path, batch_size=250):
    """uint8 (N, H, W, 3) -> the tokenizer's reconstructions through its discrete codes, uint8 (N, H, W, 3)."""
    from vqgan import load_vqgan
    from utils import to_uint8_hwc, uint8_to_float
    vq = load_vqgan(vqgan_path)
    out = [to_uint8_hwc(vq.decode(vq.encode(uint8_to_float(images_uint8[i:i + batch_size]))))
           for i in range(0, len(images_uint8), batch_size)]
    return np.concatenate(out)


def print_table(metrics, title, world_name='default'):
    chance = chance_levels() if world_name == 'default' else {}
    print(f'\n{title}')
    print(f'{"metric":<22}{"value":>10}{"chance":>10}')
    for k, v in metrics.items():
        print(f'{k:<22}{v:>10.4f}' + (f'{chance[k]:>10.4f}' if k in chance else ''))


def main(argv):
    from configurator import configure
    argv = [a + '=True' if a in ('--train', '--real') else a for a in argv]  # bare flags switch them on
    cfg = configure(EvalConfig(), argv)
    if cfg.real and cfg.samples_dir:
        raise SystemExit('pass either --real or --samples_dir=DIR, not both')
    if cfg.vqgan and not cfg.real:
        raise SystemExit('--vqgan=PATH scores reconstructions of the val images: add --real')
    if cfg.samples_dir:  # the samples' resolution picks the evaluator (one checkpoint per image size)
        images, prompts = load_samples_dir(cfg.samples_dir)
        cfg = replace(cfg, image_size=images.shape[1])
    evaluator = get_evaluator(cfg)
    print('evaluator val per-cell accuracy: ' +
          ', '.join(f'{k} {v:.4f}' for k, v in evaluator.info['val_accuracy'].items()))
    if not (cfg.real or cfg.samples_dir):
        return None
    if cfg.real:  # val images vs their own captions; the Frechet reference is then train-split images (a floor)
        name = cfg.world or 'default'
        _, images, prompts = worlds.make_split(cfg.n_real, VAL_SEED, cfg.image_size, world=name)
        real, title = worlds.make_split(cfg.n_real, VAL_SEED - 1, cfg.image_size, world=name)[1], 'real val images'
        if cfg.vqgan:
            images, title = reconstruct(images, cfg.vqgan), f'reconstructions of val images by {cfg.vqgan}'
    else:
        name = cfg.world or caption_world(prompts)
        real, title = real_val_images(cfg.image_size, cfg.n_real, name), cfg.samples_dir
    if not cfg.inception:
        print('no --inception=PATH: skipping the Inception FID')
    metrics = evaluate_samples(images, prompts, evaluator, real, cfg.inception or None, progress=True, world_name=name)
    print_table(metrics, f'{title} ({name} world): {len(images)} images', name)
    if cfg.json_out:
        from utils import atomic_write_bytes
        atomic_write_bytes(json.dumps(metrics, indent=1).encode(), cfg.json_out)
        print(f'wrote {cfg.json_out}')
    return metrics


if __name__ == '__main__':
    main(sys.argv[1:])
