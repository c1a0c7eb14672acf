"""
Train the shapes world's ARRA teacher: no pretrained model knows that world, so a small CLIP (open_clip's ViT and
text transformer, open_clip's ClipLoss) is trained on its images and captions, then saved for `Teacher.load`.

    python data/shapes/train_teacher.py                      # -> out/teacher_shapes/teacher.pt, a few minutes on a CPU
    python data/shapes/train_teacher.py --embed_dim=128 --out_dir=out/teacher_shapes128

Reads {train,val}_images.npy and _captions.txt of data/<dataset>/ through the data contract (data/common.py).
Captions name the background only half of the time; the contrastive loss still has to tell "... on a striped navy
background" from "... on a plain gray background", so the image embedding carries the global background properties
that ARRA asks the GPT to keep consistent. At the end it prints val image->text retrieval and, when the scenes are
there, a probe of how well the background can be read off the embedding (README, "The shapes pipeline").
"""
import os
import sys
import math
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch
import open_clip
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import configure  # noqa: E402
from utils import REPO_ROOT, pick_device, lr_schedule  # noqa: E402
from data.common import load_split, load_scenes  # noqa: E402
from teacher import Teacher, build_clip, preprocess_uint8, save_clip, embed_dataset  # noqa: E402


@dataclass
class ClipTrainConfig:
    dataset: str = 'shapes'          # reads data/<dataset>/{train,val}_images.npy and _captions.txt
    data_dir: str = ''               # overrides data/<dataset> when set
    out_dir: str = 'out/teacher_shapes'  # teacher.pt goes here
    base_model: str = 'ViT-S-32'     # open_clip config name; its towers and embed_dim are replaced by the fields below
    embed_dim: int = 64              # D: the width of the shared embedding, and of the GPT's alignment target
    patch_size: int = 8              # 32 px / 8 = 4x4 patches (17 tokens): 2.7x faster per step than 4 px patches
    #   (65 tokens) and better at 400 steps (val top-1 0.838 vs 0.568; docs/speed.md). The patch targets of a 4x4
    #   grid are average-pooled up to the 8x8 code grid; scripts/experiment.py keeps 4 px (its recorded teachers)
    vision_layers: int = 4           # ViT depth
    vision_width: int = 64           # ViT width (head_width 32 -> 2 heads)
    text_layers: int = 2             # text transformer depth: captions are short and templated
    text_width: int = 64             # text transformer width (2 heads)
    context_length: int = 32         # caption tokens; the longest shapes caption is 24 with SOT/EOT
    batch_size: int = 256            # contrastive batch: more negatives per step, 256 still fits a CPU step in ~1 s
    max_iters: int = 400             # optimizer steps (~5 epochs of 20,000 pairs)
    lr: float = 1e-3                 # peak AdamW learning rate
    warmup_iters: int = 50           # linear warmup, then cosine decay to lr / 10
    weight_decay: float = 0.1        # on matrices only (not gains, biases, logit scale)
    eval_interval: int = 100         # val retrieval every this many steps (and at the end)
    seed: int = 1337
    device: str = 'cpu'              # 'auto' picks cuda when available
    preset: str = ''                 # a named set of the settings above (PRESETS); the command line still wins


# `--preset=strong`: a deeper image tower trained 4x longer (the teacher-strength comparison on shapes), into its
# own out_dir so it never overwrites the default teacher. D stays 64, so the GPT's projector is unchanged. Width is
# left at 64: at 128 a step costs ~5x more on a CPU, while the default's loss is still falling at step 400.
PRESETS = {
    'strong': dict(vision_layers=6, max_iters=1600, warmup_iters=100, eval_interval=400,
                   out_dir='out/teacher_shapes_strong'),
}


def train_config(argv):
    """ClipTrainConfig from `--key=value` arguments: the defaults, or the named --preset's, under the command line."""
    cfg = configure(ClipTrainConfig(), argv)
    if cfg.preset:
        if cfg.preset not in PRESETS:
            raise SystemExit(f'--preset={cfg.preset!r}: choose one of {", ".join(PRESETS)}')
        cfg = configure(ClipTrainConfig(**PRESETS[cfg.preset]), argv)
    return cfg


def clip_model_kwargs(cfg, image_size):
    """The open_clip overrides of the small CLIP: plain dicts, stored in the checkpoint as they are."""
    return dict(embed_dim=cfg.embed_dim,
                vision_cfg=dict(image_size=image_size, patch_size=cfg.patch_size, layers=cfg.vision_layers,
                                width=cfg.vision_width, head_width=32),
                text_cfg=dict(context_length=cfg.context_length, vocab_size=49408, width=cfg.text_width,
                              heads=cfg.text_width // 32, layers=cfg.text_layers))


def clip_loss(model, images, tokens, loss_fn=None):
    """Symmetric InfoNCE (open_clip's ClipLoss) of preprocessed images (B, 3, S, S) against tokens (B, L)."""
    loss_fn = loss_fn or open_clip.ClipLoss()
    image_features = model.encode_image(images, normalize=True)   # (B, D)
    text_features = model.encode_text(tokens, normalize=True)     # (B, D)
    return loss_fn(image_features, text_features, model.logit_scale.exp())


@torch.no_grad()
def retrieval_metrics(model, images, tokens, captions, group=100, batch_size=500):
    """Image->text top-1 retrieval on a split, three ways (chance in brackets for N = 1000):
    top1: the nearest of all N captions is the image's own (1/N);
    top1_same_text: the nearest caption has the same text as the image's own (duplicates count as right);
    top1_in_group: the nearest of the `group` captions in the image's block of `group` is its own (1/group)."""
    model.eval()
    img = torch.cat([model.encode_image(images[i:i + batch_size], normalize=True)
                     for i in range(0, len(images), batch_size)])            # (N, D)
    txt = torch.cat([model.encode_text(tokens[i:i + batch_size], normalize=True)
                     for i in range(0, len(tokens), batch_size)])            # (N, D)
    sim = img @ txt.T                                                        # (N, N)
    n = len(sim)
    best = sim.argmax(dim=1)                                                 # (N,)
    own = torch.arange(n)
    blocks = [sim[i:i + group, i:i + group].argmax(dim=1) == torch.arange(min(group, n - i))
              for i in range(0, n, group)]
    return dict(top1=(best == own).float().mean().item(),
                top1_same_text=float(np.mean([captions[b] == captions[i] for i, b in enumerate(best.tolist())])),
                top1_in_group=torch.cat(blocks).float().mean().item(), n=n, group=group)


def background_probe(teacher, data_dir, n_train=4000):
    """Nearest-class-mean accuracy of the background colour and texture read from the embedding alone (val split,
    class means from n_train train images): whether the teacher carries the global property. None if no scenes."""
    if not os.path.exists(os.path.join(data_dir, 'val_scenes.jsonl')):
        return None
    result = {}
    splits = {s: (load_split(data_dir, s)[0], load_scenes(data_dir, s)) for s in ('train', 'val')}
    emb = {s: embed_dataset(teacher, imgs[:n_train], batch_size=32, progress=False).astype(np.float32)
           for s, (imgs, _) in splits.items()}
    for prop in ('bg_color', 'bg_texture'):
        labels = {s: np.array([sc[prop] for sc in scenes[:n_train]]) for s, (_, scenes) in splits.items()}
        classes = sorted(set(labels['train']))
        means = np.stack([emb['train'][labels['train'] == c].mean(0) for c in classes])   # (K, D)
        pred = np.array(classes)[(emb['val'] @ means.T).argmax(1)]
        result[prop] = float((pred == labels['val']).mean())
    return result


def clip_optimizer(model, cfg, fused=True):
    """AdamW with weight decay on matrices only; fused: one kernel over all parameters (CPU and CUDA)."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]   # gains, biases, logit scale
    return torch.optim.AdamW([{'params': decay, 'weight_decay': cfg.weight_decay},
                              {'params': no_decay, 'weight_decay': 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6,
                             fused=fused)


def clip_step(model, images, tokens, opt, loss_fn=None):
    """One optimizer step of the contrastive loss on a batch; returns the loss (a 0-d tensor)."""
    loss = clip_loss(model, images, tokens, loss_fn)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    with torch.no_grad():  # open_clip's guard: a temperature above 100 makes the loss unstable
        model.logit_scale.clamp_(0, math.log(100))
    return loss


def train_clip(model, images, tokens, cfg, progress=True, log=print, val_metrics=None):
    """AdamW + warmup/cosine on (preprocessed images (N, 3, S, S), tokens (N, L)); returns the per-step losses.
    val_metrics: optional callable -> dict of val metrics, logged every cfg.eval_interval steps."""
    opt = clip_optimizer(model, cfg)
    loss_fn = open_clip.ClipLoss()
    gen = torch.Generator().manual_seed(cfg.seed)
    n, order, pos, losses = len(images), torch.randperm(len(images), generator=gen), 0, []
    model.train()
    bar = tqdm(range(cfg.max_iters), desc='train CLIP teacher', disable=not progress)
    for it in bar:
        if pos + cfg.batch_size > n:  # a fresh permutation each epoch: no image twice in one batch
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + cfg.batch_size]
        pos += cfg.batch_size
        for g in opt.param_groups:
            g['lr'] = lr_schedule(it, cfg.warmup_iters, cfg.max_iters, cfg.lr, cfg.lr / 10)
        loss = clip_step(model, images[idx], tokens[idx], opt, loss_fn)
        losses.append(loss.item())
        bar.set_postfix(loss=f'{loss.item():.3f}', scale=f'{model.logit_scale.exp().item():.1f}')
        if log and cfg.eval_interval and (it + 1) % cfg.eval_interval == 0 and it + 1 < cfg.max_iters:
            msg = f'step {it + 1}: train loss {np.mean(losses[-cfg.eval_interval:]):.4f}'
            if val_metrics:
                msg += ' | val ' + ' '.join(f'{k} {v:.3f}' for k, v in val_metrics().items() if isinstance(v, float))
                model.train()
            log(msg)
    model.eval()
    return losses


def split_tensors(data_dir, split, preprocess_cfg, tokenizer, device):
    """A whole split in memory: preprocessed images (N, 3, S, S), tokens (N, L), captions (20,000 x 32 x 32: 250 MB)."""
    images, captions = load_split(data_dir, split)
    x = preprocess_uint8(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2), preprocess_cfg)  # (N, 3, S, S)
    return x.to(device), tokenizer(captions).to(device), captions


def print_summary(cfg, metrics, probe, dim, path):
    n = metrics['n']
    print(f'trained {cfg.max_iters} steps in {metrics["train_seconds"]:.0f}s on {metrics["threads"]} threads; '
          f'final train loss {metrics["final_train_loss"]:.4f}; D = {dim}')
    print(f'val image->text top-1: {metrics["top1"]:.3f} among all {n} captions (chance {1 / n:.4f}); '
          f'{metrics["top1_same_text"]:.3f} counting an identical caption text as right; '
          f'{metrics["top1_in_group"]:.3f} within blocks of {metrics["group"]} (chance {1 / metrics["group"]:.2f})')
    if probe:
        print(f'background read from the embedding (nearest class mean, val): colour {probe["bg_color"]:.3f} '
              f'(chance 0.25), texture {probe["bg_texture"]:.3f} (chance 0.5)')
    print(f'saved {path}')


def main(argv):
    cfg = train_config(argv)
    print(cfg)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    data_dir = cfg.data_dir or os.path.join(REPO_ROOT, 'data', cfg.dataset)
    image_size = load_split(data_dir, 'train')[0].shape[1]
    model_kwargs = clip_model_kwargs(cfg, image_size=image_size)
    model, _ = build_clip(cfg.base_model, None, device, **model_kwargs)
    print(f'CLIP teacher: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, D = {cfg.embed_dim}')
    tokenizer = open_clip.get_tokenizer(cfg.base_model, context_length=cfg.context_length)
    train_x, train_t, _ = split_tensors(data_dir, 'train', model.visual.preprocess_cfg, tokenizer, device)
    val_x, val_t, val_caps = split_tensors(data_dir, 'val', model.visual.preprocess_cfg, tokenizer, device)
    t0 = time.time()
    losses = train_clip(model, train_x, train_t, cfg,
                        val_metrics=lambda: retrieval_metrics(model, val_x, val_t, val_caps))
    metrics = retrieval_metrics(model, val_x, val_t, val_caps)
    metrics |= dict(final_train_loss=float(np.mean(losses[-20:])), train_seconds=round(time.time() - t0, 1),
                    threads=torch.get_num_threads())
    path = os.path.join(cfg.out_dir, 'teacher.pt')
    save = dict(dim=cfg.embed_dim, context_length=cfg.context_length, train_config=asdict(cfg), iter_num=cfg.max_iters)
    save_clip(path, model, cfg.base_model, model_kwargs, metrics=metrics, **save)
    teacher = Teacher.load(path, device=device)  # the probe reads the saved teacher, as the prepare step will
    probe = background_probe(teacher, data_dir)
    if probe:  # saved again, now with the probe's numbers
        metrics |= {f'probe_{k}': v for k, v in probe.items()}
        save_clip(path, model, cfg.base_model, model_kwargs, metrics=metrics, **save)
    print_summary(cfg, metrics, probe, teacher.dim, path)


if __name__ == '__main__':
    main(sys.argv[1:])
