import os
import re
import json

import numpy as np
import pytest

from data.shapes import world
from data.shapes.prepare import RenderConfig, render_dataset, load_split, load_scenes


def test_rendering_is_deterministic_for_a_seed():
    s1, im1, c1 = world.make_split(50, seed=3)
    s2, im2, c2 = world.make_split(50, seed=3)
    s3, im3, c3 = world.make_split(50, seed=4)
    assert s1 == s2 and c1 == c2 and np.array_equal(im1, im2)
    assert not np.array_equal(im1, im3)


@pytest.mark.parametrize('size', [32, 64])
def test_image_shape_and_dtype(size):
    _, images, _ = world.make_split(4, seed=0, image_size=size)
    assert images.shape == (4, size, size, 3) and images.dtype == np.uint8


def _words(text):
    return set(re.findall(r'[a-z]+', text))


@pytest.mark.parametrize('size', [32, 64])
def test_captions_name_exactly_the_drawn_attributes(size):
    scenes, images, captions = world.make_split(400, seed=11, image_size=size)
    all_shapes, all_colors = set(world.SHAPES), set(world.COLORS)
    for scene, img, cap in zip(scenes, images, captions):
        words = _words(cap)
        # every object appears as one phrase with its size, colour, shape and cell
        for o in scene['objects']:
            assert f"a {o['size']} {o['color']} {o['shape']} in the {world.CELL_NAMES[o['cell']]}" in cap
        # and nothing else is named: the shape / colour words are exactly the drawn ones
        assert words & all_shapes == {o['shape'] for o in scene['objects']}
        assert words & all_colors == {o['color'] for o in scene['objects']}
        assert cap.count(' and ') == len(scene['objects']) - 1
        # background words appear iff the scene says they are named
        assert (scene['bg_color'] in words) == scene['name_bg_color']
        assert (scene['bg_texture'] in words) == scene['name_bg_texture']
        assert ('background' in words) == (scene['name_bg_color'] or scene['name_bg_texture'])
        assert not (words & set(world.BG_COLORS)) - {scene['bg_color']}
        # the pixel at each object's centre has the object's colour
        for o in scene['objects']:
            x0, y0, x1, y1 = world.cell_box(o['cell'], size)
            cx, cy = int((x0 + x1) / 2), int((y0 + y1) / 2)
            assert np.abs(img[cy, cx].astype(int) - world.COLORS[o['color']]).max() <= 2, (cap, img[cy, cx])


def test_background_pixels_match_the_scene():
    scenes, images, _ = world.make_split(200, seed=5)
    for scene, img in zip(scenes, images):
        occupied = {o['cell'] for o in scene['objects']}
        free = next(c for c in range(9) if c not in occupied)
        x0, y0, _, _ = world.cell_box(free, 32)
        corner = img[int(np.ceil(y0)):int(np.ceil(y0)) + 3, int(np.ceil(x0))]   # a few pixels down a free cell's edge
        base = np.array(world.BG_COLORS[scene['bg_color']])
        lifted = np.clip(base + world.STRIPE_LIFT, 0, 255)
        is_base = (np.abs(corner.astype(int) - base).max(axis=1) <= 1)
        is_lift = (np.abs(corner.astype(int) - lifted).max(axis=1) <= 1)
        assert np.all(is_base | is_lift)
        column = world.background(scene, 32)[:, 0]                       # (H, 3) one column of the background
        assert (len(np.unique(column, axis=0)) == 2) == (scene['bg_texture'] == 'striped')


def test_both_object_counts_and_partial_background_naming_occur():
    scenes, _, _ = world.make_split(2000, seed=1)
    counts = np.bincount([len(s['objects']) for s in scenes])
    assert counts[1] > 800 and counts[2] > 800
    named = np.mean([s['name_bg_color'] for s in scenes])
    assert 0.45 < named < 0.55
    assert all(len({o['cell'] for o in s['objects']}) == len(s['objects']) for s in scenes)


def test_prepare_writes_splits_and_preview(tmp_path):
    cfg = RenderConfig(out_dir=str(tmp_path), n_train=64, n_val=16, seed=7)
    render_dataset(cfg, progress=False)
    images, captions = load_split(str(tmp_path), 'train')
    assert images.shape == (64, 32, 32, 3) and len(captions) == 64
    val_images, val_captions = load_split(str(tmp_path), 'val')
    assert val_images.shape == (16, 32, 32, 3) and len(val_captions) == 16
    scenes = load_scenes(str(tmp_path), 'train')
    assert [world.caption(s) for s in scenes] == captions
    assert os.path.getsize(tmp_path / 'preview.png') > 1000
    # the same split from the library, so the files hold exactly what the renderer draws
    _, ref_images, ref_captions = world.make_split(64, seed=7)
    assert np.array_equal(images, ref_images) and captions == ref_captions
    # a second run with the same settings is skipped, a changed setting re-renders
    mtime = os.path.getmtime(tmp_path / 'train_images.npy')
    render_dataset(cfg, progress=False)
    assert os.path.getmtime(tmp_path / 'train_images.npy') == mtime
    assert json.load(open(tmp_path / 'render.json'))['n_train'] == 64


def test_missing_split_error_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match='prepare.py'):
        load_split(str(tmp_path), 'train')


def test_too_small_image_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match='image_size'):
        render_dataset(RenderConfig(out_dir=str(tmp_path), image_size=8, n_train=2, n_val=2), progress=False)
