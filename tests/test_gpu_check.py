"""scripts/gpu_check.sh, the prepared check of the CUDA paths: what of it can run on a CPU machine."""
import os
import sys
import json
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'gpu_check.sh')


def run(env_extra, timeout):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS='1', CUDA_VISIBLE_DEVICES='', **env_extra)
    return subprocess.run(['bash', SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_without_a_gpu_it_says_so_and_succeeds():
    """On a machine with no CUDA device the check is not a failure: it says why it did nothing and exits 0."""
    r = run({}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'no CUDA device found' in r.stdout


@pytest.mark.slow
def test_dry_run_goes_through_every_step_on_the_cpu(tmp_path):
    """DRY_RUN=1 runs the script's own steps at toy sizes (data, torchrun training, resume, FSDP training on 2
    gloo ranks, sampling, FID), so its
    plumbing is checked before a GPU is ever spent on it."""
    r = run({'DRY_RUN': '1', 'WORK': str(tmp_path)}, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = [line for line in r.stdout.splitlines() if line.startswith('gpu_check: ')]
    assert [line.split(':')[1].split()[0] for line in lines] == ['train', 'resume', 'fsdp', 'sample', 'fid', 'fid']
    log = [json.loads(line) for line in open(tmp_path / 'run' / 'log.jsonl')]
    assert log[-1]['kind'] == 'eval' and log[-1]['iter'] == 6          # 4 steps, then 2 more after the resume
    assert len(os.listdir(tmp_path / 'samples1')) == 4 * 2 + 1          # 4 prompts x 2 samples + prompts.txt
    fsdp = [json.loads(line) for line in open(tmp_path / 'fsdp' / 'log.jsonl')]
    assert fsdp[-1]['kind'] == 'eval' and fsdp[-1]['iter'] == 4         # the sharded run's 4 steps
