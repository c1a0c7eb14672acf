"""sample.py on a tiny checkpoint trained on conftest's tiny dataset, decoded with its tiny tokenizer."""
import os
import sys
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import train
from conftest import REPO, TINY, TINY_GPT_ARGS, CAPTIONS, tiny_vqgan, free_port
from vqgan import VQConfig, VQModel, save_vqgan


@pytest.fixture(scope='module')
def tiny_ckpt(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp('gpt')
    train.main([f'--data_dir={tiny_data}', f'--out_dir={out}', *TINY_GPT_ARGS, '--batch_size=8', '--max_iters=20',
                '--eval_interval=20', '--eval_samples=0', '--learning_rate=3e-3'])
    return str(out / 'ckpt.pt')


def run(ckpt, tmp_path, *extra, name='grid.png'):
    grid, files = sample.main([f'--ckpt={ckpt}', f'--out={tmp_path / name}', *extra])
    return grid, files


def test_same_seed_same_png_bytes_and_other_seeds_differ(tiny_ckpt, tmp_path):
    """Sampling is reproducible: the seed alone decides the images, byte for byte."""
    args = ['--prompt', 'a red circle', '--prompt', 'a blue square', '--num_samples=3']
    a, _ = run(tiny_ckpt, tmp_path, *args, '--seed=1', name='a.png')
    b, _ = run(tiny_ckpt, tmp_path, *args, '--seed=1', name='b.png')
    c, _ = run(tiny_ckpt, tmp_path, *args, '--seed=2', name='c.png')
    assert open(a, 'rb').read() == open(b, 'rb').read()
    assert open(a, 'rb').read() != open(c, 'rb').read()


def test_grid_layout_and_per_sample_files(tiny_ckpt, tmp_path):
    """One grid row per prompt with its caption, and each tile is the per-sample PNG, upscaled."""
    prompts, n, scale = ['a red circle', 'a green triangle', 'a yellow square'], 2, 3
    grid, files = run(tiny_ckpt, tmp_path, *[a for p in prompts for a in ('--prompt', p)], f'--num_samples={n}',
                      f'--scale={scale}', f'--out_dir={tmp_path / "each"}', '--batch_size=4')
    names = sorted(os.listdir(tmp_path / 'each'))
    assert names == sorted([f'p{p:05d}_s{s:03d}.png' for p in range(3) for s in range(n)] + ['prompts.txt'])
    assert (tmp_path / 'each' / 'prompts.txt').read_text().splitlines() == prompts
    S = TINY['image_size']
    tiles = {f: np.array(Image.open(tmp_path / 'each' / f)) for f in names if f.endswith('.png')}
    assert all(t.shape == (S, S, 3) and t.dtype == np.uint8 for t in tiles.values())  # decoded to image size
    g = np.array(Image.open(grid))
    pad, tile = 2, S * scale
    assert g.shape[0] == len(prompts) * (tile + pad) + pad                 # one row per prompt
    assert g.shape[1] > n * (tile + pad) + pad                             # samples, then the caption column
    for p in range(len(prompts)):
        for s in range(n):
            y, x = pad + p * (tile + pad), pad + s * (tile + pad)
            expected = tiles[f'p{p:05d}_s{s:03d}.png'].repeat(scale, 0).repeat(scale, 1)
            assert np.array_equal(g[y:y + tile, x:x + tile], expected), (p, s)
    caption_column = g[:, n * (tile + pad) + pad:]
    assert (caption_column < 128).any()                                    # the prompts are written there


def test_a_mismatched_tokenizer_is_refused(tiny_ckpt, tmp_path, capsys):
    """Codes decoded by another tokenizer would be other pictures: refused, naming why."""
    other = tiny_vqgan(str(tmp_path / 'other.pt'), seed=1)      # same shapes, other weights: other sha256
    with pytest.raises(SystemExit):
        run(tiny_ckpt, tmp_path, '--prompt', 'a red circle', f'--vqgan={other}')
    err = capsys.readouterr().err
    assert 'does not match' in err and 'sha256' in err
    torch.manual_seed(0)
    bigger = VQConfig(image_size=16, codebook_size=64, codebook_embed_dim=4, ch=8, ch_mult=(1, 2, 2),
                      num_res_blocks=1, z_channels=8, norm_groups=4)
    save_vqgan(VQModel(bigger), str(tmp_path / 'bigger.pt'))
    with pytest.raises(SystemExit):
        run(tiny_ckpt, tmp_path, '--prompt', 'a red circle', f'--vqgan={tmp_path / "bigger.pt"}')
    assert '64 codes but the GPT predicts 32' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(tiny_ckpt, tmp_path, '--prompt', 'a red circle', f'--vqgan={tmp_path / "missing.pt"}')
    assert 'not found' in capsys.readouterr().err


def test_checkpoints_from_before_image_positions_are_refused_with_a_retrain_message(tiny_ckpt, tmp_path, capsys):
    """A checkpoint written before image tokens had positions holds another model's weights: sampling from it
    must stop with a message that says to retrain, not load it silently or fail deep inside load_state_dict."""
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    for key in ('image_pos', 'image_width'):
        del ckpt['model_config'][key]
    ckpt['model'] = {k: v for k, v in ckpt['model'].items() if not k.startswith('image_')}
    old = str(tmp_path / 'old.pt')
    torch.save(ckpt, old)
    with pytest.raises(SystemExit):
        run(old, tmp_path, '--prompt', 'a red circle')
    assert 'retrain' in capsys.readouterr().err


def test_temperature_zero_is_greedy_and_negative_values_are_a_clear_error(tiny_ckpt, tmp_path, capsys):
    """--temperature=0 samples greedily (identical images whatever the seed); a negative temperature is refused
    at the command line with a message, not a traceback from inside the sampling loop."""
    a, _ = run(tiny_ckpt, tmp_path, '--prompt', 'a red circle', '--temperature=0', '--seed=1', name='a.png')
    b, _ = run(tiny_ckpt, tmp_path, '--prompt', 'a red circle', '--temperature=0', '--seed=2', name='b.png')
    assert open(a, 'rb').read() == open(b, 'rb').read()
    with pytest.raises(SystemExit):
        run(tiny_ckpt, tmp_path, '--prompt', 'a red circle', '--temperature=-1')
    assert 'temperature' in capsys.readouterr().err


def test_empty_prompt_is_the_unconditional_caption(tiny_ckpt, tmp_path, capsys):
    """An empty prompt is exactly the caption guidance training dropped to."""
    model, _ = sample.load_gpt(tiny_ckpt, 'cpu')
    tokens = sample.tokenize_prompts(['', 'a red circle'], model.config.text_len)
    assert torch.equal(tokens[0], model.uncond_text(1)[0])     # exactly the caption CFG training dropped to
    assert 'prompt 0 is empty: unconditional samples' in capsys.readouterr().out
    grid, _ = run(tiny_ckpt, tmp_path, '--prompt', '', '--num_samples=2')
    assert 'unconditional' in capsys.readouterr().out and os.path.exists(grid)


def test_long_prompts_are_cut_with_a_warning_and_unknown_words_run(tiny_ckpt, tmp_path):
    """A too-long prompt is cut with a warning; unseen words still tokenize and sample."""
    long_prompt = 'a red circle ' * 10
    with pytest.warns(UserWarning, match='cut off'):
        tokens = sample.tokenize_prompts([long_prompt], TINY['text_len'])
    assert tokens.shape == (1, TINY['text_len'])
    assert (sample.tokenize_prompts(['a glorp hexagon'], 64) != 49408).sum() == 8   # 'glorp' is split by BPE
    grid, _ = run(tiny_ckpt, tmp_path, '--prompt', 'a glorp hexagon', '--num_samples=1')
    assert os.path.exists(grid)


def test_default_prompts_are_the_val_captions(tiny_ckpt, tmp_path, capsys):
    """Without --prompt, the first val captions of the training data are used."""
    grid, files = run(tiny_ckpt, tmp_path, '--num_samples=1', f'--out_dir={tmp_path / "each"}')
    prompts = (tmp_path / 'each' / 'prompts.txt').read_text().splitlines()
    assert len(prompts) == 8 and set(prompts) <= set(CAPTIONS)


def test_distributed_sampling_writes_the_files_of_a_single_process_run(tiny_ckpt, tmp_path):
    """2 torchrun ranks write the same files, byte for byte, as 1 process."""
    prompts = tmp_path / 'prompts.txt'
    prompts.write_text('a red circle\na green square\n\na blue triangle\n')   # 4 prompts, one unconditional
    common = [f'--ckpt={tiny_ckpt}', f'--prompts_file={prompts}', '--num_samples=3', '--batch_size=5']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2',
                        '--master_addr=127.0.0.1', f'--master_port={free_port()}', 'sample.py', *common,
                        f'--out_dir={tmp_path / "two"}', f'--out={tmp_path / "two.png"}'],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    sample.main([*common, f'--out_dir={tmp_path / "one"}', f'--out={tmp_path / "one.png"}'])
    one, two = sorted(os.listdir(tmp_path / 'one')), sorted(os.listdir(tmp_path / 'two'))
    assert one == two and len(one) == 4 * 3 + 1   # 12 samples + prompts.txt, no collisions
    for name in one:
        assert (tmp_path / 'one' / name).read_bytes() == (tmp_path / 'two' / name).read_bytes(), name
    assert (tmp_path / 'one.png').read_bytes() == (tmp_path / 'two.png').read_bytes()
    pngs = [(tmp_path / 'one' / n).read_bytes() for n in one if n.endswith('.png')]
    assert len(set(pngs)) > 1


def test_the_training_grid_has_one_row_per_prompt_and_is_seeded(tiny_ckpt, tiny_data, tmp_path):
    """train.py's eval grid: eval_samples samples of each of the first eval_prompts val captions, and the same
    noise at every eval (so grids of successive evals show the model changing, not the noise)."""
    from contextlib import nullcontext
    from data.common import PreparedSplit, read_meta
    model, _ = sample.load_gpt(tiny_ckpt, 'cpu')
    grid = sample.TrainingGrid(read_meta(tiny_data), tiny_data, PreparedSplit(tiny_data, 'val'), 3, 2, 0, nullcontext())
    a, b = grid.draw(model, str(tmp_path / 'a.png')), grid.draw(model, str(tmp_path / 'b.png'))
    assert open(a, 'rb').read() == open(b, 'rb').read()
    assert np.array(Image.open(a)).shape[0] == 3 * (TINY['image_size'] * 4 + 2) + 2
