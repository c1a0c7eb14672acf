"""
Does a text-only LLM's start help a small image model? On shapes, the GPT started from an LLM (--init_from=llm:DIR)
against the same architecture with fresh random weights (--init_from=llm_config:DIR), with and without ARRA, same
seeds, steps, data and schedule. docs/llm-start.md has the commands that make the LLM folder and the data, and the
table this writes.

    python scripts/llm_start.py                          # the runs not done yet, one at a time, then the report
    python scripts/llm_start.py --deadline=20:40         # start no run that would end after 20:40 UTC
    python scripts/llm_start.py --report_only=True       # rebuild the report from results.jsonl

Arms (every other setting shared):
    llm_arra       --init_from=llm:DIR         --align_weight=1 --align_layer=1   (the paper's recipe, lambda 1, block 1)
    random_arra    --init_from=llm_config:DIR  --align_weight=1 --align_layer=1
    llm_plain      --init_from=llm:DIR         --align_weight=0                   (next-token loss only)
    random_plain   --init_from=llm_config:DIR  --align_weight=0
With one seed both starts draw the same new parts (code embedding, BOI, image head, projector): train.py seeds torch
before building either, and the LLM start then overwrites the body only.

Resumable: each finished run appends one line to out_dir/results.jsonl at once and is skipped next time; a run cut
off mid-way continues from its ckpt.pt (train.py --init_from=resume). Runs go seed by seed (all arms of the first seed
first), so a budget cut leaves whole seeds. Each run: train.py (val CE and alignment every eval_interval steps on the
first eval_rows val rows), then one image for each of the first n_prompts val captions scored by the shapes evaluator
(prompt accuracy: scripts/experiment.py score_checkpoint, sample.py's default guidance and temperature).
"""
import os
import sys
import time
import subprocess
from dataclasses import dataclass, asdict
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'scripts'))
from configurator import configure  # noqa: E402
from experiment import read_jsonl, append_jsonl  # noqa: E402  (the regime map's results files, same format)

ARMS = {
    'llm_arra': ('llm', ['--align_weight=1', '--align_layer=1']),
    'random_arra': ('llm_config', ['--align_weight=1', '--align_layer=1']),
    'llm_plain': ('llm', ['--align_weight=0']),
    'random_plain': ('llm_config', ['--align_weight=0']),
}


@dataclass
class LLMStartConfig:
    llm: str = 'out/llm/smollm2-135m-instruct-q4_1'   # the LLM folder (python llm.py convert_gguf ...)
    data_dir: str = 'out/llm_start/data'             # shapes prepared with --text_tokenizer=<llm>
    out_dir: str = 'out/llm_start'                   # runs/<arm>_s<seed>/, results.jsonl, report.md
    arms: str = 'llm_arra,random_arra,llm_plain,random_plain'
    seeds: str = '1337,1338'
    steps: int = 40                  # optimizer steps per run
    eval_interval: int = 10          # val CE / alignment every this many steps: the curves
    eval_rows: int = 48              # the first eval_rows val rows (the same for every run)
    batch_size: int = 8
    learning_rate: float = 3e-4      # peak; warmup then cosine to min_lr at `steps`
    warmup_iters: int = 5
    min_lr: float = 3e-5
    n_prompts: int = 50              # val captions sampled and scored at the end of each run
    deadline: str = ''               # 'HH:MM' (UTC): start no run that would end after it (mean run time so far)
    keep_checkpoints: bool = False   # False: delete a finished run's ckpt.pt (1.6 GB with AdamW's moments)
    report_only: bool = False


def results_path(cfg):
    return os.path.join(cfg.out_dir, 'results.jsonl')


def read_results(cfg):
    return read_jsonl(results_path(cfg))


def train_command(cfg, arm, seed, out, resume):
    kind, args = ARMS[arm]
    init = 'resume' if resume else f'{kind}:{cfg.llm}'
    return [sys.executable, 'train.py', f'--data_dir={cfg.data_dir}', f'--out_dir={out}', f'--init_from={init}',
            f'--seed={seed}', f'--max_iters={cfg.steps}', f'--eval_interval={cfg.eval_interval}',
            f'--eval_rows={cfg.eval_rows}', '--eval_samples=0', f'--batch_size={cfg.batch_size}',
            f'--learning_rate={cfg.learning_rate}', f'--warmup_iters={cfg.warmup_iters}', f'--min_lr={cfg.min_lr}',
            '--log_interval=5', '--peak_flops=1e11', *args]


def run_one(cfg, arm, seed):
    """Train one (arm, seed) run, score it, append its row to results.jsonl. -> the row."""
    from experiment import ExperimentConfig, score_checkpoint
    from data.shapes.evaluate import get_evaluator, real_val_images
    out = os.path.join(cfg.out_dir, 'runs', f'{arm}_s{seed}')
    os.makedirs(out, exist_ok=True)
    resume = os.path.exists(os.path.join(out, 'ckpt.pt'))
    cmd = train_command(cfg, arm, seed, out, resume)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    t0 = time.time()
    with open(os.path.join(out, 'train_stdout.txt'), 'a') as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    t1 = time.time()
    with open(os.path.join(cfg.data_dir, 'val_captions.txt')) as f:
        prompts = f.read().splitlines()[:cfg.n_prompts]
    metrics, _ = score_checkpoint(os.path.join(out, 'ckpt.pt'), ExperimentConfig(), 'default', prompts,
                                  get_evaluator(progress=False), real_val_images(32, 1000))
    t2 = time.time()
    records = read_jsonl(os.path.join(out, 'log.jsonl'))
    evals = [r for r in records if r.get('kind') == 'eval']
    steps = [r for r in records if r.get('kind') == 'train']
    curve = {}
    for r in evals:  # a resumed run may log a step twice: the last one counts
        curve[r['iter']] = dict(val_ce=r['val_ce'], val_align=r.get('val_align'))
    row = dict(arm=arm, seed=seed, steps=cfg.steps, init=ARMS[arm][0], curve=curve,
               val_ce=curve[cfg.steps]['val_ce'], val_align=curve[cfg.steps]['val_align'],
               step_ms_median=sorted(r['dt_ms'] for r in steps)[len(steps) // 2] if steps else None,
               train_s=round(t1 - t0, 1), score_s=round(t2 - t1, 1), resumed=resume,
               train_command=' '.join(cmd[1:]), config=asdict(cfg),
               **{k: metrics[k] for k in ('prompt_acc', 'obj_shape_acc', 'obj_color_acc', 'position_acc',
                                          'count_acc', 'frechet_evaluator', 'cfg_scale', 'temperature', 'n_prompts')})
    append_jsonl(results_path(cfg), row)
    if not cfg.keep_checkpoints:
        os.remove(os.path.join(out, 'ckpt.pt'))
    print(f'[{arm} s{seed}] val CE {row["val_ce"]:.4f}, prompt acc. {row["prompt_acc"]:.3f} '
          f'({row["n_prompts"]} prompts), {row["step_ms_median"] / 1000:.1f} s/step, train {row["train_s"]:.0f} s, '
          f'score {row["score_s"]:.0f} s', flush=True)
    return row


def deadline_epoch(text):
    if not text:
        return None
    now = datetime.now(timezone.utc)
    hh, mm = map(int, text.split(':'))
    return now.replace(hour=hh, minute=mm, second=0, microsecond=0).timestamp()


def run_all(cfg):
    planned = [(arm, int(seed)) for seed in cfg.seeds.split(',') for arm in cfg.arms.split(',')]
    unknown = sorted({a for a, _ in planned} - set(ARMS))
    if unknown:
        sys.exit(f'unknown arms {unknown}; choose from {sorted(ARMS)}')
    done = {(r['arm'], r['seed']) for r in read_results(cfg)}
    durations = [r['train_s'] + r['score_s'] for r in read_results(cfg) if not r['resumed']]
    end = deadline_epoch(cfg.deadline)
    for arm, seed in planned:
        if (arm, seed) in done:
            continue
        if end and durations and time.time() + sum(durations) / len(durations) > end:
            print(f'deadline {cfg.deadline} UTC: not starting {arm} s{seed} (runs take ~'
                  f'{sum(durations) / len(durations):.0f} s)', flush=True)
            break
        row = run_one(cfg, arm, seed)
        durations.append(row['train_s'] + row['score_s'])


def reference_ces(cfg):
    """What a model that ignores the caption and the image so far scores on the same eval rows: the uniform code
    distribution, the train split's code frequencies, and those frequencies per position (add-one smoothed)."""
    import numpy as np
    from data.common import PreparedSplit, read_meta
    meta = read_meta(cfg.data_dir)
    k = meta['codebook_size']
    train = np.asarray(PreparedSplit(cfg.data_dir, 'train', meta).codes, dtype=np.int64)           # (N, T)
    val = np.asarray(PreparedSplit(cfg.data_dir, 'val', meta).codes[:cfg.eval_rows], dtype=np.int64)  # (n, T)
    marginal = (np.bincount(train.ravel(), minlength=k) + 1) / (train.size + k)                    # (K,)
    per_position = np.stack([(np.bincount(train[:, t], minlength=k) + 1) / (len(train) + k)
                             for t in range(train.shape[1])])                                      # (T, K)
    return dict(uniform=float(np.log(k)), code_frequencies=float(-np.log(marginal[val]).mean()),
                code_frequencies_per_position=float(-np.log(per_position[np.arange(val.shape[1]), val]).mean()))


def mean(xs):
    return sum(xs) / len(xs)


def report(cfg):
    """results.jsonl -> out_dir/report.md: per arm the val CE curve, prompt accuracy and cost; the paired
    differences LLM start - random start (same seed, same ARRA setting)."""
    rows = read_results(cfg)
    if not rows:
        return print('no results yet')
    arms = [a for a in ARMS if any(r['arm'] == a for r in rows)]
    iters = sorted({int(i) for r in rows for i in r['curve']})
    lines = [f'| arm | seeds | ' + ' | '.join(f'val CE @{i}' for i in iters) +
             ' | val align @end | prompt acc. | count acc. | Frechet (eval.) | s/step | train s | score s |',
             '|---|---|' + '---|' * len(iters) + '---|---|---|---|---|---|---|']
    for arm in arms:
        rs = sorted((r for r in rows if r['arm'] == arm), key=lambda r: r['seed'])
        ces = [' / '.join(f'{r["curve"][str(i)]["val_ce"]:.3f}' if str(i) in r['curve'] else '-' for r in rs)
               for i in iters]
        align = ' / '.join(f'{r["val_align"]:.3f}' if r['val_align'] is not None else '-' for r in rs)
        acc = ' / '.join(f'{r["prompt_acc"]:.2f}' for r in rs)
        count = ' / '.join(f'{r["count_acc"]:.2f}' for r in rs)
        frechet = ' / '.join(f'{r["frechet_evaluator"]:.0f}' for r in rs)
        lines.append(f'| {arm} | {", ".join(str(r["seed"]) for r in rs)} | ' + ' | '.join(ces) +
                     f' | {align} | {acc} | {count} | {frechet} | {mean([r["step_ms_median"] for r in rs]) / 1000:.1f} | '
                     f'{mean([r["train_s"] for r in rs]):.0f} | {mean([r["score_s"] for r in rs]):.0f} |')
    lines += ['', '| pair (same seed) | seeds | ' + ' | '.join(f'd val CE @{i}' for i in iters) + ' | d prompt acc. |',
              '|---|---|' + '---|' * len(iters) + '---|']
    by = {(r['arm'], r['seed']): r for r in rows}
    for a, b in (('llm_arra', 'random_arra'), ('llm_plain', 'random_plain'), ('llm_arra', 'llm_plain'),
                 ('random_arra', 'random_plain')):
        seeds = sorted(s for (arm, s) in by if arm == a and (b, s) in by)
        if not seeds:
            continue
        diffs = [' / '.join(f'{by[a, s]["curve"][str(i)]["val_ce"] - by[b, s]["curve"][str(i)]["val_ce"]:+.3f}'
                            for s in seeds) for i in iters]
        dacc = ' / '.join(f'{by[a, s]["prompt_acc"] - by[b, s]["prompt_acc"]:+.2f}' for s in seeds)
        lines.append(f'| {a} - {b} | {", ".join(map(str, seeds))} | ' + ' | '.join(diffs) + f' | {dacc} |')
    refs = reference_ces(cfg)
    lines += ['', f'Reference val CE on the same {cfg.eval_rows} rows, no model: ' +
              ', '.join(f'{k.replace("_", " ")} {v:.3f}' for k, v in refs.items())]
    text = '\n'.join(lines)
    with open(os.path.join(cfg.out_dir, 'report.md'), 'w') as f:
        f.write(text + '\n')
    print(text)


def main(argv):
    cfg = configure(LLMStartConfig(), argv)
    os.chdir(ROOT)
    if not cfg.report_only:
        run_all(cfg)
    report(cfg)


if __name__ == '__main__':
    main(sys.argv[1:])
