"""train.py on the tiny prepared dataset of conftest.py: learning, the ARRA loss, the baseline, DDP, resume, errors."""
import os
import sys
import json
import subprocess

import numpy as np
import pytest
import torch

import train
from conftest import REPO, TINY_GPT_ARGS, free_port
from data.common import PreparedSplit, read_meta
from model import GPT, alignment_loss


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


def test_a_few_steps_lower_the_loss(tiny_data, tmp_path):
    history = train.main(run_args(tiny_data, tmp_path, '--max_iters=40', '--eval_interval=40', '--log_interval=10',
                                  '--learning_rate=3e-3'))
    evals = [h for h in history if h['kind'] == 'eval']
    steps = [h for h in history if h['kind'] == 'train']
    assert [e['iter'] for e in evals] == [0, 40] and [s['iter'] for s in steps] == [10, 20, 30, 40]
    assert evals[-1]['val_ce'] < evals[0]['val_ce'] - 1.0        # 32 codes: ln 32 = 3.47 at the start
    assert evals[-1]['val_align'] < evals[0]['val_align'] - 0.3  # the projection turns towards the teacher
    assert steps[-1]['train_ce'] < steps[0]['train_ce']
    assert [json.loads(line) for line in open(tmp_path / 'log.jsonl')] == history  # the log is what was returned
    ckpt = torch.load(tmp_path / 'ckpt.pt', weights_only=True)
    assert ckpt['kind'] == 'arra-gpt' and ckpt['iter_num'] == 40 and ckpt['data_meta'] == read_meta(tiny_data)
    assert not any(k.startswith('_orig_mod.') for k in ckpt['model'])
    assert set(ckpt) == {'kind', 'model', 'optimizer', 'model_config', 'config', 'iter_num', 'best_val_loss', 'rng',
                         'data_meta'}


def test_alignment_loss_is_zero_at_the_target_and_its_gradient_reaches_projector_and_gpt_only(tiny_data):
    target = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    projected = 2.5 * target[:, None, :].expand(3, 5, 8)     # same directions, other length: cos = 1
    assert alignment_loss(projected, target).abs().item() < 1e-6
    assert alignment_loss(-projected, target).item() == pytest.approx(2.0, abs=1e-6)

    cfg = train.configure(train.TrainConfig(), run_args(tiny_data, 'unused', '--n_layer=2'))
    meta = read_meta(tiny_data)
    model = GPT(train.gpt_config(cfg, meta))
    batches = train.Batches(PreparedSplit(tiny_data, 'train'), 'cpu', model.uncond_text(1)[0], False)
    text, codes, teacher = batches.get(np.arange(8))
    assert torch.equal(teacher, torch.from_numpy(np.array(batches.split.teacher[:8], dtype=np.float32)))
    teacher.requires_grad_(True)  # would collect a gradient if the loss pushed the teacher features
    out = model(text, codes, teacher=teacher)
    out.align_loss.backward()     # the alignment term alone
    assert teacher.grad is None
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.projector.parameters())
    assert model.blocks[0].attention.wqkv.weight.grad.abs().sum() > 0   # the GPT up to align_layer = 1
    assert model.blocks[1].attention.wqkv.weight.grad is None          # nothing above the aligned layer
    assert model.head.weight.grad is None


def test_align_weight_zero_leaves_the_projector_bit_identical(tiny_data, tmp_path):
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


def test_global_batches_cover_each_epoch_once_and_split_between_ranks():
    n, g = 50, 8
    rows = np.concatenate([train.global_batch_rows(it, g, n, seed=3) for it in range(25)])  # 200 rows = 4 epochs
    for e in range(4):
        assert sorted(rows[e * n:(e + 1) * n]) == list(range(n))
    assert not np.array_equal(rows[:n], rows[n:2 * n])                    # a new order each epoch
    assert np.array_equal(train.global_batch_rows(7, g, n, 3), rows[56:64])  # a function of (seed, it) alone
    d = train.derangement(n)
    assert sorted(d) == list(range(n)) and not np.any(d == np.arange(n))


def _losses(entries, key):
    return np.array([e[key] for e in entries])


def test_ddp_two_processes_log_the_same_losses_as_one_process(tiny_data, tmp_path):
    common = ['--max_iters=4', '--log_interval=1', '--eval_interval=4', '--p_uncond=0.3', '--dropout=0.0']
    train.main(run_args(tiny_data, tmp_path / 'one', '--batch_size=8', *common))   # the 1-process reference
    two = cli(['--nproc_per_node=2', '--master_addr=127.0.0.1', f'--master_port={free_port()}', 'train.py',
               *run_args(tiny_data, tmp_path / 'two', '--batch_size=4', *common)],
              module=['-m', 'torch.distributed.run'])
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads((tmp_path / 'two' / 'config.json').read_text())['world_size'] == 2
    for kind, keys in (('train', ('train_ce', 'train_align')), ('eval', ('val_ce', 'val_align'))):
        a, b = read_log(tmp_path / 'one', kind), read_log(tmp_path / 'two', kind)
        assert [e['iter'] for e in a] == [e['iter'] for e in b] and len(a) >= 2
        for key in keys:
            np.testing.assert_allclose(_losses(a, key), _losses(b, key), rtol=0, atol=1e-5)
    # gradient accumulation on one process reaches the same numbers
    accum = train.main(run_args(tiny_data, tmp_path / 'accum', '--batch_size=4', '--grad_accum=2', *common))
    np.testing.assert_allclose(_losses([e for e in accum if e['kind'] == 'train'], 'train_ce'),
                               _losses(read_log(tmp_path / 'one', 'train'), 'train_ce'), rtol=0, atol=1e-5)


def test_resume_reproduces_the_uninterrupted_run(tiny_data, tmp_path):
    # dropout and prompt dropout on: resume must also restore the random streams, not just weights and order
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


def test_resume_refuses_another_model_or_other_data(tiny_data_copy, tmp_path, capsys):
    out = tmp_path / 'run'
    train.main(run_args(tiny_data_copy, out, '--max_iters=2', '--eval_interval=2'))
    with pytest.raises(SystemExit):
        train.main([f'--out_dir={out}', '--init_from=resume', '--max_iters=4', '--n_embd=64'])
    assert 'does not match' in capsys.readouterr().err
    meta = read_meta(tiny_data_copy)
    meta['teacher']['name'] = 'another teacher'
    with open(os.path.join(tiny_data_copy, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    with pytest.raises(SystemExit):
        train.main([f'--out_dir={out}', '--init_from=resume', '--max_iters=4'])
    assert 'different prepared data' in capsys.readouterr().err


def test_missing_or_unknown_dataset_errors_name_the_prepare_command(tmp_path, capsys):
    empty = tmp_path / 'empty'
    empty.mkdir()
    r = cli(['train.py', f'--data_dir={empty}', f'--out_dir={tmp_path / "out"}'])
    assert r.returncode == 1 and 'not prepared' in r.stderr and 'prepare' in r.stderr
    assert 'Traceback' not in r.stderr and not (tmp_path / 'out').exists()   # nothing half-made left behind
    with pytest.raises(SystemExit):
        train.main(['--dataset=no_such_set'])
    err = capsys.readouterr().err
    assert 'unknown dataset' in err and 'shapes' in err


def test_arrays_that_disagree_with_their_tokenizer_file_are_refused(tiny_data_copy, tmp_path, capsys):
    meta = read_meta(tiny_data_copy)
    meta['vqgan']['sha256'] = '0' * 64   # as if the tokenizer had been retrained after the arrays were made
    with open(os.path.join(tiny_data_copy, 'meta.json'), 'w') as f:
        json.dump(meta, f)
    with pytest.raises(SystemExit):
        train.main(run_args(tiny_data_copy, tmp_path / 'out', '--max_iters=2'))
    err = capsys.readouterr().err
    assert 'sha256' in err and 're-run' in err
    os.remove(os.path.join(tiny_data_copy, 'val_codes.bin'))
    with pytest.raises(SystemExit):
        train.main(run_args(tiny_data_copy, tmp_path / 'out', '--max_iters=2'))


def test_unknown_config_key_and_corrupt_checkpoint_are_clear_errors(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.main(run_args(tiny_data, tmp_path, '--lerning_rate=1e-3'))
    assert "unknown config key 'lerning_rate'" in capsys.readouterr().err
    (tmp_path / 'ckpt.pt').write_bytes(b'not a checkpoint at all')
    with pytest.raises(SystemExit):
        train.main([f'--out_dir={tmp_path}', '--init_from=resume'])
    assert 'corrupt' in capsys.readouterr().err


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_data_copy, tmp_path, capsys):
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


def test_shapes_encode_stage_writes_the_arrays_train_reads(tmp_path, capsys):
    from data.shapes.prepare import RenderConfig, PrepareConfig, render_dataset, encode_dataset, load_split
    from data.common import tokenize_captions
    from teacher import Teacher, embed_dataset
    from vqgan import VQConfig, VQModel, save_vqgan, load_vqgan, encode_images
    d = str(tmp_path / 'shapes')
    render_dataset(RenderConfig(out_dir=d, n_train=12, n_val=6), progress=False)
    torch.manual_seed(0)
    save_vqgan(VQModel(VQConfig(image_size=32, codebook_size=64, codebook_embed_dim=4, ch=16, ch_mult=(1, 1, 2),
                                num_res_blocks=1, z_channels=16, norm_groups=8)), str(tmp_path / 'vq.pt'))
    teacher = Teacher('ViT-S-32', embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, layers=1, width=32,
                      head_width=16), text_cfg=dict(context_length=16, width=32, heads=2, layers=1))
    teacher.save(str(tmp_path / 'teacher.pt'))
    cfg = PrepareConfig(out_dir=d, n_train=12, n_val=6, vqgan=str(tmp_path / 'vq.pt'),
                        teacher=str(tmp_path / 'missing.pt'), device='cpu', batch_size=5)
    with pytest.raises(FileNotFoundError, match='python teacher.py --dataset=shapes'):
        encode_dataset(cfg, progress=False)
    cfg = train.dataclasses.replace(cfg, teacher=str(tmp_path / 'teacher.pt'))
    meta = encode_dataset(cfg, progress=False)

    assert meta == read_meta(d) and meta['splits'] == {'train': 12, 'val': 6} and meta['text_len'] == 28
    assert (meta['grid'], meta['image_tokens'], meta['codebook_size'], meta['teacher_dim']) == ([8, 8], 64, 64, 16)
    vq, teacher = load_vqgan(cfg.vqgan), Teacher.load(cfg.teacher)
    for split in ('train', 'val'):
        images, captions = load_split(d, split)
        arrays = PreparedSplit(d, split)
        assert np.array_equal(arrays.codes, encode_images(vq, images, progress=False))
        assert np.array_equal(arrays.text, tokenize_captions(captions, 28))
        np.testing.assert_allclose(arrays.teacher.astype(np.float32),
                                   embed_dataset(teacher, images, progress=False).astype(np.float32), atol=2e-3)
        assert np.allclose(np.linalg.norm(arrays.teacher.astype(np.float32), axis=1), 1, atol=2e-3)
    mtime = os.path.getmtime(os.path.join(d, 'train_codes.bin'))
    capsys.readouterr()
    encode_dataset(cfg, progress=False)                                    # same tokenizer and teacher: no work
    assert 'skipping' in capsys.readouterr().out and os.path.getmtime(os.path.join(d, 'train_codes.bin')) == mtime
    history = train.main(run_args(d, tmp_path / 'out', '--max_iters=2', '--eval_interval=2', '--eval_rows=6'))
    assert history[-1]['kind'] == 'eval' and np.isfinite(history[-1]['val_ce'])
    torch.manual_seed(1)
    Teacher('ViT-S-32', embed_dim=16, vision_cfg=dict(image_size=32, patch_size=8, layers=1, width=32,
            head_width=16), text_cfg=dict(context_length=16, width=32, heads=2, layers=1)).save(cfg.teacher)
    with pytest.raises(SystemExit):                                        # a retrained teacher: arrays are stale
        train.main(run_args(d, tmp_path / 'out', '--max_iters=2'))
    assert 'teacher' in capsys.readouterr().err
    new_meta = encode_dataset(cfg, progress=False)                         # ... and encoding again fixes it
    assert new_meta['teacher']['sha256'] != meta['teacher']['sha256']
