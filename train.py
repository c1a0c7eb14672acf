"""
Train the text-to-image GPT with ARRA's objective: next-token cross-entropy on the image codes plus `align_weight` x
the global visual alignment loss (arXiv 2503.07334); `--align_weight=0` is the plain next-token baseline through the
same loop. The shape of nanoGPT's train.py: config, setup, data, model, optimizer, loop.

CPU (the shapes default, a few minutes on 2 cores, after the prepare steps of data/shapes/):
    python train.py                                        # ARRA, writes out/shapes/
    python train.py --align_weight=0 --out_dir=out/shapes_baseline
    python train.py --init_from=resume --out_dir=out/shapes --max_iters=1200   # continue (or extend) a run
    python train.py --init_from=llm:path/to/SmolLM2-135M --learning_rate=2e-4 ...  # from a text-only LLM (llm.py)
One GPU:
    python train.py --dataset=imagenet --grad_accum=8      # global batch 8 x 32 = 256, as LlamaGen
One node, 8 GPUs (DDP through torchrun):
    torchrun --nproc_per_node=8 train.py --dataset=imagenet
Models too large for DDP (XL and up): weights, gradients and AdamW states sharded over the ranks (PyTorch FSDP):
    torchrun --nproc_per_node=8 train.py --dataset=imagenet --model=XXL --fsdp=True
Two nodes: the same under `torchrun --nnodes=2 --node_rank=...` (docs/training-at-scale.md).

Writes out_dir/ckpt.pt (atomic; the uncompiled model, optimizer, configs, RNG states, the data's meta.json),
log.jsonl (one JSON line per log / eval), config.json and sample grids. How it works: docs/design-notes.md. Under
torchrun the process group, FSDP's shards and full checkpoints are distributed.py's; the run's files runlog.py's.
"""
import os
import sys
import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass, asdict

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from configurator import configure, config_from_dict, ConfigError
from model import GPT, preset_config, config_from_checkpoint, alignment_objective
from utils import (REPO_ROOT, CheckpointError, atomic_torch_save, load_checkpoint, pick_device, lr_schedule,
                   measure_peak_flops, rng_states, set_rng_states)
from runlog import RunLog, Evaluator, describe_run, logged_alignment
from distributed import process_group, shard_model, gradient_sync, load_optimizer_state, full_state
from data.common import PreparedDataError, open_prepared, Batches, global_batch_rows, uncond_rows, step_seed
from data.common import require_patch_targets

CHECKPOINT_KIND = 'arra-gpt'


@dataclass
class TrainConfig:
    # data
    dataset: str = 'shapes'          # prepared folder data/<dataset>/ ('shapes', 'imagenet', 'folder', ...)
    data_dir: str = ''               # a prepared folder anywhere (overrides dataset)
    out_dir: str = ''                # '' = out/<dataset>: ckpt.pt, log.jsonl, config.json, sample grids
    init_from: str = 'scratch'       # 'scratch', 'resume' (continue out_dir/ckpt.pt: same order, same schedule), or
                                     # 'llm:<folder or hub id>': blocks and text table from a Llama LLM (llm.py)
                                     # 'llm_config:<folder or hub id>': that LLM's architecture, fresh weights
    # model (codebook size, image tokens, text length and teacher width come from the data's meta.json)
    model: str = 'tiny'              # size preset: 'tiny' (4 x 128), or LlamaGen's 'B', 'L', 'XL', 'XXL'
    n_layer: int = 0                 # 0 = the preset's; else overrides it
    n_head: int = 0                  # 0 = the preset's
    n_embd: int = 0                  # 0 = the preset's
    dropout: float = 0.0             # LlamaGen uses 0.1 on ImageNet; the small shapes model does not need it
    image_pos: str = 'rowcol'        # image positions: learned row + column vectors; 'none' = 1-D rotary only
    # ARRA: the alignment loss and what it aligns (model.py, section ARRA)
    align_weight: float = 1.0        # lambda in CE + lambda * (1 - cos); 0 = the plain next-token baseline
    align_layer: int = 1             # align the hidden state after this block (1 = the first, the paper's best)
    align_positions: str = 'hybnext'  # 'hybnext': every image prediction position; 'rep': the BOI position only
    projector_hidden: int = 0        # hidden width of the 2-layer projector; 0 = teacher width (the paper's)
    shuffle_teacher: bool = False    # control: align each image to ANOTHER image's teacher embedding (and patches)
    align_target: str = 'global'     # 'global' (ARRA), 'patch' (REPA's per-cell targets: {split}_teacher_patch.bin),
                                     # or 'both' (the two losses, two projectors); docs/global-vs-patch.md
    patch_weight: float = 0.5        # weight of the patch loss (LlamaGen-REPA's 0.5); align_weight weights the global
    patch_projector: str = 'mlp'     # 'mlp' (the projector's form) or 'repa' (3-layer SiLU MLP, hidden 2048)
    patch_projector_hidden: int = 0  # 0 = patch width ('mlp') or 2048 ('repa')
    # classifier-free guidance
    p_uncond: float = 0.1            # probability that a row's caption is replaced by the empty caption
    # optimization
    batch_size: int = 32             # rows per micro-step on each rank
    grad_accum: int = 1              # micro-steps per optimizer step; global batch = batch_size*grad_accum*ranks
    max_iters: int = 1200            # optimizer steps
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
    eval_interval: int = 400         # val losses + sample grid + checkpoint every this many steps (and at the end)
    eval_rows: int = 1000            # the first eval_rows val rows, always the same ones: comparable across runs
    eval_prompts: int = 8            # sample grid: the first eval_prompts val captions ...
    eval_samples: int = 4            # ... with this many samples each (0 = no grid)
    log_interval: int = 10           # train losses averaged over this many steps, printed and logged
    always_save_checkpoint: bool = True  # False: save only when val CE improves (and never at the end otherwise)
    # system
    device: str = 'auto'             # 'auto': cuda if available; under torchrun, cuda:LOCAL_RANK
    dtype: str = 'auto'              # 'auto': bfloat16 autocast on CUDA, float32 on CPU; or 'float32'
    compile: bool = False            # torch.compile the model (CUDA; slow to start)
    grad_checkpoint: bool = False    # activation checkpointing per block: ~1/3 more compute, activations of one block
    fsdp: bool = False               # shard weights, gradients and AdamW states over the ranks (PyTorch FSDP,
                                     # under torchrun); False = DDP, every rank holds everything
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
# config: defaults, the dataset's recipe, the checkpoint's config when resuming, the command line; checked here

def parse_config(argv):
    """The run's config, checked, and the checkpoint to resume from (or None)."""
    cfg = configure(TrainConfig(), argv)
    if cfg.dataset in DATASET_DEFAULTS:
        cfg = configure(dataclasses.replace(TrainConfig(), **DATASET_DEFAULTS[cfg.dataset]), argv)
    ckpt = None
    if cfg.init_from == 'resume':
        path = os.path.join(resolve_paths(cfg)[1], 'ckpt.pt')
        ckpt = read_resume_checkpoint(path)
        try:
            saved = config_from_dict(TrainConfig, ckpt['config'])
            config_from_checkpoint(ckpt['model_config'])  # refuses a model of an older layout, saying to retrain
        except (ConfigError, TypeError, ValueError) as e:
            raise TrainError(f'{path}: its config does not fit this train.py ({e})') from None
        cfg = configure(saved, argv)
    if cfg.init_from not in ('scratch', 'resume') and not cfg.init_from.startswith(('llm:', 'llm_config:')):
        raise TrainError(f"init_from={cfg.init_from!r}: choose 'scratch', 'resume', 'llm:<folder or hub id>' or "
                         f"'llm_config:<folder or hub id>'")
    if cfg.batch_size < 1 or cfg.grad_accum < 1 or cfg.max_iters < 0 or cfg.eval_interval < 1 or cfg.log_interval < 1:
        raise TrainError('batch_size, grad_accum, eval_interval and log_interval must be >= 1, max_iters >= 0')
    if cfg.fsdp and int(os.environ.get('RANK', -1)) == -1:
        raise TrainError('--fsdp=True shards the model over the ranks of torchrun: launch it with '
                         '`torchrun --nproc_per_node=N train.py ...` (N = 1 works too)')
    if cfg.dtype not in ('auto', 'float32', 'bfloat16'):
        raise TrainError(f"dtype={cfg.dtype!r}: choose 'auto', 'float32' or 'bfloat16' (bf16 only on CUDA)")
    if cfg.dtype == 'bfloat16' and not (pick_device(cfg.device).startswith('cuda') and torch.cuda.is_bf16_supported()):
        raise TrainError('dtype=bfloat16 needs a CUDA device with bf16 support; CPUs train in float32')
    return cfg, ckpt


def read_resume_checkpoint(path):
    if not os.path.exists(path):
        raise TrainError(f'--init_from=resume: no checkpoint at {path}; pass the run\'s --out_dir, or train from '
                         f'scratch first')
    try:
        ckpt = load_checkpoint(path, kind='train first: python train.py')
    except CheckpointError as e:  # corrupt or foreign file (the message says which)
        raise TrainError(str(e)) from None
    required = {'kind', 'model', 'optimizer', 'model_config', 'config', 'iter_num', 'best_val_loss', 'data_meta'}
    if not isinstance(ckpt, dict) or ckpt.get('kind') != CHECKPOINT_KIND or required - set(ckpt):
        kind = ckpt.get('kind') if isinstance(ckpt, dict) else type(ckpt).__name__
        raise TrainError(f'{path} is not a GPT training checkpoint of this project (kind {kind!r}, expected '
                         f'{CHECKPOINT_KIND!r} with keys {sorted(required)}); start with --init_from=scratch')
    return ckpt


# ----------------------------------------------------------------------------------------------------------------
# data: the prepared memmaps of data/<dataset>/ (data/common.py: the arrays, and the order rows are read in)

def resolve_paths(cfg):
    """-> (data_dir, out_dir)."""
    data_dir = cfg.data_dir or os.path.join(REPO_ROOT, 'data', cfg.dataset)
    out_dir = cfg.out_dir or os.path.join('out', os.path.basename(os.path.normpath(data_dir)))
    return data_dir, out_dir


def load_data(cfg):
    """-> (data_dir, out_dir, meta, train split, val split), with errors that name the command to run."""
    data_dir, out_dir = resolve_paths(cfg)
    if not os.path.isdir(data_dir):
        known = sorted(d for d in os.listdir(os.path.join(REPO_ROOT, 'data'))
                       if os.path.isdir(os.path.join(REPO_ROOT, 'data', d)) and not d.startswith(('_', '.')))
        raise TrainError(f'unknown dataset {cfg.dataset!r}: {data_dir} does not exist. Datasets under data/: '
                         f'{", ".join(known)}; or pass --data_dir=FOLDER of a prepared dataset')
    try:
        meta, train_split, val_split = open_prepared(data_dir)
        if cfg.align_target != 'global':  # the patch targets are an optional part of a prepared dir
            require_patch_targets(data_dir, meta, (train_split, val_split))
        return data_dir, out_dir, meta, train_split, val_split
    except PreparedDataError as e:
        raise TrainError(str(e)) from None


# ----------------------------------------------------------------------------------------------------------------
# model

def gpt_overrides(cfg, meta):
    """The GPTConfig fields this run sets: sizes given on the command line, the prepared data's shapes and text ids,
    the ARRA settings."""
    sizes = {k: getattr(cfg, k) for k in ('n_layer', 'n_head', 'n_embd') if getattr(cfg, k)}
    text_ids = {k: meta[k] for k in ('text_vocab_size', 'text_pad_id', 'text_sot_id', 'text_eot_id') if k in meta}
    return dict(**sizes, **text_ids, codebook_size=meta['codebook_size'], image_tokens=meta['image_tokens'],
                image_width=meta['grid'][1], image_pos=cfg.image_pos, text_len=meta['text_len'], dropout=cfg.dropout,
                teacher_dim=meta['teacher_dim'] if cfg.align_target != 'patch' else 0,
                projector_hidden=cfg.projector_hidden, align_layer=cfg.align_layer,
                align_positions=cfg.align_positions, **patch_overrides(cfg, meta))


def patch_overrides(cfg, meta):
    """The patch-head fields of GPTConfig; none for align_target='global' (so such a model_config is as before)."""
    if cfg.align_target == 'global':
        return {}
    return dict(align_target=cfg.align_target, patch_dim=meta['teacher_patch']['dim'],
                patch_projector=cfg.patch_projector, patch_projector_hidden=cfg.patch_projector_hidden)


def gpt_config(cfg, meta):
    """The GPTConfig of a run from scratch: a size preset with gpt_overrides on top."""
    return preset_config(cfg.model, **gpt_overrides(cfg, meta))


def new_model(cfg, meta, data_dir, llm_source, ckpt):
    """A GPT with fresh weights: a size preset, or the body of the LLM llm_source (read from the LLM when starting
    from it, rebuilt from the checkpoint's model_config when resuming such a run)."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    if cfg.init_from.startswith('llm:'):
        from llm import start_from_llm
        return start_from_llm(llm_source, meta, data_dir, gpt_overrides(cfg, meta))
    if cfg.init_from.startswith('llm_config:'):  # the LLM's architecture with fresh weights: the LLM start's control
        from llm import gpt_from_llm_config
        return gpt_from_llm_config(llm_source, **gpt_overrides(cfg, meta))
    if llm_source:
        from llm import llm_gpt_config
        return GPT(llm_gpt_config(ckpt['model_config'], **gpt_overrides(cfg, meta)))
    return GPT(gpt_config(cfg, meta))


def describe_differences(a, b):
    keys = sorted(set(a) | set(b), key=str)
    return ', '.join(f'{k}: {a.get(k)!r} vs {b.get(k)!r}' for k in keys if a.get(k) != b.get(k))


def build_model(cfg, meta, data_dir, ckpt, llm_source):
    """-> (GPTConfig, GPT on the CPU, iter_num, best_val_loss): fresh, or the checkpoint's weights and counters."""
    try:
        model = new_model(cfg, meta, data_dir, llm_source, ckpt)
    except ValueError as e:  # bad sizes, or an LLM that cannot be loaded (llm.LLMError)
        raise TrainError(str(e)) from None
    gpt_conf = model.config
    for head, weight in ((model.projector, cfg.align_weight), (model.patch_projector, cfg.patch_weight)):
        if head is not None and weight == 0:
            head.requires_grad_(False)  # ARRA off (the baseline), or its patch loss off: the head stays as it is
    if ckpt is None:
        return gpt_conf, model, 0, float('inf')
    if ckpt['data_meta'] != meta:
        raise TrainError(f'the checkpoint was trained on different prepared data than {data_dir} holds now '
                         f'({describe_differences(ckpt["data_meta"], meta)}); resume with the same data '
                         f'or start a new run with --init_from=scratch')
    saved_conf = asdict(config_from_checkpoint(ckpt['model_config']))  # fields added since then take defaults
    if saved_conf != asdict(gpt_conf):
        raise TrainError(f'the checkpoint model does not match this config ('
                         f'{describe_differences(saved_conf, asdict(gpt_conf))}); drop the '
                         f'overrides that change the model, or start a new run')
    model.load_state_dict(ckpt['model'], strict=True)
    return gpt_conf, model, ckpt['iter_num'], ckpt['best_val_loss']


def resume_optimizer_and_rng(model, optimizer, ckpt, device_type, fsdp):
    try:
        load_optimizer_state(model, optimizer, ckpt['optimizer'], fsdp)
    except ValueError as e:
        raise TrainError(f'the checkpoint optimizer state does not fit this model ({e}); did align_weight change '
                         f'between 0 and > 0? Resume with the original value') from None
    set_rng_states(ckpt.get('rng', {}), cuda=device_type == 'cuda')


def place_model(cfg, raw_model, ckpt, device, ddp, use_bf16):
    """Put the model on its device and wrap it for this run: activation checkpointing, FSDP shards (before the
    optimizer: it must hold the shards) or DDP, compile; make the optimizer, with its state when resuming.
    -> (the model the loop calls, the optimizer). raw_model stays the unwrapped module."""
    device_type = 'cuda' if device.startswith('cuda') else 'cpu'
    raw_model.to(device)
    raw_model.grad_checkpoint = cfg.grad_checkpoint
    if cfg.fsdp:
        shard_model(raw_model, use_bf16)
    optimizer = raw_model.configure_optimizers(cfg.weight_decay, cfg.learning_rate, (cfg.beta1, cfg.beta2),
                                               device_type)
    if ckpt is not None:
        resume_optimizer_and_rng(raw_model, optimizer, ckpt, device_type, cfg.fsdp)
    model = torch.compile(raw_model) if cfg.compile else raw_model
    if ddp and not cfg.fsdp:  # FSDP's sharding is already in raw_model
        model = DDP(model, device_ids=[torch.device(device).index] if device_type == 'cuda' else None)
    return model, optimizer


def save_checkpoint(out_dir, raw_model, optimizer, gpt_conf, cfg, iter_num, best_val_loss, meta, llm_source, master):
    """Every rank calls it (FSDP gathers the shards); rank 0 writes out_dir/ckpt.pt with everything a resume needs,
    atomically; it loads with weights_only=True. A run started from an LLM records it (llm_source), so its resume
    rebuilds the LLM's body."""
    model_state, optimizer_state = full_state(raw_model, optimizer, cfg.fsdp)
    if not master:
        return
    rng = rng_states(cuda=torch.cuda.is_available() and next(raw_model.parameters()).is_cuda)
    atomic_torch_save({'kind': CHECKPOINT_KIND, 'model': model_state, 'optimizer': optimizer_state,
                       'model_config': asdict(gpt_conf), 'config': asdict(cfg), 'iter_num': iter_num,
                       'best_val_loss': best_val_loss, 'rng': rng, 'data_meta': meta,
                       **({'llm_source': llm_source} if llm_source else {})}, os.path.join(out_dir, 'ckpt.pt'))


# ----------------------------------------------------------------------------------------------------------------
# when a step goes wrong (eval and what the run prints and writes: runlog.py)

def non_finite_error(it, step_losses, grad_norm, out_dir):
    kept = os.path.join(out_dir, 'ckpt.pt')
    kept = kept if os.path.exists(kept) else '(none saved yet)'
    return TrainError(f'iter {it}: the loss or its gradient is not finite (train CE {step_losses[0].item():.4g}, '
                      f'align {step_losses[1].item():.4g}, grad norm {grad_norm.item()}); stopping without this '
                      f'update. The last good checkpoint is kept: {kept}. Lower learning_rate, or check the data.')


# ----------------------------------------------------------------------------------------------------------------
# the training run

def train(cfg, resume_ckpt=None):
    """Run the training described by cfg (under torchrun: one rank of it). Returns the list of logged dicts."""
    with process_group(cfg.device) as (ddp, rank, world, device):
        # setup: precision (bf16 autocast on CUDA only)
        master, device_type = rank == 0, 'cuda' if device.startswith('cuda') else 'cpu'
        use_bf16 = device_type == 'cuda' and cfg.dtype in ('auto', 'bfloat16') and torch.cuda.is_bf16_supported()
        ctx = torch.autocast(device_type='cuda', dtype=torch.bfloat16) if use_bf16 else nullcontext()
        if device_type == 'cuda':
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        # data
        data_dir, out_dir, meta, train_split, val_split = load_data(cfg)
        # model (an LLM start is recorded in the checkpoints, so a resumed run rebuilds the LLM's body)
        llm_source = cfg.init_from.split(':', 1)[1] if cfg.init_from.startswith(('llm:', 'llm_config:')) else \
            (resume_ckpt or {}).get('llm_source')
        gpt_conf, raw_model, iter_num, best_val_loss = build_model(cfg, meta, data_dir, resume_ckpt, llm_source)
        # optimizer, and the model as this run calls it (on its device; FSDP shards or DDP; compiled)
        model, optimizer = place_model(cfg, raw_model, resume_ckpt, device, ddp, use_bf16)
        uncond = raw_model.uncond_text(1)[0]  # the empty caption, swapped in for prompt dropout
        train_batches, val_batches = (Batches(s, device, uncond, cfg.shuffle_teacher, cfg.align_target)
                                      for s in (train_split, val_split))
        peak_flops = cfg.peak_flops or measure_peak_flops(device, torch.bfloat16 if use_bf16 else torch.float32)
        # the run's files and eval
        runlog = RunLog(cfg, out_dir, data_dir, world, master, resume_ckpt and iter_num, raw_model, peak_flops)
        runlog.print(describe_run(cfg, data_dir, meta, (train_split, val_split), raw_model, world, device, use_bf16,
                                  peak_flops))
        evaluator = Evaluator(cfg, val_batches, meta, data_dir, ctx, rank, world, runlog)
        if iter_num == 0 and cfg.max_iters > 0:
            best_val_loss = evaluator.run(model, raw_model, 0, out_dir)  # the starting point of the curves
        global_batch = cfg.batch_size * cfg.grad_accum * world
        runlog.restart_clock()
        bar = tqdm(total=cfg.max_iters, initial=iter_num, desc='train', disable=not master, dynamic_ncols=True)
        while iter_num < cfg.max_iters:
            # learning rate, random numbers and rows of this step: functions of (seed, iter_num), so resume is exact
            lr = lr_schedule(iter_num, cfg.warmup_iters, cfg.lr_decay_iters or cfg.max_iters, cfg.learning_rate,
                             cfg.min_lr, decay=cfg.decay_lr)
            for group in optimizer.param_groups:
                group['lr'] = lr
            torch.manual_seed(step_seed(cfg.seed, rank, iter_num))
            rows = global_batch_rows(iter_num, global_batch, len(train_split), cfg.seed)
            drop = uncond_rows(iter_num, global_batch, cfg.p_uncond, cfg.seed)
            step_losses = torch.zeros(2, device=device, dtype=torch.float64)  # this step's CE and alignment loss
            for micro in range(cfg.grad_accum):
                # get batch: this rank's slice of the global batch, this micro-step's part of it
                lo = (rank * cfg.grad_accum + micro) * cfg.batch_size
                batch = train_batches.get(rows[lo:lo + cfg.batch_size], drop[lo:lo + cfg.batch_size])
                # forward (gradients are reduced across ranks on the last micro-step only)
                with gradient_sync(model, raw_model, cfg.fsdp, micro == cfg.grad_accum - 1), ctx:
                    out = model(*batch)  # text, codes, teacher (None for 'patch'), [teacher_patch]
                # ARRA: next-token CE + align_weight x the global loss + patch_weight x the patch loss (the ones
                # align_target computes; align_weight = 0 with 'global': the plain baseline)
                loss = out.loss + alignment_objective(out, cfg.align_weight, cfg.patch_weight)
                # backward
                (loss / cfg.grad_accum).backward()
                step_losses += torch.stack([out.loss, logged_alignment(out)]).detach().double() / cfg.grad_accum
            # clip; a non-finite norm (the same on every rank) stops all ranks before the weights are touched
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip or float('inf'))
            if cfg.fsdp:  # the norm over all shards, as a replicated DTensor: the plain tensor, the same on every rank
                grad_norm = grad_norm.full_tensor()
            if not torch.isfinite(grad_norm):
                raise non_finite_error(iter_num, step_losses, grad_norm, out_dir)
            # step
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            runlog.add_step(step_losses)
            iter_num += 1
            bar.update(1)
            # log
            if iter_num % cfg.log_interval == 0 or iter_num == cfg.max_iters:
                runlog.record_train(iter_num, lr)
            # eval and checkpoint
            if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
                val_ce = evaluator.run(model, raw_model, iter_num, out_dir)
                improved, best_val_loss = val_ce < best_val_loss, min(best_val_loss, val_ce)
                if cfg.always_save_checkpoint or improved:  # the same on every rank: val CE is all-reduced
                    save_checkpoint(out_dir, raw_model, optimizer, gpt_conf, cfg, iter_num, best_val_loss, meta,
                                    llm_source, master)
                    runlog.print(f'saved {out_dir}/ckpt.pt at iter {iter_num}')
                runlog.restart_clock()  # eval and checkpoint time are not step time
        bar.close()
        return runlog.history


def main(argv):
    try:
        cfg, ckpt = parse_config(argv)
        return train(cfg, ckpt)
    except (TrainError, ConfigError) as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
        raise SystemExit(1)


if __name__ == '__main__':
    main(sys.argv[1:])
