"""
The `plan` variant of the shapes world: captions that leave part of the layout to the generator, so it has to commit
to a plan for objects it has not drawn yet (where they go, how many are still to come, which row must stay free).

    python data/shapes/prepare.py --world=plan --out_dir=data/shapes_plan

Same canvas, grid, shapes, colours, sizes, backgrounds and renderer as world.py (all of them canvas.py's, which this
module builds on), so the evaluator reads it unchanged; only the scene sampler and the caption grammar differ. The
rules, for people, are in data/shapes/README.md:
1-3 objects in distinct cells; with two or more, sometimes a counted group of identical objects ("two large red
circles") or a spatial relation between two objects ("a small blue square above a large red circle"), whose cells
the caption does not name; every other object is named alone, its cell given only half of the time.

Everything is a pure function of a seeded numpy Generator (make_split, or worlds.make_split(..., world='plan')).
"""
from data.shapes.canvas import CELL_NAMES, background_phrase, draw_objects, draw_background, render_split

MAX_OBJECTS = 3
P_COUNT = 1 / 3           # with >= 2 objects: the first k of them (k uniform in 2..n) become one counted group
P_RELATION = 1 / 2        # else, with >= 2 objects: two of them are described by a relation
P_NAME_CELL = 0.5         # each object described alone has its cell named with this probability
RELATIONS = ('above', 'below', 'left of', 'right of')  # by grid row / column, not necessarily adjacent
NUMBER_WORDS = {2: 'two', 3: 'three'}
PLURALS = {'circle': 'circles', 'square': 'squares', 'triangle': 'triangles', 'diamond': 'diamonds',
           'cross': 'crosses'}
TEXT_LEN = 36             # open_clip BPE tokens (SOT and EOT included) that hold every plan caption (longest: 33)


def relation_holds(relation, cell_a, cell_b):
    """Whether the object in cell_a is `relation` the one in cell_b: 'above' = a smaller row, 'left of' = a smaller
    column (any distance, any other coordinate)."""
    (ra, ca), (rb, cb) = divmod(cell_a, 3), divmod(cell_b, 3)
    return {'above': ra < rb, 'below': ra > rb, 'left of': ca < cb, 'right of': ca > cb}[relation]


def sample_scene(rng):
    """Draw one plan-world scene: a JSON-serialisable dict with the objects (each with its cell: the renderer needs
    it), the caption's clauses (which objects each one describes, and how), and the background."""
    n = 1 + int(rng.integers(MAX_OBJECTS))
    cells = rng.choice(9, size=n, replace=False)
    objects = draw_objects(rng, cells)
    clauses, rest = [], list(range(n))
    if n >= 2 and rng.random() < P_COUNT:
        k = 2 + int(rng.integers(n - 1))
        for i in rest[1:k]:  # the group looks alike: it is named once, with a number
            objects[i].update({a: objects[0][a] for a in ('shape', 'color', 'size')})
        clauses.append(dict(kind='count', objects=rest[:k]))
        rest = rest[k:]
    elif n >= 2 and rng.random() < P_RELATION:
        a, b = rest[:2]
        true = [r for r in RELATIONS if relation_holds(r, objects[a]['cell'], objects[b]['cell'])]
        clauses.append(dict(kind='relation', objects=[a, b], relation=true[rng.integers(len(true))]))
        rest = rest[2:]
    for i in rest:
        clauses.append(dict(kind='object', objects=[i], name_cell=bool(rng.random() < P_NAME_CELL)))
    clauses = [clauses[j] for j in rng.permutation(len(clauses))]  # the caption's order of clauses is random
    return dict(world='plan', objects=objects, clauses=clauses, **draw_background(rng))


def _looks(o):
    return f"{o['size']} {o['color']} {o['shape']}"


def caption(scene):
    """The scene's caption, e.g. 'two small red circles and a large blue square in the center on a striped
    background' or 'a large white cross below a small green diamond'."""
    objects, parts = scene['objects'], []
    for c in scene['clauses']:
        first = objects[c['objects'][0]]
        if c['kind'] == 'object':
            parts.append(f'a {_looks(first)}' + (f" in the {CELL_NAMES[first['cell']]}" if c['name_cell'] else ''))
        elif c['kind'] == 'count':
            parts.append(f"{NUMBER_WORDS[len(c['objects'])]} {first['size']} {first['color']} "
                         f"{PLURALS[first['shape']]}")
        elif c['kind'] == 'relation':
            parts.append(f"a {_looks(first)} {c['relation']} a {_looks(objects[c['objects'][1]])}")
        else:
            raise ValueError(f"unknown clause kind {c['kind']!r} in a plan scene")
    return ' and '.join(parts) + background_phrase(scene)


def make_split(n, seed, image_size=32, progress=False):
    """n plan-world scenes, their images (n, H, W, 3) uint8 and captions, all determined by `seed`."""
    return render_split(sample_scene, caption, n, seed, image_size, progress)
