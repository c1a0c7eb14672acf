"""Tests of data/shapes/evaluate.py: the caption parser, the metrics (first on ground-truth readings, then on a small
evaluator trained here in ~20 s), the Frechet distance in its feature space, and the samples-folder / CLI plumbing."""
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import fid
from data.shapes import world, worlds
from data.shapes import evaluate as ev
from data.shapes import plan_world

N_VAL = 500  # real val images the trained-evaluator tests read (the first 500 of the val split)


def random_scenes(n, seed):
    rng = np.random.default_rng(seed)
    return [world.sample_scene(rng) for _ in range(n)]


def truth(scenes):
    """What a perfect evaluator would read: the scenes' own per-cell labels."""
    return {k: v.numpy() for k, v in ev.cell_labels(scenes).items()}


# -----------------------------------------------------------------------------------------------------------------
# Captions


def test_parse_caption_inverts_caption():
    for scene in random_scenes(5000, seed=0):
        parsed = ev.parse_caption(worlds.caption(scene))
        assert parsed == dict(objects=[{k: o[k] for k in ('shape', 'color', 'size', 'cell')}
                                       for o in scene['objects']],
                              bg_color=scene['bg_color'] if scene['name_bg_color'] else None,
                              bg_texture=scene['bg_texture'] if scene['name_bg_texture'] else None)


@pytest.mark.parametrize('text', [
    '',                                                                     # unconditional prompt
    'a red circle',                                                         # size and cell missing
    'a large red circle in the middle',                                     # not a cell name
    'a large pink circle in the center',                                    # not a colour of the world
    'a large red circle in the center and a small blue square in the center',  # two objects in one cell
    'a large red circle in the center on a shiny background',               # not a background word
    'a large red circle in the center on a gray striped background',        # texture must come first
    'a large red circle in the center and',
])
def test_parse_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match='not a shapes caption'):
        ev.parse_caption(text)


# -----------------------------------------------------------------------------------------------------------------
# Metrics on ground-truth readings (no network): the bookkeeping itself


def test_metrics_of_perfect_readings_against_own_captions_are_one():
    scenes = random_scenes(2000, seed=1)
    m = ev.prompt_metrics(truth(scenes), [worlds.caption(s) for s in scenes])
    for k in ev.chance_levels():
        assert m[k] == 1.0, k
    assert m['n_bg_color_named'] == sum(s['name_bg_color'] for s in scenes)
    c = ev.coherence_metrics(truth(scenes), [worlds.caption(s) for s in scenes])
    assert c['coherence_bg_color'] == 1.0 and c['coherence_bg_texture'] == 1.0
    assert c['n_bg_color_open'] == sum(not s['name_bg_color'] for s in scenes)


def test_chance_levels_match_shuffled_captions():
    """chance_levels() is derived from the rules; a Monte Carlo estimate with shuffled captions must agree."""
    scenes, others = random_scenes(20000, seed=2), random_scenes(20000, seed=3)
    m = ev.prompt_metrics(truth(scenes), [worlds.caption(s) for s in others])
    chance = ev.chance_levels()
    for k, p in chance.items():
        n = m['n_images'] if k in ('prompt_acc', 'count_acc', 'position_acc') else \
            m[f'n_{k[:-4]}_named'] if k.startswith('bg_') else 1.5 * m['n_images']  # trials behind each rate
        assert abs(m[k] - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-4, (k, m[k], p)
    assert 1e-4 < chance['prompt_acc'] < 3e-4  # ~0.02%: 1/4 * 1/9 * 1/70 (one object) * 5/8 * 3/4 (background)


def test_coherence_counts_images_whose_background_cells_disagree():
    scenes = random_scenes(300, seed=4)
    pred = truth(scenes)
    pred['bg_color'][:100, 2] = (pred['bg_color'][:100, 2] + 1) % len(world.BG_COLORS)  # top-right reads wrong
    for i in range(100):
        pred['shape'][i, 2] = 0  # and is empty, so it counts as a background cell
    c = ev.coherence_metrics(pred)  # no prompts: every image counts
    assert c['coherence_bg_color'] == pytest.approx(200 / 300) and c['coherence_bg_texture'] == 1.0
    # a disagreeing cell that holds an object is not a background cell and does not count
    pred = truth(scenes)
    for i, s in enumerate(scenes):
        cell = s['objects'][0]['cell']
        pred['bg_color'][i, cell] = (pred['bg_color'][i, cell] + 1) % len(world.BG_COLORS)
    assert ev.coherence_metrics(pred)['coherence_bg_color'] == 1.0


# -----------------------------------------------------------------------------------------------------------------
# A small trained evaluator


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A small evaluator (4,000 scenes, 600 steps: ~20 s on one core) saved and loaded back like the real one."""
    cfg = ev.EvalConfig(n_train=4000, steps=600, batch_size=64, keep_empty=0.1, lr=6e-3, seed=7,
                        ckpt=str(tmp_path_factory.mktemp('evaluator') / 'evaluator.pt'))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: one thread is as fast, and far faster on a busy machine
    try:
        model = ev.get_evaluator(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)
    return model, cfg


@pytest.fixture(scope='module')
def val():
    scenes, images, captions = world.make_split(N_VAL, ev.VAL_SEED)
    return scenes, images, captions


def test_checkpoint_round_trip_and_reuse(trained, val):
    model, cfg = trained
    loaded = ev.get_evaluator(cfg)  # the checkpoint exists: loaded, not retrained
    assert loaded.config == model.config and loaded.info['val_accuracy'] == model.info['val_accuracy']
    images = val[1][:50]
    a, b = ev.read_images(model, images), ev.read_images(loaded, images)
    for k in a:
        assert np.array_equal(a[k], b[k]), k
    assert a['shape'].shape == (50, 9) and a['features'].shape == (50, 9 * cfg.feat_dim)


def test_evaluator_reads_val_attributes(trained, val):
    model, _ = trained
    scenes, images, _ = val
    acc = ev.cell_accuracy(model, images, scenes)
    assert set(acc) == {'occupancy', 'shape', 'color', 'size', 'bg_color', 'bg_texture'}
    for k, a in acc.items():
        assert a >= 0.95, (k, a)


def test_prompt_accuracy_of_real_images(trained, val):
    model, _ = trained
    scenes, images, captions = val
    pred = ev.read_images(model, images)
    own = ev.prompt_metrics(pred, captions)
    assert own['prompt_acc'] >= 0.9 and own['position_acc'] >= 0.98, own
    shuffled = ev.prompt_metrics(pred, list(np.roll(captions, 1)))
    chance = ev.chance_levels()  # prompt_acc ~0.0002: at 500 images, expect 0.1 matches
    assert shuffled['prompt_acc'] <= 0.01, shuffled
    for k in ('obj_shape_acc', 'obj_color_acc', 'obj_size_acc', 'count_acc', 'position_acc'):
        assert shuffled[k] < chance[k] + 0.06, (k, shuffled[k], chance[k])


def test_coherence_of_real_images_and_of_two_background_composites(trained, val):
    model, _ = trained
    scenes, images, captions = val
    real = ev.coherence_metrics(ev.read_images(model, images))
    assert real['coherence_bg_color'] >= 0.98 and real['coherence_bg_texture'] >= 0.95, real
    # composites: left half from one image, right half from another image with a different background colour
    color = np.array([world.BG_COLORS[s['bg_color']] for s in scenes])
    partner = np.array([next(j for j in range(i + 1, i + N_VAL) if scenes[j % N_VAL]['bg_color'] !=
                             scenes[i]['bg_color']) % N_VAL for i in range(N_VAL)])
    assert (color != color[partner]).any(1).all()
    composite = images.copy()
    composite[:, :, 16:] = images[partner][:, :, 16:]
    mixed = ev.coherence_metrics(ev.read_images(model, composite))
    assert mixed['coherence_bg_color'] <= 0.05, mixed


def test_frechet_distance_in_evaluator_features(trained, val):
    model, _ = trained
    scenes, images, _ = val
    feats = ev.read_images(model, images)['features']
    stats = fid.compute_statistics(feats)
    assert abs(fid.frechet_distance(*stats, *stats)) < 1e-6 * np.trace(stats[1])
    # the floor: 500 other real images (with 288-d features and 500 images the estimate's own bias is large)
    floor = fid.frechet_distance(*stats, *fid.compute_statistics(
        ev.read_images(model, world.make_split(N_VAL, 99)[1])['features']))
    rng = np.random.default_rng(0)
    noisy = np.clip(images + rng.normal(0, 60, images.shape), 0, 255).astype(np.uint8)
    mixed = images.copy()
    mixed[:, :, 16:] = images[::-1][:, :, 16:]  # halves of two images: mostly two different backgrounds
    for corrupt in (noisy, mixed):
        d = fid.frechet_distance(*stats, *fid.compute_statistics(ev.read_images(model, corrupt)['features']))
        assert d > 3 * floor, (floor, d)


def test_evaluate_samples_gives_flat_json_floats(trained, val):
    model, cfg = trained
    _, images, captions = val
    real = world.make_split(400, 5)[1]
    m = ev.evaluate_samples(images[:400], captions[:400], evaluator=model, real_images=real)
    assert all(isinstance(v, float) for v in m.values())
    json.dumps(m)
    assert set(ev.chance_levels()) | {'coherence_bg_color', 'coherence_bg_texture', 'frechet_evaluator'} <= set(m)
    assert 'fid_inception' not in m  # no Inception given: skipped
    # with a network in the Inception's place (fid.py's contract: float (B, 3, H, W) in [0, 1] -> (B, d))
    stand_in = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())  # 12-d colour layout
    m2 = ev.evaluate_samples(images[:400], captions[:400], evaluator=model, real_images=real, inception=stand_in)
    mu_s, s_s = fid.activation_statistics(images[:400], stand_in, progress=False)
    mu_r, s_r = fid.activation_statistics(real, stand_in, progress=False)
    assert m2['fid_inception'] == pytest.approx(fid.frechet_distance(mu_s, s_s, mu_r, s_r))
    assert m2['prompt_acc'] == m['prompt_acc']
    assert m['prompt_acc'] >= 0.9
    with pytest.raises(ValueError, match='prompts'):
        ev.evaluate_samples(images[:10], captions[:9], evaluator=model, real_images=real)
    with pytest.raises(ValueError, match='--image_size=64'):
        ev.read_images(model, world.make_split(2, 0, image_size=64)[1])


def test_cli_real_sanity_check(trained, tmp_path):
    _, cfg = trained
    out = tmp_path / 'metrics.json'
    ev.main([f'--ckpt={cfg.ckpt}', '--real', '--n_real=300', f'--json_out={out}'])
    m = json.loads(out.read_text())
    assert m['n_images'] == 300 and m['prompt_acc'] >= 0.9


# -----------------------------------------------------------------------------------------------------------------
# Plumbing


def test_reader_works_at_64px():
    model = ev.CellReader().eval()
    with torch.no_grad():
        feats, logits = model(torch.rand(2, 3, 64, 64))
    assert feats.shape == (2, 9, 32) and logits['shape'].shape == (2, 9, 1 + len(world.SHAPES))
    assert logits['bg_texture'].shape == (2, 9, 2)


def test_cells_are_the_image_thirds_in_raster_order():
    """Cell k of the reader is grid cell k: paint one cell of a 36 px image (cells are then exactly 12 px)."""
    model = ev.CellReader(cell_px=12)
    for k in range(9):
        img = torch.zeros(1, 3, 36, 36)
        r, c = divmod(k, 3)
        img[:, :, 12 * r:12 * r + 12, 12 * c:12 * c + 12] = 1
        cells = model.cells(img)                             # (9, 3, 12, 12), in [-1, 1]
        assert torch.equal(cells.amax(dim=(1, 2, 3)) > 0, torch.arange(9) == k)


def test_load_samples_dir(tmp_path):
    _, images, captions = world.make_split(6, 0)
    # sample.py's layout: p<prompt>_s<sample>.png, prompts.txt with one line per prompt
    for p in range(3):
        for s in range(2):
            Image.fromarray(images[2 * p + s]).save(tmp_path / f'p{p:05d}_s{s:03d}.png')
    (tmp_path / 'prompts.txt').write_text(''.join(c + '\n' for c in captions[:3]))
    got, prompts = ev.load_samples_dir(str(tmp_path))
    assert np.array_equal(got, images) and prompts == [captions[p] for p in (0, 0, 1, 1, 2, 2)]
    # a JSONL naming each file wins over prompts.txt
    rows = [dict(file=f'p{i // 2:05d}_s{i % 2:03d}.png', prompt=captions[5 - i]) for i in range(6)]
    (tmp_path / 'prompts.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    got, prompts = ev.load_samples_dir(str(tmp_path))
    assert np.array_equal(got, images) and prompts == captions[::-1]
    empty = tmp_path / 'none'
    empty.mkdir()
    Image.fromarray(images[0]).save(empty / 'a.png')
    with pytest.raises(FileNotFoundError, match='prompts.txt'):
        ev.load_samples_dir(str(empty))


# -----------------------------------------------------------------------------------------------------------------
# The plan world: its caption grammar and metrics


def plan_scenes(n, seed):
    rng = np.random.default_rng(seed)
    return [plan_world.sample_scene(rng) for _ in range(n)]


def expected_plan_parse(scene):
    """What parse_plan_caption must return for a scene: objects in clause order, cells only where named."""
    objects, relations = [], []
    for c in scene['clauses']:
        if c['kind'] == 'relation':
            relations.append((len(objects), len(objects) + 1, c['relation']))
        for i in c['objects']:
            o = scene['objects'][i]
            named = c['kind'] == 'object' and c['name_cell']
            objects.append(dict(shape=o['shape'], color=o['color'], size=o['size'], cell=o['cell'] if named else None))
    return dict(objects=objects, relations=relations,
                bg_color=scene['bg_color'] if scene['name_bg_color'] else None,
                bg_texture=scene['bg_texture'] if scene['name_bg_texture'] else None)


def test_parse_plan_caption_inverts_the_plan_caption():
    for scene in plan_scenes(3000, seed=0):
        assert ev.parse_plan_caption(worlds.caption(scene)) == expected_plan_parse(scene)


def test_parse_plan_caption_reads_default_captions_alike():
    """The plan grammar contains the default one: a default caption parses to the same objects and background."""
    for scene in random_scenes(500, seed=1):
        text = worlds.caption(scene)
        assert ev.parse_plan_caption(text) | {'relations': None} == ev.parse_caption(text) | {'relations': None}
    assert ev.caption_world([worlds.caption(s) for s in random_scenes(50, 2)]) == 'default'
    assert ev.caption_world([worlds.caption(s) for s in plan_scenes(50, 2)]) == 'plan'


@pytest.mark.parametrize('text', [
    'four large red circles',                                           # no such number word
    'two large red circle',                                             # a count needs the plural
    'a large red circle beside a small blue square',                    # not a relation of the world
    'a large red circle in the center and a small blue cross in the center',  # two objects in one cell
])
def test_parse_plan_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match='not a plan-world caption'):
        ev.parse_plan_caption(text)


def test_plan_metrics_of_perfect_readings_are_one():
    scenes = plan_scenes(2000, seed=3)
    m = ev.plan_prompt_metrics(truth(scenes), [worlds.caption(s) for s in scenes])
    for k in ('prompt_acc', 'count_acc', 'objects_acc', 'named_cell_acc', 'relation_acc', 'bg_color_acc',
              'bg_texture_acc'):
        assert m[k] == 1.0, k
    assert m['n_relations'] == sum(c['kind'] == 'relation' for s in scenes for c in s['clauses']) > 200


def _with_clause(scenes, kind):
    return [s for s in scenes if any(c['kind'] == kind for c in s['clauses'])]


def _swap_related(scenes):
    """(scenes with a relation between two objects that look different, the same scenes with those two objects'
    cells swapped): every object is still there, and the relation is now false."""
    kept, swapped = [], []
    for s in _with_clause(scenes, 'relation'):
        a, b = next(c['objects'] for c in s['clauses'] if c['kind'] == 'relation')
        look = lambda o: (o['shape'], o['color'], o['size'])  # noqa: E731
        if look(s['objects'][a]) == look(s['objects'][b]):
            continue  # swapping two look-alikes changes nothing
        t = json.loads(json.dumps(s))
        t['objects'][a]['cell'], t['objects'][b]['cell'] = s['objects'][b]['cell'], s['objects'][a]['cell']
        kept.append(s)
        swapped.append(t)
    return kept, swapped


def test_plan_metrics_catch_a_missing_object_and_an_extra_one():
    """Erase one object from each reading: the count and the object set are wrong; add one in a free cell: the same."""
    scenes = plan_scenes(600, seed=4)
    captions = [worlds.caption(s) for s in scenes]
    missing = truth(scenes)
    for i, s in enumerate(scenes):
        missing['shape'][i, s['objects'][0]['cell']] = 0
    m = ev.plan_prompt_metrics(missing, captions)
    assert m['count_acc'] == m['objects_acc'] == m['prompt_acc'] == 0.0
    extra = truth(scenes)
    for i, s in enumerate(scenes):
        free = next(c for c in range(9) if c not in {o['cell'] for o in s['objects']})
        extra['shape'][i, free], extra['color'][i, free], extra['size'][i, free] = 1, 0, 0
    m = ev.plan_prompt_metrics(extra, captions)
    assert m['count_acc'] == m['objects_acc'] == m['prompt_acc'] == 0.0


def test_plan_metrics_catch_a_broken_relation_and_a_misplaced_named_object():
    """Swap the two related objects' cells: everything is there but the relation fails; move a named object to a
    free cell: the object set and the count still hold, its named cell does not."""
    scenes, swapped = _swap_related(plan_scenes(2000, seed=5))
    m = ev.plan_prompt_metrics(truth(swapped), [worlds.caption(s) for s in scenes])
    assert m['relation_acc'] == 0.0 and m['prompt_acc'] == 0.0 and m['count_acc'] == 1.0
    named = [s for s in plan_scenes(2000, seed=6) if any(c['kind'] == 'object' and c['name_cell']
                                                         for c in s['clauses'])]
    moved = []
    for s in named:
        s = json.loads(json.dumps(s))
        i = next(c['objects'][0] for c in s['clauses'] if c['kind'] == 'object' and c['name_cell'])
        s['objects'][i]['cell'] = next(c for c in range(9) if c not in {o['cell'] for o in s['objects']})
        moved.append(s)
    m = ev.plan_prompt_metrics(truth(moved), [worlds.caption(s) for s in named])
    assert m['count_acc'] == 1.0 and m['named_cell_acc'] < 0.75 and m['prompt_acc'] == 0.0


def test_trained_evaluator_reads_the_plan_world(trained):
    """On real plan images the plan metrics are near 1 (the reader knows cells, not worlds); re-rendered with each
    relation's objects swapped, the relation accuracy collapses while the count stays right."""
    model, _ = trained
    scenes, images, captions = worlds.make_split(400, ev.VAL_SEED, world='plan')
    m = ev.evaluate_samples(images, captions, evaluator=model, real_images=worlds.make_split(300, 9, world='plan')[1])
    assert m['prompt_acc'] >= 0.9 and m['count_acc'] >= 0.95 and m['relation_acc'] >= 0.9, m
    assert 'position_acc' not in m and 'objects_acc' in m  # detected as the plan world from the prompts
    related, swapped = _swap_related(scenes)
    bad = np.stack([world.render(s) for s in swapped])
    m_bad = ev.plan_prompt_metrics(ev.read_images(model, bad), [worlds.caption(s) for s in related])
    assert m_bad['relation_acc'] <= 0.1 and m_bad['count_acc'] >= 0.9, m_bad


# -----------------------------------------------------------------------------------------------------------------
# GenEval's task groups


def reading(objects):
    """A hand-made evaluator reading of one image: {head: (1, 9)} with the given (cell, shape, colour) objects (size
    large) on a plain black background."""
    r = dict(shape=np.zeros((1, 9), int), color=np.full((1, 9), -1), size=np.full((1, 9), -1),
             bg_color=np.zeros((1, 9), int), bg_texture=np.zeros((1, 9), int))
    for cell, shape, color in objects:
        r['shape'][0, cell] = 1 + world.SHAPES.index(shape)
        r['color'][0, cell] = ev.COLOR_NAMES.index(color)
        r['size'][0, cell] = 1
    return r


def test_geneval_groups_on_a_hand_built_batch():
    """Each group scores exactly the prompts of its kind, with the right verdict, and overall is their mean."""
    two = 'a large red circle in the top left and a small blue cross in the bottom right'
    rel = 'a large white cross below a small green diamond'
    batch = [
        ('a large red circle in the center', [(4, 'circle', 'red')]),                    # single + colours
        ('a small blue square in the top left', [(0, 'square', 'green')]),               # single, wrong colour
        (two, [(0, 'circle', 'red'), (8, 'cross', 'blue')]),                             # all right
        (two, [(8, 'circle', 'red'), (0, 'cross', 'blue')]),                             # both there, places swapped
        (two, [(0, 'circle', 'red')]),                                                   # the cross is missing
        ('two small red circles and a large blue square on a plain background',
         [(0, 'circle', 'red'), (5, 'circle', 'red'), (7, 'square', 'blue')]),            # the count is right
        ('two small red circles and a large blue square',
         [(0, 'circle', 'red'), (5, 'circle', 'red'), (2, 'circle', 'red'), (7, 'square', 'blue')]),  # one too many
        (rel, [(7, 'cross', 'white'), (1, 'diamond', 'green')]),                          # the relation holds
        (rel, [(1, 'cross', 'white'), (7, 'diamond', 'green')]),                          # ... and here it does not
    ]
    pred = {k: np.concatenate([reading(objs)[k] for _, objs in batch]) for k in ev.HEADS}
    m = ev.geneval_metrics(pred, [p for p, _ in batch])
    want = dict(single_object=(1.0, 2), colors=(0.5, 2), two_object=(4 / 5, 5), color_attr=(4 / 5, 5),
                position=(2 / 5, 5), counting=(0.5, 2))
    for group, (acc, n) in want.items():
        assert m[f'geneval_{group}'] == pytest.approx(acc) and m[f'n_geneval_{group}'] == n, group
    assert m['geneval_overall'] == pytest.approx(np.mean([a for a, _ in want.values()]))
    # the default world alone has no counting prompt: nan there, and overall is the mean of the other five
    d = ev.geneval_metrics({k: v[:5] for k, v in pred.items()}, [p for p, _ in batch[:5]])
    assert math.isnan(d['geneval_counting']) and d['n_geneval_counting'] == 0
    assert d['geneval_overall'] == pytest.approx(np.mean([1.0, 0.5, 2 / 3, 2 / 3, 1 / 3]))


def test_geneval_groups_of_perfect_readings_are_one():
    scenes = random_scenes(300, seed=4) + plan_scenes(600, seed=5)
    m = ev.geneval_metrics(truth(scenes), [worlds.caption(s) for s in scenes])
    for g in ev.GENEVAL_GROUPS:
        assert m[f'geneval_{g}'] == 1.0 and m[f'n_geneval_{g}'] > 20, g
    assert m['geneval_overall'] == 1.0
