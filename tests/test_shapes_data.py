import os
import re
import json

import numpy as np
import pytest

from data.shapes import world, worlds
from data.shapes.prepare import RenderConfig, render_dataset
from data.common import load_split, load_scenes
from conftest import TINY_SHAPES_TEACHER, encode_tiny_shapes


def test_rendering_is_deterministic_for_a_seed():
    """The same seed renders the same world on every machine; another seed another one."""
    s1, im1, c1 = world.make_split(50, seed=3)
    s2, im2, c2 = world.make_split(50, seed=3)
    s3, im3, c3 = world.make_split(50, seed=4)
    assert s1 == s2 and c1 == c2 and np.array_equal(im1, im2)
    assert not np.array_equal(im1, im3)


@pytest.mark.parametrize('size', [32, 64])
def test_image_shape_and_dtype(size):
    """uint8 (N, S, S, 3): the layout the tokenizer, teacher and evaluator read."""
    _, images, _ = world.make_split(4, seed=0, image_size=size)
    assert images.shape == (4, size, size, 3) and images.dtype == np.uint8


def _words(text):
    return set(re.findall(r'[a-z]+', text))


@pytest.mark.parametrize('size', [32, 64])
def test_captions_name_exactly_the_drawn_attributes(size):
    """A caption names every drawn object with its four attributes and nothing else, so prompt accuracy
    can be measured."""
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
    """The background is drawn as the scene says: base colour, and stripes exactly when striped."""
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
    """One and two objects are equally likely and the background colour is named about half the time."""
    scenes, _, _ = world.make_split(2000, seed=1)
    counts = np.bincount([len(s['objects']) for s in scenes])
    assert counts[1] > 800 and counts[2] > 800
    named = np.mean([s['name_bg_color'] for s in scenes])
    assert 0.45 < named < 0.55
    assert all(len({o['cell'] for o in s['objects']}) == len(s['objects']) for s in scenes)


def test_prepare_writes_splits_and_preview(tmp_path):
    """render_dataset writes what the world draws, a preview, and skips an identical second run."""
    cfg = RenderConfig(out_dir=str(tmp_path), n_train=64, n_val=16, seed=7)
    render_dataset(cfg, progress=False)
    images, captions = load_split(str(tmp_path), 'train')
    assert images.shape == (64, 32, 32, 3) and len(captions) == 64
    val_images, val_captions = load_split(str(tmp_path), 'val')
    assert val_images.shape == (16, 32, 32, 3) and len(val_captions) == 16
    scenes = load_scenes(str(tmp_path), 'train')
    assert [worlds.caption(s) for s in scenes] == captions
    assert os.path.getsize(tmp_path / 'preview.png') > 1000
    # the same split from the library, so the files hold exactly what the renderer draws
    _, ref_images, ref_captions = world.make_split(64, seed=7)
    assert np.array_equal(images, ref_images) and captions == ref_captions
    # a second run with the same settings is skipped, a changed setting re-renders
    mtime = os.path.getmtime(tmp_path / 'train_images.npy')
    render_dataset(cfg, progress=False)
    assert os.path.getmtime(tmp_path / 'train_images.npy') == mtime
    assert json.load(open(tmp_path / 'render.json'))['n_train'] == 64


def test_too_small_image_size_is_rejected(tmp_path):
    """Below 24 px the shapes cannot be drawn: a clear error instead of garbage."""
    with pytest.raises(ValueError, match='image_size'):
        render_dataset(RenderConfig(out_dir=str(tmp_path), image_size=8, n_train=2, n_val=2), progress=False)


# ----------------------------------------------------------------------------------------------------------------
# the encode stage: rendered pairs -> the prepared arrays train.py reads

TINY_TEACHER = TINY_SHAPES_TEACHER  # a 4x4 patch grid at 32 px (conftest.py)


@pytest.fixture(scope='module')
def encoded(tmp_path_factory):
    """12 + 6 rendered scenes encoded with a tiny random tokenizer and teacher: (PrepareConfig, meta, folder)."""
    return encode_tiny_shapes(str(tmp_path_factory.mktemp('encode')))


def test_encode_without_a_teacher_names_the_command_that_trains_it(encoded):
    """The encode stage needs the tokenizer and teacher files: a missing one names the script that makes it."""
    from dataclasses import replace
    from data.shapes.prepare import encode_dataset
    cfg, _, d = encoded
    with pytest.raises(FileNotFoundError, match='python data/shapes/train_teacher.py'):
        encode_dataset(replace(cfg, teacher=os.path.join(d, 'missing.pt')), progress=False)


def test_encode_writes_the_meta_of_the_contract(encoded):
    """meta.json records the sizes train.py builds the GPT from: splits, grid, codes, text length, teacher width."""
    from data.common import read_meta
    _, meta, d = encoded
    assert meta == read_meta(d) and meta['splits'] == {'train': 12, 'val': 6} and meta['text_len'] == 28
    assert (meta['grid'], meta['image_tokens'], meta['codebook_size'], meta['teacher_dim']) == ([8, 8], 64, 64, 16)


def test_encoded_arrays_equal_direct_tokenizer_teacher_and_bpe_calls(encoded):
    """The arrays hold exactly what the tokenizer, the teacher (fp16, unit norm) and the BPE give for each image."""
    from data.common import PreparedSplit, tokenize_captions
    from teacher import Teacher, embed_dataset
    from vqgan import load_vqgan, encode_images
    cfg, _, d = encoded
    vq, teacher = load_vqgan(cfg.vqgan), Teacher.load(cfg.teacher)
    for split in ('train', 'val'):
        images, captions = load_split(d, split)
        arrays = PreparedSplit(d, split)
        assert np.array_equal(arrays.codes, encode_images(vq, images, progress=False))
        assert np.array_equal(arrays.text, tokenize_captions(captions, 28))
        np.testing.assert_allclose(arrays.teacher.astype(np.float32),
                                   embed_dataset(teacher, images, progress=False).astype(np.float32), atol=2e-3)
        assert np.allclose(np.linalg.norm(arrays.teacher.astype(np.float32), axis=1), 1, atol=2e-3)


def test_encoding_again_with_the_same_files_is_skipped(encoded, capsys):
    """Same tokenizer and teacher (by sha256): nothing is rewritten."""
    from data.shapes.prepare import encode_dataset
    cfg, _, d = encoded
    mtime = os.path.getmtime(os.path.join(d, 'train_codes.bin'))
    capsys.readouterr()
    encode_dataset(cfg, progress=False)
    assert 'skipping' in capsys.readouterr().out and os.path.getmtime(os.path.join(d, 'train_codes.bin')) == mtime


def test_train_reads_the_encoded_arrays_and_refuses_them_once_the_teacher_changes(encoded, tmp_path, capsys):
    """The arrays are what train.py reads; a retrained teacher makes them stale (refused, naming the teacher) until
    the encode stage runs again and records the new teacher."""
    import shutil
    import torch
    import train
    from data.shapes.prepare import encode_dataset
    from teacher import Teacher
    from conftest import TINY_GPT_ARGS
    cfg, meta, d = encoded
    d = shutil.copytree(d, str(tmp_path / 'shapes'))               # a private copy: the teacher is about to change
    os.remove(os.path.join(d, 'meta.json'))
    teacher = str(tmp_path / 'teacher.pt')
    shutil.copy(cfg.teacher, teacher)
    cfg = train.dataclasses.replace(cfg, out_dir=d, teacher=teacher)
    encode_dataset(cfg, progress=False)                             # records the copy's path
    args = [f'--data_dir={d}', f'--out_dir={tmp_path / "out"}', *TINY_GPT_ARGS, '--batch_size=8', '--eval_samples=0',
            '--eval_rows=6', '--max_iters=2']
    history = train.main(args)
    assert history[-1]['kind'] == 'eval' and np.isfinite(history[-1]['val_ce'])
    torch.manual_seed(1)
    Teacher('ViT-S-32', **TINY_TEACHER).save(teacher)
    with pytest.raises(SystemExit):
        train.main(args)
    assert 'teacher' in capsys.readouterr().err
    assert encode_dataset(cfg, progress=False)['teacher']['sha256'] != meta['teacher']['sha256']


# ---------------------------------------------------------------------------------------------------------------
# The plan world (plan_world.py)

from data.shapes import plan_world  # noqa: E402


def test_plan_world_is_deterministic_and_differs_from_the_default():
    """A split is a pure function of its seed and world; the plan world is another stream of scenes."""
    s1, im1, c1 = worlds.make_split(60, seed=3, world='plan')
    s2, im2, c2 = worlds.make_split(60, seed=3, world='plan')
    assert s1 == s2 and c1 == c2 and np.array_equal(im1, im2)
    assert c1 != world.make_split(60, seed=3)[2]
    with pytest.raises(ValueError, match='plan'):
        worlds.make_split(2, seed=0, world='nope')


def test_plan_captions_follow_the_scene_clauses():
    """Every clause is rendered from its objects: singles with their cell only when named, counted groups that look
    alike and carry a number word, relations that hold between the two objects' cells; every object is in exactly
    one clause, and the background is named as in the default world."""
    scenes, images, captions = worlds.make_split(1500, seed=11, world='plan')
    for scene, cap in zip(scenes, captions):
        assert cap == worlds.caption(scene) == plan_world.caption(scene)
        objects = scene['objects']
        assert 1 <= len(objects) <= 3 and len({o['cell'] for o in objects}) == len(objects)
        assert sorted(i for c in scene['clauses'] for i in c['objects']) == list(range(len(objects)))
        for c in scene['clauses']:
            first = objects[c['objects'][0]]
            looks = f"{first['size']} {first['color']} {first['shape']}"
            if c['kind'] == 'object':
                cell = f" in the {world.CELL_NAMES[first['cell']]}"
                assert (f'a {looks}{cell}' in cap) == c['name_cell'] and f'a {looks}' in cap
            elif c['kind'] == 'count':
                assert all({k: objects[i][k] for k in ('shape', 'color', 'size')} ==
                           {k: first[k] for k in ('shape', 'color', 'size')} for i in c['objects'])
                word = plan_world.NUMBER_WORDS[len(c['objects'])]
                assert f"{word} {first['size']} {first['color']} {plan_world.PLURALS[first['shape']]}" in cap
            else:
                second = objects[c['objects'][1]]
                assert plan_world.relation_holds(c['relation'], first['cell'], second['cell'])
                assert f"a {looks} {c['relation']} a {second['size']} {second['color']} {second['shape']}" in cap
        assert (scene['bg_color'] in cap.split()) == scene['name_bg_color']
        assert (scene['bg_texture'] in cap.split()) == scene['name_bg_texture']


def test_plan_world_mixes_its_clause_kinds():
    """The rules' rates: objects uniform in 1..3; with >= 2 objects a count a third of the time, otherwise a relation
    half of the time; single objects have their cell named half of the time."""
    scenes, _, _ = worlds.make_split(6000, seed=2, world='plan')
    counts = np.bincount([len(s['objects']) for s in scenes], minlength=4)[1:] / len(scenes)
    assert np.all(np.abs(counts - 1 / 3) < 0.03), counts
    multi = [s for s in scenes if len(s['objects']) >= 2]
    kinds = lambda s: {c['kind'] for c in s['clauses']}  # noqa: E731
    p_count = np.mean(['count' in kinds(s) for s in multi])
    p_relation = np.mean(['relation' in kinds(s) for s in multi])
    assert abs(p_count - 1 / 3) < 0.03 and abs(p_relation - 1 / 3) < 0.03, (p_count, p_relation)
    named = [c['name_cell'] for s in scenes for c in s['clauses'] if c['kind'] == 'object']
    assert abs(np.mean(named) - 0.5) < 0.03


def test_plan_relations_are_read_from_the_grid():
    """'above' / 'left of' compare grid rows / columns, at any distance and whatever the other coordinate."""
    top_left, center, bottom_right, top_right = 0, 4, 8, 2
    assert plan_world.relation_holds('above', top_left, center) and plan_world.relation_holds('below', center, 0)
    assert plan_world.relation_holds('left of', top_left, bottom_right)
    assert plan_world.relation_holds('right of', top_right, center)
    assert not plan_world.relation_holds('above', top_left, top_right)      # same row
    assert not plan_world.relation_holds('left of', top_right, bottom_right)  # same column


def test_plan_pixels_show_every_object_and_the_background():
    """The renderer is the default world's: each object's centre pixel has its colour, and a free cell's corner is
    the scene's background (base or striped shade)."""
    scenes, images, _ = worlds.make_split(300, seed=5, world='plan')
    for scene, img in zip(scenes, images):
        for o in scene['objects']:
            x0, y0, x1, y1 = world.cell_box(o['cell'], 32)
            assert np.abs(img[int((y0 + y1) / 2), int((x0 + x1) / 2)].astype(int) -
                          world.COLORS[o['color']]).max() <= 2
        free = next(c for c in range(9) if c not in {o['cell'] for o in scene['objects']})
        x0, y0, _, _ = world.cell_box(free, 32)
        pixel = img[int(np.ceil(y0)), int(np.ceil(x0))].astype(int)
        base = np.array(world.BG_COLORS[scene['bg_color']])
        assert min(np.abs(pixel - base).max(), np.abs(pixel - np.clip(base + world.STRIPE_LIFT, 0, 255)).max()) <= 1


def test_plan_captions_fit_the_text_length():
    """TEXT_LEN holds the longest plan caption in open_clip BPE tokens (the encode step of the plan world uses it)."""
    from data.common import tokenize_captions, TEXT_PAD_ID
    _, _, captions = worlds.make_split(3000, seed=8, world='plan')
    tokens = tokenize_captions(captions, plan_world.TEXT_LEN + 20, warn=False)
    assert 20 < (tokens != TEXT_PAD_ID).sum(1).max() <= plan_world.TEXT_LEN


def test_prepare_renders_the_plan_world_and_records_it(tmp_path):
    """--world=plan writes plan scenes whose captions re-derive from the records, and says so in render.json; the
    default world's render.json stays as before the option existed (no 'world' key)."""
    render_dataset(RenderConfig(out_dir=str(tmp_path / 'plan'), n_train=40, n_val=8, world='plan'), progress=False)
    images, captions = load_split(str(tmp_path / 'plan'), 'train')
    scenes = load_scenes(str(tmp_path / 'plan'), 'train')
    assert [worlds.caption(s) for s in scenes] == captions and all(s['world'] == 'plan' for s in scenes)
    assert np.array_equal(images, worlds.make_split(40, 1337, world='plan')[1])
    assert json.load(open(tmp_path / 'plan' / 'render.json'))['world'] == 'plan'
    render_dataset(RenderConfig(out_dir=str(tmp_path / 'default'), n_train=4, n_val=2), progress=False)
    assert 'world' not in json.load(open(tmp_path / 'default' / 'render.json'))
    with pytest.raises(ValueError, match='--world'):
        render_dataset(RenderConfig(out_dir=str(tmp_path / 'x'), world='moon'), progress=False)
