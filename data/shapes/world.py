"""
The `shapes` world: procedurally rendered text-image pairs, the project's embedded default dataset.

Each image shows one or two coloured shapes, each in its own cell of a 3x3 grid, on a background with a colour and a
texture (plain or striped). The caption always names every object's size, colour, shape and cell; it names the
background colour and texture each only half of the time. When the caption is silent about the background, the
generator must pick one itself and keep it the same over the whole image: the global coherence ARRA targets.

Everything is a pure function of a seeded numpy Generator, so a split is identical for a seed on any machine.
The rules are documented for people in data/shapes/README.md. The vocabulary and the renderer, shared with the plan
world (plan_world.py), are canvas.py's and are re-exported here (world.COLORS, world.render, ...). This module knows
only its own world: worlds.py picks a world by name (worlds.make_split(..., world='plan')), so world.py and
plan_world.py each import canvas.py alone.
"""
import numpy as np

from data.shapes.canvas import (SHAPES, COLORS, SIZES, ROWS, COLS, CELL_NAMES, BG_COLORS, BG_TEXTURES,  # noqa: F401
                                STRIPE_LIFT, STRIPE_PERIOD, SUPERSAMPLE, P_NAME_BG, draw_objects, draw_background,
                                background_phrase, cell_box, shape_polygon, object_radius, background, render,
                                render_split)


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
        raise ValueError(f"a {scene['world']!r} world scene: caption it with worlds.caption(scene)")
    parts = [f"a {o['size']} {o['color']} {o['shape']} in the {CELL_NAMES[o['cell']]}" for o in scene['objects']]
    return ' and '.join(parts) + background_phrase(scene)


def make_split(n, seed, image_size=32, progress=False):
    """n scenes of this world, their images (n, H, W, 3) uint8 and captions, all determined by `seed`."""
    return render_split(sample_scene, caption, n, seed, image_size, progress)
