"""
The image tokenizer: a VQGAN that turns an image into a grid of discrete codes and back.

    images (B, 3, H, W) in [-1, 1] -> Encoder -> quant_conv -> VectorQuantizer -> codes (B, h*w), raster order
    codes -> codebook vectors -> post_quant_conv -> Decoder -> images (B, 3, H, W), roughly in [-1, 1]

    vq = load_vqgan('out/vqgan_shapes/ckpt.pt')      # this project's checkpoint, or LlamaGen's vq_ds16_c2i.pt
    codes = vq.encode(images)                        # (B, h*w) long
    images = vq.decode(codes)                        # (B, 3, H, W)

The architecture is taming-transformers' VQGAN (Esser et al. 2021) in the form LlamaGen (Sun et al. 2024,
github.com/FoundationVision/LlamaGen, tokenizer/tokenizer_image/vq_model.py) uses: ResNet blocks with GroupNorm and
swish, downsampling by a stride-2 conv with (0,1,0,1) padding, upsampling by nearest x2 + conv, single-head attention
at the lowest resolution and in the middle block. The quantizer follows LlamaGen: a low-dimensional codebook (16384
codes x 8 dims) whose vectors and the encoder's latents are both L2-normalised before the nearest-code search.

Module and parameter names match LlamaGen's `VQ_16` exactly, so its released `vq_ds16_c2i.pt` / `vq_ds16_t2i.pt`
load with `load_state_dict(strict=True)` and no renaming (`load_vqgan`), and the ops run in the same order, so the
same weights give the same codes. tests/data/llamagen_vq16_keys.json lists the expected names and shapes.
The shapes tokenizer is trained by `python data/shapes/train_tokenizer.py`. Imports only torch at module level.
"""
import os
import argparse
from dataclasses import dataclass, asdict, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT_KIND = 'arra-vqgan'  # the 'kind' entry of this project's tokenizer checkpoints
USAGE_WINDOW = 65536            # length of the rolling buffer of recent codes (LlamaGen's size: part of its state dict)
DISTANCE_CHUNK = 16384          # latents per block in the nearest-code search: bounds the (n, K) distance matrix


@dataclass
class VQConfig:
    # The defaults are LlamaGen's VQ-16 (ModelArgs + VQ_16 in its vq_model.py) at 256 px: 16x16 codes.
    image_size: int = 256                        # input resolution (square); the code grid is image_size // downsample
    codebook_size: int = 16384                   # number of codes K
    codebook_embed_dim: int = 8                  # dimension of a code vector (low-dim codes are used more evenly)
    codebook_l2_norm: bool = True                # search on the unit sphere: normalise latents and codes first
    commit_loss_beta: float = 0.25               # weight of the commitment term (pulls the encoder to its code)
    ch: int = 128                                # base channel width
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)   # width multiplier per resolution; len(ch_mult) - 1 halvings
    num_res_blocks: int = 2                      # ResNet blocks per resolution in the encoder (decoder: one more)
    z_channels: int = 256                        # encoder output / decoder input width, before the 1x1 quant convs
    dropout: float = 0.0                         # dropout inside the ResNet blocks
    norm_groups: int = 32                        # GroupNorm groups (LlamaGen: 32); every width must be divisible
    attention: bool = True                       # the self-attention blocks at the lowest resolution and in the
    #   middle (LlamaGen: on). Off, the middle keeps its two ResNet blocks (an Identity between them, so parameter
    #   names stay LlamaGen's); a small tokenizer of 32 px images trains ~20% faster per step on a CPU without them

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)  # a checkpoint's plain dict may hold a list
        ds = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % ds:
            raise ValueError(f'image_size={self.image_size} is not divisible by the downsample factor {ds} '
                             f'(ch_mult={self.ch_mult}); use a multiple of {ds}, e.g. '
                             f'{self.image_size // ds * ds or ds}')
        widths = {self.ch * m for m in self.ch_mult}
        if any(w % self.norm_groups for w in widths):
            raise ValueError(f'channel widths {sorted(widths)} must be divisible by norm_groups={self.norm_groups}')
        if self.codebook_size < 1 or self.codebook_embed_dim < 1:
            raise ValueError('codebook_size and codebook_embed_dim must be positive')


# ----------------------------------------------------------------------------------------------------------------
# Building blocks. Names (norm1, conv1, nin_shortcut, q/k/v/proj_out, ...) are LlamaGen's, for strict loading.

def swish(x):
    return x * torch.sigmoid(x)  # written out (not F.silu) to match LlamaGen's arithmetic bit for bit


class ResnetBlock(nn.Module):
    def __init__(self, in_ch, out_ch, dropout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # a 1x1 conv brings the skip path to the new width when the block changes it
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):  # (B, C_in, H, W) -> (B, C_out, H, W)
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with 1x1 convs as the projections."""

    def __init__(self, ch, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.q, self.k, self.v = (nn.Conv2d(ch, ch, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W).permute(0, 2, 1)  # (B, HW, C)
        k = self.k(h).reshape(B, C, H * W)                   # (B, C, HW)
        v = self.v(h).reshape(B, C, H * W)                   # (B, C, HW)
        # explicit bmm + softmax (not scaled_dot_product_attention) so the floats match LlamaGen's exactly
        att = F.softmax(torch.bmm(q, k) * (C ** -0.5), dim=2)  # (B, HW_query, HW_key)
        out = torch.bmm(v, att.permute(0, 2, 1))              # (B, C, HW_query)
        return x + self.proj_out(out.reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # pad right/bottom only: torch convs pad symmetrically


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode='nearest'))


def middle_blocks(ch, cfg):
    """ResNet, attention (or an Identity when cfg.attention is off), ResNet: the middle of encoder and decoder."""
    g = cfg.norm_groups  # built in this order (the random init draws in it): same seed, same weights as before
    return nn.ModuleList([ResnetBlock(ch, ch, cfg.dropout, g), AttnBlock(ch, g) if cfg.attention else nn.Identity(),
                          ResnetBlock(ch, ch, cfg.dropout, g)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        levels, g = len(cfg.ch_mult), cfg.norm_groups
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c_in = cfg.ch
        for i in range(levels):
            block, c_out = nn.Module(), cfg.ch * cfg.ch_mult[i]
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                block.res.append(ResnetBlock(c_in, c_out, cfg.dropout, g))
                c_in = c_out
                if i == levels - 1 and cfg.attention:  # attention only at the lowest resolution, after each block
                    block.attn.append(AttnBlock(c_in, g))
            if i != levels - 1:
                block.downsample = Downsample(c_in)
            self.conv_blocks.append(block)
        self.mid = middle_blocks(c_in, cfg)
        self.norm_out = nn.GroupNorm(g, c_in, eps=1e-6)
        self.conv_out = nn.Conv2d(c_in, cfg.z_channels, 3, padding=1)

    def forward(self, x):  # (B, 3, H, W) -> (B, z_channels, h, w)
        h = self.conv_in(x)
        for block in self.conv_blocks:
            for j, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[j](h)
            if hasattr(block, 'downsample'):
                h = block.downsample(h)
        for layer in self.mid:
            h = layer(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        levels, g = len(cfg.ch_mult), cfg.norm_groups
        c_in = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1)
        self.mid = middle_blocks(c_in, cfg)
        self.conv_blocks = nn.ModuleList()  # lowest resolution first
        for i in reversed(range(levels)):
            block, c_out = nn.Module(), cfg.ch * cfg.ch_mult[i]
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                block.res.append(ResnetBlock(c_in, c_out, cfg.dropout, g))
                c_in = c_out
                if i == levels - 1 and cfg.attention:
                    block.attn.append(AttnBlock(c_in, g))
            if i != 0:
                block.upsample = Upsample(c_in)
            self.conv_blocks.append(block)
        self.norm_out = nn.GroupNorm(g, c_in, eps=1e-6)
        self.conv_out = nn.Conv2d(c_in, 3, 3, padding=1)

    @property
    def last_layer(self):  # the weight the adaptive GAN weight compares gradient norms at
        return self.conv_out.weight

    def forward(self, z):  # (B, z_channels, h, w) -> (B, 3, H, W)
        h = self.conv_in(z)
        for layer in self.mid:
            h = layer(h)
        for block in self.conv_blocks:
            for j, res in enumerate(block.res):
                h = res(h)
                if len(block.attn):
                    h = block.attn[j](h)
            if hasattr(block, 'upsample'):
                h = block.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------------
# Vector quantizer

class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.codebook_size, self.l2_norm, self.beta = cfg.codebook_size, cfg.codebook_l2_norm, cfg.commit_loss_beta
        # LlamaGen's init: small uniform, then projected onto the sphere (random directions, spread evenly in 8-d)
        K = cfg.codebook_size
        weight = torch.empty(K, cfg.codebook_embed_dim).uniform_(-1.0 / K, 1.0 / K)  # (K, D)
        self.embedding = nn.Embedding.from_pretrained(F.normalize(weight, dim=-1) if self.l2_norm else weight,
                                                      freeze=False)
        self.register_buffer('codebook_used', torch.full((USAGE_WINDOW,), -1.0))  # -1: empty slot

    def codebook(self):
        """The code vectors as the search sees them: (K, D), unit length when l2-normalised."""
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def nearest_codes(self, z):
        """argmin_k ||z - e_k||^2 for each row of z (N, D) -> (N,) long. Expanded as z^2 + e^2 - 2 z.e, as LlamaGen
        does, and computed in row blocks so a large batch never builds one huge (N, K) matrix."""
        e = self.codebook()                                              # (K, D)
        e_sq = torch.sum(e ** 2, dim=1)                                  # (K,)
        out = []
        for zc in z.split(DISTANCE_CHUNK):
            # z^2 + e^2 - 2 z.e in one addmm (the same sums as written out, in half the CPU time); min's index is
            # argmin's (the first of tied minima), ~2x faster on a CPU
            d = torch.addmm(torch.sum(zc ** 2, dim=1, keepdim=True) + e_sq, zc, e.t(), alpha=-2)  # (n, K)
            out.append(d.min(dim=1).indices)
        return torch.cat(out)

    def forward(self, z):
        """z (B, D, h, w) -> (z_q (B, D, h, w) with straight-through gradients, loss terms dict, codes (B, h*w))."""
        B, D, h, w = z.shape
        z = z.permute(0, 2, 3, 1).contiguous()           # (B, h, w, D): one latent vector per position
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        codes = self.nearest_codes(z.view(-1, D))         # (B*h*w,), raster order within each image
        z_q = self.codebook()[codes].view(z.shape)        # (B, h, w, D)
        losses = {
            'codebook': torch.mean((z_q - z.detach()) ** 2),                 # moves the codes towards the latents
            'commitment': self.beta * torch.mean((z_q.detach() - z) ** 2),   # keeps the encoder near its codes
        }
        if self.training:  # rolling window of recent codes -> the 'usage' figure printed while training
            n = min(codes.numel(), USAGE_WINDOW)
            self.codebook_used.copy_(torch.cat([self.codebook_used[n:], codes[-n:].float()]))
        z_q = z + (z_q - z).detach()  # straight-through: forward uses z_q, backward copies the gradient to z
        return z_q.permute(0, 3, 1, 2), losses, codes.view(B, h * w)

    def window_usage(self):
        """Fraction of the codebook seen in the rolling window of recent training codes."""
        used = self.codebook_used[self.codebook_used >= 0]
        return used.unique().numel() / self.codebook_size


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer

class VQModel(nn.Module):
    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)       # 256 -> 8 (VQ-16)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)  # 8 -> 256

    @property
    def downsample(self):
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def image_size(self):
        return self.config.image_size

    @property
    def grid(self):
        return (self.image_size // self.downsample,) * 2

    @property
    def codebook_size(self):
        return self.config.codebook_size

    def forward(self, images):
        """Training pass: images (B, 3, H, W) -> (reconstruction (B, 3, H, W), vq loss terms dict, codes (B, h*w))."""
        z_q, losses, codes = self.quantize(self.quant_conv(self.encoder(images)))
        return self.decoder(self.post_quant_conv(z_q)), losses, codes

    def check_images(self, images):
        if not torch.is_tensor(images) or not images.is_floating_point():
            raise TypeError(f'images must be a float tensor (B, 3, H, W) in [-1, 1], got '
                            f'{getattr(images, "dtype", type(images).__name__)}; convert uint8 (B, H, W, 3) arrays '
                            f'with utils.uint8_to_float')
        S = self.image_size
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'images must be shaped (B, 3, H, W), got {tuple(images.shape)}')
        if tuple(images.shape[-2:]) != (S, S):
            H, W = images.shape[-2:]
            raise ValueError(f'images are {H}x{W} but this tokenizer is set up for {S}x{S} ({self.grid[0]}x'
                             f'{self.grid[1]} codes): resize them, or load it with load_vqgan(path, image_size=N) '
                             f'for square images whose side N is a multiple of {self.downsample}')
        lo, hi = torch.aminmax(images.detach())
        if lo < -1.01 or hi > 1.01:
            raise ValueError(f'pixel values span [{lo.item():.3g}, {hi.item():.3g}] but must lie in [-1, 1]: map '
                             f'uint8 images with x / 127.5 - 1 (utils.uint8_to_float)')

    @torch.no_grad()
    def encode(self, images):
        """images float (B, 3, H, W) in [-1, 1] -> codes long (B, h*w), raster order (row by row)."""
        self.check_images(images)
        z = self.quant_conv(self.encoder(images))                        # (B, D, h, w)
        B, D, h, w = z.shape
        z = z.permute(0, 2, 3, 1).reshape(-1, D)                         # (B*h*w, D)
        if self.config.codebook_l2_norm:
            z = F.normalize(z, dim=-1)
        return self.quantize.nearest_codes(z).view(B, h * w)

    def decode(self, codes):
        """codes int (B, h*w) -> images (B, 3, H, W). Roughly in [-1, 1] but not clamped: clamp before display."""
        h, w = self.grid
        if not torch.is_tensor(codes) or codes.is_floating_point() or codes.ndim != 2 or codes.shape[1] != h * w:
            raise ValueError(f'codes must be an integer tensor (B, {h * w}) for this {h}x{w} grid, got '
                             f'{getattr(codes, "dtype", type(codes).__name__)} {tuple(getattr(codes, "shape", ()))}')
        codes = codes.long()
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.codebook_size):
            raise ValueError(f'codes must lie in [0, {self.codebook_size}), got [{codes.min()}, {codes.max()}]')
        z_q = self.quantize.codebook()[codes].view(codes.shape[0], h, w, -1)  # (B, h, w, D)
        return self.decoder(self.post_quant_conv(z_q.permute(0, 3, 1, 2).contiguous()))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: this project's own, and LlamaGen's released VQ files

def config_from_llamagen(state_dict, image_size=256):
    """Read a LlamaGen-layout VQ state dict's sizes off its tensor shapes (VQ_16 gives the VQConfig defaults)."""
    ch = state_dict['encoder.conv_in.weight'].shape[0]
    levels = sorted({int(k.split('.')[2]) for k in state_dict if k.startswith('encoder.conv_blocks.')})
    ch_mult = tuple(state_dict[f'encoder.conv_blocks.{i}.res.0.conv1.weight'].shape[0] // ch for i in levels)
    n_res = len({k.split('.')[4] for k in state_dict if k.startswith('encoder.conv_blocks.0.res.')})
    K, D = state_dict['quantize.embedding.weight'].shape
    return VQConfig(image_size=image_size, codebook_size=K, codebook_embed_dim=D, ch=ch, ch_mult=ch_mult,
                    num_res_blocks=n_res, z_channels=state_dict['quant_conv.weight'].shape[1])


def _read_checkpoint(path, image_size=None):
    """-> (VQConfig, state_dict) from either checkpoint format, with errors that name the problem."""
    from utils import load_checkpoint
    from configurator import config_from_dict
    # LlamaGen's training script also pickles its argparse.Namespace under 'args'; allow that one plain class
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = load_checkpoint(path, kind='train one with `python data/shapes/train_tokenizer.py`, or download '
                                          "LlamaGen's vq_ds16_c2i.pt")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict):
        raise ValueError(f'{path} is not an image tokenizer checkpoint: expected a dict with a "model" state dict')
    kind, sd = ckpt.get('kind'), ckpt['model']
    if kind == CHECKPOINT_KIND:
        cfg = config_from_dict(VQConfig, dict(ckpt['config']))
        if image_size is not None:
            cfg = replace(cfg, image_size=image_size)  # the convs run at any multiple of the downsample factor
    elif kind is not None:
        raise ValueError(f'{path} is a {kind!r} checkpoint, not an image tokenizer ({CHECKPOINT_KIND!r}); pass the '
                         f'tokenizer checkpoint (e.g. out/vqgan_shapes/ckpt.pt or vq_ds16_c2i.pt)')
    elif all(k in sd for k in ('encoder.conv_in.weight', 'quantize.embedding.weight', 'quant_conv.weight',
                               'decoder.conv_out.weight')):
        cfg = config_from_llamagen(sd, 256 if image_size is None else image_size)
    else:
        raise ValueError(f'{path} holds a state dict that is neither this project\'s tokenizer nor LlamaGen\'s VQ '
                         f'(first keys: {list(sd)[:3]}); pass a tokenizer checkpoint')
    return cfg, sd


def load_vqgan(path, image_size=None):
    """Load a tokenizer (this project's checkpoint or LlamaGen's vq_ds16_*.pt) strictly, in eval mode, frozen.
    image_size overrides the resolution (LlamaGen files default to 256: 16x16 codes; 512 gives 32x32)."""
    cfg, sd = _read_checkpoint(path, image_size)
    model = VQModel(cfg)
    model.load_state_dict(sd, strict=True)
    return model.eval().requires_grad_(False)


def save_vqgan(model, path, **extra):
    """Atomic checkpoint {'kind', 'model', 'config' (plain dict), **extra} that load_vqgan reads back."""
    from utils import atomic_torch_save
    atomic_torch_save({'kind': CHECKPOINT_KIND, 'model': model.state_dict(), 'config': asdict(model.config),
                       **extra}, path)


def vqgan_identity(path, image_size=None):
    """What a prepared dataset records about the tokenizer that made its codes (meta.json)."""
    from utils import file_sha256
    cfg, _ = _read_checkpoint(path, image_size)
    ds = 2 ** (len(cfg.ch_mult) - 1)
    return dict(path=os.path.abspath(path), sha256=file_sha256(path), codebook_size=cfg.codebook_size,
                grid=[cfg.image_size // ds] * 2)


def encode_images(model, images_uint8, batch_size=256, device='cpu', progress=True):
    """uint8 (N, H, W, 3) array (numpy or memmap) -> uint16 codes (N, h*w), batch by batch. Moves model to device.
    Runs in fp32: lower precision could flip near-tie codes and make the codes depend on the hardware. On a CPU,
    small batches are faster per image (32 x 32 images: batch 32 ~2x batch 256), as the activations stay in cache."""
    import numpy as np
    from tqdm import tqdm
    images = images_uint8
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f'expected uint8 images (N, H, W, 3), got {images.dtype} {images.shape}')
    if model.codebook_size > 65536:
        raise ValueError(f'{model.codebook_size} codes do not fit in uint16')
    model.to(device)
    out = np.empty((len(images), model.grid[0] * model.grid[1]), dtype=np.uint16)
    with torch.inference_mode():  # no autograd bookkeeping at all: the codes only go to numpy
        for start in tqdm(range(0, len(images), batch_size), desc='encode', unit='batch', disable=not progress):
            x = torch.from_numpy(np.array(images[start:start + batch_size])).to(device)  # (b, H, W, 3) uint8
            x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0                             # (b, 3, H, W) in [-1, 1]
            out[start:start + len(x)] = model.encode(x).cpu().numpy().astype(np.uint16)
    return out
