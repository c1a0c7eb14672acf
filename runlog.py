"""
What a training run of train.py prints and writes beside its checkpoint: the summary printed at the start
(describe_run), and RunLog: config.json, log.jsonl (one JSON line per train / eval entry), and the train losses
since the last log line with their time per step, tokens/s and MFU; the Evaluator: val losses and sample grids.
"""
import os
import json
import time
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from sample import TrainingGrid


def describe_run(cfg, data_dir, meta, splits, model, world, device, use_bf16, peak_flops):
    """What is about to be trained, on what: printed once at the start."""
    c, batch = model.config, cfg.batch_size * world
    n_proj = sum(p.numel() for h in (model.projector, model.patch_projector) if h is not None for p in h.parameters())
    trained = any(h is not None and w for h, w in ((model.projector, cfg.align_weight),
                                                   (model.patch_projector, cfg.patch_weight)))
    return '\n'.join(['config:'] + [f'  {k} = {v!r}' for k, v in asdict(cfg).items()] + [
        f'data {data_dir}: {len(splits[0])} train / {len(splits[1])} val rows, {c.image_tokens} codes of '
        f'{c.codebook_size}, text_len {c.text_len}, teacher {meta["teacher"].get("name")} (D = {c.teacher_dim}'
        f'{f", patch targets D_p = {c.patch_dim}" if c.patch_dim else ""}; align_target {c.align_target})',
        f'model: {"blocks and text table from an LLM (llm.py); " if cfg.init_from.startswith("llm:") else ""}'
        f'{model.num_params() / 1e6:.2f}M parameters ({model.num_params(body_only=True) / 1e6:.2f}M body) + '
        f'projector {n_proj / 1e6:.3f}M ({"trained" if trained else "frozen"}); {world} rank(s) on {device} '
        f'({"FSDP" if cfg.fsdp else "DDP" if world > 1 else "one process"}), {"bf16" if use_bf16 else "fp32"}; '
        f'global batch {batch * cfg.grad_accum} rows; peak {peak_flops / 1e9:.1f} GFLOP/s per device '
        f'({"given" if cfg.peak_flops else "measured"})'])


class RunLog:
    """The run's log: config.json and log.jsonl (one JSON line per train / eval entry) in out_dir, written by rank 0
    and made only once all input is checked (bad input leaves no half-made out_dir); .history on every rank; and the
    train losses of the steps since the last log (summed over ranks at the log) with the time they took."""

    def __init__(self, cfg, out_dir, data_dir, world, master, resumed_at, model, peak_flops):
        """resumed_at: the checkpoint's iter_num when resuming (log lines after it are dropped), else None."""
        self.path, self.master, self.history, self.world = os.path.join(out_dir, 'log.jsonl'), master, [], world
        self.window = torch.zeros(3, device=next(model.parameters()).device, dtype=torch.float64)  # CE, align, steps
        seq_len = model.config.text_len + model.config.image_tokens
        self.tokens_per_step = cfg.batch_size * cfg.grad_accum * world * seq_len  # every position, summed over ranks
        self.mfu_of = lambda dt: model.estimate_mfu(cfg.batch_size * cfg.grad_accum, dt, peak_flops)
        if not master:
            return
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, 'config.json'), 'w') as f:
            json.dump(asdict(cfg) | {'resolved_data_dir': data_dir, 'world_size': world}, f, indent=1)
        if resumed_at is None:
            if os.path.exists(os.path.join(out_dir, 'ckpt.pt')):
                self.print(f'note: starting from scratch; {out_dir}/ckpt.pt will be overwritten at the first save')
            open(self.path, 'w').close()
        elif os.path.exists(self.path):  # drop lines a crashed run logged after its last checkpoint
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)['iter'] <= resumed_at]
            with open(self.path, 'w') as f:
                f.writelines(kept)

    def print(self, msg):
        if self.master:
            tqdm.write(msg)

    def record(self, entry, msg):
        self.history.append(entry)
        if self.master:
            with open(self.path, 'a') as f:
                f.write(json.dumps(entry) + '\n')
        self.print(msg)

    def add_step(self, step_losses):
        self.window += torch.cat([step_losses, step_losses.new_ones(1)])

    def restart_clock(self):
        self.t0 = time.time()

    def record_train(self, it, lr):
        """Log the steps since the last call: mean losses, time per step, tokens/s, MFU; start a new window."""
        if self.world > 1:
            dist.all_reduce(self.window)
            self.window /= self.world
        ce, align, n = self.window.tolist()
        dt = (time.time() - self.t0) / n
        e = dict(kind='train', iter=it, train_ce=ce / n, train_align=align / n, lr=lr, dt_ms=1000 * dt,
                 tokens_per_s=self.tokens_per_step / dt, mfu=self.mfu_of(dt))
        self.record(e, f'iter {it}: train CE {e["train_ce"]:.4f}, align {e["train_align"]:.4f}, lr {lr:.2e}, '
                       f'{e["dt_ms"]:.0f} ms/step, {e["tokens_per_s"]:,.0f} tokens/s, MFU {100 * e["mfu"]:.1f}%')
        self.window.zero_()
        self.restart_clock()


def logged_alignment(out):
    """The 'align' of the logs: the global loss, the patch loss, or (align_target='both') their unweighted sum."""
    return sum((x for x in (out.align_loss, out.patch_loss) if x is not None), out.loss.new_zeros(()))


class Evaluator:
    """At every eval: val CE and alignment loss over the first eval_rows val rows (always the same ones, so numbers
    compare across runs), split over the ranks and all-reduced; on rank 0 also a PNG grid of eval_samples samples
    for each of the first eval_prompts val captions, decoded with the tokenizer named in meta.json."""

    def __init__(self, cfg, batches, meta, data_dir, ctx, rank, world, runlog):
        self.cfg, self.batches, self.ctx, self.rank, self.world, self.runlog = cfg, batches, ctx, rank, world, runlog
        self.n_rows, self.grid = min(cfg.eval_rows, len(batches.split)), None
        if cfg.fsdp and cfg.eval_samples > 0:  # sampling runs on rank 0 alone, which FSDP's shards cannot
            runlog.print('note: no sample grids in training under --fsdp=True; draw them from the checkpoint with '
                         'sample.py')
        elif rank == 0 and cfg.eval_samples > 0:
            self.grid = TrainingGrid(meta, data_dir, batches.split, cfg.eval_prompts, cfg.eval_samples, cfg.seed, ctx)
            if self.grid.vq is None:
                runlog.print(f'note: the tokenizer {meta["vqgan"].get("path")} named in meta.json is not here; no '
                             f'sample grids in training')

    def run(self, model, raw_model, it, out_dir):
        """Evaluate, log, draw the grid; returns the val CE."""
        t0 = time.time()
        val = self.losses(model)
        self.runlog.record(dict(kind='eval', iter=it, **val, val_rows=self.n_rows),
                           f'iter {it}: val CE {val["val_ce"]:.4f}, val align {val["val_align"]:.4f} '
                           f'({self.n_rows} rows, {time.time() - t0:.1f}s)')
        if self.grid is not None and self.grid.vq is not None:
            self.runlog.print(f'samples: {self.grid.draw(raw_model, os.path.join(out_dir, f"samples_{it:06d}.png"))}')
        return val['val_ce']

    @torch.no_grad()
    def losses(self, model):
        model = getattr(model, 'module', model)  # DDP's own model: no gradient hooks are needed under no_grad
        model.eval()
        sums = torch.zeros(3, device=self.batches.device, dtype=torch.float64)  # ce * rows, align * rows, rows
        bs = self.cfg.batch_size
        for start in range(self.rank * bs, self.n_rows, self.world * bs):  # rank r: chunks r, r + world, ...
            rows = np.arange(start, min(start + bs, self.n_rows))
            with self.ctx:
                out = model(*self.batches.get(rows))
            sums += torch.stack([out.loss.double(), logged_alignment(out).double(), sums.new_ones(())]) * len(rows)
        if self.world > 1:
            dist.all_reduce(sums)
        model.train()
        return dict(val_ce=(sums[0] / sums[2]).item(), val_align=(sums[1] / sums[2]).item())
