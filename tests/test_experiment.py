"""Tests of scripts/experiment.py without training anything: cells and plans, the CPU estimate, and the report built
from a results file of made-up runs (tables, paired statistics checked against scipy, the curve figure)."""
import os
import sys
import json

import numpy as np
import pytest
from scipy import stats

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts'))
import experiment as ex  # noqa: E402

SEEDS = (0, 1, 2)
STEPS = (250, 1000)


def fake_row(cell, seed, step, rng, shift=0.0):
    """One results.jsonl line of a made-up run: metrics drawn around a value the cell's shift moves."""
    c = ex.Cell.parse(cell)
    row = dict(run=f'{c.name}_s{seed}', cell=str(c), world=c.world, teacher=c.teacher, seed=seed, step=step,
               val_ce=2.0 - step / 1000 + 0.1 * shift + 0.01 * rng.standard_normal(),
               prompt_acc=0.1 + step / 10000 + shift * 0.02 + 0.01 * rng.standard_normal(),
               frechet_evaluator=900 - 100 * shift + 10 * rng.standard_normal(),
               coherence_bg_color=0.95 + 0.01 * rng.standard_normal(), n_prompts=1000)
    if c.world == 'plan':
        row |= dict(count_acc=0.5 + 0.1 * shift, objects_acc=0.2, relation_acc=0.3 + 0.05 * shift)
    return row


@pytest.fixture
def results(tmp_path):
    """A results.jsonl with a baseline and two ARRA cells over 3 seeds on the default world, a plan-world pair, and
    one stage written twice (a re-scored stage: the last line wins)."""
    rng = np.random.default_rng(0)
    rows = []
    cells = {'default:none:0:4:1': 0.0, 'default:clip:1:4:1': -1.0, 'default:scene:0.3:4:1': 1.5,
             'default:clip_shuffled:1:4:1': -0.5, 'plan:none:0:4:1': 0.0, 'plan:scene:1:4:1': 1.0}
    for cell, shift in cells.items():
        for seed in SEEDS:
            for step in STEPS:
                rows.append(fake_row(cell, seed, step, rng, shift))
    stale = dict(rows[0], prompt_acc=-5.0)       # an earlier scoring of the same stage, later replaced
    rows.insert(0, stale)
    with open(tmp_path / 'results.jsonl', 'w') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in rows))
    return tmp_path, rows[1:]


def test_cell_parse_round_trip_and_errors():
    """A cell prints as it parses; the baseline is one cell per world and depth; malformed cells name the fix."""
    for text in ('default:clip:1:4:1', 'plan:scene_shuffled:0.3:8:3', 'default:clip_strong:0.1:4:1'):
        assert str(ex.Cell.parse(text)) == text
    assert ex.Cell.parse('plan:scene:1:8:3').baseline == ex.Cell.parse('plan:none:0:8:1')
    assert ex.Cell.parse('default:clip_shuffled:1:4:1').kind == 'clip'
    assert ex.Cell.parse('default:none:0:4:1').kind == 'clip'  # the baseline reads the clip dir (teacher unused)
    for bad in ('default:clip:1:4', 'moon:clip:1:4:1', 'default:dino:1:4:1', 'default:none:1:4:1',
                'default:clip:0:4:1', 'default:clip:1:4:5', 'default:none_shuffled:0:4:1', 'default:clip:x:4:1'):
        with pytest.raises(ValueError, match='cell'):
            ex.Cell.parse(bad)


def test_screen_plan_has_every_arm_and_a_baseline_for_each_depth():
    cfg = ex.ExperimentConfig()
    runs = ex.planned_runs(cfg)
    cells = [c for c, _, _ in runs]
    assert len(cells) == len(set(cells)) == 15 and {s for _, s, _ in runs} == {0} and {n for _, _, n in runs} == {1000}
    for w in ('default', 'plan'):
        assert ex.Cell.parse(f'{w}:clip:1:4:1') in cells and ex.Cell.parse(f'{w}:clip_shuffled:1:4:1') in cells
        assert {c.align_weight for c in cells if c.world == w and c.teacher == 'scene'} == {0.3, 1.0}
    assert all(c.baseline in cells for c in cells)
    assert ex.Cell.parse('default:clip:1:8:3') in cells and ex.Cell.parse('plan:clip_strong:1:4:1') in cells
    # --cells: each named cell with its baseline (once, however many cells share it), seed by seed
    one = ex.planned_runs(ex.ExperimentConfig(worlds='plan', cells='plan:scene:1:4:1,plan:clip:1:4:1,plan:none:0:4:1',
                                              seeds=5, steps=3000))
    named = [ex.Cell.parse(c) for c in ('plan:none:0:4:1', 'plan:scene:1:4:1', 'plan:clip:1:4:1')]
    assert one == [(c, s, 3000) for s in range(5) for c in named]


def test_confirm_plan_takes_the_best_screened_cell(results):
    """'auto' picks, per world, the cell with the largest paired prompt-accuracy gain (the shuffled control and the
    baselines excluded); confirm runs it, its baseline and the paper's defaults with 3 seeds, controls with one."""
    out, rows = results
    assert ex.best_cell(rows, 'default') == ex.Cell.parse('default:scene:0.3:4:1')
    cfg = ex.ExperimentConfig(out_dir=str(out), plan='confirm')
    runs = ex.planned_runs(cfg)
    three = {c for c, s, _ in runs if s == 2}
    assert {ex.Cell.parse(c) for c in ('default:none:0:4:1', 'default:clip:1:4:1', 'default:scene:0.3:4:1',
                                       'plan:none:0:4:1', 'plan:clip:1:4:1', 'plan:scene:1:4:1')} == three
    controls = {c for c, s, _ in runs if c not in three}
    assert controls == {ex.Cell.parse(c) for c in ('default:clip_shuffled:1:4:1', 'default:scene_shuffled:0.3:4:1',
                                                   'default:scene:1:4:1', 'plan:clip_shuffled:1:4:1',
                                                   'plan:scene_shuffled:1:4:1')}
    assert all(s == 0 for c, s, _ in runs if c in controls) and {n for _, _, n in runs} == {1000}
    # curves: seed 0 of the baseline, the paper's defaults, the best cell and the oracle, to 3000 steps
    curves = ex.planned_runs(ex.ExperimentConfig(out_dir=str(out), plan='curves', worlds='default'))
    assert curves == [(ex.Cell.parse(c), 0, 3000) for c in ('default:none:0:4:1', 'default:clip:1:4:1',
                                                            'default:scene:0.3:4:1', 'default:scene:1:4:1')]
    with pytest.raises(ValueError, match='run the screen first'):
        ex.best_cell(rows, 'plan', full_score_steps=(5000,))


def test_paired_test_matches_scipy():
    rng = np.random.default_rng(3)
    for n in (2, 3, 5, 8):
        x, y = rng.standard_normal(n), rng.standard_normal(n)
        diff, t, p = ex.paired_test(x, y)
        ref = stats.ttest_rel(x, y)
        assert diff == pytest.approx(np.mean(x - y)) and t == pytest.approx(ref.statistic)
        assert p == pytest.approx(ref.pvalue)
    assert np.isnan(ex.paired_test([1.0], [0.5])[2]) and ex.paired_test([1.0], [0.5])[0] == 0.5


def test_summary_rows_and_paired_statistics(results):
    """Each (world, full-score step) table has a row per cell with mean +/- std over its seeds, and the paired
    difference against its baseline with scipy's ttest_rel p; the re-scored stage replaces the earlier line."""
    out, rows = results
    summary = ex.summarise(ex.load_results(str(out)), (1000,))
    assert list(summary) == ['default@1000', 'plan@1000']
    table = summary['default@1000']
    assert list(table) == ['default:none:0:4:1', 'default:clip:1:4:1', 'default:clip_shuffled:1:4:1',
                           'default:scene:0.3:4:1']
    pick = lambda cell, key: [r[key] for r in rows if r['cell'] == cell and r['step'] == 1000]  # noqa: E731
    for cell, e in table.items():
        assert e['seeds'] == list(SEEDS)
        for key in ('prompt_acc', 'val_ce', 'frechet_evaluator'):
            mean, std, _ = e['metrics'][key]
            assert mean == pytest.approx(np.mean(pick(cell, key))) and std == pytest.approx(np.std(pick(cell, key),
                                                                                                   ddof=1))
            if cell != 'default:none:0:4:1':
                diff, t, p, n = e['paired'][key]
                ref = stats.ttest_rel(pick(cell, key), pick('default:none:0:4:1', key))
                assert n == 3 and p == pytest.approx(ref.pvalue) and t == pytest.approx(ref.statistic)
    assert 'paired' not in table['default:none:0:4:1']
    assert summary['plan@1000']['plan:scene:1:4:1']['metrics']['relation_acc'][0] == pytest.approx(0.35)


def fake_teacher_dir(data_root, world, kind, r2, metrics=None):
    """A prepared dir's meta.json (and, for a CLIP kind, a teacher.pt holding train_teacher.py's metrics)."""
    import torch
    d = data_root / f'shapes_{world}_{kind}'
    d.mkdir(parents=True)
    teacher = dict(sha256='0' * 64, path=None)
    if metrics is not None:
        teacher['path'] = str(d / 'teacher.pt')
        torch.save(dict(kind='arra-teacher', metrics=metrics, iter_num=400), teacher['path'])
    (d / 'meta.json').write_text(json.dumps(dict(teacher=teacher, teacher_caption_r2=dict(r2=r2))))


def test_report_only_rebuilds_table_and_figure(results, capsys):
    out, rows = results
    fake_teacher_dir(out / 'data', 'default', 'clip', 0.776, dict(top1=0.568, top1_in_group=0.908,
                                                                   probe_bg_color=1.0, probe_bg_texture=0.97))
    fake_teacher_dir(out / 'data', 'plan', 'scene', 0.36)
    ex.main(ex.ExperimentConfig(out_dir=str(out), report_only=True, full_score_steps=(1000,),
                                data_root=str(out / 'data')))
    md = (out / 'results.md').read_text()
    assert '### default world, step 1000' in md and '### plan world, step 1000' in md
    line = next(l for l in md.splitlines() if l.startswith('| default:scene:0.3:4:1 |'))
    vals = [r['prompt_acc'] for r in rows if r['cell'] == 'default:scene:0.3:4:1' and r['step'] == 1000]
    base = [r['prompt_acc'] for r in rows if r['cell'] == 'default:none:0:4:1' and r['step'] == 1000]
    cells = [c.strip() for c in line.strip('|').split('|')]
    assert cells[1] == '3' and cells[2] == f'{np.mean(vals):.3f} +/- {np.std(vals, ddof=1):.3f}'
    assert cells[3] == f'{np.mean(vals) - np.mean(base):+.3f} (p={stats.ttest_rel(vals, base).pvalue:.3f})'
    plan_header = next(l for l in md.splitlines() if l.startswith('| cell |') and 'relation acc.' in l)
    assert 'count acc.' in plan_header and 'objects acc.' in plan_header
    assert (out / 'curves.png').stat().st_size > 10_000 and json.loads((out / 'results.json').read_text())['summary']
    # the teachers' table: one row per prepared dir, the CLIP's saved metrics, every kind's caption R^2
    assert '| default | clip | 400 | 0.568 | 0.908 | 1.000 / 0.970 | 0.776 |' in md.splitlines()
    assert '| plan | scene | - | n/a | n/a | n/a | 0.360 |' in md.splitlines()
    assert len(json.loads((out / 'results.json').read_text())['teachers']) == 2


def test_dry_run_estimates_only_the_work_left(tmp_path, capsys):
    """A run with stages already scored costs less than one not started; the printout lists every run."""
    cfg = ex.ExperimentConfig(out_dir=str(tmp_path), cells='default:clip:1:4:1,default:none:0:4:1', steps=1000,
                              data_root=str(tmp_path / 'data'))
    cell = ex.Cell.parse('default:clip:1:4:1')
    fresh = ex.estimate_cpu_s(cfg, cell, 0, 1000)
    os.makedirs(ex.run_dir(cfg, cell, 0))
    with open(os.path.join(ex.run_dir(cfg, cell, 0), 'metrics.jsonl'), 'w') as f:
        f.write(json.dumps(dict(step=250)) + '\n' + json.dumps(dict(step=500)) + '\n')
    left = ex.estimate_cpu_s(cfg, cell, 0, 1000)
    assert left == pytest.approx(500 * ex.SEC_PER_STEP(4) + cfg.n_prompts * ex.SEC_PER_PROMPT(4)) and left < fresh
    ex.main(ex.ExperimentConfig(**{**cfg.__dict__, 'dry_run': True}))
    text = capsys.readouterr().out
    assert 'default_clip_w1_L4b1' in text and 'default_baseline_L4' in text and 'CPU-hours' in text
    assert not os.path.exists(tmp_path / 'data')  # nothing prepared or run
    with pytest.raises(SystemExit, match='stages'):
        ex.main(ex.ExperimentConfig(**{**cfg.__dict__, 'dry_run': True, 'steps': 1500}))


def test_paired_curve_is_the_mean_same_seed_difference(results):
    """The figure's lines: cell minus baseline over the seeds both have at each step; a seed the baseline lacks is
    left out rather than compared with another seed's baseline."""
    _, rows = results
    rows = [r for r in rows if not (r['cell'] == 'default:none:0:4:1' and r['seed'] == 2 and r['step'] == 1000)]
    steps, diffs, ns = ex.paired_curve(rows, 'default:scene:0.3:4:1', 'prompt_acc')
    assert steps == list(STEPS) and ns == [3, 2]
    value = {(r['cell'], r['seed'], r['step']): r['prompt_acc'] for r in rows}
    for step, diff, seeds in zip(steps, diffs, ([0, 1, 2], [0, 1])):
        expect = np.mean([value['default:scene:0.3:4:1', s, step] - value['default:none:0:4:1', s, step]
                          for s in seeds])
        assert diff == pytest.approx(expect)


# ----------------------------------------------------------------------------------------------------------------
# global vs patch targets

def test_the_target_is_a_field_of_the_cell():
    """A sixth field names the target; global cells print (and name their runs) as before; the baseline has none;
    a patch cell's weight becomes the patch loss's, a both cell's weights both losses."""
    for text in ('plan:clip:0.5:4:1:patch', 'default:clip_shuffled:0.5:4:1:patch', 'plan:scene:0.5:8:3:both'):
        assert str(ex.Cell.parse(text)) == text
    assert str(ex.Cell.parse('default:clip:1:4:1:global')) == 'default:clip:1:4:1'
    assert ex.Cell.parse('default:clip:1:4:1:global').name == ex.Cell.parse('default:clip:1:4:1').name
    patch = ex.Cell.parse('plan:clip:0.5:4:1:patch')
    assert patch.name == 'plan_clip_w0.5_L4b1_patch' and patch.baseline == ex.Cell.parse('plan:none:0:4:1')
    assert ex.shuffled_twin(patch) == ex.Cell.parse('plan:clip_shuffled:0.5:4:1:patch')
    assert patch.train_args()[-2:] == ['--align_target=patch', '--patch_weight=0.5']
    assert '--align_target=both' in ex.Cell.parse('plan:clip:0.5:4:1:both').train_args()
    assert not any('align_target' in a for a in ex.Cell.parse('plan:clip:1:4:1').train_args())
    for bad in ('plan:clip:0.5:4:1:cells', 'plan:clip:0.5:4:1:patch:x'):
        with pytest.raises(ValueError, match='cell'):
            ex.Cell.parse(bad)
    # every train.py flag a cell writes is a real one (configurator rejects unknown keys)
    import train
    train.configure(train.TrainConfig(), ex.Cell.parse('plan:clip_shuffled:0.5:4:1:both').train_args())


def test_targets_plan_screens_every_target_and_the_controls_per_world(tmp_path):
    cfg = ex.ExperimentConfig(plan='targets', out_dir=str(tmp_path), data_root=str(tmp_path / 'data'))
    runs = ex.planned_runs(cfg)
    assert {s for _, s, _ in runs} == {0} and {n for _, _, n in runs} == {1000}
    for w in ('plan', 'default'):
        got = {str(c) for c, _, _ in runs if c.world == w}
        assert got == {f'{w}:none:0:4:1', f'{w}:clip:1:4:1', f'{w}:clip:0.5:4:1:patch', f'{w}:clip:0.5:4:1:both',
                       f'{w}:clip_shuffled:0.5:4:1:patch', f'{w}:scene:0.5:4:1:patch'}
    # Fashion-MNIST aligns to its pretrained ViT; it has no scene oracle; its encode always writes patch targets
    assert ex.target_worlds(['plan', 'fashion', 'nowhere']) == ['plan', 'fashion']
    fashion = ex.planned_runs(ex.ExperimentConfig(plan='targets', worlds='fashion', out_dir=str(tmp_path)))
    assert {str(c) for c, _, _ in fashion} == {'fashion:none:0:4:1', 'fashion:vit:1:4:1', 'fashion:vit:0.5:4:1:patch',
                                               'fashion:vit:0.5:4:1:both', 'fashion:vit_shuffled:0.5:4:1:patch'}
    fashion_clip = dict((n, cmd) for n, cmd, _ in ex.prepare_steps(cfg, 'fashion', 'clip'))
    assert '--patch_targets=True' in fashion_clip['encode']
    # the data dirs that a patch cell reads are encoded with their patch targets
    steps = dict((n, (cmd, done)) for n, cmd, done in ex.prepare_steps(cfg, 'plan', 'clip', patch=True))
    assert '--patch_targets=True' in steps['encode'][0] and not steps['encode'][1]
    # the studies' CLIP teachers keep 4 px patches (8x8 = the code grid), whatever train_teacher.py's default is
    assert '--patch_size=4' in steps['teacher'][0] and '--patch_size=4' in fashion_clip['teacher']
    assert ex.needs_patch(runs, 'plan', 'scene') and ex.needs_patch(runs, 'default', 'clip')
    assert not ex.needs_patch([(ex.Cell.parse('plan:clip:1:4:1'), 0, 1000)], 'plan', 'clip')


def target_results(tmp_path):
    rng = np.random.default_rng(1)
    shifts = {'none:0:4:1': 0.0, 'clip:1:4:1': 0.5, 'clip:0.5:4:1:patch': 1.5, 'clip:0.5:4:1:both': 1.0,
              'clip_shuffled:0.5:4:1:patch': -0.5, 'scene:0.5:4:1:patch': 3.0}
    rows = [dict(fake_row(f'{w}:{c}', 0, 1000, rng, shift), geneval_overall=0.5 + 0.1 * shift)
            for w in ('plan', 'default') for c, shift in shifts.items()]
    with open(tmp_path / 'results.jsonl', 'w') as f:
        f.write(''.join(json.dumps(r) + '\n' for r in rows))
    return rows


def test_targets_confirm_takes_the_best_patch_or_both_cell_with_five_seeds_to_3000(tmp_path):
    """'auto' picks the patch / both cell of the world's teacher with the largest paired gain (not the oracle, not
    the shuffled control); the confirm runs baseline, global, it and its shuffled twin with seeds 0..4 to 3000; its
    dry run prints the cost."""
    rows = target_results(tmp_path)
    assert ex.best_target_cell(rows, 'plan') == ex.Cell.parse('plan:clip:0.5:4:1:patch')
    cfg = ex.ExperimentConfig(plan='targets_confirm', out_dir=str(tmp_path), worlds='plan',
                              data_root=str(tmp_path / 'data'))
    runs = ex.planned_runs(cfg)
    assert {n for _, _, n in runs} == {3000} and {s for _, s, _ in runs} == set(range(5))
    assert {str(c) for c, _, _ in runs} == {'plan:none:0:4:1', 'plan:clip:1:4:1', 'plan:clip:0.5:4:1:patch',
                                             'plan:clip_shuffled:0.5:4:1:patch'}
    assert ex.print_plan(cfg, runs) > 0
    with pytest.raises(ValueError, match='targets first'):
        ex.best_target_cell([r for r in rows if 'patch' not in r['cell'] and 'both' not in r['cell']], 'plan')


def test_report_has_the_global_vs_patch_table(tmp_path, capsys):
    rows = target_results(tmp_path)
    ex.main(ex.ExperimentConfig(out_dir=str(tmp_path), report_only=True, full_score_steps=(1000,),
                                data_root=str(tmp_path / 'data')))
    md = (tmp_path / 'results.md').read_text().splitlines()
    assert '### global vs patch: plan world, step 1000' in md and '### global vs patch: default world, step 1000' in md
    line = next(l for l in md if l.startswith('| patch (w 0.5) | `plan:clip:0.5:4:1:patch` |'))
    cells = [c.strip() for c in line.strip('|').split('|')]
    got = {r['cell']: r for r in rows if r['world'] == 'plan'}
    diff = got['plan:clip:0.5:4:1:patch']['prompt_acc'] - got['plan:none:0:4:1']['prompt_acc']
    assert cells[2] == '1' and cells[4] == f'{diff:+.3f} (n=1)'
    assert cells[-1] == f'{got["plan:clip:0.5:4:1:patch"]["geneval_overall"]:.3f} +/- 0.000'
    labels = [l.split('|')[1].strip() for l in md[md.index('### global vs patch: plan world, step 1000') + 4:][:6]]
    assert labels == ['none (baseline)', 'global (w 1)', 'patch (w 0.5)', 'both (w 0.5)', 'patch shuffled (w 0.5)',
                      'patch (scene oracle) (w 0.5)']


def test_the_record_leaves_out_recorded_pairs_and_brings_a_baseline_to_each_cell_left(tmp_path):
    """--record: a cell recorded with its baseline (same seed and draw) is not run again; a cell recorded without
    one, or not at all, runs with its baseline on this machine's draw; a recorded baseline with no cell of its seed
    left is not rerun."""
    rng = np.random.default_rng(2)
    cells = ('plan:none:0:4:1', 'plan:clip:1:4:1', 'plan:clip:0.5:4:1:both', 'plan:clip_shuffled:0.5:4:1:both')
    record = [dict(fake_row(c, 0, 3000, rng), draw='A') for c in cells[:3]]        # seed 0: no shuffled twin
    record += [dict(fake_row(c, 1, 3000, rng), draw='A') for c in cells]            # seed 1: complete
    record += [dict(fake_row(cells[1], 2, 3000, rng), draw='A'),                   # seed 2: its baseline elsewhere
               dict(fake_row(cells[0], 2, 3000, rng), draw='B'), dict(fake_row(cells[0], 3, 3000, rng), draw='B')]
    record += [dict(fake_row(c, 0, 1000, rng), draw='A') for c in cells]            # a shorter stage: not the run
    path = tmp_path / 'record.jsonl'
    path.write_text(''.join(json.dumps(r) + '\n' for r in record))
    runs = [(ex.Cell.parse(c), s, 3000) for s in range(4) for c in cells]
    left = {(str(c), s) for c, s, _ in ex.not_recorded(runs, ex.read_jsonl(str(path)))}
    assert left == {(cells[0], 0), (cells[3], 0), (cells[0], 2), (cells[1], 2), (cells[2], 2), (cells[3], 2),
                    (cells[0], 3), (cells[1], 3), (cells[2], 3), (cells[3], 3)}
    assert ex.not_recorded([(ex.Cell.parse(cells[0]), 3, 3000)], ex.read_jsonl(str(path))) == []
    cfg = ex.ExperimentConfig(plan='targets_confirm', worlds='plan', out_dir=str(tmp_path / 'out'), seeds=4,
                              best='plan:clip:0.5:4:1:both', record=str(path))
    assert {(str(c), s) for c, s, _ in ex.planned_runs(cfg)} == left
    assert len(ex.planned_runs(ex.ExperimentConfig(**(vars(cfg) | dict(record=''))))) == 16


def test_pairs_form_within_a_draw(tmp_path):
    """Two machines' draws of the same seeds: each cell pairs with the baseline of its own draw, never across, and
    every (seed, draw) is a replicate; --report_only=True reads the record without any out_dir results."""
    rows = []
    for draw, base, gain in (('A', 0.30, 0.10), ('B', 0.50, 0.02)):
        for s in (0, 1):
            rows += [dict(fake_row('plan:none:0:4:1', s, 3000, np.random.default_rng(s)), draw=draw,
                          prompt_acc=base + 0.01 * s, geneval_overall=0.4),
                     dict(fake_row('plan:clip:0.5:4:1:both', s, 3000, np.random.default_rng(s)), draw=draw,
                          prompt_acc=base + 0.01 * s + gain, geneval_overall=0.4)]
    rows.append(dict(rows[-1], draw='C'))  # a cell run without its baseline's draw: unpaired, still counted
    (tmp_path / 'record.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    got = ex.load_results(str(tmp_path / 'out'), str(tmp_path / 'record.jsonl'))
    e = ex.summarise(got, (3000,))['plan@3000']['plan:clip:0.5:4:1:both']
    assert e['seeds'] == [0, 0, 1, 1, 1] and e['draws'] == ['A', 'B', 'C']
    diff, t, p, n = e['paired']['prompt_acc']
    ref = stats.ttest_rel([0.40, 0.52, 0.41, 0.53], [0.30, 0.50, 0.31, 0.51])
    assert n == 4 and diff == pytest.approx(0.06) and p == pytest.approx(ref.pvalue)
    ex.main(ex.ExperimentConfig(out_dir=str(tmp_path / 'out'), report_only=True, full_score_steps=(3000,),
                                record=str(tmp_path / 'record.jsonl'), data_root=str(tmp_path / 'data')))
    md = (tmp_path / 'out' / 'results.md').read_text()
    assert '| both (w 0.5) | `plan:clip:0.5:4:1:both` | 5 | ' in md and '+0.060 (p=' in md
