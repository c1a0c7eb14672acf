"""
Speed figures of the project, each a ratio against a baseline measured in the same run on the same machine
(absolute numbers drift with the machine and its load; ratios measured side by side do not).

    python bench.py                 # CPU: about three minutes on 2 cores
    python bench.py --device=cuda   # adds bf16 figures (and torch.compile with --compile=True)

| figure | measured | baseline |
|---|---|---|
| GPT training throughput (tokens/s) and MFU | fwd + bwd + AdamW step | the matmul peak measured here (fp32 CPU, bf16 CUDA) |
| generation with the KV cache (images/s, 256 codes) | prefill + 1-token decode steps | full recompute each step |
| VQ encoding (images/s) | batched | one image at a time |
| Frechet distance at 2048-d (s) | symmetric eigen route | scipy.linalg.sqrtm |
| shapes tokenizer candidates (CPU) | a candidate recipe: steps x s/step, its recorded ceiling | today's recipe |
| shapes teacher training (CPU) | today's recipe: steps x s/step | the recipe before docs/speed.md |
| shapes encode (CPU, ms/img) | codes + teacher embedding, today's batching | batches of 256 under no_grad |

The first row, the fp32 matmul GFLOP/s of utils.measure_peak_flops, is the figure scripts/shapes_pipeline.sh prints
beside its step times: it places this machine against the ones the README's times were measured on.
"""
import copy
import functools
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from configurator import configure
from utils import pick_device, measure_peak_flops


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


# ----------------------------------------------------------------------------------------------------------------
# The shapes preparation steps: today's recipe against the one it replaced (docs/speed.md). Each figure times steps
# (or images) of both recipes alternately in this run, then scales them by the recipe's step count: the ratio is
# the old run's training time over the new one's. The quality columns are recorded full runs (too long for here).

# the tokenizer's recipe is unchanged: its row times the candidates that were tried (their recorded ceilings:
# a faster candidate is only worth taking at today's ceiling)
TOKENIZER_CANDIDATES = {  # name: (VQTrainConfig overrides, fused Adam, recorded ceiling / val MSE of its full run)
    'fused Adam': (dict(), True, 'ceiling 0.904, MSE 0.00083'),
    'no attention, fused Adam': (dict(attention=False), True, 'ceiling 0.868, MSE 0.00115'),
    '1000 steps x 64, lr 4e-3': (dict(batch_size=64, max_iters=1000, lr=4e-3, warmup_iters=50, restart_interval=25),
                                 True, 'ceiling 0.496, MSE 0.00308'),
    'num_res_blocks=0': (dict(num_res_blocks=0), False, 'ceiling 0.838 / 0.788 (seeds 1337 / 2), MSE 0.00095/0.00118'),
    'batch 8': (dict(batch_size=8), False, 'ceiling 0.596, MSE 0.00227 (its draw of today: 0.953, 0.00077)'),
    '1667 steps, lr 5e-3': (dict(max_iters=1667, lr=5e-3), False, 'ceiling 0.433, MSE 0.00350 (lr 2e-3: 0.420)'),
}
OLD_TEACHER = dict(batch_size=256, max_iters=400, patch_size=4)      # + unfused AdamW (the recipe before 8 px patches)
OLD_ENCODE_BATCH = 256                                               # + torch.no_grad instead of inference_mode

RECORDED = {  # quality of full runs (docs/speed.md, sections 2-3, with their commands)
    'tokenizer': dict(old='ceiling 0.930, val MSE 0.00077'),
    'teacher': dict(old='top-1 0.568, in-100 0.908, bg 1.000/0.970', new='top-1 0.838, in-100 0.981, bg 0.997/1.000'),
    'encode': dict(old='', new='codes bit-identical to batch 256 and the argmin search; the 8 px teacher above'),
}


def nearest_codes_before(quantizer, z):
    """The encode baseline's nearest-code search (vqgan.py before docs/speed.md's change): the sums written out, then
    torch.argmin. Same codes as today's addmm + min, ~2x slower on a CPU."""
    e = quantizer.codebook()                                                                     # (K, D)
    return torch.argmin(torch.sum(z ** 2, dim=1, keepdim=True) + torch.sum(e ** 2, dim=1) - 2 * (z @ e.t()), dim=1)


def interleaved(fns, rounds, reps):
    """{name: best seconds per call} of the callables in fns, timed alternately `rounds` times, `reps` calls each
    (after one warm-up call each): alternation spreads any outside load over all of them alike."""
    for fn in fns.values():
        fn()
    best = {k: float('inf') for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / reps)
    return best


def shapes_images(n, seed=0):
    from data.shapes.world import make_split
    return make_split(n, seed, 32, progress=False)[1:]  # (images uint8 (n, 32, 32, 3), captions)


def bench_tokenizer_recipe(cfg, images):
    """Seconds per training step (train_tokenizer.Losses.step) of today's recipe and of each candidate, and the
    projected ratio of whole runs: today's steps x step time / the candidate's."""
    from dataclasses import replace
    from data.shapes.train_tokenizer import VQTrainConfig, Losses
    from vqgan import VQModel, VQConfig
    from utils import uint8_to_float
    today = VQTrainConfig(device='cpu')
    runs = {'today': (today, False)} | {name: (replace(today, **over), fused)
                                        for name, (over, fused, _) in TOKENIZER_CANDIDATES.items()}
    steps, gen, x_all = {}, torch.Generator().manual_seed(0), torch.from_numpy(images[0])
    for name, (c, fused) in runs.items():
        torch.manual_seed(0)
        model = VQModel(VQConfig(image_size=32, codebook_size=c.codebook_size, codebook_embed_dim=c.codebook_embed_dim,
                                 ch=c.ch, ch_mult=c.ch_mult, num_res_blocks=c.num_res_blocks, z_channels=c.z_channels,
                                 norm_groups=c.norm_groups, attention=c.attention)).train()
        losses = Losses(c, model, 'cpu', fused=fused)

        def step(c=c, losses=losses):
            x = uint8_to_float(x_all[torch.randint(len(x_all), (c.batch_size,), generator=gen)])
            losses.step(x, 200, c.lr)
        steps[name] = step
    t = interleaved(steps, rounds=2 if cfg.quick else 4, reps=2 if cfg.quick else 8)
    return {name: dict(step=t[name], steps=c.max_iters, batch=c.batch_size,
                       ratio=t['today'] * today.max_iters / (t[name] * c.max_iters))
            for name, (c, _) in runs.items()}


def bench_teacher_recipe(cfg, images):
    """Seconds per training step of the shapes CLIP teacher, old recipe vs new, and the projected run ratio."""
    from dataclasses import replace
    import open_clip
    from data.shapes.train_teacher import ClipTrainConfig, clip_model_kwargs, clip_optimizer, clip_step
    from teacher import build_clip, preprocess_uint8
    new = ClipTrainConfig()
    old = replace(new, **OLD_TEACHER)
    tokenizer = open_clip.get_tokenizer(new.base_model, context_length=new.context_length)
    steps = {}
    for name, c in (('old', old), ('new', new)):
        torch.manual_seed(0)
        model, _ = build_clip(c.base_model, None, 'cpu', **clip_model_kwargs(c, 32))
        b = min(c.batch_size, len(images[0]))
        x = preprocess_uint8(torch.from_numpy(images[0][:b]).permute(0, 3, 1, 2), model.visual.preprocess_cfg)
        tokens = tokenizer(images[1][:b])
        opt = clip_optimizer(model.train(), c, fused=name == 'new')
        loss_fn = open_clip.ClipLoss()
        steps[name] = lambda model=model, x=x, tokens=tokens, opt=opt, loss_fn=loss_fn: clip_step(
            model, x, tokens, opt, loss_fn)
    t = interleaved(steps, rounds=2 if cfg.quick else 4, reps=1 if cfg.quick else 3)
    return dict(old_step=t['old'], new_step=t['new'], old_steps=old.max_iters, new_steps=new.max_iters,
                ratio=t['old'] * old.max_iters / (t['new'] * new.max_iters),
                old_batch=old.batch_size, new_batch=new.batch_size)


def bench_encode_recipe(cfg, images):
    """Seconds per image of the shapes encode (tokenizer codes + teacher embedding): the old recipe (batches of 256,
    no_grad, the 4 px teacher, the old nearest-code search) vs today's (PrepareConfig's batch, inference_mode,
    ClipTrainConfig's teacher)."""
    from dataclasses import replace
    from data.shapes.prepare import PrepareConfig
    from data.shapes.train_tokenizer import VQTrainConfig
    from data.shapes.train_teacher import ClipTrainConfig, clip_model_kwargs
    from vqgan import VQModel, VQConfig, encode_images
    from teacher import Teacher, embed_dataset
    t, c = VQTrainConfig(), ClipTrainConfig()  # the shapes tokenizer and teacher, random weights (speed only)
    torch.manual_seed(0)
    vq = VQModel(VQConfig(image_size=32, codebook_size=t.codebook_size, codebook_embed_dim=t.codebook_embed_dim,
                          ch=t.ch, ch_mult=t.ch_mult, num_res_blocks=t.num_res_blocks, z_channels=t.z_channels,
                          norm_groups=t.norm_groups, attention=t.attention)).eval()
    teacher = Teacher(c.base_model, **clip_model_kwargs(c, 32))
    old_teacher = Teacher(c.base_model, **clip_model_kwargs(replace(c, **OLD_TEACHER), 32))
    imgs = images[0]
    new_batch = PrepareConfig().batch_size
    old_vq = copy.deepcopy(vq)
    old_vq.quantize.nearest_codes = functools.partial(nearest_codes_before, old_vq.quantize)

    def old():  # the encode before: batches of 256 under no_grad, the old nearest-code search
        with torch.no_grad():
            for i in range(0, len(imgs), OLD_ENCODE_BATCH):
                x = torch.from_numpy(imgs[i:i + OLD_ENCODE_BATCH])
                old_vq.encode(x.permute(0, 3, 1, 2).float() / 127.5 - 1.0)
                old_teacher.embed(x.permute(0, 3, 1, 2), batch_size=OLD_ENCODE_BATCH)

    def new():
        encode_images(vq, imgs, new_batch, progress=False)
        embed_dataset(teacher, imgs, new_batch, progress=False)
    tm = interleaved(dict(old=old, new=new), rounds=2 if cfg.quick else 4, reps=1)
    return dict(old_img=tm['old'] / len(imgs), new_img=tm['new'] / len(imgs), ratio=tm['old'] / tm['new'],
                old_batch=OLD_ENCODE_BATCH, new_batch=new_batch)


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
    # utils.measure_peak_flops: the figure train.py's MFU and scripts/shapes_pipeline.sh's summary print too
    n = 8192 if device.startswith('cuda') else 1024
    peak32 = measure_peak_flops(device, torch.float32)
    rows.append(('matmul peak fp32', f'{peak32 / 1e9:.1f} GFLOP/s', f'best {n}x{n} matmul, '
                 f'{torch.get_num_threads()} threads (utils.measure_peak_flops)', ''))
    tr = bench_training(cfg, device, sync, peak32)
    rows.append(('GPT train fp32', f'{tr["tokens_per_s"]:.0f} tok/s, {tr["step_ms"]:.0f} ms/step',
                 f'{tr["shape"]}, {tr["params"] / 1e6:.1f}M params', f'MFU {tr["mfu"]:.2f} of fp32 peak'))
    if device.startswith('cuda'):
        peak16 = measure_peak_flops(device, torch.bfloat16)
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
    if device == 'cpu':  # the shapes preparation steps, at this process's thread count
        images = shapes_images(64 if cfg.quick else 1024)
        tok, tea, enc = bench_tokenizer_recipe(cfg, images), bench_teacher_recipe(cfg, images), \
            bench_encode_recipe(cfg, images)
        base = tok['today']
        for name, (_, _, quality) in TOKENIZER_CANDIDATES.items():
            r = tok[name]
            rows.append((f'shapes tokenizer: {name} (not adopted)', f'{r["steps"]} steps x {r["step"] * 1e3:.0f} ms '
                         f'(batch {r["batch"]}); {quality}', f'today: {base["steps"]} steps x {base["step"] * 1e3:.0f} '
                         f'ms (batch {base["batch"]}); {RECORDED["tokenizer"]["old"]}', f'{r["ratio"]:.2f}x'))
        rows.append(('shapes teacher training', f'{tea["new_steps"]} steps x {tea["new_step"] * 1e3:.0f} ms '
                     f'(8 px patches, fused AdamW); {RECORDED["teacher"]["new"]}',
                     f'{tea["old_steps"]} steps x {tea["old_step"] * 1e3:.0f} ms (4 px, unfused); '
                     f'{RECORDED["teacher"]["old"]}',
                     f'{tea["ratio"]:.2f}x'))
        rows.append(('shapes encode (codes + teacher)', f'{enc["new_img"] * 1e3:.2f} ms/img (batch {enc["new_batch"]}); '
                     f'{RECORDED["encode"]["new"]}', f'{enc["old_img"] * 1e3:.2f} ms/img (batch {enc["old_batch"]}, '
                     f'4 px teacher, argmin search)',
                     f'{enc["ratio"]:.2f}x'))
    fr = bench_frechet(cfg)
    rows.append((f'Frechet distance {fr["dim"]}-d', f'{fr["fast_s"]:.2f} s eigen route', f'{fr["sqrtm_s"]:.2f} s sqrtm',
                 f'{fr["sqrtm_s"] / fr["fast_s"]:.1f}x (rel. diff {fr["rel_diff"]:.1e})'))
    print('\n| figure | measured | baseline / setting | ratio |\n|---|---|---|---|')
    for r in rows:
        print('| ' + ' | '.join(r) + ' |')
    return rows


if __name__ == '__main__':
    main(configure(BenchConfig(), sys.argv[1:]))
