"""
Speed figures of the project, each a ratio against a baseline measured in the same run on the same machine
(absolute numbers drift with the machine and its load; ratios measured side by side do not).

    python bench.py                 # CPU: about two minutes on 2 cores
    python bench.py --device=cuda   # adds bf16 figures (and torch.compile with --compile=True)

| figure | measured | baseline |
|---|---|---|
| GPT training throughput (tokens/s) and MFU | fwd + bwd + AdamW step | the matmul peak measured here (fp32 CPU, bf16 CUDA) |
| generation with the KV cache (images/s, 256 codes) | prefill + 1-token decode steps | full recompute each step |
| VQ encoding (images/s) | batched | one image at a time |
| Frechet distance at 2048-d (s) | symmetric eigen route | scipy.linalg.sqrtm |
"""
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from configurator import configure
from utils import pick_device


@dataclass
class BenchConfig:
    device: str = 'auto'        # 'cpu' | 'cuda' | 'auto'
    compile: bool = False       # torch.compile the training step's model (CUDA only in practice)
    repeats: int = 3            # timed repeats per figure (the best is kept: the least disturbed by other load)
    quick: bool = False         # smaller sizes, for a smoke run (tests / CI)


def best_time(fn, repeats, sync):
    """Best wall time of fn() over `repeats` runs, after one warm-up run."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def matmul_peak(device, dtype, sync, repeats, n):
    """Measured FLOP/s of one large square matmul: the machine's practical peak for this dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    iters = 4 if device == 'cpu' else 50
    dt = best_time(lambda: [a @ b for _ in range(iters)], repeats, sync)
    return 2 * n ** 3 * iters / dt


def bench_training(cfg, device, sync, peak, autocast_dtype=None):
    from model import GPT, preset_config
    if device == 'cpu':
        mc = preset_config('tiny', n_layer=6, n_head=6, n_embd=384, codebook_size=1024, image_tokens=64,
                           text_len=28, teacher_dim=64)
        batch = 8 if cfg.quick else 32
    else:
        mc = preset_config('B', codebook_size=16384, image_tokens=256, text_len=16, teacher_dim=512)
        batch = 32
    if cfg.quick:
        mc.n_layer, mc.n_embd, mc.n_head = 2, 128, 4
    model = GPT(mc).to(device)
    opt = model.configure_optimizers(0.05, 1e-4, (0.9, 0.95), 'cuda' if device.startswith('cuda') else 'cpu')
    fwd = torch.compile(model) if cfg.compile else model
    text = torch.randint(0, 49406, (batch, mc.text_len), device=device)
    codes = torch.randint(0, mc.codebook_size, (batch, mc.image_tokens), device=device)
    teacher = torch.nn.functional.normalize(torch.randn(batch, mc.teacher_dim, device=device), dim=-1)
    ctx = (torch.autocast('cuda', dtype=autocast_dtype) if autocast_dtype else torch.autocast('cpu', enabled=False))

    def step():
        with ctx:
            out = fwd(text, codes, teacher)
            loss = out.loss + out.align_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = best_time(step, cfg.repeats, sync)
    tokens = batch * (mc.text_len + mc.image_tokens)
    mfu = model.estimate_mfu(batch, dt, peak)
    return dict(params=model.num_params(), tokens_per_s=tokens / dt, step_ms=dt * 1e3, mfu=mfu,
                shape=f'{mc.n_layer}x{mc.n_embd}, batch {batch} x {mc.text_len}+{mc.image_tokens} tokens')


def bench_generation(cfg, device, sync):
    from model import GPT, preset_config
    mc = preset_config('tiny', n_layer=4, n_head=4, n_embd=256, codebook_size=1024,
                       image_tokens=64 if cfg.quick else 256, text_len=28)
    model = GPT(mc).to(device).eval()
    text = torch.randint(0, 49406, (4, mc.text_len), device=device)
    times = {}
    for use_cache in (True, False):
        g = torch.Generator(device=device)

        def run():
            g.manual_seed(0)
            with torch.no_grad():
                model.generate(text, cfg_scale=2.0, generator=g, use_cache=use_cache)
        times[use_cache] = best_time(run, 1 if not use_cache else cfg.repeats, sync)
    return dict(cached=len(text) / times[True], uncached=len(text) / times[False], codes=mc.image_tokens)


def bench_encoding(cfg, device, sync):
    from vqgan import VQModel, VQConfig
    from data.shapes.train_tokenizer import VQTrainConfig
    t = VQTrainConfig()  # the shapes tokenizer's architecture (random weights: speed does not depend on them)
    vq = VQModel(VQConfig(image_size=32, codebook_size=t.codebook_size, codebook_embed_dim=t.codebook_embed_dim,
                          ch=t.ch, ch_mult=t.ch_mult, num_res_blocks=t.num_res_blocks, z_channels=t.z_channels,
                          norm_groups=t.norm_groups)).to(device).eval()
    size = 32
    n = 64 if cfg.quick else 256
    images = torch.rand(n, 3, size, size, device=device) * 2 - 1
    with torch.no_grad():
        t_batched = best_time(lambda: vq.encode(images), cfg.repeats, sync)
        k = 16 if cfg.quick else 64
        t_single = best_time(lambda: [vq.encode(images[i:i + 1]) for i in range(k)], 1, sync)
    return dict(batched=n / t_batched, single=k / t_single, image_size=size)


def bench_frechet(cfg):
    from fid import frechet_distance, frechet_distance_sqrtm
    d = 256 if cfg.quick else 2048
    rng = np.random.default_rng(0)
    stats = []
    for _ in range(2):
        x = rng.standard_normal((d + 500, d)) @ rng.standard_normal((d, d)) * 0.1
        stats += [x.mean(0), np.cov(x, rowvar=False)]
    t0 = time.perf_counter()
    fast = frechet_distance(*stats)
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = frechet_distance_sqrtm(*stats)
    t_ref = time.perf_counter() - t0
    return dict(fast_s=t_fast, sqrtm_s=t_ref, rel_diff=abs(fast - ref) / abs(ref), dim=d)


def main(cfg):
    device = pick_device(cfg.device)
    sync = (lambda: torch.cuda.synchronize()) if device.startswith('cuda') else (lambda: None)
    torch.manual_seed(0)
    print(f'device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}')
    if device.startswith('cuda'):
        print(f'GPU: {torch.cuda.get_device_name()}')
    rows = []
    n = 1024 if cfg.quick else (2048 if device == 'cpu' else 8192)
    peak32 = matmul_peak(device, torch.float32, sync, cfg.repeats, n)
    rows.append(('matmul peak fp32', f'{peak32 / 1e9:.1f} GFLOP/s', f'{n}x{n} @ {n}x{n}', ''))
    tr = bench_training(cfg, device, sync, peak32)
    rows.append(('GPT train fp32', f'{tr["tokens_per_s"]:.0f} tok/s, {tr["step_ms"]:.0f} ms/step',
                 f'{tr["shape"]}, {tr["params"] / 1e6:.1f}M params', f'MFU {tr["mfu"]:.2f} of fp32 peak'))
    if device.startswith('cuda'):
        peak16 = matmul_peak(device, torch.bfloat16, sync, cfg.repeats, n)
        rows.append(('matmul peak bf16', f'{peak16 / 1e12:.1f} TFLOP/s', f'{n}x{n}', ''))
        trb = bench_training(cfg, device, sync, peak16, autocast_dtype=torch.bfloat16)
        rows.append(('GPT train bf16', f'{trb["tokens_per_s"]:.0f} tok/s, {trb["step_ms"]:.0f} ms/step',
                     f'{trb["shape"]}, {trb["params"] / 1e6:.1f}M params', f'MFU {trb["mfu"]:.2f} of bf16 peak'))
    ge = bench_generation(cfg, device, sync)
    rows.append((f'generate {ge["codes"]} codes, CFG', f'{ge["cached"]:.2f} img/s with KV cache',
                 f'{ge["uncached"]:.2f} img/s recomputing', f'{ge["cached"] / ge["uncached"]:.1f}x'))
    en = bench_encoding(cfg, device, sync)
    rows.append((f'VQ encode {en["image_size"]}px', f'{en["batched"]:.0f} img/s batched',
                 f'{en["single"]:.0f} img/s one by one', f'{en["batched"] / en["single"]:.1f}x'))
    fr = bench_frechet(cfg)
    rows.append((f'Frechet distance {fr["dim"]}-d', f'{fr["fast_s"]:.2f} s eigen route', f'{fr["sqrtm_s"]:.2f} s sqrtm',
                 f'{fr["sqrtm_s"] / fr["fast_s"]:.1f}x (rel. diff {fr["rel_diff"]:.1e})'))
    print('\n| figure | measured | baseline / setting | ratio |\n|---|---|---|---|')
    for r in rows:
        print('| ' + ' | '.join(r) + ' |')
    return rows


if __name__ == '__main__':
    main(configure(BenchConfig(), sys.argv[1:]))
