"""Tests of data/shapes/train_tokenizer.py: the training metrics and a short run on a few hundred shapes images."""
import os

import numpy as np
import pytest
import torch

from data.shapes.world import make_split
from data.shapes.train_tokenizer import VQTrainConfig, code_stats, train
from utils import uint8_to_float
from vqgan import load_vqgan


def test_code_stats():
    """Usage is the fraction of codes seen; perplexity the effective number of codes (2 of 4 evenly: 2)."""
    usage, ppl = code_stats(torch.tensor([0, 0, 1, 1]), 4)
    assert usage == 0.5 and ppl == pytest.approx(2.0)
    usage, ppl = code_stats(torch.tensor([3, 3, 3]), 8)
    assert usage == 1 / 8 and ppl == pytest.approx(1.0)


@pytest.fixture(scope='module')
def shapes_dir(tmp_path_factory):
    """A few hundred freshly rendered shapes images (independent of the repo's prepared data)."""
    d = tmp_path_factory.mktemp('shapes')
    for split, n, seed in (('train', 384, 0), ('val', 64, 1)):
        _, imgs, caps = make_split(n, seed, 32)
        np.save(d / f'{split}_images.npy', imgs)
        (d / f'{split}_captions.txt').write_text('\n'.join(caps) + '\n')
    return str(d)


def small_train_config(shapes_dir, out_dir, **overrides):
    kw = dict(data_dir=shapes_dir, out_dir=out_dir, codebook_size=64, ch=8, ch_mult=(1, 2, 2), z_channels=16,
              norm_groups=4, max_iters=100, batch_size=8, lr=3e-3, warmup_iters=10, restart_interval=25,
              eval_interval=50, eval_images=64, device='cpu')
    return VQTrainConfig(**(kw | overrides))


def test_short_training_run_lowers_reconstruction_error(shapes_dir, tmp_path):
    """100 steps cut the reconstruction error five-fold, and the saved checkpoint is the evaluated model."""
    cfg = small_train_config(shapes_dir, str(tmp_path / 'run'))
    m = train(cfg, progress=False)
    assert m['mse'] < m['start_mse'] / 5, m       # a large drop, measured through the discrete codes
    assert 0 < m['usage'] <= 1 and 1 <= m['perplexity'] <= 64
    assert os.path.exists(tmp_path / 'run' / 'recon.png') and os.path.exists(tmp_path / 'run' / 'recon_00050.png')
    model = load_vqgan(m['ckpt'])
    assert model.grid == (8, 8)
    val = uint8_to_float(np.load(os.path.join(shapes_dir, 'val_images.npy')))
    with torch.no_grad():
        mse = ((model.decode(model.encode(val)).clamp(-1, 1) - val) ** 2).mean().item()
    assert mse == pytest.approx(m['mse'], rel=1e-4)  # the saved checkpoint is the evaluated model


def test_gan_loss_path_runs(shapes_dir, tmp_path):
    """The PatchGAN and L1 options (off by default) train without error."""
    cfg = small_train_config(shapes_dir, str(tmp_path / 'gan'), max_iters=3, disc_weight=0.5,
                             disc_start=1, recon_loss='l1')
    m = train(cfg, progress=False)
    assert np.isfinite(m['mse'])
