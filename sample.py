"""
Prompts to images: load a GPT checkpoint from train.py and the image tokenizer it was trained with, sample codes
with classifier-free guidance and the KV cache, decode them, and save a PNG grid (one row per prompt, the prompt
written beside it).

    python sample.py --prompt "a large red circle in the top left"
    python sample.py --prompt "a small blue square in the center" --prompt "" --num_samples=8   # "" = unconditional
    python sample.py --prompts_file=prompts.txt --num_samples=50 --out_dir=out/samples_fid     # one PNG per sample
    torchrun --nproc_per_node=8 sample.py --prompts_file=prompts.txt --num_samples=50 --out_dir=out/samples_fid

- The tokenizer is the one recorded in the checkpoint (data_meta['vqgan']: path and sha256); --vqgan=PATH points to
  another copy of it. A file whose sha256, codebook size or grid differs from the recorded one is refused: its codes
  would mean different pictures.
- Prompts are tokenized like the training captions, with the text tokenizer recorded in the checkpoint (open_clip
  BPE, or the tokenizer.json of the LLM the model started from, refused if that file changed; --text_tokenizer=PATH
  points to another copy of it), left-padded to the model's text_len. A longer
  prompt is cut to text_len with a warning; words never seen in training still tokenize (BPE) and run. An empty
  prompt is the empty caption the model was trained on for classifier-free guidance: unconditional samples.
- Jobs are (prompt, sample) pairs, numbered j = prompt * num_samples + sample and cut, in that order, into batches of
  batch_size. Each batch draws its randomness from one generator seeded by (seed, its first job index). The batches
  are the same whatever the number of processes, so under torchrun (ranks take batches round-robin, each writes its
  own files) the images are exactly those of a single-process run, and the same seed gives the same PNG bytes.
  What does change the images: seed, batch_size (which jobs share a generator), the sampling settings, and the
  device / precision (CUDA samples in bf16 autocast).
- --out_dir writes one PNG per sample at the tokenizer's resolution, p{prompt:05d}_s{sample:03d}.png (ready for
  fid.py), and prompts.txt listing the prompts in order.

How the defaults were chosen: README, "Measured while choosing the defaults".
"""
import os
import sys
import warnings
from dataclasses import dataclass, field
from contextlib import nullcontext

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

from configurator import configure, ConfigError
from model import GPT, config_from_checkpoint
from utils import REPO_ROOT, CheckpointError, load_checkpoint, pick_device, save_image_grid, to_uint8_hwc
from vqgan import load_vqgan, vqgan_identity
from data.common import tokenize_captions, open_clip_tokenizer

CHECKPOINT_KIND = 'arra-gpt'
GRID_MAX_ROWS, GRID_MAX_COLS = 32, 16  # the PNG grid shows at most this many prompts x samples


@dataclass
class SampleConfig:
    ckpt: str = 'out/shapes/ckpt.pt'  # a GPT checkpoint written by train.py
    vqgan: str = ''                   # '' = the tokenizer file recorded in the checkpoint
    text_tokenizer: str = ''          # '' = the text tokenizer recorded in the checkpoint (a tokenizer.json copy)
    prompt: list[str] = field(default_factory=list)  # repeat --prompt for several; none = 8 val captions
    prompts_file: str = ''            # one prompt per line (added after the --prompt ones)
    num_samples: int = 4              # samples per prompt
    cfg_scale: float = 1.5            # classifier-free guidance scale s in u + s (c - u); 1 = no guidance
    temperature: float = 0.3          # softmax temperature (< 1: fewer stray codes, cleaner small images); 0 = greedy
    top_k: int = 0                    # keep the k most likely codes; 0 = all
    top_p: float = 1.0                # nucleus sampling mass; 1.0 = off
    seed: int = 1337                  # same seed (and batch_size, device) -> identical images
    batch_size: int = 64              # jobs per generate() call (x2 rows with guidance)
    out: str = ''                     # the PNG grid; '' = samples.png next to the checkpoint
    out_dir: str = ''                 # also write one PNG per sample here ('' = no per-sample files)
    scale: int = 4                    # grid upscaling (nearest neighbour), so small images are visible
    device: str = 'auto'              # 'auto': cuda if available (under torchrun: cuda:LOCAL_RANK)


class SampleError(Exception):
    """Bad input that the message explains."""


# ----------------------------------------------------------------------------------------------------------------
# loading

def load_gpt(path, device):
    """A train.py checkpoint -> (GPT in eval mode on device, the checkpoint dict)."""
    ckpt = load_checkpoint(path, kind='python train.py')
    if not isinstance(ckpt, dict) or ckpt.get('kind') != CHECKPOINT_KIND or 'model_config' not in ckpt:
        kind = ckpt.get('kind') if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SampleError(f'{path} is not a GPT checkpoint of train.py (kind {kind!r}, expected {CHECKPOINT_KIND!r})')
    try:
        model = GPT(config_from_checkpoint(ckpt['model_config']))
    except (ValueError, TypeError) as e:
        raise SampleError(f'{path}: {e}') from None
    model.load_state_dict(ckpt['model'], strict=True)
    return model.to(device).eval(), ckpt


def load_matching_vqgan(ckpt, override_path, device):
    """The tokenizer the GPT was trained with: the recorded file (or override_path), refused unless its sha256,
    codebook size and grid are the recorded ones and fit the GPT."""
    recorded = ckpt.get('data_meta', {}).get('vqgan', {})
    path = override_path or recorded.get('path')
    if not path:
        raise SampleError('the checkpoint records no tokenizer; pass --vqgan=PATH')
    if not os.path.isfile(path):
        raise SampleError(f'tokenizer {path} not found' + ('' if override_path else
                          ' (the path recorded when the data was prepared); pass --vqgan=PATH to a copy of it'))
    found = vqgan_identity(path)
    model_cfg = ckpt['model_config']
    problems = []
    if recorded.get('sha256') and found['sha256'] != recorded['sha256']:
        problems.append(f'sha256 {found["sha256"][:12]}.. but the model was trained on codes of '
                        f'{recorded.get("path")} with sha256 {recorded["sha256"][:12]}..')
    if found['codebook_size'] != model_cfg['codebook_size']:
        problems.append(f'{found["codebook_size"]} codes but the GPT predicts {model_cfg["codebook_size"]}')
    if found['grid'][0] * found['grid'][1] != model_cfg['image_tokens'] or \
            (recorded.get('grid') and list(found['grid']) != list(recorded['grid'])):
        problems.append(f'a {found["grid"][0]}x{found["grid"][1]} grid but the GPT writes {model_cfg["image_tokens"]} '
                        f'codes per image ({recorded.get("grid")} recorded)')
    if problems:
        raise SampleError(f'tokenizer {path} does not match the checkpoint: ' + '; '.join(problems) +
                          '. Pass --vqgan=PATH to the tokenizer the model was trained with.')
    return load_vqgan(path).to(device)


def read_prompts(settings, ckpt):
    """The prompts: --prompt ones, then --prompts_file lines; with neither, the first 8 captions of the val split."""
    prompts = list(settings.prompt)
    if settings.prompts_file:
        if not os.path.isfile(settings.prompts_file):
            raise SampleError(f'--prompts_file={settings.prompts_file} not found')
        with open(settings.prompts_file) as f:
            prompts += f.read().splitlines()
    if prompts:
        return prompts
    train_cfg, meta = ckpt.get('config', {}), ckpt.get('data_meta', {})
    data_dir = train_cfg.get('data_dir') or os.path.join(REPO_ROOT, 'data', train_cfg.get('dataset', ''))
    path = os.path.join(data_dir, meta.get('captions', {}).get('val', 'val_captions.txt'))
    if not os.path.isfile(path):
        raise SampleError('no prompts: pass --prompt "..." (repeatable) or --prompts_file=FILE')
    with open(path) as f:
        prompts = f.read().splitlines()[:8]
    print(f'no --prompt given: using the first {len(prompts)} captions of {path}')
    return prompts


def load_text_tokenizer(ckpt, override_path):
    """The text tokenizer the checkpoint's training data was prepared with (data.common.text_tokenizer_of)."""
    from data.common import text_tokenizer_of
    try:
        return text_tokenizer_of(ckpt.get('data_meta', {}), override_path)
    except (FileNotFoundError, ValueError) as e:
        raise SampleError(str(e)) from None


def tokenize_prompts(prompts, text_len, tokenizer=None):
    """-> long (P, text_len), warning about prompts cut to text_len and saying which ones are empty."""
    tokenizer = tokenizer or open_clip_tokenizer()
    tokens = tokenize_captions(prompts, text_len, warn=False, tokenizer=tokenizer)          # (P, L)
    lengths = (tokenize_captions(prompts, max(256, text_len), warn=False, tokenizer=tokenizer)
               != tokenizer.pad_id).sum(1)                                                    # with SOT/EOT
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        if n > text_len:
            warnings.warn(f'prompt {i} is {n} tokens long (with start/end) but the model reads {text_len}: its end '
                          f'is cut off: {p!r}', stacklevel=2)
        if not p.strip():
            print(f'prompt {i} is empty: unconditional samples')
    return torch.from_numpy(tokens.astype(np.int64))


# ----------------------------------------------------------------------------------------------------------------
# sampling

@torch.no_grad()
def generate_images(model, vq, text, ctx, generator, cfg_scale, temperature, top_k=None, top_p=None):
    """text (B, L) long on the model's device -> uint8 images (B, H, W, 3): GPT codes (KV cache, CFG) -> tokenizer."""
    with ctx:
        codes = model.generate(text, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                               generator=generator)                                  # (B, T)
    return to_uint8_hwc(vq.decode(codes))                                            # (B, H, W, 3), fp32 decode


class TrainingGrid:
    """train.py's sample grid at every eval: `samples` samples of each of the first `n_prompts` captions of a
    prepared split, at sample.py's defaults with a fixed seed (the same noise at every eval), one row per prompt,
    decoded with the tokenizer named in the dataset's meta.json (.vq is None when that file is not here)."""

    def __init__(self, meta, data_dir, split, n_prompts, samples, seed, ctx):
        vq_path = meta['vqgan'].get('path')
        self.vq = load_vqgan(vq_path) if vq_path and os.path.isfile(vq_path) else None
        self.text = torch.from_numpy(np.array(split.text[:n_prompts], dtype=np.int64))        # (P, L)
        cap_file = os.path.join(data_dir, meta.get('captions', {}).get('val', 'val_captions.txt'))
        self.captions = open(cap_file).read().splitlines()[:n_prompts] if os.path.isfile(cap_file) else []
        self.samples, self.seed, self.ctx = samples, seed, ctx

    def draw(self, model, path):
        """Sample with `model`, save the PNG grid at path; returns path."""
        device, defaults = next(model.parameters()).device, SampleConfig()
        generator = torch.Generator(device=device).manual_seed(self.seed)
        text = self.text.to(device).repeat_interleave(self.samples, dim=0)                     # (P * samples, L)
        images = generate_images(model, self.vq.to(device), text, self.ctx, generator, defaults.cfg_scale,
                                 defaults.temperature, defaults.top_k or None,
                                 defaults.top_p if defaults.top_p < 1 else None)                # (P * samples, H, W, 3)
        return save_image_grid(images, path, nrow=self.samples, scale=4, captions=self.captions)


def batch_seed(seed, first_job):
    """The generator seed of the batch that starts at job `first_job`: depends on nothing else."""
    return int(np.random.SeedSequence([seed, first_job]).generate_state(1)[0])


def sample(settings):
    """Run sampling (one rank of it under torchrun). Returns (grid path or None, list of per-sample files written)."""
    if settings.num_samples < 1 or settings.batch_size < 1 or settings.scale < 1:
        raise SampleError('num_samples, batch_size and scale must be >= 1')
    if settings.temperature < 0 or settings.top_k < 0 or not 0 < settings.top_p <= 1:
        raise SampleError(f'--temperature={settings.temperature} must be >= 0 (0 = greedy), '
                          f'--top_k={settings.top_k} >= 0 (0 = off), --top_p={settings.top_p} in (0, 1] (1 = off)')
    world, rank = int(os.environ.get('WORLD_SIZE', 1)), int(os.environ.get('RANK', 0))
    device = pick_device(settings.device)
    if world > 1 and device.startswith('cuda'):
        device = f'cuda:{int(os.environ.get("LOCAL_RANK", 0))}'
        torch.cuda.set_device(device)
    if world > 1:
        dist.init_process_group(backend='gloo')  # only a barrier and a gather of the grid's few images
    try:
        model, ckpt = load_gpt(settings.ckpt, device)
        vq = load_matching_vqgan(ckpt, settings.vqgan, device)
        prompts = read_prompts(settings, ckpt)
        text_tok = load_text_tokenizer(ckpt, settings.text_tokenizer)
        text = tokenize_prompts(prompts, model.config.text_len, text_tok).to(device)  # (P, L)
        use_bf16 = device.startswith('cuda') and torch.cuda.is_bf16_supported()
        ctx = torch.autocast(device_type='cuda', dtype=torch.bfloat16) if use_bf16 else nullcontext()

        n_jobs = len(prompts) * settings.num_samples
        batches = [(s, min(s + settings.batch_size, n_jobs)) for s in range(0, n_jobs, settings.batch_size)]
        grid_rows, grid_cols = min(len(prompts), GRID_MAX_ROWS), min(settings.num_samples, GRID_MAX_COLS)
        grid_images, written = {}, []
        if settings.out_dir:
            os.makedirs(settings.out_dir, exist_ok=True)
        if rank == 0:
            print(f'{len(prompts)} prompt(s) x {settings.num_samples} samples = {n_jobs} images in {len(batches)} '
                  f'batch(es) over {world} process(es); cfg_scale {settings.cfg_scale}, temperature '
                  f'{settings.temperature}, top_k {settings.top_k or "off"}, top_p '
                  f'{settings.top_p if settings.top_p < 1 else "off"}, seed {settings.seed}')
        for start, end in tqdm(batches[rank::world], desc=f'sample (rank {rank})' if world > 1 else 'sample',
                               disable=rank != 0 and world > 1):
            jobs = np.arange(start, end)
            generator = torch.Generator(device=device).manual_seed(batch_seed(settings.seed, start))
            images = generate_images(model, vq, text[jobs // settings.num_samples], ctx, generator,
                                     settings.cfg_scale, settings.temperature, settings.top_k or None,
                                     settings.top_p if settings.top_p < 1 else None)
            for j, image in zip(jobs, images):
                p, s = divmod(int(j), settings.num_samples)
                if settings.out_dir:
                    path = os.path.join(settings.out_dir, f'p{p:05d}_s{s:03d}.png')
                    Image.fromarray(image).save(path)
                    written.append(path)
                if p < grid_rows and s < grid_cols:
                    grid_images[int(j)] = image
        if world > 1:  # the grid's images to rank 0 (a few hundred at most), then wait for every rank's files
            gathered = [None] * world if rank == 0 else None
            dist.gather_object(grid_images, gathered, dst=0)
            if rank == 0:
                grid_images = {k: v for part in gathered for k, v in part.items()}
            dist.barrier()
        if rank != 0:
            return None, written
        grid_path = settings.out or os.path.join(os.path.dirname(os.path.abspath(settings.ckpt)), 'samples.png')
        order = [p * settings.num_samples + s for p in range(grid_rows) for s in range(grid_cols)]
        save_image_grid(np.stack([grid_images[j] for j in order]), grid_path, nrow=grid_cols, scale=settings.scale,
                        captions=prompts[:grid_rows])
        note = f' (the first {grid_rows} prompts x {grid_cols} samples)' if (grid_rows, grid_cols) != (
            len(prompts), settings.num_samples) else ''
        print(f'saved the grid{note}: {grid_path}')
        if settings.out_dir:
            with open(os.path.join(settings.out_dir, 'prompts.txt'), 'w') as f:
                f.write(''.join(p + '\n' for p in prompts))
            print(f'saved {n_jobs} PNGs (p<prompt>_s<sample>.png) and prompts.txt in {settings.out_dir}')
        return grid_path, written
    finally:
        if world > 1:
            dist.destroy_process_group()


def main(argv):
    try:
        return sample(configure(SampleConfig(), argv))
    except (SampleError, ConfigError, FileNotFoundError, CheckpointError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        raise SystemExit(1)


if __name__ == '__main__':
    main(sys.argv[1:])
