"""
The teachers the shapes encode step can write into {split}_teacher.bin, chosen with --teacher_kind:

    python data/shapes/prepare.py --stage=encode --teacher_kind=clip           # the shapes CLIP (train_teacher.py)
    python data/shapes/prepare.py --stage=encode --teacher_kind=clip_strong    # train_teacher.py --preset=strong
    python data/shapes/prepare.py --stage=encode --teacher_kind=scene          # the ground-truth scene (an oracle)

`scene` is what a perfect teacher would say: the true scene of each image (every cell's shape, colour and size, and
the background colour and texture) as one-hot attributes, mapped through a fixed random projection (seed
SCENE_SEED) to D = SCENE_DIM and L2-normalised, like a CLIP embedding. It is a deterministic function of the scene
record in {split}_scenes.jsonl, never of the pixels, so it carries exactly the image's content and nothing else.
Aligning to it tells apart "the teacher is weak" from "alignment does not help this model".

Patch targets (prepare.py --patch_targets=True, for train.py --align_target=patch|both): a CLIP kind gives its ViT's
patch tokens resampled to the code grid (data/encode.py embed_patch_dataset; a shapes CLIP with 4 px patches on 32 px
images, as scripts/experiment.py trains, is already the 8x8 code grid; the default 8 px patches' 4x4 grid is pooled
up); `scene` gives `ScenePatchTeacher`, its patch-wise twin: for each code cell, what it truly shows, from the
scene record: the object whose bounding box holds the cell's centre (shape, colour, size; else 'empty'), the
background colour and texture, and the fraction of the cell's pixel rows in a light stripe, through a fixed random
projection (seed PATCH_SEED) to D = SCENE_DIM, L2-normalised.
"""
import hashlib
import os

import numpy as np

from data.shapes.world import SHAPES, COLORS, SIZES, BG_COLORS, BG_TEXTURES, STRIPE_PERIOD, cell_box, object_radius

TEACHER_KINDS = ('clip', 'clip_strong', 'scene')
DEFAULT_CHECKPOINTS = {'clip': 'out/teacher_shapes/teacher.pt',                 # python data/shapes/train_teacher.py
                       'clip_strong': 'out/teacher_shapes_strong/teacher.pt'}  # ... --preset=strong
SCENE_DIM = 64        # the shapes CLIP's width, so the GPT's projector is the same whichever teacher it aligns to
SCENE_SEED = 2503     # the projection's seed: part of the teacher's identity (meta.json)
CELL_FEATURES = (1 + len(SHAPES)) + len(COLORS) + len(SIZES)   # shape (or empty), colour, size: 15 per cell
SCENE_FEATURES = 9 * CELL_FEATURES + len(BG_COLORS) + len(BG_TEXTURES)   # 141
PATCH_SEED = 2504     # the patch oracle's projection seed
PATCH_FEATURES = CELL_FEATURES + len(BG_COLORS) + len(BG_TEXTURES) + 1   # what one code cell shows: 22


def teacher_checkpoint(kind, path=''):
    """The checkpoint a CLIP kind reads: `path` when given, else the kind's default (None for `scene`)."""
    if kind not in TEACHER_KINDS:
        raise ValueError(f'--teacher_kind={kind!r}: choose one of {", ".join(TEACHER_KINDS)}')
    if kind == 'scene':
        if path:
            raise ValueError(f'--teacher_kind=scene reads no checkpoint; drop --teacher={path}')
        return None
    return path or DEFAULT_CHECKPOINTS[kind]


def scene_onehot(scene):
    """float32 (SCENE_FEATURES,): per cell in raster order [empty or shape (6), colour (7), size (2)], then the
    background colour (4) and texture (2). An empty cell sets only its 'empty' entry."""
    x = np.zeros(SCENE_FEATURES, dtype=np.float32)
    x[np.arange(9) * CELL_FEATURES] = 1.0                                  # every cell empty ...
    for o in scene['objects']:                                             # ... until an object fills it
        base = o['cell'] * CELL_FEATURES
        x[base] = 0.0
        x[base + 1 + SHAPES.index(o['shape'])] = 1.0
        x[base + 1 + len(SHAPES) + list(COLORS).index(o['color'])] = 1.0
        x[base + 1 + len(SHAPES) + len(COLORS) + SIZES.index(o['size'])] = 1.0
    x[9 * CELL_FEATURES + list(BG_COLORS).index(scene['bg_color'])] = 1.0
    x[9 * CELL_FEATURES + len(BG_COLORS) + BG_TEXTURES.index(scene['bg_texture'])] = 1.0
    return x


class SceneTeacher:
    """The oracle teacher: embed(scenes) -> float32 (N, D) unit vectors, normalize(onehot(scene) @ P), with P a
    fixed (SCENE_FEATURES, D) Gaussian matrix. Quacks like teacher.Teacher where the encode step needs it (.name,
    .dim, .identity())."""
    name = 'shapes-scene-oracle'

    def __init__(self, dim=SCENE_DIM, seed=SCENE_SEED):
        self.dim, self.seed = dim, seed
        self.projection = np.random.default_rng(seed).standard_normal((SCENE_FEATURES, dim)).astype(np.float32)

    def embed(self, scenes):
        x = np.stack([scene_onehot(s) for s in scenes])                    # (N, F)
        e = x @ self.projection                                            # (N, D)
        return e / np.linalg.norm(e, axis=1, keepdims=True)

    def identity(self):
        """meta.json's record: the sha256 covers the projection, so another seed or width is another teacher."""
        sha = hashlib.sha256(f'{self.name}:{SCENE_FEATURES}:{self.dim}:{self.seed}'.encode()
                             + self.projection.tobytes()).hexdigest()
        return dict(name=self.name, pretrained=None, path=None, sha256=sha, dim=self.dim, seed=self.seed)


def patch_onehot(scene, grid, image_size):
    """float32 (T, PATCH_FEATURES), T = grid_h * grid_w code cells in raster order: per code cell [empty or shape (6),
    colour (7), size (2)] of the object whose bounding box (centre +- world.object_radius) holds the code cell's
    centre, the background colour (4) and texture (2), and the fraction of its pixel rows in a light stripe."""
    gh, gw = grid
    x = np.zeros((gh * gw, PATCH_FEATURES), dtype=np.float32)
    cy = (np.arange(gh) + 0.5) * image_size / gh                           # (gh,) centres of the code rows, px
    cx = (np.arange(gw) + 0.5) * image_size / gw                           # (gw,)
    inside_any = np.zeros((gh, gw), dtype=bool)
    for o in scene['objects']:
        x0, y0, x1, y1 = cell_box(o['cell'], image_size)
        r = object_radius(o['size'], image_size)
        inside = (np.abs(cy - (y0 + y1) / 2) <= r)[:, None] & (np.abs(cx - (x0 + x1) / 2) <= r)[None, :]  # (gh, gw)
        idx = np.flatnonzero(inside)
        x[idx, 1 + SHAPES.index(o['shape'])] = 1.0
        x[idx, 1 + len(SHAPES) + list(COLORS).index(o['color'])] = 1.0
        x[idx, 1 + len(SHAPES) + len(COLORS) + SIZES.index(o['size'])] = 1.0
        inside_any |= inside
    x[~inside_any.reshape(-1), 0] = 1.0                                     # 'empty': background only
    x[:, CELL_FEATURES + list(BG_COLORS).index(scene['bg_color'])] = 1.0
    x[:, CELL_FEATURES + len(BG_COLORS) + BG_TEXTURES.index(scene['bg_texture'])] = 1.0
    if scene['bg_texture'] == 'striped':                                    # as world.background draws the bands
        period = max(2, int(round(image_size * STRIPE_PERIOD)))
        light = (np.arange(image_size) % period) >= period // 2             # (H,) pixel rows in a light band
        rows = np.array_split(light, gh)                                    # the pixel rows of each code row
        x[:, -1] = np.repeat([band.mean() for band in rows], gw)
    return x


class ScenePatchTeacher:
    """The patch oracle: embed(scenes, grid, image_size) -> float32 (N, T, D) unit vectors,
    normalize(patch_onehot(scene) @ P), P a fixed (PATCH_FEATURES, D) Gaussian matrix. Two code cells that show
    the same thing get the same target, wherever they are."""
    name = 'shapes-scene-patch-oracle'

    def __init__(self, dim=SCENE_DIM, seed=PATCH_SEED):
        self.dim, self.seed = dim, seed
        self.projection = np.random.default_rng(seed).standard_normal((PATCH_FEATURES, dim)).astype(np.float32)

    def embed(self, scenes, grid, image_size):
        x = np.stack([patch_onehot(s, grid, image_size) for s in scenes])   # (N, T, F)
        e = x @ self.projection                                              # (N, T, D)
        return e / np.linalg.norm(e, axis=-1, keepdims=True)

    def identity(self):
        sha = hashlib.sha256(f'{self.name}:{PATCH_FEATURES}:{self.dim}:{self.seed}'.encode()
                             + self.projection.tobytes()).hexdigest()
        return dict(name=self.name, pretrained=None, path=None, sha256=sha, dim=self.dim, seed=self.seed)


def patch_split(teacher, data_dir, split, images, grid, batch_size=256, progress=True):
    """-> (float16 (N, T, D_p) patch targets of a rendered split on the code grid, their teacher's identity, the
    teacher's own patch grid, how it was resampled): the scene patch oracle for `scene`, the CLIP's patch tokens
    otherwise."""
    if isinstance(teacher, SceneTeacher):
        from data.common import load_scenes
        oracle = ScenePatchTeacher()
        scenes = load_scenes(data_dir, split)
        if len(scenes) != len(images):
            raise ValueError(f'{split}: {len(images)} images but {len(scenes)} scene records in {data_dir}; '
                             f're-render with `python data/shapes/prepare.py`')
        array = oracle.embed(scenes, grid, images.shape[1]).astype(np.float16)
        return array, oracle.identity(), tuple(grid), 'none: computed per code cell from the scene record'
    from data.encode import embed_patch_dataset, teacher_patch_grid, resample_note
    src = teacher_patch_grid(teacher)
    return (embed_patch_dataset(teacher, images, tuple(grid), batch_size, progress), teacher.identity(), src,
            resample_note(src, grid))


def load_teacher(kind, path, device):
    """The teacher of a kind: a SceneTeacher, or the saved CLIP (teacher.Teacher) at the resolved checkpoint."""
    if kind == 'scene':
        return SceneTeacher()
    from teacher import Teacher
    return Teacher.load(os.path.abspath(teacher_checkpoint(kind, path)), device=device)  # identity() records it


def embed_split(teacher, data_dir, split, images, batch_size=256, progress=True):
    """float16 (N, D) teacher features of a rendered split: from the pixels for a CLIP, from the scene records
    ({split}_scenes.jsonl) for the oracle."""
    if isinstance(teacher, SceneTeacher):
        from data.common import load_scenes
        scenes = load_scenes(data_dir, split)
        if len(scenes) != len(images):
            raise ValueError(f'{split}: {len(images)} images but {len(scenes)} scene records in {data_dir}; '
                             f're-render with `python data/shapes/prepare.py`')
        return teacher.embed(scenes).astype(np.float16)
    from teacher import embed_dataset
    return embed_dataset(teacher, images, batch_size, progress)
