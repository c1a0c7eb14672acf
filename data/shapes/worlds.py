"""
The shapes worlds by name, for the commands that take --world: 'default' (world.py: every object named with its
cell) and 'plan' (plan_world.py: captions that leave part of the layout open). Both build on canvas.py and neither
imports the other; this registry is the one module that knows them all.
"""
from data.shapes import world, plan_world

WORLDS = {'default': world, 'plan': plan_world}  # each: sample_scene(rng), caption(scene), make_split(n, seed, ...)


def get(name):
    """The module of a world, by name."""
    if name not in WORLDS:
        raise ValueError(f'unknown shapes world {name!r}; choose one of {", ".join(WORLDS)}')
    return WORLDS[name]


def make_split(n, seed, image_size=32, progress=False, world='default'):
    """n scenes of `world`, their images (n, H, W, 3) uint8 and captions, all determined by `seed`."""
    return get(world).make_split(n, seed, image_size, progress)


def caption(scene):
    """The caption of a scene of any world (a scene records its world; default-world scenes may not)."""
    return get(scene.get('world', 'default')).caption(scene)
