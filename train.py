"""
Train the text-to-image GPT with ARRA's objective: next-token cross-entropy on the image codes plus
`align_weight` x the global visual alignment loss (arXiv 2503.07334). With `--align_weight=0` the very same loop is
the plain next-token baseline. nanoGPT's train.py is the model for the shape of this file.

CPU (the shapes default: a few minutes on 2 cores, after the prepare steps in data/shapes/prepare.py):
    python train.py                                        # ARRA, writes out/shapes/
    python train.py --align_weight=0 --out_dir=out/shapes_baseline
    python train.py --init_from=resume --out_dir=out/shapes --max_iters=1200   # continue (or extend) a run
    python train.py --init_from=llm:path/to/SmolLM2-135M --learning_rate=2e-4 ...  # from a text-only LLM (llm.py)
One GPU:
    python train.py --dataset=imagenet --grad_accum=8      # global batch 8 x 32 = 256, as LlamaGen
One node, 8 GPUs (DDP through torchrun):
    torchrun --nproc_per_node=8 train.py --dataset=imagenet
Two nodes of 8 GPUs (run on each node; node_rank 0 on the node whose address is given):
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \\
        train.py --dataset=imagenet --grad_accum=1 --batch_size=16
    torchrun --nnodes=2 --node_rank=1 --nproc_per_node=8 --master_addr=10.0.0.1 --master_port=29500 \\
        train.py --dataset=imagenet --grad_accum=1 --batch_size=16
  (If the nodes have no Infiniband, prefix NCCL_IB_DISABLE=1.)

What happens, top to bottom:
- Config: `TrainConfig` below, `--key=value` overrides (unknown keys are errors). `--dataset=imagenet` first applies
  the LlamaGen recipe in DATASET_DEFAULTS. The resolved config is printed, saved as out_dir/config.json and stored in
  every checkpoint. `--init_from=resume` starts from the checkpoint's config, then applies the command line.
- Data: the prepared memmaps of data/<dataset>/ (data/common.py), read straight into batches; the teacher never runs
  here, its embeddings are one of the arrays. meta.json must agree with the tokenizer and teacher files it names.
- Order: a global stream of rows, epoch e being a permutation drawn from (seed, e). Optimizer step `it` takes the
  next global batch of batch_size * grad_accum * world_size rows; rank r takes its own contiguous slice. So 2 ranks
  see exactly the rows 1 rank sees with the same global batch, and a resumed run picks up the same order. Prompt
  dropout (classifier-free guidance) is drawn per global row from (seed, it), for the same reason; torch's RNG
  (dropout) is reseeded from (seed, rank, it) at every step, so a resumed run draws the same numbers as well.
- Step: linear warmup + cosine decay (or LlamaGen's constant lr: --decay_lr=False), AdamW (betas 0.9/0.95, weight
  decay on matrices), gradient accumulation with no all-reduce on non-final micro-steps (DDP's no_sync), gradient
  clipping, bf16 autocast on CUDA only (fp32 on CPU), optional torch.compile (the uncompiled weights are saved).
- A non-finite gradient norm (so a NaN/inf loss on any rank) stops the run before the weights are touched; the last
  good checkpoint stays as it was.
- Eval (every eval_interval and at the end, on all ranks, all-reduced): val CE and val alignment loss over a FIXED
  set of val rows, so numbers are comparable between runs; rank 0 also draws samples for the first val prompts and
  saves a PNG grid, decoded with the tokenizer named in meta.json. One JSON line per log / eval goes to
  out_dir/log.jsonl.
- Checkpoint out_dir/ckpt.pt (rank 0, atomic, loads with weights_only=True): the uncompiled model, the optimizer,
  both configs as plain dicts, iter_num, best_val_loss, RNG states, and the dataset's meta.json (which records the
  tokenizer and teacher the model was trained against).

Honest notes:
- tokens/s counts every sequence position the model processes (text + image), summed over ranks.
- MFU divides by a peak measured at start with one large matmul in the training dtype (or --peak_flops): a
  measured peak is below the datasheet's, so this MFU reads higher than one against the datasheet.
- With align_weight=0 the alignment loss is still computed and logged (the projector is frozen and left out of
  the optimizer, so it stays exactly at its initial weights); the number then only says how far a random projection
  of the hidden state is from the teacher.
- shuffle_teacher=True is a control: every image is aligned to another image's teacher embedding (a fixed
  derangement of each split, the same for every seed), which keeps "an extra loss of this form" and removes the
  teacher's information about the image.
"""
import os
import sys
import json
import math
import time
import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, asdict
from functools import lru_cache

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from configurator import configure, config_from_dict, ConfigError
from model import GPT, preset_config, config_from_checkpoint
from utils import REPO_ROOT, atomic_torch_save, load_checkpoint, file_sha256, pick_device
from data.common import PreparedSplit, read_meta

CHECKPOINT_KIND = 'arra-gpt'


@dataclass
class TrainConfig:
    # data
    dataset: str = 'shapes'          # prepared folder data/<dataset>/ ('shapes', 'imagenet', 'folder', ...)
    data_dir: str = ''               # a prepared folder anywhere (overrides dataset)
    out_dir: str = ''                # '' = out/<dataset>: ckpt.pt, log.jsonl, config.json, sample grids
    init_from: str = 'scratch'       # 'scratch', 'resume' (continue out_dir/ckpt.pt: same order, same schedule), or
                                     # 'llm:<folder or hub id>': blocks and text table from a Llama LLM (llm.py)
    # model (codebook size, image tokens, text length and teacher width come from the data's meta.json)
    model: str = 'tiny'              # size preset: 'tiny' (4 x 128), or LlamaGen's 'B', 'L', 'XL', 'XXL'
    n_layer: int = 0                 # 0 = the preset's; else overrides it
    n_head: int = 0                  # 0 = the preset's
    n_embd: int = 0                  # 0 = the preset's
    dropout: float = 0.0             # LlamaGen uses 0.1 on ImageNet; the small shapes model does not need it
    image_pos: str = 'rowcol'        # image positions: learned row + column vectors; 'none' = 1-D rotary only
    # ARRA
    align_weight: float = 1.0        # lambda in CE + lambda * (1 - cos); 0 = the plain next-token baseline
    align_layer: int = 1             # align the hidden state after this block (1 = the first, the paper's best)
    align_positions: str = 'hybnext'  # 'hybnext': every image prediction position; 'rep': the BOI position only
    projector_hidden: int = 0        # hidden width of the 2-layer projector; 0 = teacher width (the paper's)
    shuffle_teacher: bool = False    # control: align each image to ANOTHER image's teacher embedding
    # classifier-free guidance
    p_uncond: float = 0.1            # probability that a row's caption is replaced by the empty caption
    # optimization
    batch_size: int = 32             # rows per micro-step on each rank
    grad_accum: int = 1              # micro-steps per optimizer step; global batch = batch_size*grad_accum*ranks
    max_iters: int = 900             # optimizer steps
    learning_rate: float = 2e-3      # peak learning rate
    decay_lr: bool = True            # warmup + cosine to min_lr; False = constant after warmup (LlamaGen's recipe)
    warmup_iters: int = 50           # linear warmup steps
    lr_decay_iters: int = 0          # the cosine reaches min_lr here; 0 = max_iters (keep it fixed to extend a run)
    min_lr: float = 1e-4             # learning rate at the end of the cosine
    weight_decay: float = 0.05       # AdamW decay on matrices and embeddings (LlamaGen: 0.05)
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0           # clip the global gradient norm; 0 = off
    # eval, logging, checkpoints
    eval_interval: int = 300         # val losses + sample grid + checkpoint every this many steps (and at the end)
    eval_rows: int = 1000            # the first eval_rows val rows, always the same ones: comparable across runs
    eval_prompts: int = 8            # sample grid: the first eval_prompts val captions ...
    eval_samples: int = 4            # ... with this many samples each (0 = no grid)
    log_interval: int = 10           # train losses averaged over this many steps, printed and logged
    always_save_checkpoint: bool = True  # False: save only when val CE improves (and never at the end otherwise)
    # system
    device: str = 'auto'             # 'auto': cuda if available; under torchrun, cuda:LOCAL_RANK
    dtype: str = 'auto'              # 'auto': bfloat16 autocast on CUDA, float32 on CPU; or 'float32'
    compile: bool = False            # torch.compile the model (CUDA; slow to start)
    seed: int = 1337
    peak_flops: float = 0.0          # FLOP/s per device for MFU; 0 = measure a matmul at start


# LlamaGen's class-conditional recipe (GPT-B, global batch 256 = 8 GPUs x 32, lr 1e-4 constant, dropout 0.1,
# 300 epochs of 1.28M images ~ 1.5M steps). Applied under the command line when --dataset=imagenet.
DATASET_DEFAULTS = {
    'imagenet': dict(model='B', batch_size=32, grad_accum=1, learning_rate=1e-4, decay_lr=False, warmup_iters=0,
                     dropout=0.1, max_iters=1_500_000, eval_interval=10_000, eval_rows=10_000, log_interval=100),
}


class TrainError(Exception):
    """A problem with the input (data, checkpoint, config) that the message explains; no traceback needed."""


# ----------------------------------------------------------------------------------------------------------------
# data

def resolve_paths(cfg):
    """-> (data_dir, out_dir)."""
    data_dir = cfg.data_dir or os.path.join(REPO_ROOT, 'data', cfg.dataset)
    out_dir = cfg.out_dir or os.path.join('out', os.path.basename(os.path.normpath(data_dir)))
    return data_dir, out_dir


def prepare_command(data_dir):
    """The command that makes the prepared arrays of data_dir (with what it needs first, for shapes)."""
    if os.path.basename(os.path.normpath(data_dir)) == 'shapes':
        return ('`python data/shapes/prepare.py --stage=all` (it reads the tokenizer and teacher made by '
                '`python vqgan.py --dataset=shapes` and `python teacher.py --dataset=shapes`)')
    script = os.path.join(data_dir, 'prepare.py')
    return f'`python {os.path.relpath(script)}`' if os.path.exists(script) else \
        'the prepare step of this dataset (data/common.py describes the arrays)'


def load_data(cfg):
    """-> (data_dir, meta, train split, val split), with errors that name the command to run."""
    data_dir, _ = resolve_paths(cfg)
    if not os.path.isdir(data_dir):
        known = sorted(d for d in os.listdir(os.path.join(REPO_ROOT, 'data'))
                       if os.path.isdir(os.path.join(REPO_ROOT, 'data', d)) and not d.startswith(('_', '.')))
        raise TrainError(f'unknown dataset {cfg.dataset!r}: {data_dir} does not exist. Datasets under data/: '
                         f'{", ".join(known)}; or pass --data_dir=FOLDER of a prepared dataset')
    command = prepare_command(data_dir)
    if not os.path.exists(os.path.join(data_dir, 'meta.json')):
        raise TrainError(f'{data_dir} is not prepared (no meta.json): run {command}')
    meta = read_meta(data_dir)
    if meta.get('prepare_command'):  # the exact command that made these arrays
        command = f'`{meta["prepare_command"]}`'
    missing = [k for k in ('splits', 'image_tokens', 'codebook_size', 'text_len', 'teacher_dim', 'vqgan', 'teacher')
               if k not in meta]
    if missing or not {'train', 'val'} <= set(meta['splits']):
        raise TrainError(f'{data_dir}/meta.json lacks {missing or "a train and a val split"}: re-run {command}')
    # the arrays must still correspond to the tokenizers and teacher files they were made with
    for what in ('vqgan', 'teacher', 'text_tokenizer'):
        if not isinstance(meta.get(what), dict):  # older meta.json: text_tokenizer 'open_clip bpe'
            continue
        path, sha = meta[what].get('path'), meta[what].get('sha256')
        if path and sha and os.path.isfile(path) and file_sha256(path) != sha:
            raise TrainError(f'{data_dir} was prepared with the {what} file {path} of sha256 {sha[:12]}.., but that '
                             f'file now has sha256 {file_sha256(path)[:12]}.. (retrained?): re-run {command}')
    try:
        train, val = PreparedSplit(data_dir, 'train', meta), PreparedSplit(data_dir, 'val', meta)
    except FileNotFoundError as e:
        raise TrainError(f'{e}: {command}') from None
    return data_dir, meta, train, val


def gpt_overrides(cfg, meta):
    """The GPTConfig fields this run sets: sizes given on the command line, the prepared data's shapes and text ids,
    the ARRA settings."""
    sizes = {k: getattr(cfg, k) for k in ('n_layer', 'n_head', 'n_embd') if getattr(cfg, k)}
    text_ids = {k: meta[k] for k in ('text_vocab_size', 'text_pad_id', 'text_sot_id', 'text_eot_id') if k in meta}
    return dict(**sizes, **text_ids, codebook_size=meta['codebook_size'], image_tokens=meta['image_tokens'],
                image_width=meta['grid'][1], image_pos=cfg.image_pos, text_len=meta['text_len'], dropout=cfg.dropout,
                teacher_dim=meta['teacher_dim'], projector_hidden=cfg.projector_hidden, align_layer=cfg.align_layer,
                align_positions=cfg.align_positions)


def gpt_config(cfg, meta):
    """The GPTConfig of a run from scratch: a size preset with gpt_overrides on top."""
    return preset_config(cfg.model, **gpt_overrides(cfg, meta))


def start_from_llm(source, meta, data_dir, overrides):
    """--init_from=llm:SOURCE -> the GPT with the LLM's weights (llm.py), once the captions of data_dir are known to
    be in the LLM's own tokenizer (its tokenizer.json, by sha256)."""
    from llm import from_pretrained_llm, resolve_llm_dir
    folder = resolve_llm_dir(source)
    tokenizer_file = os.path.join(folder, 'tokenizer.json')
    recorded = meta.get('text_tokenizer')
    if not os.path.isfile(tokenizer_file) or not isinstance(recorded, dict) or \
            recorded.get('sha256') != file_sha256(tokenizer_file):
        used = recorded.get('path') if isinstance(recorded, dict) and recorded.get('path') else 'open_clip BPE'
        command = meta.get('prepare_command', 'the prepare step of this dataset')
        raise TrainError(f'the captions in {data_dir} were tokenized with {used}, not with the tokenizer of the LLM '
                         f'{source} ({tokenizer_file}{"" if os.path.isfile(tokenizer_file) else ", missing"}): '
                         f'prepare them with it: `{command} --text_tokenizer={source}`')
    return from_pretrained_llm(folder, **overrides)


@lru_cache(maxsize=2)
def epoch_permutation(seed, epoch, n):
    """The order of the n training rows in epoch `epoch`: a function of (seed, epoch) only."""
    return np.random.default_rng([seed, 0, epoch]).permutation(n)


def global_batch_rows(it, global_batch, n, seed):
    """Row indices (global_batch,) of optimizer step `it`: positions it*G .. it*G+G-1 of the endless stream of
    epochs (a batch may straddle two epochs)."""
    pos = np.arange(it * global_batch, (it + 1) * global_batch)
    epoch, offset = pos // n, pos % n
    return np.array([epoch_permutation(seed, int(e), n)[o] for e, o in zip(epoch, offset)], dtype=np.int64)


def uncond_rows(it, global_batch, p_uncond, seed):
    """bool (global_batch,): which rows of step `it` get the empty caption (prompt dropout for CFG)."""
    return np.random.default_rng([seed, 1, it]).random(global_batch) < p_uncond


def derangement(n, seed=0):
    """A permutation of range(n) with no fixed point (each row points to another row): shuffle, then map every
    element to the next one around the cycle."""
    order = np.random.default_rng([seed, 2, n]).permutation(n)
    target = np.empty(n, dtype=np.int64)
    target[order] = np.roll(order, -1)
    return target


class Batches:
    """Turns row indices of a split into device tensors: text (B, L) long, codes (B, T) long, teacher (B, D) float."""

    def __init__(self, split, device, uncond_text, shuffle_teacher):
        self.split, self.device, self.uncond_text = split, device, uncond_text.cpu().numpy()
        self.teacher_rows = derangement(len(split)) if shuffle_teacher else None

    def get(self, rows, drop=None):
        text = np.array(self.split.text[rows], dtype=np.int64)                   # (B, L)
        if drop is not None and drop.any():
            text[drop] = self.uncond_text                                        # empty caption [PAD.., SOT, EOT]
        codes = np.array(self.split.codes[rows], dtype=np.int64)                 # (B, T)
        teacher_rows = rows if self.teacher_rows is None else self.teacher_rows[rows]
        teacher = np.array(self.split.teacher[teacher_rows], dtype=np.float32)   # (B, D)
        out = [torch.from_numpy(a) for a in (text, codes, teacher)]
        if 'cuda' in str(self.device):
            return [t.pin_memory().to(self.device, non_blocking=True) for t in out]
        return out


# ----------------------------------------------------------------------------------------------------------------
# schedule, FLOPs, checkpoints

def get_lr(it, cfg):
    """Linear warmup to learning_rate, then cosine down to min_lr at lr_decay_iters (or constant: decay_lr=False)."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / cfg.warmup_iters
    if not cfg.decay_lr:
        return cfg.learning_rate
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if it >= decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def measure_peak_flops(device, dtype):
    """FLOP/s of the best of a few large square matmuls in the training dtype: the peak MFU is measured against."""
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


def step_seed(seed, rank, it):
    """The torch seed of rank `rank` at step `it` (dropout and anything else random that is not the data)."""
    return int(np.random.SeedSequence([seed, 3, rank, it]).generate_state(1)[0])


def read_resume_checkpoint(path):
    ckpt = load_checkpoint(path, kind='train first: python train.py')
    required = {'kind', 'model', 'optimizer', 'model_config', 'config', 'iter_num', 'best_val_loss', 'data_meta'}
    if not isinstance(ckpt, dict) or ckpt.get('kind') != CHECKPOINT_KIND or required - set(ckpt):
        kind = ckpt.get('kind') if isinstance(ckpt, dict) else type(ckpt).__name__
        raise TrainError(f'{path} is not a GPT training checkpoint of this project (kind {kind!r}, expected '
                         f'{CHECKPOINT_KIND!r} with keys {sorted(required)}); start with --init_from=scratch')
    return ckpt


def describe_differences(a, b):
    keys = sorted(set(a) | set(b), key=str)
    return ', '.join(f'{k}: {a.get(k)!r} vs {b.get(k)!r}' for k in keys if a.get(k) != b.get(k))


# ----------------------------------------------------------------------------------------------------------------
# eval

@torch.no_grad()
def evaluate(model, batches, n_rows, cfg, ctx, rank, world):
    """Mean val CE and alignment loss over the first n_rows val rows (no prompt dropout), split over the ranks in
    chunks of batch_size and summed with an all-reduce: the same rows whatever the number of ranks."""
    model.eval()
    sums = torch.zeros(3, device=batches.device, dtype=torch.float64)  # ce * rows, align * rows, rows
    chunks = [np.arange(s, min(s + cfg.batch_size, n_rows)) for s in range(0, n_rows, cfg.batch_size)]
    for rows in chunks[rank::world]:
        text, codes, teacher = batches.get(rows)
        with ctx:
            out = model(text, codes, teacher=teacher)
        sums += torch.stack([out.loss.double() * len(rows), out.align_loss.double() * len(rows),
                             torch.tensor(float(len(rows)), device=sums.device, dtype=torch.float64)])
    if world > 1:
        dist.all_reduce(sums)
    model.train()
    return dict(val_ce=(sums[0] / sums[2]).item(), val_align=(sums[1] / sums[2]).item())


def sample_grid(raw_model, vq, batches, captions, cfg, ctx, path):
    """Rank 0: eval_samples samples for each of the first eval_prompts val captions, one row per prompt, drawn with
    sample.py's defaults and a fixed seed (the same noise at every eval), saved as a PNG grid."""
    from sample import SampleConfig, generate_images
    from utils import save_image_grid
    defaults = SampleConfig()
    n_prompts = min(cfg.eval_prompts, len(batches.split))
    text = torch.from_numpy(np.array(batches.split.text[:n_prompts], dtype=np.int64))  # (P, L)
    text = text.repeat_interleave(cfg.eval_samples, dim=0).to(batches.device)            # (P * S, L)
    generator = torch.Generator(device=batches.device).manual_seed(cfg.seed)
    images = generate_images(raw_model, vq, text, ctx, generator, cfg_scale=defaults.cfg_scale,
                             temperature=defaults.temperature, top_k=defaults.top_k or None,
                             top_p=defaults.top_p if defaults.top_p < 1 else None)     # (P * S, H, W, 3) uint8
    save_image_grid(images, path, nrow=cfg.eval_samples, scale=4, captions=captions[:n_prompts])


# ----------------------------------------------------------------------------------------------------------------
# the training run

def train(cfg, resume_ckpt=None):
    """Run the training described by cfg (under torchrun: one rank of it). Returns the list of logged dicts."""
    # -- processes and devices
    ddp = int(os.environ.get('RANK', -1)) != -1
    if ddp:
        rank, local_rank, world = int(os.environ['RANK']), int(os.environ['LOCAL_RANK']), int(os.environ['WORLD_SIZE'])
        use_cuda = pick_device(cfg.device).startswith('cuda')
        device = f'cuda:{local_rank}' if use_cuda else 'cpu'
        if use_cuda:
            torch.cuda.set_device(device)
        dist.init_process_group(backend='nccl' if use_cuda else 'gloo')
    else:
        rank, local_rank, world = 0, 0, 1
        device = pick_device(cfg.device)
    master = rank == 0
    try:
        return _train(cfg, resume_ckpt, ddp, rank, world, device, master)
    finally:
        if ddp:
            dist.destroy_process_group()


def _train(cfg, resume_ckpt, ddp, rank, world, device, master):
    def log(msg):
        if master:
            print(msg, flush=True)

    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    if cfg.dtype not in ('auto', 'float32', 'bfloat16'):
        raise TrainError(f"dtype={cfg.dtype!r}: choose 'auto', 'float32' or 'bfloat16' (bf16 only on CUDA)")
    use_bf16 = device_type == 'cuda' and cfg.dtype in ('auto', 'bfloat16') and torch.cuda.is_bf16_supported()
    if cfg.dtype == 'bfloat16' and not use_bf16:
        raise TrainError('dtype=bfloat16 needs a CUDA device with bf16 support; CPUs train in float32')
    ctx = torch.autocast(device_type='cuda', dtype=torch.bfloat16) if use_bf16 else nullcontext()
    if device_type == 'cuda':
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.init_from not in ('scratch', 'resume') and not cfg.init_from.startswith('llm:'):
        raise TrainError(f"init_from={cfg.init_from!r}: choose 'scratch', 'resume' or 'llm:<folder or hub id>'")
    if cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.max_iters < 0 or cfg.eval_interval < 1 or cfg.log_interval < 1:
        raise TrainError('batch_size, grad_accum, eval_interval and log_interval must be >= 1, max_iters >= 0')

    # -- data and model
    data_dir, meta, train_split, val_split = load_data(cfg)
    _, out_dir = resolve_paths(cfg)
    # an LLM start is recorded in the checkpoints (llm_source), so a resumed run rebuilds the LLM's body
    llm_source = cfg.init_from[4:] if cfg.init_from.startswith('llm:') else (resume_ckpt or {}).get('llm_source')
    try:
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
        if cfg.init_from.startswith('llm:'):
            raw_model = start_from_llm(llm_source, meta, data_dir, gpt_overrides(cfg, meta))
        elif llm_source:  # resuming a run that started from an LLM: its body is in the checkpoint's model_config
            from llm import llm_gpt_config
            raw_model = GPT(llm_gpt_config(resume_ckpt['model_config'], **gpt_overrides(cfg, meta)))
        else:
            raw_model = GPT(gpt_config(cfg, meta))
        gpt_conf = raw_model.config
    except ValueError as e:  # bad sizes, or an LLM that cannot be loaded (llm.LLMError)
        raise TrainError(str(e)) from None
    if cfg.align_weight == 0:
        raw_model.projector.requires_grad_(False)  # the baseline: the projector takes no part and stays as it is
    iter_num, best_val_loss = 0, float('inf')
    if resume_ckpt is not None:
        if resume_ckpt['data_meta'] != meta:
            raise TrainError(f'the checkpoint was trained on different prepared data than {data_dir} holds now '
                             f'({describe_differences(resume_ckpt["data_meta"], meta)}); resume with the same data '
                             f'or start a new run with --init_from=scratch')
        if resume_ckpt['model_config'] != asdict(gpt_conf):
            raise TrainError(f'the checkpoint model does not match this config ('
                             f'{describe_differences(resume_ckpt["model_config"], asdict(gpt_conf))}); drop the '
                             f'overrides that change the model, or start a new run')
        raw_model.load_state_dict(resume_ckpt['model'], strict=True)
        iter_num, best_val_loss = resume_ckpt['iter_num'], resume_ckpt['best_val_loss']
    raw_model.to(device)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                               device_type)
    if resume_ckpt is not None:
        try:
            optimizer.load_state_dict(resume_ckpt['optimizer'])
        except ValueError as e:
            raise TrainError(f'the checkpoint optimizer state does not fit this model ({e}); did align_weight change '
                             f'between 0 and > 0? Resume with the original value') from None
        rng = resume_ckpt.get('rng', {})
        if 'torch' in rng:
            torch.set_rng_state(rng['torch'])
        if device_type == 'cuda' and rng.get('cuda'):
            torch.cuda.set_rng_state_all(rng['cuda'])
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if ddp:
        model = DDP(model, device_ids=[torch.device(device).index] if device_type == 'cuda' else None)
    eval_model = model.module if ddp else model  # no DDP hooks needed under no_grad

    train_batches = Batches(train_split, device, raw_model.uncond_text(1)[0], cfg.shuffle_teacher)
    val_batches = Batches(val_split, device, raw_model.uncond_text(1)[0], cfg.shuffle_teacher)
    global_batch = cfg.batch_size * cfg.grad_accum * world
    n_eval = min(cfg.eval_rows, len(val_split))
    seq_len = gpt_conf.text_len + gpt_conf.image_tokens
    peak_flops = cfg.peak_flops or measure_peak_flops(device, torch.bfloat16 if use_bf16 else torch.float32)

    # -- report, and the run's files (only now: bad input never leaves a half-made out_dir behind)
    log(f'config:\n' + '\n'.join(f'  {k} = {v!r}' for k, v in asdict(cfg).items()))
    log(f'data {data_dir}: {len(train_split)} train / {len(val_split)} val rows, {gpt_conf.image_tokens} codes of '
        f'{gpt_conf.codebook_size}, text_len {gpt_conf.text_len}, teacher {meta["teacher"].get("name")} '
        f'(D = {gpt_conf.teacher_dim})')
    if llm_source:
        log(f'model: blocks and text table from the LLM {llm_source} (the --model preset is not used)')
    log(f'model: {raw_model.num_params() / 1e6:.2f}M parameters ({raw_model.num_params(body_only=True) / 1e6:.2f}M '
        f'body) + projector {sum(p.numel() for p in raw_model.projector.parameters()) / 1e6:.3f}M '
        f'({"trained" if cfg.align_weight else "frozen"}); {world} rank(s) on {device}, '
        f'{"bf16 autocast" if use_bf16 else "fp32"}; global batch {global_batch} rows = {global_batch * seq_len:,} '
        f'tokens; peak {peak_flops / 1e9:.1f} GFLOP/s per device ({"given" if cfg.peak_flops else "measured"})')
    log_path = os.path.join(out_dir, 'log.jsonl')
    if master:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, 'config.json'), 'w') as f:
            json.dump(asdict(cfg) | {'resolved_data_dir': data_dir, 'world_size': world}, f, indent=1)
        if resume_ckpt is None:
            if os.path.exists(os.path.join(out_dir, 'ckpt.pt')):
                log(f'note: starting from scratch; {out_dir}/ckpt.pt will be overwritten at the first save')
            open(log_path, 'w').close()
        elif os.path.exists(log_path):  # drop lines a crashed run logged after its last checkpoint
            with open(log_path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)['iter'] <= iter_num]
            with open(log_path, 'w') as f:
                f.writelines(kept)
    history = []

    def record(entry):
        history.append(entry)
        if master:
            with open(log_path, 'a') as f:
                f.write(json.dumps(entry) + '\n')

    def save_checkpoint():
        cpu_rng = {'torch': torch.get_rng_state()}
        if device_type == 'cuda':
            cpu_rng['cuda'] = torch.cuda.get_rng_state_all()
        atomic_torch_save({'kind': CHECKPOINT_KIND, 'model': raw_model.state_dict(),
                           'optimizer': optimizer.state_dict(), 'model_config': asdict(gpt_conf),
                           'config': asdict(cfg), 'iter_num': iter_num, 'best_val_loss': best_val_loss,
                           'rng': cpu_rng, 'data_meta': meta, **({'llm_source': llm_source} if llm_source else {})},
                          os.path.join(out_dir, 'ckpt.pt'))
        log(f'saved {os.path.join(out_dir, "ckpt.pt")} at iter {iter_num}')

    vq, vq_note = None, None
    captions = []
    if master and cfg.eval_samples > 0:
        vq_path = meta['vqgan'].get('path')
        if vq_path and os.path.isfile(vq_path):
            from vqgan import load_vqgan
            vq = load_vqgan(vq_path).to(device)
            cap_file = os.path.join(data_dir, meta.get('captions', {}).get('val', 'val_captions.txt'))
            if os.path.exists(cap_file):
                with open(cap_file) as f:
                    captions = f.read().splitlines()
        else:
            log(f'note: the tokenizer {vq_path} named in meta.json is not here; no sample grids during training')

    def run_eval():
        nonlocal best_val_loss
        t0 = time.time()
        result = evaluate(eval_model, val_batches, n_eval, cfg, ctx, rank, world)
        improved = result['val_ce'] < best_val_loss
        best_val_loss = min(best_val_loss, result['val_ce'])
        entry = dict(kind='eval', iter=iter_num, **result, val_rows=n_eval)
        record(entry)
        log(f'iter {iter_num}: val CE {result["val_ce"]:.4f}, val align {result["val_align"]:.4f} '
            f'({n_eval} rows, {time.time() - t0:.1f}s)')
        if vq is not None:
            path = os.path.join(out_dir, f'samples_{iter_num:06d}.png')
            sample_grid(raw_model, vq, val_batches, captions, cfg, ctx, path)
            log(f'samples: {path}')
        return improved

    # -- the loop
    from tqdm import tqdm
    if iter_num == 0 and cfg.max_iters > 0:
        run_eval()  # the starting point of the curves
    window = torch.zeros(3, device=device, dtype=torch.float64)  # sum of step CE, sum of step align, steps
    t_window = time.time()
    bar = tqdm(total=cfg.max_iters, initial=iter_num, desc='train', disable=not master, dynamic_ncols=True)
    while iter_num < cfg.max_iters:
        lr = get_lr(iter_num, cfg)
        for group in optimizer.param_groups:
            group['lr'] = lr
        torch.manual_seed(step_seed(cfg.seed, rank, iter_num))
        rows = global_batch_rows(iter_num, global_batch, len(train_split), cfg.seed)
        drop = uncond_rows(iter_num, global_batch, cfg.p_uncond, cfg.seed)
        step_ce = step_align = 0.0
        for micro in range(cfg.grad_accum):
            lo = (rank * cfg.grad_accum + micro) * cfg.batch_size  # this rank's slice, this micro-step's part
            text, codes, teacher = train_batches.get(rows[lo:lo + cfg.batch_size], drop[lo:lo + cfg.batch_size])
            last = micro == cfg.grad_accum - 1
            with (model.no_sync() if ddp and not last else nullcontext()):  # all-reduce once, on the last backward
                with ctx:
                    out = model(text, codes, teacher=teacher)
                    loss = out.loss + cfg.align_weight * out.align_loss if cfg.align_weight else out.loss
                (loss / cfg.grad_accum).backward()
            step_ce = step_ce + out.loss.detach().double() / cfg.grad_accum
            step_align = step_align + out.align_loss.detach().double() / cfg.grad_accum
        # the norm of the all-reduced gradient is the same number on every rank, so all ranks stop together
        grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float('inf'))
        if not torch.isfinite(grad_norm):
            kept = os.path.join(out_dir, 'ckpt.pt')
            raise TrainError(f'iter {iter_num}: the loss or its gradient is not finite (train CE {step_ce.item():.4g}, '
                             f'align {step_align.item():.4g}, grad norm {grad_norm.item()}); stopping without '
                             f'this update. The last good checkpoint is kept: '
                             f'{kept if os.path.exists(kept) else "(none saved yet)"}. Lower learning_rate, or '
                             f'check the data.')
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window += torch.stack([step_ce, step_align, torch.ones((), device=device, dtype=torch.float64)])
        iter_num += 1
        bar.update(1)

        if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
            if ddp:
                dist.all_reduce(window)
                window /= world
            steps = window[2].item()
            dt = (time.time() - t_window) / steps
            entry = dict(kind='train', iter=iter_num, train_ce=window[0].item() / steps,
                         train_align=window[1].item() / steps, lr=lr, dt_ms=1000 * dt,
                         tokens_per_s=global_batch * seq_len / dt,
                         mfu=raw_model.estimate_mfu(cfg.batch_size * cfg.grad_accum, dt, peak_flops))
            record(entry)
            bar.set_postfix(ce=f'{entry["train_ce"]:.4f}', align=f'{entry["train_align"]:.4f}')
            if master:
                bar.write(f'iter {iter_num}: train CE {entry["train_ce"]:.4f}, align {entry["train_align"]:.4f}, '
                          f'lr {lr:.2e}, {entry["dt_ms"]:.0f} ms/step, {entry["tokens_per_s"]:,.0f} tokens/s, '
                          f'MFU {100 * entry["mfu"]:.1f}%')
            window.zero_()
            t_window = time.time()

        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            improved = run_eval()
            if master and (cfg.always_save_checkpoint or improved):
                save_checkpoint()
            t_window = time.time()  # eval time is not step time
    bar.close()
    return history


def parse_config(argv):
    """The run's config: defaults (with the dataset's recipe), the checkpoint's config when resuming, then argv.
    Returns (config, checkpoint or None)."""
    cfg = configure(TrainConfig(), argv)
    if cfg.dataset in DATASET_DEFAULTS:
        cfg = configure(dataclasses.replace(TrainConfig(), **DATASET_DEFAULTS[cfg.dataset]), argv)
    if cfg.init_from != 'resume':
        return cfg, None
    path = os.path.join(resolve_paths(cfg)[1], 'ckpt.pt')
    if not os.path.exists(path):
        raise TrainError(f'--init_from=resume: no checkpoint at {path}; pass the run\'s --out_dir, or train from '
                         f'scratch first')
    try:
        ckpt = read_resume_checkpoint(path)
        config_from_checkpoint(ckpt['model_config'])  # refuses a model of an older layout
    except (RuntimeError, ValueError, TypeError) as e:  # corrupt, foreign or outdated file (the message says which)
        raise TrainError(f'{path}: {e}') from None
    try:
        saved = config_from_dict(TrainConfig, ckpt['config'])
    except (ConfigError, TypeError) as e:
        raise TrainError(f'{path}: its config does not fit this train.py ({e})') from None
    return configure(saved, argv), ckpt


def main(argv):
    try:
        cfg, ckpt = parse_config(argv)
        return train(cfg, ckpt)
    except (TrainError, ConfigError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        raise SystemExit(1)


if __name__ == '__main__':
    main(sys.argv[1:])
