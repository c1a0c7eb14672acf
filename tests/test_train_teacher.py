"""Tests of data/shapes/train_teacher.py: the small CLIP of the shapes world trains, its metrics mean what they say,
and the command line saves a teacher that teacher.py loads (CPU, no network)."""
import math

import pytest
import torch
import open_clip

from data.shapes.train_teacher import ClipTrainConfig, clip_loss, clip_model_kwargs, main, retrieval_metrics, train_clip
from teacher import Teacher, build_clip, preprocess_uint8

pytestmark = pytest.mark.usefixtures('one_thread')
BASE = 'ViT-S-32'
TINY_TRAIN = ClipTrainConfig(embed_dim=32, patch_size=4, vision_layers=2, vision_width=64, text_layers=1, text_width=64,
                             batch_size=32, max_iters=30, lr=3e-3, warmup_iters=2, eval_interval=0)


@pytest.fixture(scope='module')
def trained(shapes32):
    """A tiny CLIP trained briefly on 32 shapes pairs, with its loss on those pairs before and after."""
    images, captions = shapes32
    torch.manual_seed(0)
    model, _ = build_clip(BASE, **clip_model_kwargs(TINY_TRAIN, image_size=32))
    x = preprocess_uint8(torch.from_numpy(images).permute(0, 3, 1, 2), model.visual.preprocess_cfg)
    tokens = open_clip.get_tokenizer(BASE, context_length=TINY_TRAIN.context_length)(captions)
    model.eval()
    with torch.no_grad():
        before = clip_loss(model, x, tokens).item()
    train_clip(model, x, tokens, TINY_TRAIN, progress=False, log=None)
    with torch.no_grad():
        after = clip_loss(model, x, tokens).item()
    return dict(model=model, x=x, tokens=tokens, before=before, after=after)


def test_training_lowers_contrastive_loss(trained):
    """30 steps on one batch of 32 pairs: the loss falls by over a nat and well below chance (ln 32 = 3.47)."""
    before, after = trained['before'], trained['after']
    assert after < before - 1.0 and after < math.log(32) - 0.5, (before, after)


def test_retrieval_metrics_definitions(trained, shapes32):
    """top1 <= top1_same_text (identical captions can only add hits), and a model trained on these pairs retrieves
    within groups above chance."""
    m = retrieval_metrics(trained['model'], trained['x'], trained['tokens'], shapes32[1], group=16)
    assert m['n'] == 32 and m['group'] == 16
    assert m['top1'] <= m['top1_same_text'] <= 1
    assert m['top1_in_group'] > 1 / 16


def test_cli_trains_saves_and_loads(tmp_path, capsys):
    """The command trains, prints retrieval and the background probe, and writes a teacher Teacher.load reads back
    with its config and metrics."""
    from data.shapes.prepare import RenderConfig, render_dataset
    render_dataset(RenderConfig(out_dir=str(tmp_path / 'data'), n_train=64, n_val=100), progress=False)
    argv = [f'--data_dir={tmp_path / "data"}', f'--out_dir={tmp_path / "out"}', '--max_iters=3', '--batch_size=32',
            '--embed_dim=16', '--vision_layers=1', '--text_layers=1', '--vision_width=32', '--text_width=32']
    main(argv)
    out = capsys.readouterr().out
    assert 'val image->text top-1' in out and 'background read from the embedding' in out
    t = Teacher.load(str(tmp_path / 'out' / 'teacher.pt'))
    assert t.dim == 16 and t.checkpoint_info['train_config']['max_iters'] == 3
    assert {'top1', 'top1_same_text', 'top1_in_group', 'probe_bg_color'} <= set(t.checkpoint_info['metrics'])
