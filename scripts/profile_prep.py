"""
Where the time of the shapes preparation steps goes (docs/speed.md): plain timers over the parts of one training
step of the tokenizer or the teacher, then torch.profiler's table of the busiest operators; or, for the encode, the
time per image of the tokenizer codes and the teacher embedding at several batch sizes (random weights of the
shapes sizes: speed does not depend on the weights).

    OMP_NUM_THREADS=1 python scripts/profile_prep.py --part=tokenizer            # --batch_size=64 --steps=20
    OMP_NUM_THREADS=1 python scripts/profile_prep.py --part=teacher
    OMP_NUM_THREADS=1 python scripts/profile_prep.py --part=encode --n_images=512

Reads the rendered images of data_dir (python data/shapes/prepare.py). Times are of this machine under its present
load: compare settings within one run, not across runs.
"""
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import profile, ProfilerActivity

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402
from utils import uint8_to_float  # noqa: E402
from data.common import load_split  # noqa: E402


@dataclass
class ProfileConfig:
    part: str = 'tokenizer'          # 'tokenizer' | 'teacher' | 'encode'
    data_dir: str = 'data/shapes'    # rendered shapes images
    batch_size: int = 0              # 0 = the trainer's default; encode: ignored (it sweeps 16..256)
    steps: int = 20                  # timed steps (after 3 warm-up steps), then 5 profiled
    n_images: int = 512              # encode: images per batch size
    rows: int = 15                   # rows of the profiler table


def timed_parts(parts, steps):
    """parts: list of (name, fn) run in order each step -> {name: mean ms}."""
    total = {name: 0.0 for name, _ in parts}
    for i in range(steps + 3):
        for name, fn in parts:
            t0 = time.perf_counter()
            fn()
            if i >= 3:
                total[name] += time.perf_counter() - t0
    return {k: v / steps * 1e3 for k, v in total.items()}


def tokenizer_step(cfg, images):
    from data.shapes.train_tokenizer import VQTrainConfig, Losses
    from vqgan import VQModel, VQConfig
    c = VQTrainConfig(batch_size=cfg.batch_size or VQTrainConfig.batch_size, device='cpu')
    model = VQModel(VQConfig(image_size=images.shape[1], codebook_size=c.codebook_size, ch=c.ch, ch_mult=c.ch_mult,
                             codebook_embed_dim=c.codebook_embed_dim, num_res_blocks=c.num_res_blocks,
                             z_channels=c.z_channels, norm_groups=c.norm_groups, attention=c.attention)).train()
    losses, x_all, gen, st = Losses(c, model, 'cpu'), torch.from_numpy(images), torch.Generator().manual_seed(0), {}

    def data():
        st['x'] = uint8_to_float(x_all[torch.randint(len(x_all), (c.batch_size,), generator=gen)])

    def forward():
        recon, vq, _ = model(st['x'])
        st['loss'] = F.mse_loss(recon, st['x']) + vq['codebook'] + vq['commitment']

    def backward():
        losses.opt.zero_grad(set_to_none=True)
        st['loss'].backward()

    def optimizer():
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        losses.opt.step()
    return c.batch_size, [('data', data), ('forward', forward), ('backward', backward), ('optimizer', optimizer)]


def teacher_step(cfg, images, captions):
    import open_clip
    from data.shapes.train_teacher import ClipTrainConfig, clip_model_kwargs, clip_optimizer
    from teacher import build_clip, preprocess_uint8
    c = ClipTrainConfig(batch_size=cfg.batch_size or ClipTrainConfig.batch_size)
    model, _ = build_clip(c.base_model, None, 'cpu', **clip_model_kwargs(c, images.shape[1]))
    x_all = preprocess_uint8(torch.from_numpy(images).permute(0, 3, 1, 2), model.visual.preprocess_cfg)
    t_all = open_clip.get_tokenizer(c.base_model, context_length=c.context_length)(captions)
    opt, loss_fn, st = clip_optimizer(model.train(), c), open_clip.ClipLoss(), {}

    def data():
        idx = torch.randint(len(x_all), (c.batch_size,))
        st['x'], st['t'] = x_all[idx], t_all[idx]

    def image_tower():
        st['fi'] = model.encode_image(st['x'], normalize=True)

    def text_tower():
        st['ft'] = model.encode_text(st['t'], normalize=True)

    def loss():
        st['loss'] = loss_fn(st['fi'], st['ft'], model.logit_scale.exp())

    def backward():
        opt.zero_grad(set_to_none=True)
        st['loss'].backward()
    return c.batch_size, [('data', data), ('image tower', image_tower), ('text tower', text_tower), ('loss', loss),
                          ('backward', backward), ('optimizer', opt.step)]


def encode_sweep(cfg, images):
    from data.shapes.train_tokenizer import VQTrainConfig
    from data.shapes.train_teacher import ClipTrainConfig, clip_model_kwargs
    from vqgan import VQModel, VQConfig, encode_images
    from teacher import Teacher, embed_dataset
    t, c = VQTrainConfig(), ClipTrainConfig()
    vq = VQModel(VQConfig(image_size=images.shape[1], codebook_size=t.codebook_size, ch=t.ch, ch_mult=t.ch_mult,
                          codebook_embed_dim=t.codebook_embed_dim, num_res_blocks=t.num_res_blocks,
                          z_channels=t.z_channels, norm_groups=t.norm_groups, attention=t.attention)).eval()
    teacher = Teacher(c.base_model, **clip_model_kwargs(c, images.shape[1]))
    imgs, best = images[:cfg.n_images], {}
    for _ in range(3):  # interleaved repeats; the best is the least disturbed by other load
        for b in (16, 32, 64, 128, 256):
            t0 = time.perf_counter()
            encode_images(vq, imgs, b, progress=False)
            t1 = time.perf_counter()
            embed_dataset(teacher, imgs, b, progress=False)
            t2 = time.perf_counter()
            old = best.get(b, (1e9, 1e9))
            best[b] = (min(old[0], t1 - t0), min(old[1], t2 - t1))
    print(f'encode, {len(imgs)} images, {torch.get_num_threads()} threads, ms per image (best of 3):')
    for b, (a, e) in best.items():
        print(f'  batch {b:3d}: tokenizer codes {a / len(imgs) * 1e3:.2f}, teacher embedding {e / len(imgs) * 1e3:.2f}')


def main(argv):
    cfg = configure(ProfileConfig(), argv)
    images, captions = load_split(cfg.data_dir, 'train')
    images = np.array(images[:4096])
    torch.manual_seed(0)
    if cfg.part == 'encode':
        return encode_sweep(cfg, images)
    if cfg.part == 'tokenizer':
        batch, parts = tokenizer_step(cfg, images)
    elif cfg.part == 'teacher':
        batch, parts = teacher_step(cfg, images, captions[:4096])
    else:
        raise SystemExit(f"--part={cfg.part!r}: choose 'tokenizer', 'teacher' or 'encode'")
    ms = timed_parts(parts, cfg.steps)
    print(f'{cfg.part} step, batch {batch}, {torch.get_num_threads()} threads, mean over {cfg.steps} steps: ' +
          ', '.join(f'{k} {v:.1f} ms' for k, v in ms.items()) + f'; total {sum(ms.values()):.1f} ms')
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        timed_parts(parts, 5)
    print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=cfg.rows))


if __name__ == '__main__':
    main(sys.argv[1:])
