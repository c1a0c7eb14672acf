"""Tests of the shapes teacher options (data/shapes/teachers.py: the scene oracle and the kinds of the encode step),
the caption -> embedding ridge R^2 (data/shapes/caption_r2.py) and data/shapes/train_teacher.py's --preset."""
import numpy as np
import pytest
import torch

from data.shapes import world, worlds, teachers
from data.shapes import evaluate as ev
from data.shapes.caption_r2 import caption_phrases, caption_features, ridge_fit, r2_score, caption_r2
from conftest import tiny_shapes_vqgan


def scenes_of(n, seed, name='default'):
    return worlds.make_split(n, seed, world=name)[0]


# -----------------------------------------------------------------------------------------------------------------
# the scene oracle


def test_scene_onehot_encodes_every_cell_and_the_background():
    """Decoding the one-hot layout gives back the evaluator's per-cell labels of the same scenes (a reference built
    another way), and the background colour and texture."""
    scenes = scenes_of(300, 1) + scenes_of(300, 2, 'plan')
    labels = {k: v.numpy() for k, v in ev.cell_labels(scenes).items()}
    F = teachers.CELL_FEATURES
    for i, s in enumerate(scenes):
        x = teachers.scene_onehot(s)
        assert x.shape == (teachers.SCENE_FEATURES,) and set(np.unique(x)) <= {0.0, 1.0}
        cells = x[:9 * F].reshape(9, F)
        assert np.array_equal(cells[:, :1 + len(world.SHAPES)].argmax(1), labels['shape'][i])
        occupied = labels['shape'][i] > 0
        assert np.array_equal(cells[occupied, 6:13].argmax(1), labels['color'][i][occupied])
        assert np.array_equal(cells[occupied, 13:].argmax(1), labels['size'][i][occupied])
        assert cells[~occupied, 1:].sum() == 0 and x.sum() == 9 + 2 * occupied.sum() + 2
        assert list(world.BG_COLORS)[x[9 * F:9 * F + 4].argmax()] == s['bg_color']
        assert world.BG_TEXTURES[x[9 * F + 4:].argmax()] == s['bg_texture']


def test_scene_teacher_is_a_deterministic_function_of_the_scene_content():
    """Two teachers agree exactly; the embedding is unit-norm, ignores what the caption names, and changes with any
    drawn attribute; another seed is another teacher (identity)."""
    scenes = scenes_of(200, 3)
    a, b = teachers.SceneTeacher(), teachers.SceneTeacher()
    ea = a.embed(scenes)
    assert ea.shape == (200, teachers.SCENE_DIM) and np.array_equal(ea, b.embed(scenes))
    assert np.allclose(np.linalg.norm(ea, axis=1), 1, atol=1e-5)
    silent = [dict(s, name_bg_color=not s['name_bg_color'], name_bg_texture=False) for s in scenes]
    assert np.array_equal(a.embed(silent), ea)
    recoloured = [dict(s, objects=[dict(s['objects'][0], color='white' if s['objects'][0]['color'] != 'white'
                                        else 'red')] + s['objects'][1:]) for s in scenes]
    assert (np.abs(a.embed(recoloured) - ea).max(1) > 1e-3).all()
    assert a.identity() == b.identity() and a.identity()['sha256'] != teachers.SceneTeacher(seed=1).identity()['sha256']


def test_teacher_checkpoint_resolution():
    assert teachers.teacher_checkpoint('clip') == 'out/teacher_shapes/teacher.pt'
    assert teachers.teacher_checkpoint('clip_strong') == 'out/teacher_shapes_strong/teacher.pt'
    assert teachers.teacher_checkpoint('clip', 'x.pt') == 'x.pt' and teachers.teacher_checkpoint('scene') is None
    with pytest.raises(ValueError, match='choose one of'):
        teachers.teacher_checkpoint('dino')
    with pytest.raises(ValueError, match='drop --teacher'):
        teachers.teacher_checkpoint('scene', 'x.pt')


def test_encode_with_the_scene_teacher_writes_the_oracle_and_its_r2(tmp_path):
    """--teacher_kind=scene needs no checkpoint: {split}_teacher.bin holds SceneTeacher().embed of the scene records
    (float16), and meta.json records the kind, the oracle's identity and the caption R^2 computed on those arrays."""
    from data.common import PreparedSplit, load_scenes, load_split
    from data.shapes.prepare import RenderConfig, PrepareConfig, render_dataset, encode_dataset
    d = str(tmp_path / 'plan')
    render_dataset(RenderConfig(out_dir=d, n_train=40, n_val=20, world='plan'), progress=False)
    tiny_shapes_vqgan(str(tmp_path / 'vq.pt'))
    meta = encode_dataset(PrepareConfig(out_dir=d, n_train=40, n_val=20, world='plan', vqgan=str(tmp_path / 'vq.pt'),
                                        teacher_kind='scene', text_len=36, device='cpu'), progress=False)
    assert meta['teacher_kind'] == 'scene' and meta['teacher'] == teachers.SceneTeacher().identity()
    assert meta['teacher_dim'] == teachers.SCENE_DIM and meta['render']['world'] == 'plan'
    feats = {}
    for split in ('train', 'val'):
        feats[split] = np.asarray(PreparedSplit(d, split).teacher).astype(np.float32)
        want = teachers.SceneTeacher().embed(load_scenes(d, split)).astype(np.float16).astype(np.float32)
        assert np.array_equal(feats[split], want)
    r = caption_r2(load_split(d, 'train')[1], feats['train'], load_split(d, 'val')[1], feats['val'])
    assert meta['teacher_caption_r2'] == pytest.approx(r)


# -----------------------------------------------------------------------------------------------------------------
# caption R^2


def test_caption_phrases_keep_multiword_names_whole():
    assert caption_phrases('a large red circle in the top left and two small blue squares on a striped gray '
                           'background') == [['large', 'red', 'circle', 'top_left'], ['two', 'small', 'blue',
                                             'squares'], ['striped', 'gray', 'background']]
    assert caption_phrases('a small white cross left of a large green square') == \
        [['small', 'white', 'cross', 'left_of', 'large', 'green', 'square']]
    assert caption_phrases('a large red circle in the center')[0][-1] == 'center'


def test_ridge_fit_matches_least_squares_on_the_augmented_system():
    """The closed form equals np.linalg.lstsq on [Xc; sqrt(alpha) I] w = [Yc; 0] (ridge as ordinary least squares)."""
    rng = np.random.default_rng(0)
    X, Y = rng.poisson(1.0, (300, 20)).astype(float), rng.standard_normal((300, 5))
    W, x_mean, y_mean = ridge_fit(X, Y, alpha=3.0)
    A = np.vstack([X - X.mean(0), np.sqrt(3.0) * np.eye(20)])
    B = np.vstack([Y - Y.mean(0), np.zeros((20, 5))])
    np.testing.assert_allclose(W, np.linalg.lstsq(A, B, rcond=None)[0], atol=1e-10)
    np.testing.assert_allclose(y_mean, Y.mean(0))


def test_r2_is_one_for_a_target_linear_in_the_captions_and_near_zero_for_noise():
    """A target that is a linear function of the caption features is predicted on val (R^2 ~ 1); one drawn
    independently of the captions is not (R^2 <= ~0)."""
    _, _, train_caps = world.make_split(3000, 1)
    _, _, val_caps = world.make_split(500, 2)
    X, vocab = caption_features(train_caps)
    Xv, _ = caption_features(val_caps, vocab)
    M = np.random.default_rng(0).standard_normal((len(vocab), 8))
    assert caption_r2(train_caps, X @ M, val_caps, Xv @ M, alpha=1e-6)['r2'] > 0.999
    rng = np.random.default_rng(1)
    noise = caption_r2(train_caps, rng.standard_normal((3000, 8)), val_caps, rng.standard_normal((500, 8)))
    assert -0.2 < noise['r2'] < 0.02 and noise['r2_train'] > noise['r2']


def test_r2_score_is_pooled_over_dimensions():
    Y = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]])
    P = np.array([[1.0, 1.0], [2.0, 4.0], [4.0, 6.0]])
    sse, sst = 1 + 0 + 0 + 0 + 1 + 4, 4 + 0 + 4 + (1 - 4) ** 2 + (3 - 4) ** 2 + (8 - 4) ** 2
    assert r2_score(Y, P) == pytest.approx(1 - sse / sst)


def test_scene_oracle_is_more_caption_predictable_in_the_default_world_than_in_the_plan_world():
    """The default world's captions name every object's attributes and cell, so most of the oracle is predictable
    from them; plan captions leave cells open, so much less is: the property the plan world is built for."""
    r2 = {}
    for name in ('default', 'plan'):
        tr, _, tc = worlds.make_split(4000, 1, world=name)
        va, _, vc = worlds.make_split(1000, 2, world=name)
        t = teachers.SceneTeacher()
        r2[name] = caption_r2(tc, t.embed(tr), vc, t.embed(va))['r2']
    assert r2['default'] > 0.8 and r2['plan'] < r2['default'] - 0.15, r2


def test_caption_r2_cli_reads_an_encoded_folder(tiny_data, capsys):
    from data.shapes.caption_r2 import main
    r = main([f'--data_dir={tiny_data}', '--min_count=1'])
    assert 'R^2' in capsys.readouterr().out and r['n_features'] > 0
    # the tiny world's teacher vector is a function of the caption: all of it is predictable
    assert r['r2'] > 0.99


# -----------------------------------------------------------------------------------------------------------------
# data/shapes/train_teacher.py --preset


def test_teacher_preset_sets_its_values_under_the_command_line():
    from data.shapes.train_teacher import train_config, ClipTrainConfig as TrainConfig, PRESETS
    cfg = train_config(['--preset=strong', '--max_iters=10'])
    assert cfg.max_iters == 10
    assert cfg.vision_layers == PRESETS['strong']['vision_layers'] != TrainConfig().vision_layers
    assert cfg.out_dir == 'out/teacher_shapes_strong' and cfg.embed_dim == TrainConfig().embed_dim
    assert train_config([]) == TrainConfig()
    with pytest.raises(SystemExit, match='choose one of'):
        train_config(['--preset=huge'])
