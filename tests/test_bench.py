"""bench.py runs end to end at its smoke size (its figures are measurements, so nothing here asserts a speed)."""
import bench


def test_bench_quick_runs_and_fast_frechet_matches_sqrtm(capsys):
    """bench.py runs end to end at its smoke size (its figures are measurements, not asserted), and its
    fast Frechet route agrees with sqrtm."""
    rows = bench.main(bench.BenchConfig(quick=True, repeats=1))
    names = [r[0] for r in rows]
    assert names[0] == 'matmul peak fp32' and any(n.startswith('GPT train') for n in names)
    assert any(n.startswith('generate') for n in names) and any(n.startswith('VQ encode') for n in names)
    fd = bench.bench_frechet(bench.BenchConfig(quick=True))
    assert fd['rel_diff'] < 1e-6
    assert '| figure |' in capsys.readouterr().out
