"""The Quickstart's main job, end to end, with every step shrunk: render -> tokenizer -> teacher -> encode -> GPT
with ARRA -> sample grid, run exactly as scripts/demo.sh runs it (scripts/shapes_pipeline.sh), in a temp folder."""
import os
import json
import subprocess

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_shapes_pipeline_end_to_end(tmp_path):
    """The Quickstart's steps run as scripts/demo.sh runs them and leave every artefact of the contract;
    a second run reuses every finished step."""
    data, out = tmp_path / 'shapes', tmp_path / 'out'
    env = dict(os.environ, DATA_DIR=str(data), OUT=str(out), OMP_NUM_THREADS='1',
               RENDER_ARGS='--n_train=256 --n_val=64',
               VQ_ARGS='--max_iters=20 --batch_size=16 --eval_interval=20 --eval_images=16 --codebook_size=64',
               TEACHER_ARGS='--max_iters=5 --batch_size=32 --eval_interval=5',
               TRAIN_ARGS='--max_iters=12 --batch_size=8 --eval_interval=12 --eval_rows=16 --eval_samples=1 '
                          '--warmup_iters=2 --log_interval=4 --peak_flops=1e11',
               SAMPLE_ARGS='--num_samples=2')
    run = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'shapes_pipeline.sh')], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # every artefact of the contract is there and consistent
    meta = json.load(open(data / 'meta.json'))
    assert meta['splits'] == {'train': 256, 'val': 64} and meta['codebook_size'] == 64
    codes = np.memmap(data / 'train_codes.bin', dtype=np.uint16, mode='r').reshape(256, -1)
    assert codes.shape[1] == meta['image_tokens'] and codes.max() < 64
    grid = Image.open(out / 'shapes' / 'demo.png')
    # 6 prompts x 2 samples of 32 px images, upscaled 4x, captions to the right
    assert grid.size[1] >= 6 * 32 * 4 and grid.size[0] > 2 * 32 * 4
    assert 'pipeline finished' in run.stdout
    # a second run reuses every finished step
    again = subprocess.run(['bash', os.path.join(ROOT, 'scripts', 'shapes_pipeline.sh')], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    for step in ('tokenizer', 'teacher', 'gpt'):
        assert f'== {step}: done before, reusing' in again.stdout
