"""train.py on the tiny prepared dataset of conftest.py: learning, the baseline, DDP, resume, errors that name the
fix."""
import os
import sys
import json
import subprocess

import numpy as np
import pytest
import torch

import train
from conftest import REPO, TINY_GPT_ARGS, free_port
from data.common import read_meta
from model import GPT


def run_args(data_dir, out_dir, *extra):
    return [f'--data_dir={data_dir}', f'--out_dir={out_dir}', *TINY_GPT_ARGS, '--batch_size=8', '--warmup_iters=2',
            '--eval_samples=0', '--eval_rows=24', *extra]


def read_log(out_dir, kind):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [e for e in map(json.loads, f) if e['kind'] == kind]


def cli(args, env_extra=None, module=None):
    env = dict(os.environ, OMP_NUM_THREADS='1', **(env_extra or {}))
    cmd = [sys.executable] + (module or []) + args
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def short_run(tiny_data, tmp_path_factory):
    """40 steps of the default (ARRA) objective on the tiny data: (history, out_dir)."""
    out = tmp_path_factory.mktemp('short_run')
    history = train.main(run_args(tiny_data, out, '--max_iters=40', '--eval_interval=40', '--log_interval=10',
                                  '--learning_rate=3e-3'))
    return history, out


def test_a_few_steps_lower_both_losses(short_run):
    """Training works: val CE falls by over a nat (ln 32 = 3.47 at the start) and the projection turns towards the
    teacher (val alignment loss falls), logged at the expected iterations."""
    history, _ = short_run
    evals = [h for h in history if h['kind'] == 'eval']
    steps = [h for h in history if h['kind'] == 'train']
    assert [e['iter'] for e in evals] == [0, 40] and [s['iter'] for s in steps] == [10, 20, 30, 40]
    assert evals[-1]['val_ce'] < evals[0]['val_ce'] - 1.0
    assert evals[-1]['val_align'] < evals[0]['val_align'] - 0.3
    assert steps[-1]['train_ce'] < steps[0]['train_ce']


def test_the_log_file_holds_the_returned_history(short_run):
    """log.jsonl is the machine-readable record of the run: exactly the entries train() returns."""
    history, out = short_run
    assert [json.loads(line) for line in open(out / 'log.jsonl')] == history


def test_the_checkpoint_holds_the_raw_model_and_what_resume_needs(short_run, tiny_data):
    """ckpt.pt has the uncompiled weights (no _orig_mod. prefix), the data's meta.json and every key resume reads."""
    _, out = short_run
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['kind'] == 'arra-gpt' and ckpt['iter_num'] == 40 and ckpt['data_meta'] == read_meta(tiny_data)
    assert not any(k.startswith('_orig_mod.') for k in ckpt['model'])
    assert set(ckpt) == {'kind', 'model', 'optimizer', 'model_config', 'config', 'iter_num', 'best_val_loss', 'rng',
                         'data_meta'}


def test_align_weight_zero_leaves_the_projector_bit_identical(tiny_data, tmp_path):
    """The baseline is the same loop without ARRA: the projector stays at its initial weights and is not optimized,
    while the GPT itself trains."""
    train.main(run_args(tiny_data, tmp_path, '--align_weight=0', '--max_iters=6', '--eval_interval=6'))
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    cfg = train.configure(train.TrainConfig(), run_args(tiny_data, tmp_path))
    torch.manual_seed(cfg.seed)
    initial = GPT(train.gpt_config(cfg, read_meta(tiny_data))).state_dict()
    for name, value in ckpt['model'].items():
        if name.startswith('projector.'):
            assert torch.equal(value, initial[name]), name
    assert not torch.equal(ckpt['model']['head.weight'], initial['head.weight'])  # the GPT itself did train
    n_projector = sum(v.numel() for k, v in initial.items() if k.startswith('projector.'))
    n_optimized = sum(s['exp_avg'].numel() for s in ckpt['optimizer']['state'].values())
    assert n_optimized == sum(v.numel() for v in initial.values()) - n_projector


def _losses(entries, key):
    return np.array([e[key] for e in entries])


DDP_COMMON = ['--max_iters=4', '--log_interval=1', '--eval_interval=4', '--p_uncond=0.3', '--dropout=0.0']


@pytest.fixture(scope='module')
def one_process_run(tiny_data, tmp_path_factory):
    """The 1-process reference: global batch 8 in one micro-step."""
    out = tmp_path_factory.mktemp('one')
    train.main(run_args(tiny_data, out, '--batch_size=8', *DDP_COMMON))
    return out


def test_ddp_two_processes_log_the_same_losses_as_one_process(tiny_data, one_process_run, tmp_path):
    """2 gloo ranks of 4 rows see exactly the rows 1 rank of 8 sees, so train and val losses agree to 1e-5."""
    two = cli(['--nproc_per_node=2', '--master_addr=127.0.0.1', f'--master_port={free_port()}', 'train.py',
               *run_args(tiny_data, tmp_path / 'two', '--batch_size=4', *DDP_COMMON)],
              module=['-m', 'torch.distributed.run'])
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / 'two' / 'config.json').read_text())['world_size'] == 2
    for kind, keys in (('train', ('train_ce', 'train_align')), ('eval', ('val_ce', 'val_align'))):
        a, b = read_log(one_process_run, kind), read_log(tmp_path / 'two', kind)
        assert [e['iter'] for e in a] == [e['iter'] for e in b] and len(a) >= 2
        for key in keys:
            np.testing.assert_allclose(_losses(a, key), _losses(b, key), rtol=0, atol=1e-5)


def test_gradient_accumulation_equals_one_large_batch(tiny_data, one_process_run, tmp_path):
    """2 micro-steps of 4 rows make the same optimizer steps as 1 micro-step of 8."""
    accum = train.main(run_args(tiny_data, tmp_path / 'accum', '--batch_size=4', '--grad_accum=2', *DDP_COMMON))
    np.testing.assert_allclose(_losses([e for e in accum if e['kind'] == 'train'], 'train_ce'),
                               _losses(read_log(one_process_run, 'train'), 'train_ce'), rtol=0, atol=1e-5)


def test_resume_reproduces_the_uninterrupted_run(tiny_data, tmp_path):
    """6 + 6 steps through a checkpoint equal 12 steps in one go, bit for bit, with dropout and prompt dropout on:
    resume restores the random streams, not just weights and order."""
    common = ['--lr_decay_iters=12', '--log_interval=2', '--eval_interval=6', '--dropout=0.1', '--p_uncond=0.3']
    full = tmp_path / 'full'
    train.main(run_args(tiny_data, full, '--max_iters=12', *common))
    cut = tmp_path / 'cut'
    train.main(run_args(tiny_data, cut, '--max_iters=6', *common))
    assert torch.load(cut / 'ckpt.pt', weights_only=True)['iter_num'] == 6
    train.main([f'--out_dir={cut}', '--init_from=resume', '--max_iters=12'])  # the rest from the checkpoint

    for key in ('train_ce', 'train_align'):
        np.testing.assert_array_equal(_losses(read_log(cut, 'train'), key), _losses(read_log(full, 'train'), key))
    np.testing.assert_array_equal(_losses(read_log(cut, 'eval'), 'val_ce'), _losses(read_log(full, 'eval'), 'val_ce'))
    a, b = (torch.load(d / 'ckpt.pt', weights_only=True) for d in (full, cut))
    assert a['iter_num'] == b['iter_num'] == 12
    for name in a['model']:
        assert torch.equal(a['model'][name], b['model'][name]), name


@pytest.fixture
def two_step_run(tiny_data_copy, tmp_path):
    out = tmp_path / 'run'
    train.main(run_args(tiny_data_copy, out, '--max_iters=2', '--eval_interval=2'))
    return out


def test_resume_refuses_another_model(two_step_run, capsys):
    """Weights of one shape cannot continue as another: the error names the differing fields."""
    with pytest.raises(SystemExit):
        train.main([f'--out_dir={two_step_run}', '--init_from=resume', '--max_iters=4', '--n_embd=64'])
    assert 'does not match' in capsys.readouterr().err


def test_resume_refuses_other_data(two_step_run, tiny_data_copy, capsys):
    """A run continued on other prepared data would mix two datasets: refused, naming the difference."""
    meta = read_meta(tiny_data_copy)
    meta['teacher']['name'] = 'another teacher'
    with open(os.path.join(tiny_data_copy, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    with pytest.raises(SystemExit):
        train.main([f'--out_dir={two_step_run}', '--init_from=resume', '--max_iters=4'])
    assert 'different prepared data' in capsys.readouterr().err


def test_an_unprepared_folder_names_the_prepare_command_and_leaves_no_output(tmp_path):
    """From the command line: no traceback, the command to run, and no half-made out_dir."""
    empty = tmp_path / 'empty'
    empty.mkdir()
    r = cli(['train.py', f'--data_dir={empty}', f'--out_dir={tmp_path / "out"}'])
    assert r.returncode == 1 and 'not prepared' in r.stderr and 'prepare' in r.stderr
    assert 'Traceback' not in r.stderr and not (tmp_path / 'out').exists()


def test_an_unknown_dataset_lists_the_known_ones(capsys):
    """A typo in --dataset names the datasets under data/."""
    with pytest.raises(SystemExit):
        train.main(['--dataset=no_such_set'])
    err = capsys.readouterr().err
    assert 'unknown dataset' in err and 'shapes' in err


def test_arrays_that_disagree_with_their_tokenizer_file_are_refused(tiny_data_copy, tmp_path, capsys):
    """Codes made by a tokenizer that has since been retrained would train on the wrong pictures."""
    meta = read_meta(tiny_data_copy)
    meta['vqgan']['sha256'] = '0' * 64   # as if the tokenizer had been retrained after the arrays were made
    with open(os.path.join(tiny_data_copy, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    with pytest.raises(SystemExit):
        train.main(run_args(tiny_data_copy, tmp_path / 'out', '--max_iters=2'))
    err = capsys.readouterr().err
    assert 'sha256' in err and 're-run' in err


def test_a_missing_array_is_refused(tiny_data_copy, tmp_path, capsys):
    """A prepared folder with an array gone names the prepare step instead of failing inside numpy."""
    os.remove(os.path.join(tiny_data_copy, 'val_codes.bin'))
    with pytest.raises(SystemExit):
        train.main(run_args(tiny_data_copy, tmp_path / 'out', '--max_iters=2'))
    assert 'val_codes.bin' in capsys.readouterr().err


def test_an_unknown_config_key_is_an_error(tiny_data, tmp_path, capsys):
    """A typo never trains silently with a default."""
    with pytest.raises(SystemExit):
        train.main(run_args(tiny_data, tmp_path, '--lerning_rate=1e-3'))
    assert "unknown config key 'lerning_rate'" in capsys.readouterr().err


def test_a_corrupt_checkpoint_is_a_clear_error(tmp_path, capsys):
    """Resuming from a truncated or foreign file says so instead of showing a pickle traceback."""
    (tmp_path / 'ckpt.pt').write_bytes(b'not a checkpoint at all')
    with pytest.raises(SystemExit):
        train.main([f'--out_dir={tmp_path}', '--init_from=resume'])
    assert 'corrupt' in capsys.readouterr().err


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data_copy, tmp_path, capsys):
    """Broken teacher features make the alignment loss NaN: the run stops before the weights move, names the step,
    and the last good checkpoint stays byte for byte."""
    out = tmp_path / 'run'
    train.main(run_args(tiny_data_copy, out, '--max_iters=4', '--eval_interval=4'))
    good = (out / 'ckpt.pt').read_bytes()
    teacher = np.memmap(os.path.join(tiny_data_copy, 'train_teacher.bin'), dtype=np.float16, mode='r+')
    teacher[:] = np.nan  # broken features: the alignment loss turns NaN
    teacher.flush()
    with pytest.raises(SystemExit):
        train.main([f'--out_dir={out}', '--init_from=resume', '--max_iters=8'])
    err = capsys.readouterr().err
    assert 'not finite' in err and 'iter 4' in err and 'kept' in err
    assert (out / 'ckpt.pt').read_bytes() == good
