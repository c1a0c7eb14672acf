"""
Train the shapes world's image tokenizer (the VQGAN of vqgan.py): 32x32 images -> 8x8 codes from 512.

    python data/shapes/train_tokenizer.py                    # -> out/vqgan_shapes/ckpt.pt + recon PNGs, a few minutes
    python data/shapes/train_tokenizer.py --data_dir=data/shapes64 --out_dir=out/vqgan_shapes64
    python data/shapes/train_tokenizer.py --dataset=fashion   # any prepared image set -> out/vqgan_<dataset>/

Reads {train,val}_images.npy of data/<dataset>/ through the data contract (data/common.py load_split), so it trains
on any folder of images in that layout. Loss = reconstruction (L2 or L1) + codebook + beta * commitment, optionally
+ a PatchGAN hinge loss (delayed start, adaptive weight, as taming's VQGAN) and LPIPS (only if its weights are already
on disk; never downloaded). Codes unused for `restart_interval` steps are re-seeded from the batch's latents
(dead-code replacement, as vector-quantize-pytorch does). The training recipe lives here, beside the dataset that
needs it; vqgan.py holds only the model and its checkpoints (LlamaGen keeps vq_model.py and vq_train.py apart too).
"""
import os
import sys
import math
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import configure  # noqa: E402
from utils import REPO_ROOT, pick_device, uint8_to_float, to_uint8_hwc, save_image_grid, lr_schedule  # noqa: E402
from data.common import load_split  # noqa: E402
from vqgan import VQConfig, VQModel, save_vqgan  # noqa: E402


@dataclass
class VQTrainConfig:
    dataset: str = 'shapes'             # reads data/<dataset>/{train,val}_images.npy (python data/shapes/prepare.py)
    data_dir: str = ''                  # '' = data/<dataset>
    out_dir: str = ''                   # '' = out/vqgan_<dataset>: ckpt.pt and reconstruction PNGs
    n_train: int = 0                    # use only the first n_train training images (0 = all)
    # model (image_size comes from the data). Sized for a CPU: ~74 MFLOP per 32x32 image forward.
    codebook_size: int = 512            # K
    codebook_embed_dim: int = 8         # LlamaGen's low-dim codes
    ch: int = 16                        # base width
    ch_mult: tuple[int, ...] = (1, 1, 2)  # 32 -> 8: two halvings, widths 16, 16, 32
    num_res_blocks: int = 1             # per level (decoder: one more)
    z_channels: int = 32
    norm_groups: int = 8
    attention: bool = True              # the VQGAN's attention blocks (8x8 and middle)
    commit_loss_beta: float = 0.25
    # losses
    recon_loss: str = 'l2'              # 'l2' or 'l1'
    codebook_weight: float = 1.0        # weight of codebook + beta * commitment
    perceptual_weight: float = 0.0      # LPIPS; needs local weights (off: none ship with the repo)
    disc_weight: float = 0.0            # PatchGAN hinge loss weight (0 = off: the CPU budget goes to more L2 steps)
    disc_start: int = 1000              # iteration where the GAN terms switch on (the autoencoder must work first)
    disc_adaptive: bool = True          # scale the GAN term by grad-norm ratio at the decoder's last layer (taming)
    # codebook upkeep
    restart_interval: int = 100         # every N iters, re-seed codes unused for N iters from batch latents (0 = off)
    restart_until: float = 0.8          # stop re-seeding after this fraction of max_iters, so the last codes settle
    # optimisation
    max_iters: int = 5000               # reconstructions sharpen late: 2500 steps lose small shapes (README)
    batch_size: int = 16
    lr: float = 2e-3                    # peak learning rate (Adam), after warmup, cosine decay to min_lr
    min_lr: float = 1e-4
    warmup_iters: int = 100
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0              # 0 = off
    # logging
    eval_interval: int = 2500           # reconstruction PNG + val MSE on eval_images + checkpoint
    eval_images: int = 256
    device: str = 'auto'
    seed: int = 1337


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN: strided 4x4 convs ending in a map of real/fake logits, one per overlapping patch."""

    def __init__(self, ch=64, n_layers=2):
        super().__init__()
        layers, c = [nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2)], ch
        for i in range(1, n_layers + 1):
            c_next = ch * min(2 ** i, 8)
            layers += [nn.Conv2d(c, c_next, 4, 2 if i < n_layers else 1, 1, bias=False), nn.BatchNorm2d(c_next),
                       nn.LeakyReLU(0.2)]
            c = c_next
        self.main = nn.Sequential(*layers, nn.Conv2d(c, 1, 4, 1, 1))

    def forward(self, x):  # (B, 3, H, W) -> (B, 1, h', w') logits
        return self.main(x)


def load_lpips(device):
    """LPIPS(VGG) from the `lpips` package, only when it and torchvision's VGG16 weights are already on disk."""
    vgg = os.path.join(torch.hub.get_dir(), 'checkpoints', 'vgg16-397923af.pth')
    try:
        import lpips  # optional: only this loss needs it
    except ImportError:
        raise RuntimeError('perceptual_weight > 0 needs the lpips package (pip install lpips); or use '
                           '--perceptual_weight=0') from None
    if not os.path.exists(vgg):
        raise FileNotFoundError(f'LPIPS needs VGG16 weights at {vgg}; this script never downloads. Put the file '
                                f'there or use --perceptual_weight=0')
    return lpips.LPIPS(net='vgg', verbose=False).to(device).eval().requires_grad_(False)


@torch.no_grad()
def restart_dead_codes(model, images, hits):
    """Re-seed every code that no latent picked since the last call (hits == 0) with a random latent of this batch,
    so dead codes move onto the data and stay in play. Returns the number re-seeded."""
    dead = (hits == 0).nonzero().squeeze(1)                               # (n_dead,)
    if len(dead):
        z = model.quant_conv(model.encoder(images))                       # (B, D, h, w)
        z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])                 # (B*h*w, D)
        if model.config.codebook_l2_norm:
            z = F.normalize(z, dim=-1)
        pick = torch.randperm(len(z), device=z.device)[:len(dead)] if len(z) >= len(dead) else \
            torch.randint(len(z), (len(dead),), device=z.device)
        model.quantize.embedding.weight[dead] = z[pick]
    return len(dead)


def code_stats(codes, codebook_size):
    """(fraction of the codebook used, perplexity) of a set of code indices. Perplexity = exp(entropy of the code
    histogram): the 'effective number of codes', K when all are used evenly, 1 when one code is used."""
    counts = torch.bincount(codes.flatten().long(), minlength=codebook_size).float()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return (counts > 0).float().mean().item(), entropy.exp().item()


@torch.no_grad()
def save_recon_grid(model, images, path, n=8):
    """PNG of rows of n originals, each above its reconstruction through the discrete codes."""
    orig, recon = to_uint8_hwc(images), to_uint8_hwc(model.decode(model.encode(images)))  # (N, H, W, 3) uint8
    rows = [a[i:i + n] for i in range(0, len(orig), n) for a in (orig, recon)]
    save_image_grid(np.concatenate(rows), path, nrow=n, scale=4,
                    captions=['original', 'reconstruction'] * (len(rows) // 2), caption_width=100)


@torch.no_grad()
def evaluate_reconstruction(model, images, batch_size=250):
    """Reconstruction MSE through the discrete codes (on [-1, 1] pixels, clamped), codebook usage and perplexity."""
    se, codes = 0.0, []
    for x in images.split(batch_size):
        c = model.encode(x)
        se += ((model.decode(c).clamp(-1, 1) - x) ** 2).sum().item()
        codes.append(c)
    usage, ppl = code_stats(torch.cat(codes), model.codebook_size)
    return dict(mse=se / images.numel(), usage=usage, perplexity=ppl)


def load_images(cfg, data_dir, device):
    """-> train images uint8 (N, H, W, 3) in RAM, val images float (Nv, 3, H, W) in [-1, 1] on device."""
    train_images, _ = load_split(data_dir, 'train')
    val_images, _ = load_split(data_dir, 'val')
    train_images = torch.from_numpy(np.array(train_images[:cfg.n_train or None]))  # (N, H, W, 3) uint8
    val_x = uint8_to_float(np.array(val_images)).to(device)                        # (Nv, 3, H, W)
    if train_images.shape[1] != train_images.shape[2]:
        raise ValueError(f'training images must be square, got {tuple(train_images.shape[1:3])}')
    return train_images, val_x


class Losses:
    """The tokenizer's training loss (and, with disc_weight > 0, the discriminator's), one optimizer step each."""

    def __init__(self, cfg, model, device, fused=False):
        self.cfg, self.model = cfg, model
        # fused=True (one kernel over all parameters) saves ~3-5% of a CPU step but changes the rounding, and with it
        # this recipe's result (docs/speed.md: ceiling 0.904 against 0.930): off, so the recorded numbers reproduce
        self.opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, fused=fused)
        self.disc = PatchDiscriminator().to(device).train() if cfg.disc_weight > 0 else None
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=cfg.lr, betas=cfg.betas, fused=fused) if self.disc \
            else None
        self.lpips = load_lpips(device) if cfg.perceptual_weight > 0 else None

    def step(self, x, it, lr):
        """One update on images x (B, 3, H, W); returns (reconstruction loss, vq loss terms, codes (B, h*w))."""
        cfg, model = self.cfg, self.model
        for group in self.opt.param_groups:  # the discriminator keeps cfg.lr throughout
            group['lr'] = lr
        recon, vq, codes = model(x)                                      # (B, 3, H, W), (B, h*w)
        rec = F.mse_loss(recon, x) if cfg.recon_loss == 'l2' else F.l1_loss(recon, x)
        nll = rec + (cfg.perceptual_weight * self.lpips(recon, x).mean() if self.lpips else 0.0)
        loss = nll + cfg.codebook_weight * (vq['codebook'] + vq['commitment'])
        gan_on = self.disc is not None and it >= cfg.disc_start
        if gan_on:  # generator side of the hinge loss: make D call the reconstruction real
            g_loss = -self.disc(recon).mean()
            weight = cfg.disc_weight
            if cfg.disc_adaptive:  # balance the two gradients at the last layer (taming's VQGAN)
                last = model.decoder.last_layer
                g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
                g_gan = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
                weight = weight * (g_nll.norm() / (g_gan.norm() + 1e-4)).clamp(0, 1e4).detach()
            loss = loss + weight * g_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        self.opt.step()
        if gan_on:  # discriminator side: hinge on real images vs detached reconstructions
            d_loss = 0.5 * (F.relu(1 - self.disc(x)).mean() + F.relu(1 + self.disc(recon.detach())).mean())
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            self.opt_d.step()
        return rec, vq, codes


def train(cfg: VQTrainConfig, progress=True):
    """Train a tokenizer on data/<dataset>; returns the final metrics. Writes <out_dir>/ckpt.pt and PNGs."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    data_dir = cfg.data_dir or os.path.join(REPO_ROOT, 'data', cfg.dataset)
    out_dir = cfg.out_dir or os.path.join('out', f'vqgan_{cfg.dataset}')
    ckpt = os.path.join(out_dir, 'ckpt.pt')
    if cfg.recon_loss not in ('l1', 'l2'):
        raise ValueError(f"recon_loss must be 'l1' or 'l2', got {cfg.recon_loss!r}")
    train_images, val_x = load_images(cfg, data_dir, device)
    N, H = train_images.shape[:2]
    model = VQModel(VQConfig(image_size=H, codebook_size=cfg.codebook_size, codebook_embed_dim=cfg.codebook_embed_dim,
                             commit_loss_beta=cfg.commit_loss_beta, ch=cfg.ch, ch_mult=cfg.ch_mult,
                             num_res_blocks=cfg.num_res_blocks, z_channels=cfg.z_channels,
                             norm_groups=cfg.norm_groups, attention=cfg.attention)).to(device)
    print(f'tokenizer: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {H}x{H} -> '
          f'{model.grid[0]}x{model.grid[1]} codes from {cfg.codebook_size}; {N} train images on {device}')
    losses = Losses(cfg, model.train(), device)
    show = val_x[:16]  # the images in every reconstruction PNG
    start = evaluate_reconstruction(model.eval(), val_x[:cfg.eval_images])
    model.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    hits = torch.zeros(cfg.codebook_size, dtype=torch.long, device=device)  # code use since the last restart
    restarted = 0
    bar = tqdm(range(cfg.max_iters), desc='vqgan', disable=not progress)
    for it in bar:
        lr = lr_schedule(it, cfg.warmup_iters, cfg.max_iters, cfg.lr, cfg.min_lr)
        x = uint8_to_float(train_images[torch.randint(N, (cfg.batch_size,), generator=gen)]).to(device)
        rec, vq, codes = losses.step(x, it, lr)
        hits += torch.bincount(codes.flatten(), minlength=cfg.codebook_size)
        if cfg.restart_interval and (it + 1) % cfg.restart_interval == 0:
            if it + 1 <= cfg.restart_until * cfg.max_iters:
                restarted += restart_dead_codes(model, x, hits)
            hits.zero_()
        if it % 20 == 0:
            bar.set_postfix(rec=f'{rec.item():.4f}', vq=f'{(vq["codebook"] + vq["commitment"]).item():.4f}',
                            usage=f'{model.quantize.window_usage():.2f}', restarted=restarted)
        if (it + 1) % cfg.eval_interval == 0 and it + 1 < cfg.max_iters:
            m = evaluate_reconstruction(model.eval(), val_x[:cfg.eval_images])
            tqdm.write(f'iter {it + 1}: val mse {m["mse"]:.5f}, usage {m["usage"]:.3f}, '
                       f'perplexity {m["perplexity"]:.1f}')
            save_recon_grid(model, show, os.path.join(out_dir, f'recon_{it + 1:05d}.png'))
            save_vqgan(model, ckpt, iter_num=it + 1, train_config=asdict(cfg), metrics=m)
            model.train()
    model.eval()
    seconds = time.time() - t0
    final = evaluate_reconstruction(model, val_x) | dict(start_mse=start['mse'], train_seconds=seconds)
    save_recon_grid(model, show, os.path.join(out_dir, 'recon.png'))
    save_vqgan(model, ckpt, iter_num=cfg.max_iters, train_config=asdict(cfg), metrics=final)
    psnr = 10 * math.log10(4 / final['mse'])  # pixel range 2 -> peak^2 = 4
    print(f'trained {cfg.max_iters} iters in {seconds:.0f}s (all included). val ({len(val_x)} images): '
          f'reconstruction mse {final["mse"]:.5f} (start {start["mse"]:.4f}, PSNR {psnr:.1f} dB), '
          f'codebook usage {final["usage"]:.3f} ({round(final["usage"] * cfg.codebook_size)}/'
          f'{cfg.codebook_size}), perplexity {final["perplexity"]:.1f}\nsaved {ckpt} and '
          f'{os.path.join(out_dir, "recon.png")}')
    return final | dict(ckpt=ckpt)


if __name__ == '__main__':
    config = configure(VQTrainConfig(), sys.argv[1:])
    print(config)
    train(config)
