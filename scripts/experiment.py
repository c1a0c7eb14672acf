"""
The ARRA-vs-baseline experiment on `shapes`: same data, same steps, same seeds, only the training objective differs.

    python scripts/experiment.py                          # the whole table + plot (see README for the time it takes)
    python scripts/experiment.py --arms=baseline,arra --seeds=5
    python scripts/experiment.py --report_only=True       # re-make the table and plot from finished runs

Arms (each a set of train.py overrides on top of the shapes defaults):
    baseline   align_weight=0: plain next-token training (the projector exists but is frozen and unused)
    arra       the paper's defaults: align_weight=1, block-1 hidden states, every image position (<HYBNEXT>)
    rep        the paper's <REP> ablation: only the BOI position is aligned
    late       alignment after a late block (layer 3 of 4; the paper also tried 30 of 32)
    shuffled   control: ARRA's loss, but each image is aligned to ANOTHER image's teacher embedding; it keeps "an
               extra loss of this form" and removes what the teacher knows about the image

Each run trains in stages (resume reproduces an uninterrupted run exactly, and lr_decay_iters pins the schedule),
and after every stage it samples one image for each of the first n_prompts val captions (fixed sampling seed) and
scores them with the shapes evaluator (data/shapes/evaluate.py): prompt accuracy, background coherence, and the
Frechet distance to real val images in the evaluator's feature space. Runs go `parallel` at a time, one thread each.
Results: out_dir/<arm>_s<seed>/metrics.jsonl, then out_dir/results.json, results.md and curves.png.
"""
import os
import sys
import json
import time
import subprocess
from dataclasses import dataclass, asdict

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from configurator import configure  # noqa: E402

ARMS = {
    'baseline': ['--align_weight=0'],
    'arra': [],
    'rep': ['--align_positions=rep'],
    'late': ['--align_layer=3'],
    'shuffled': ['--shuffle_teacher=True'],
}
METRICS = [('val_ce', 'val CE (nats/code)', 'lower'), ('prompt_acc', 'prompt accuracy', 'higher'),
           ('coherence_bg_color', 'bg colour coherence', 'higher'),
           ('coherence_bg_texture', 'bg texture coherence', 'higher'),
           ('frechet_evaluator', 'Frechet dist. (evaluator)', 'lower')]


@dataclass
class ExperimentConfig:
    out_dir: str = 'out/experiment'      # one folder per run, plus the results
    data_dir: str = 'data/shapes'        # prepared shapes (python data/shapes/prepare.py --stage=all)
    arms: str = 'baseline,arra,rep,late,shuffled'  # comma-separated names from ARMS
    seeds: int = 3                       # seeds per arm (seed k uses train.py --seed=k; arms share seeds: paired)
    stages: tuple[int, ...] = (150, 300, 600)  # steps at which each run is scored; the last is the run length
    n_prompts: int = 500                 # val captions sampled (one image each) at every stage
    sample_seed: int = 0                 # the sampling seed, the same for every run
    vqgan: str = ''                      # tokenizer for scoring ('' = the one recorded in the checkpoint)
    cfg_scale: float = 2.0               # sampling settings of the scores (sample.py's defaults)
    temperature: float = 0.7
    rescore: bool = False                # only re-score each run's final checkpoint with the settings above
    parallel: int = 2                    # runs at once; each gets one thread (2 cores -> 2 runs)
    train_args: str = ''                 # extra train.py overrides for every run, space-separated
    report_only: bool = False            # skip training; summarise what is in out_dir
    worker: str = ''                     # internal: 'arm:seed' runs one run in this process


def run_dir(cfg, arm, seed):
    return os.path.join(cfg.out_dir, f'{arm}_s{seed}')


def score_checkpoint(ckpt_path, cfg, evaluator, real_images, prompts):
    """Sample one image per prompt from a checkpoint and score them with the shapes evaluator."""
    import torch
    from contextlib import nullcontext
    from sample import load_gpt, load_matching_vqgan, tokenize_prompts, generate_images
    from data.shapes.evaluate import evaluate_samples
    model, ckpt = load_gpt(ckpt_path, 'cpu')
    vq = load_matching_vqgan(ckpt, cfg.vqgan, 'cpu')  # refuses a tokenizer of another sha256
    text = tokenize_prompts(prompts, model.config.text_len)
    images = []
    for start in range(0, len(prompts), 250):
        g = torch.Generator().manual_seed(cfg.sample_seed + start)
        images.append(generate_images(model, vq, text[start:start + 250], nullcontext(), g, cfg.cfg_scale,
                                      cfg.temperature))
    images = np.concatenate(images)
    metrics = evaluate_samples(images, prompts, evaluator=evaluator, real_images=real_images)
    metrics.update(cfg_scale=cfg.cfg_scale, temperature=cfg.temperature)
    return metrics, images


def rescore(cfg, arms):
    """Score every finished run's final checkpoint again with the current sampling settings (final.json)."""
    from data.shapes.evaluate import get_evaluator, real_val_images
    evaluator, real = get_evaluator(progress=False), real_val_images()
    with open(os.path.join(cfg.data_dir, 'val_captions.txt')) as f:
        prompts = f.read().splitlines()[:cfg.n_prompts]
    for arm in arms:
        for seed in range(cfg.seeds):
            out = run_dir(cfg, arm, seed)
            path = os.path.join(out, 'metrics.jsonl')
            if not os.path.exists(path):
                continue
            last = [json.loads(line) for line in open(path)][-1]
            if last['step'] != cfg.stages[-1]:
                continue
            metrics, _ = score_checkpoint(os.path.join(out, 'ckpt.pt'), cfg, evaluator, real, prompts)
            metrics.update(step=last['step'], val_ce=last['val_ce'])
            with open(os.path.join(out, 'final.json'), 'w') as f:
                json.dump(metrics, f)
            print(f'[{arm} s{seed}] rescored: prompt_acc {metrics["prompt_acc"]:.3f}')


def last_val_ce(log_path, step):
    """The val CE logged at `step` in train.py's log.jsonl."""
    val = None
    with open(log_path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get('iter') == step and rec.get('val_ce') is not None:
                val = rec['val_ce']
    return val


def run_one(cfg, arm, seed):
    """Train one (arm, seed) run stage by stage, scoring each stage. Resumable: finished stages are skipped."""
    from data.shapes.evaluate import get_evaluator, real_val_images
    from utils import save_image_grid
    out = run_dir(cfg, arm, seed)
    os.makedirs(out, exist_ok=True)
    metrics_path = os.path.join(out, 'metrics.jsonl')
    done = set()
    if os.path.exists(metrics_path):
        done = {json.loads(line)['step'] for line in open(metrics_path)}
    evaluator = get_evaluator(progress=False)
    real = real_val_images()
    with open(os.path.join(cfg.data_dir, 'val_captions.txt')) as f:
        prompts = f.read().splitlines()[:cfg.n_prompts]
    final = cfg.stages[-1]
    eval_every = min(b - a for a, b in zip((0,) + tuple(cfg.stages), cfg.stages))
    for k, step in enumerate(cfg.stages):
        if step in done:
            continue
        resume = os.path.exists(os.path.join(out, 'ckpt.pt'))
        cmd = [sys.executable, os.path.join(ROOT, 'train.py'), f'--data_dir={cfg.data_dir}', f'--out_dir={out}',
               f'--seed={seed}', f'--max_iters={step}', f'--lr_decay_iters={final}', f'--eval_interval={eval_every}',
               '--eval_samples=2', '--eval_rows=500', f'--init_from={"resume" if resume else "scratch"}'] + ARMS[arm] + cfg.train_args.split()
        t0 = time.time()
        with open(os.path.join(out, 'train_stdout.txt'), 'a') as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        metrics, images = score_checkpoint(os.path.join(out, 'ckpt.pt'), cfg, evaluator, real, prompts)
        metrics.update(step=step, val_ce=last_val_ce(os.path.join(out, 'log.jsonl'), step),
                       train_s=time.time() - t0)
        with open(metrics_path, 'a') as f:
            f.write(json.dumps(metrics) + '\n')
        if step == final:
            save_image_grid(images[:64], os.path.join(out, 'samples_final.png'), nrow=8, scale=3)
        print(f'[{arm} s{seed}] step {step}: val_ce {metrics["val_ce"]:.4f} prompt_acc {metrics["prompt_acc"]:.3f} '
              f'coh_color {metrics["coherence_bg_color"]:.3f} frechet {metrics["frechet_evaluator"]:.2f}', flush=True)


def launch_all(cfg, jobs):
    """Run the (arm, seed) jobs as worker subprocesses, `parallel` at a time, one thread each."""
    from tqdm import tqdm
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    pending, running = list(jobs), []
    bar = tqdm(total=len(jobs), desc='runs', unit='run')
    failed = []
    while pending or running:
        while pending and len(running) < cfg.parallel:
            arm, seed = pending.pop(0)
            argv = [sys.executable, os.path.abspath(__file__), f'--worker={arm}:{seed}'] + \
                [f'--{k}={v}' for k, v in asdict(cfg).items() if k not in ('worker', 'report_only')]
            log = open(os.path.join(cfg.out_dir, f'worker_{arm}_s{seed}.log'), 'w')
            running.append(((arm, seed), subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for job in list(running):
            if job[1].poll() is not None:
                running.remove(job)
                bar.update(1)
                if job[1].returncode != 0:
                    failed.append(job[0])
                    print(f'run {job[0]} failed: see {cfg.out_dir}/worker_{job[0][0]}_s{job[0][1]}.log')
    bar.close()
    return failed


def summarise(cfg, arms):
    """Mean +/- std per arm and stage, paired differences against the baseline, a markdown table and a plot."""
    from scipy import stats
    runs = {}
    for arm in arms:
        for seed in range(cfg.seeds):
            path = os.path.join(run_dir(cfg, arm, seed), 'metrics.jsonl')
            if os.path.exists(path):
                runs[(arm, seed)] = {r['step']: r for r in map(json.loads, open(path))}
    final = cfg.stages[-1]
    finals = {}  # the table: each run's last stage, or its re-scoring with the current settings (final.json)
    for key, steps in runs.items():
        final_path = os.path.join(run_dir(cfg, *key), 'final.json')
        if os.path.exists(final_path):
            finals[key] = json.load(open(final_path))
        elif final in steps:
            finals[key] = steps[final]
    table = {}
    for arm in arms:
        seeds = [s for s in range(cfg.seeds) if (arm, s) in finals]
        table[arm] = {'seeds': seeds}
        for key, _, _ in METRICS:
            vals = [finals[(arm, s)][key] for s in seeds]
            table[arm][key] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, vals)
    settings = sorted({(f.get('cfg_scale'), f.get('temperature')) for f in finals.values()}, key=str)
    lines = [f'Final step {final}, samples scored at (cfg_scale, temperature) {settings}; mean +/- std over seeds (n per arm in brackets); paired difference against the '
             f'baseline with a paired t-test p-value where both ran.\n',
             '| arm | ' + ' | '.join(name for _, name, _ in METRICS) + ' |',
             '|---|' + '---|' * len(METRICS)]
    for arm in arms:
        cells = []
        for key, _, _ in METRICS:
            mean, std, vals = table[arm][key]
            cells.append(f'{mean:.4f} +/- {std:.4f}' if key == 'val_ce' else f'{mean:.3f} +/- {std:.3f}')
        lines.append(f'| {arm} [{len(table[arm]["seeds"])}] | ' + ' | '.join(cells) + ' |')
    if 'baseline' in arms:
        lines += ['', '| arm - baseline (paired) | ' + ' | '.join(name for _, name, _ in METRICS) + ' |',
                  '|---|' + '---|' * len(METRICS)]
        for arm in arms:
            if arm == 'baseline':
                continue
            common = sorted(set(table[arm]['seeds']) & set(table['baseline']['seeds']))
            cells = []
            for key, _, _ in METRICS:
                d = [finals[(arm, s)][key] - finals[('baseline', s)][key] for s in common]
                p = stats.ttest_rel([finals[(arm, s)][key] for s in common],
                                    [finals[('baseline', s)][key] for s in common]).pvalue if len(common) > 1 else float('nan')
                cells.append(f'{np.mean(d):+.4f} (p={p:.2f})' if d else 'n/a')
            lines.append(f'| {arm} | ' + ' | '.join(cells) + ' |')
    text = '\n'.join(lines)
    print(text)
    with open(os.path.join(cfg.out_dir, 'results.md'), 'w') as f:
        f.write(text + '\n')
    with open(os.path.join(cfg.out_dir, 'results.json'), 'w') as f:
        json.dump({'config': asdict(cfg), 'final': table, 'final_runs': {f'{a}_s{s}': r for (a, s), r in finals.items()},
                   'curves': {f'{a}_s{s}': r for (a, s), r in runs.items()}}, f, indent=1)
    plot_curves(cfg, arms, runs)
    return table


def plot_curves(cfg, arms, runs):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.4))
    for ax, (key, name, better) in zip(axes, METRICS):
        for arm in arms:
            steps = list(cfg.stages)
            vals = np.array([[runs.get((arm, s), {}).get(st, {}).get(key, np.nan) for st in steps]
                             for s in range(cfg.seeds)], dtype=float)
            if np.all(np.isnan(vals)):
                continue
            mean, std = np.nanmean(vals, 0), np.nanstd(vals, 0)
            ax.plot(steps, mean, marker='o', label=arm)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_title(f'{name} ({better} is better)', fontsize=9)
        ax.set_xlabel('training step')
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path = os.path.join(cfg.out_dir, 'curves.png')
    fig.savefig(path, dpi=110)
    print(f'plot: {path}')


def main(cfg):
    arms = [a for a in cfg.arms.split(',') if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f'unknown arms {unknown}; choose from {list(ARMS)}')
    if cfg.worker:
        arm, seed = cfg.worker.split(':')
        run_one(cfg, arm, int(seed))
        return
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.rescore:
        rescore(cfg, arms)
    elif not cfg.report_only:
        if not os.path.exists(os.path.join(cfg.data_dir, 'meta.json')):
            raise SystemExit(f'{cfg.data_dir} is not prepared: run `bash scripts/shapes_pipeline.sh` (or the '
                             f'prepare steps it lists) first')
        from data.shapes.evaluate import get_evaluator
        get_evaluator()  # train the evaluator once, before the workers need it
        # the first two arms (baseline, arra) for every seed first, then the ablations: the main comparison is
        # complete before the extras start
        jobs = [(arm, seed) for seed in range(cfg.seeds) for arm in arms[:2]] + \
               [(arm, seed) for seed in range(cfg.seeds) for arm in arms[2:]]
        t0 = time.time()
        failed = launch_all(cfg, jobs)
        print(f'{len(jobs)} runs in {(time.time() - t0) / 60:.1f} min' + (f'; failed: {failed}' if failed else ''))
    summarise(cfg, arms)


if __name__ == '__main__':
    main(configure(ExperimentConfig(), sys.argv[1:]))
