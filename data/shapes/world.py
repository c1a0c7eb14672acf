"""
The `shapes` world: procedurally rendered text-image pairs, the project's embedded default dataset.

Each image shows one or two coloured shapes, each in its own cell of a 3x3 grid, on a background with a colour and a
texture (plain or striped). The caption always names every object's size, colour, shape and cell; it names the
background colour and texture each only half of the time. When the caption is silent about the background, the
generator must pick one itself and keep it the same over the whole image: the global coherence ARRA targets.

Everything is a pure function of a seeded numpy Generator, so a split is identical for a seed on any machine.
The rules are documented for people in data/shapes/README.md. The vocabulary and the renderer, shared with the plan
world (plan_world.py), are canvas.py's and are re-exported here (world.COLORS, world.render, ...); make_split and
caption pick a world by name. The imports run one way: world -> plan_world -> canvas.
"""
import numpy as np

from data.shapes import plan_world
from data.shapes.canvas import (SHAPES, COLORS, SIZES, ROWS, COLS, CELL_NAMES, BG_COLORS, BG_TEXTURES,  # noqa: F401
                                STRIPE_LIFT, STRIPE_PERIOD, SUPERSAMPLE, P_NAME_BG, draw_objects, draw_background,
                                background_phrase, cell_box, shape_polygon, object_radius, background, render)

VARIANTS = {'plan': plan_world}  # other worlds by name: a module with sample_scene(rng) and caption(scene) each
WORLDS = ('default', *VARIANTS)  # 'plan': captions that leave part of the layout open


def sample_scene(rng):
    """Draw one scene: a plain dict (JSON-serialisable) that fully determines the image and its caption."""
    n_objects = 1 + int(rng.integers(2))
    cells = rng.choice(9, size=n_objects, replace=False)
    # objects in caption order (random, so the text does not always run in raster order)
    return dict(objects=draw_objects(rng, cells), **draw_background(rng))


def caption(scene):
    """The scene's caption in plain English, e.g. 'a large red circle in the top left and a small blue square in
    the center on a striped gray background'."""
    if scene.get('world', 'default') != 'default':
        return _variant(scene['world']).caption(scene)
    parts = [f"a {o['size']} {o['color']} {o['shape']} in the {CELL_NAMES[o['cell']]}" for o in scene['objects']]
    return ' and '.join(parts) + background_phrase(scene)


def _variant(name):
    """The module of a world variant."""
    if name not in VARIANTS:
        raise ValueError(f'unknown shapes world {name!r}; choose one of {WORLDS}')
    return VARIANTS[name]


def make_split(n, seed, image_size=32, progress=False, world='default'):
    """n scenes of `world` ('default' or 'plan'), their images (n, H, W, 3) uint8 and captions, all determined by
    `seed`."""
    rng = np.random.default_rng(seed)
    sample = sample_scene if world == 'default' else _variant(world).sample_scene
    scenes = [sample(rng) for _ in range(n)]
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    it = range(n)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f'render {n} images', unit='img', leave=False)
    for i in it:
        images[i] = render(scenes[i], image_size)
    return scenes, images, [caption(s) for s in scenes]
