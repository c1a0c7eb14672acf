"""
What every shapes world shares: the vocabulary (shapes, colours, sizes, the 3x3 grid's cells, backgrounds), the
draws of objects and backgrounds from a seeded numpy Generator, the background phrase of a caption, and the
renderer. world.py (the default world, and the choice of world by name) and plan_world.py (its variant) both build
on this module; it knows neither.
"""
import numpy as np
from PIL import Image, ImageDraw

SHAPES = ('circle', 'square', 'triangle', 'diamond', 'cross')
COLORS = {  # name -> RGB; all bright, so each stands out on every (dark) background
    'red': (230, 40, 40), 'green': (40, 200, 60), 'blue': (60, 120, 255), 'yellow': (240, 220, 40),
    'purple': (170, 70, 230), 'orange': (255, 140, 20), 'white': (245, 245, 245),
}
SIZES = ('small', 'large')
ROWS = ('top', 'middle', 'bottom')
COLS = ('left', 'center', 'right')
CELL_NAMES = ('top left', 'top center', 'top right', 'middle left', 'center', 'middle right',
              'bottom left', 'bottom center', 'bottom right')  # raster order, cell = 3 * row + col
BG_COLORS = {'black': (15, 15, 15), 'gray': (105, 105, 105), 'navy': (20, 30, 95), 'brown': (95, 55, 25)}
BG_TEXTURES = ('plain', 'striped')
STRIPE_LIFT = 50          # striped backgrounds alternate the base colour and the base colour + this
STRIPE_PERIOD = 1 / 4     # stripe period as a fraction of the image height (4 light + 4 dark bands)
SUPERSAMPLE = 4           # draw at 4x then box-filter down: clean antialiased edges at 32 px
P_NAME_BG = 0.5           # probability that the caption names the background colour (and, independently, texture)


def draw_objects(rng, cells):
    """One object of uniformly drawn shape, colour and size in each of the given cells."""
    return [dict(shape=SHAPES[rng.integers(len(SHAPES))], color=list(COLORS)[rng.integers(len(COLORS))],
                 size=SIZES[rng.integers(len(SIZES))], cell=int(c)) for c in cells]


def draw_background(rng):
    """The background colour and texture, and whether the caption names each."""
    return dict(bg_color=list(BG_COLORS)[rng.integers(len(BG_COLORS))],
                bg_texture=BG_TEXTURES[rng.integers(len(BG_TEXTURES))],
                name_bg_color=bool(rng.random() < P_NAME_BG),
                name_bg_texture=bool(rng.random() < P_NAME_BG))


def background_phrase(scene):
    """' on a striped gray background', ' on a plain background', ... or '' when the caption names neither."""
    bg = [w for w, named in ((scene['bg_texture'], scene['name_bg_texture']),
                             (scene['bg_color'], scene['name_bg_color'])) if named]
    return f" on a {' '.join(bg)} background" if bg else ''


def cell_box(cell, image_size):
    """(x0, y0, x1, y1) pixel box of a grid cell; cells split the image into thirds."""
    r, c = divmod(cell, 3)
    edges = np.linspace(0, image_size, 4)
    return edges[c], edges[r], edges[c + 1], edges[r + 1]


def shape_polygon(shape, cx, cy, radius):
    """Vertices of a polygonal shape centred at (cx, cy) whose extent is `radius` from the centre."""
    r = radius
    if shape == 'square':
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == 'triangle':  # pointing up, centred on its bounding box
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == 'diamond':
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == 'cross':  # a plus sign with arms a third of the width
        a = r / 3
        return [(cx - a, cy - r), (cx + a, cy - r), (cx + a, cy - a), (cx + r, cy - a), (cx + r, cy + a),
                (cx + a, cy + a), (cx + a, cy + r), (cx - a, cy + r), (cx - a, cy + a), (cx - r, cy + a),
                (cx - r, cy - a), (cx - a, cy - a)]
    raise ValueError(f'unknown shape {shape!r}; known: {SHAPES}')


def object_radius(size, image_size):
    """Half-extent in pixels of a small or large object: large nearly fills its cell."""
    cell = image_size / 3
    return cell * (0.42 if size == 'large' else 0.26)


def background(scene, image_size):
    """uint8 (H, W, 3) background: the base colour, with horizontal light bands when striped."""
    base = np.array(BG_COLORS[scene['bg_color']], dtype=np.int16)
    img = np.broadcast_to(base, (image_size, image_size, 3)).copy()
    if scene['bg_texture'] == 'striped':
        period = max(2, int(round(image_size * STRIPE_PERIOD)))
        rows = (np.arange(image_size) % period) >= period // 2    # (H,) the light half of each period
        img[rows] = np.clip(base + STRIPE_LIFT, 0, 255)
    return img.astype(np.uint8)


def render(scene, image_size=32):
    """Render a scene to uint8 (H, W, 3)."""
    big = image_size * SUPERSAMPLE
    bg = Image.fromarray(background(scene, image_size)).resize((big, big), Image.NEAREST)
    draw = ImageDraw.Draw(bg)
    for o in scene['objects']:
        x0, y0, x1, y1 = (v * SUPERSAMPLE for v in cell_box(o['cell'], image_size))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        r = object_radius(o['size'], image_size) * SUPERSAMPLE
        color = COLORS[o['color']]
        if o['shape'] == 'circle':
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        else:
            draw.polygon(shape_polygon(o['shape'], cx, cy, r), fill=color)
    return np.asarray(bg.resize((image_size, image_size), Image.BOX))



def render_split(sample_scene, caption, n, seed, image_size=32, progress=False):
    """n scenes drawn by `sample_scene(rng)`, their images (n, H, W, 3) uint8 and `caption(scene)`s, all determined by
    `seed`: the split of any world, which supplies its own sampler and caption grammar."""
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng) for _ in range(n)]
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    it = range(n)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=f'render {n} images', unit='img', leave=False)
    for i in it:
        images[i] = render(scenes[i], image_size)
    return scenes, images, [caption(s) for s in scenes]
