"""train.py --fsdp=True (PyTorch FSDP2, fully_shard) on the CPU: 2 gloo ranks under torchrun train the same steps as
one process and as DDP, and their checkpoints are the one-process format, loading under any other layout; and the
memory estimate of llm.train_memory that the README's table comes from."""
import pytest
import numpy as np
import torch

import sample
import train
from conftest import free_port
from llm import train_memory
from model import GPT, GPTConfig
from test_train import run_args, read_log, cli

COMMON = ['--log_interval=1', '--p_uncond=0.3', '--dropout=0.0']  # dropout masks depend on the rank: off
STEPS = ['--max_iters=4', '--eval_interval=4']


def torchrun(args, nproc=2):
    r = cli(['--nproc_per_node', str(nproc), '--master_addr=127.0.0.1', f'--master_port={free_port()}', 'train.py',
             *args], module=['-m', 'torch.distributed.run'])
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def assert_same_losses(a_dir, b_dir, atol=1e-5):
    for kind, keys in (('train', ('train_ce', 'train_align')), ('eval', ('val_ce', 'val_align'))):
        a, b = read_log(a_dir, kind), read_log(b_dir, kind)
        assert [e['iter'] for e in a] == [e['iter'] for e in b] and len(a) >= 2
        for key in keys:
            np.testing.assert_allclose([e[key] for e in a], [e[key] for e in b], rtol=0, atol=atol, err_msg=key)


@pytest.fixture(scope='module')
def plain_run(tiny_data, tmp_path_factory):
    """The reference: one process, global batch 8 in one micro-step."""
    out = tmp_path_factory.mktemp('plain')
    train.main(run_args(tiny_data, out, '--batch_size=8', *COMMON, *STEPS))
    return out


@pytest.fixture(scope='module')
def fsdp_run(tiny_data, tmp_path_factory):
    """2 FSDP ranks of 4 rows each: the same global batch of 8."""
    out = tmp_path_factory.mktemp('fsdp')
    torchrun(run_args(tiny_data, out, '--batch_size=4', '--fsdp=True', *COMMON, *STEPS))
    return out


@pytest.mark.slow  # launches torchrun with 2 processes (~10 s each on 2 cores)
def test_fsdp_two_ranks_log_the_same_losses_as_one_process(plain_run, fsdp_run):
    """Sharding changes where the weights live, not the arithmetic: the same rows, the same averaged gradients, the
    same AdamW steps, so train and val losses agree to 1e-5."""
    assert_same_losses(plain_run, fsdp_run)


@pytest.mark.slow  # launches torchrun with 2 processes (~10 s each on 2 cores)
def test_fsdp_two_ranks_log_the_same_losses_as_ddp(tiny_data, fsdp_run, tmp_path):
    """FSDP's reduce-scatter averages gradients exactly as DDP's all-reduce does."""
    torchrun(run_args(tiny_data, tmp_path / 'ddp', '--batch_size=4', *COMMON, *STEPS))
    assert_same_losses(tmp_path / 'ddp', fsdp_run)


@pytest.mark.slow  # launches torchrun with 2 processes (~10 s each on 2 cores)
def test_fsdp_gradient_accumulation_equals_one_large_batch(tiny_data, plain_run, tmp_path):
    """2 ranks x 2 micro-steps of 2 rows (gradients reduced on the last micro-step only) equal 1 process x 8 rows."""
    torchrun(run_args(tiny_data, tmp_path / 'accum', '--batch_size=2', '--grad_accum=2', '--fsdp=True', *COMMON,
                      *STEPS))
    assert_same_losses(plain_run, tmp_path / 'accum')


def test_grad_checkpoint_trains_the_same_steps(tiny_data, plain_run, tmp_path):
    """Activation checkpointing recomputes each block in the backward (with the same dropout stream): the same
    numbers, so the same losses as the run that kept every activation."""
    train.main(run_args(tiny_data, tmp_path / 'ckpt', '--batch_size=8', '--grad_checkpoint=True', *COMMON, *STEPS))
    assert_same_losses(plain_run, tmp_path / 'ckpt', atol=1e-6)


@pytest.mark.slow  # launches torchrun with 2 processes (~10 s each on 2 cores)
def test_fsdp_with_grad_checkpoint_logs_the_same_losses(tiny_data, plain_run, tmp_path):
    """Recomputing a sharded block in the backward gathers its weights again: still the one-process losses."""
    torchrun(run_args(tiny_data, tmp_path / 'gc', '--batch_size=4', '--fsdp=True', '--grad_checkpoint=True', *COMMON,
                      *STEPS))
    assert_same_losses(plain_run, tmp_path / 'gc')

@pytest.mark.slow  # launches torchrun with 2 processes (~10 s each on 2 cores)
def test_the_fsdp_checkpoint_is_the_one_process_checkpoint(plain_run, fsdp_run):
    """Rank 0 gathers the full weights and AdamW states into the same file a single process writes: the same keys,
    optimizer indices and param groups, every tensor full-size and equal to the one-process run's to 1e-5."""
    a, b = (torch.load(d / 'ckpt.pt', weights_only=True) for d in (plain_run, fsdp_run))
    assert set(a) == set(b) and a['model'].keys() == b['model'].keys() and a['iter_num'] == b['iter_num'] == 4
    for name in a['model']:
        torch.testing.assert_close(b['model'][name], a['model'][name], rtol=0, atol=1e-5, msg=name)
    assert [g['params'] for g in a['optimizer']['param_groups']] == \
        [g['params'] for g in b['optimizer']['param_groups']]
    assert a['optimizer']['state'].keys() == b['optimizer']['state'].keys()
    for i, state in a['optimizer']['state'].items():
        for key in ('exp_avg', 'exp_avg_sq', 'step'):
            torch.testing.assert_close(b['optimizer']['state'][i][key], state[key], rtol=0, atol=1e-5)


RESUME = ['--lr_decay_iters=8', '--eval_interval=4', *COMMON]


@pytest.fixture(scope='module')
def uninterrupted(tiny_data, tmp_path_factory):
    """8 steps in one process, in one go."""
    out = tmp_path_factory.mktemp('uninterrupted')
    train.main(run_args(tiny_data, out, '--batch_size=8', '--max_iters=8', *RESUME))
    return out


@pytest.mark.slow  # launches torchrun with 2 processes (~10 s each on 2 cores)
def test_fsdp_save_then_one_process_resume_reproduces_the_run(tiny_data, uninterrupted, tmp_path):
    """4 steps on 2 FSDP ranks, then 4 more resumed in one plain process, equal 8 steps in one go."""
    cut = tmp_path / 'cut'
    torchrun(run_args(tiny_data, cut, '--batch_size=4', '--max_iters=4', '--fsdp=True', *RESUME))
    train.main([f'--out_dir={cut}', '--init_from=resume', '--max_iters=8', '--batch_size=8', '--fsdp=False'])
    assert_same_losses(uninterrupted, cut)


@pytest.mark.slow  # launches torchrun with 2 processes (~10 s each on 2 cores)
def test_one_process_save_then_fsdp_resume_reproduces_the_run(tiny_data, uninterrupted, tmp_path):
    """4 steps in one process, then 4 more resumed on 2 FSDP ranks (weights and AdamW states loaded into the
    shards), equal 8 steps in one go."""
    cut = tmp_path / 'cut'
    train.main(run_args(tiny_data, cut, '--batch_size=8', '--max_iters=4', *RESUME))
    torchrun([f'--out_dir={cut}', '--init_from=resume', '--max_iters=8', '--batch_size=4', '--fsdp=True'])
    assert_same_losses(uninterrupted, cut)


@pytest.mark.slow  # launches torchrun with 2 processes (~10 s each on 2 cores)
def test_sample_py_loads_the_fsdp_checkpoint(fsdp_run, plain_run, tmp_path):
    """sample.py needs no distributed setup for an FSDP checkpoint; it draws what the one-process twin draws."""
    args = ['--prompt', 'a red circle', '--num_samples=2', '--seed=3', '--temperature=0']
    grid, files = sample.main([f'--ckpt={fsdp_run / "ckpt.pt"}', f'--out={tmp_path / "fsdp.png"}', *args])
    twin, _ = sample.main([f'--ckpt={plain_run / "ckpt.pt"}', f'--out={tmp_path / "plain.png"}', *args])
    assert open(grid, 'rb').read() == open(twin, 'rb').read()


@pytest.mark.slow  # launches torchrun with 2 processes (~10 s each on 2 cores)
def test_fsdp_nan_stops_every_rank_and_keeps_the_checkpoint(tiny_data_copy, tmp_path):
    """Under sharding the gradient norm is a DTensor over all shards: a NaN on the ranks still stops the run before
    the weights move, with the usual message, and the last good checkpoint stays byte for byte."""
    out = tmp_path / 'run'
    torchrun(run_args(tiny_data_copy, out, '--batch_size=4', '--fsdp=True', '--max_iters=2', '--eval_interval=2'))
    good = (out / 'ckpt.pt').read_bytes()
    teacher = np.memmap(f'{tiny_data_copy}/train_teacher.bin', dtype=np.float16, mode='r+')
    teacher[:] = np.nan  # broken features: the alignment loss turns NaN
    teacher.flush()
    r = cli(['--nproc_per_node=2', '--master_addr=127.0.0.1', f'--master_port={free_port()}', 'train.py',
             f'--out_dir={out}', '--init_from=resume', '--max_iters=4'], module=['-m', 'torch.distributed.run'])
    assert r.returncode != 0 and 'not finite' in r.stderr and 'iter 2' in r.stderr
    assert (out / 'ckpt.pt').read_bytes() == good

def test_fsdp_without_torchrun_names_the_launch_command(tiny_data, tmp_path, capsys, monkeypatch):
    """FSDP shards over torchrun's ranks; launched as a plain process it says how to launch, before writing files."""
    monkeypatch.delenv('RANK', raising=False)
    with pytest.raises(SystemExit):
        train.main(run_args(tiny_data, tmp_path / 'out', '--fsdp=True', '--max_iters=2'))
    assert 'torchrun --nproc_per_node=N' in capsys.readouterr().err and not (tmp_path / 'out').exists()

def test_train_memory_matches_a_hand_count():
    """The README's memory table rests on train_memory: checked against parameters counted on a real GPT and the
    byte counts written out by hand (16 bytes per parameter under DDP, 16 / world plus the gathered bf16 root and two
    blocks and one block's fp32 gradient under FSDP; per-token activations and the logits)."""
    c = GPTConfig(n_layer=3, n_head=2, n_embd=32, codebook_size=64, image_tokens=16, text_len=8, teacher_dim=8)
    model = GPT(c)
    n = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.blocks[1].parameters())
    root = n - 3 * block
    ffn = model.blocks[0].feed_forward.w3.out_features
    acts = 5 * (8 + 16) * 3 * (34 * 32 + 8 * ffn) + 5 * 16 * 64 * 10   # batch 5: tokens x layers x bytes per token
    gib = 1024 ** 3
    ddp, fsdp = train_memory(c, 5, world=4, fsdp=False), train_memory(c, 5, world=4, fsdp=True)
    assert ddp['params'] == fsdp['params'] == n and ddp['bytes_per_param'] == 16 and fsdp['bytes_per_param'] == 4
    assert ddp['states_gib'] * gib == pytest.approx(16 * n)
    assert fsdp['states_gib'] * gib == pytest.approx(4 * n + 2 * (root + 2 * block) + 4 * block)
    assert ddp['activations_gib'] * gib == pytest.approx(acts) and fsdp['activations_gib'] == ddp['activations_gib']
    assert fsdp['total_gib'] == pytest.approx(fsdp['states_gib'] + fsdp['activations_gib'])
    recompute = train_memory(c, 5, world=4, fsdp=True, grad_checkpoint=True)   # block inputs + one block in full
    assert recompute['activations_gib'] * gib == pytest.approx(
        5 * (8 + 16) * (3 * 4 * 32 + 34 * 32 + 8 * ffn) + 5 * 16 * 64 * 10)
