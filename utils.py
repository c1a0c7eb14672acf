"""
Small helpers shared by the scripts: atomic file writes (a crash never leaves a half-written checkpoint or array
behind), checkpoint loading with clear errors, the learning-rate schedule of every trainer, PNG image grids a person
can look at, and the device choice every script repeats (torchrun's process group is in distributed.py). Imports
only torch, numpy and PIL.
"""
import os
import math
import time
import hashlib
import tempfile
import textwrap

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = os.path.dirname(os.path.abspath(__file__))


def atomic_torch_save(obj, path):
    """torch.save to a temp file in the same folder, then rename: readers see the old file or the new, never half."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix='.tmp_', suffix='.pt')
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(data, path):
    """Write bytes to `path` through a temp file + rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix='.tmp_')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, not a torch file, or holding objects weights_only refuses)."""


def load_checkpoint(path, kind=None):
    """torch.load(weights_only=True) with errors that say what went wrong and what to run instead."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'checkpoint {path!r} does not exist' + (f' (train one first: {kind})' if kind else ''))
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated file, not a torch file, or pickled objects that weights_only refuses
        raise CheckpointError(f'could not read checkpoint {path!r}: {type(e).__name__}: {e}. The file is corrupt or '
                           f'not a checkpoint of this project; retrain it or point to the right file.') from e


def rng_states(cuda):
    """torch's random number generator states (and every CUDA device's when cuda), for a checkpoint."""
    return {'torch': torch.get_rng_state(), **({'cuda': torch.cuda.get_rng_state_all()} if cuda else {})}


def set_rng_states(rng, cuda):
    """Restore what rng_states saved (the CUDA states only when cuda and saved)."""
    if 'torch' in rng:
        torch.set_rng_state(rng['torch'])
    if cuda and rng.get('cuda'):
        torch.cuda.set_rng_state_all(rng['cuda'])


def lr_schedule(it, warmup_iters, decay_iters, lr, min_lr, decay=True):
    """The learning rate at step `it`: linear warmup to lr over warmup_iters steps, then a cosine from lr down to
    min_lr at decay_iters (and min_lr after it); decay=False keeps lr after the warmup (LlamaGen's recipe)."""
    if it < warmup_iters:
        return lr * (it + 1) / warmup_iters
    if not decay:
        return lr
    if it >= decay_iters:
        return min_lr
    ratio = (it - warmup_iters) / max(1, decay_iters - warmup_iters)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def measure_peak_flops(device, dtype):
    """FLOP/s of the best of a few large square matmuls in `dtype`: the practical peak that MFU is measured against
    (below the datasheet's, so an MFU against it reads higher than one against the datasheet)."""
    n = 8192 if device.startswith('cuda') else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.startswith('cuda') else (lambda: None)
    best = float('inf')
    for _ in range(10):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def file_sha256(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(chunk), b''):
            h.update(block)
    return h.hexdigest()


def to_uint8_hwc(images):
    """float (B, 3, H, W) in [-1, 1] -> uint8 numpy (B, H, W, 3)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def uint8_to_float(images):
    """uint8 (B, H, W, 3) numpy or tensor -> float (B, 3, H, W) in [-1, 1]."""
    x = torch.as_tensor(np.asarray(images))
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def save_image_grid(images, path, nrow=8, scale=4, captions=None, caption_width=None):
    """Save uint8 images (N, H, W, 3) as one PNG grid, upscaled `scale`x with nearest neighbour so pixels stay crisp.

    captions: optional list of strings, one per grid *row*, drawn to the right of the row.
    """
    images = np.asarray(images)
    n, h, w, _ = images.shape
    ncol = min(nrow, n)
    nrows = (n + ncol - 1) // ncol
    th, tw, pad = h * scale, w * scale, 2
    font = ImageFont.load_default()
    text_w = 0
    if captions:
        text_w = caption_width or 6 * 48 + 8
    grid = Image.new('RGB', (ncol * (tw + pad) + pad + text_w, nrows * (th + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        r, c = divmod(i, ncol)
        tile = Image.fromarray(images[i]).resize((tw, th), Image.NEAREST)
        grid.paste(tile, (pad + c * (tw + pad), pad + r * (th + pad)))
    if captions:
        x0 = ncol * (tw + pad) + pad + 4
        chars = max(8, (text_w - 8) // 6)
        for r, cap in enumerate(captions[:nrows]):
            lines = textwrap.wrap(cap if cap else '(empty prompt: unconditional)', chars)
            draw.multiline_text((x0, pad + r * (th + pad) + 2), '\n'.join(lines), fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)
    return path


def pick_device(device='auto'):
    if device == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    return device

