import os
import json
import types
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import fid
from utils import REPO_ROOT

KEYS_FILE = os.path.join(os.path.dirname(__file__), 'data', 'fid_inception_keys.json')


def random_stats(rng, n, d, shift=0.0):
    """Mean and covariance of n correlated Gaussian samples in d dims (rank min(n - 1, d))."""
    x = rng.standard_normal((n, d)) @ (rng.standard_normal((d, d)) / np.sqrt(d)) + shift
    return x.mean(0), np.cov(x, rowvar=False)


def mean_std_features(x):
    """A stand-in for Inception: (B, 3, H, W) -> (B, 6) per-channel mean and std."""
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1)


def write_pngs(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(folder, f'{i:03d}.png'))
    return str(folder)


@pytest.fixture(scope='module')
def net():
    torch.manual_seed(0)
    return fid.FIDInceptionV3().eval()


@pytest.fixture
def no_onednn(monkeypatch):
    """Plain CPU convolutions: oneDNN spends seconds preparing kernels for each new input shape, far more than
    these one-off forward passes take."""
    monkeypatch.setattr(torch.backends.mkldnn, 'enabled', False)


def plain_state_dict(model):
    """What the weights file holds: a plain dict of the 472 tensors, no num_batches_tracked, no metadata."""
    return {k: v.clone() for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}


# ------------------------------------------------------------------------------------------------ the network

def test_state_dict_names_and_shapes_equal_the_standard_file(net):
    """The pytorch-fid weights file loads strictly only if all 472 names and shapes are the file's."""
    with open(KEYS_FILE) as f:
        expected = json.load(f)
    ours = {k: list(v.shape) for k, v in plain_state_dict(net).items()}
    assert expected['count'] == len(expected['shapes']) == 472
    assert set(ours) == set(expected['shapes'])
    assert ours == expected['shapes']


def test_expected_keys_match_torchvision_skeleton():
    """The recorded key list is torchvision's Inception (1008 classes), checked independently of our network."""
    torchvision = pytest.importorskip('torchvision')
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    tv_shapes = {k: list(v.shape) for k, v in tv.state_dict().items() if not k.endswith('num_batches_tracked')}
    with open(KEYS_FILE) as f:
        assert tv_shapes == json.load(f)['shapes']


def test_forward_matches_torchvision_with_pytorch_fid_patches(net, no_onednn):
    """Independent reference: torchvision's Inception with the three documented FID patches applied by shimming its
    functional pools (avg pools exclude padding; Mixed_7c's pool branch is a max pool), fed our weights."""
    torchvision = pytest.importorskip('torchvision')
    import torchvision.models.inception as tvi
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    g = torch.Generator().manual_seed(1)
    state = plain_state_dict(net)
    for k, v in state.items():  # non-trivial BatchNorm statistics so that every layer matters
        if k.endswith('running_var'):
            state[k] = 0.5 + torch.rand(v.shape, generator=g)
        elif k.endswith(('running_mean', 'bn.bias')):
            state[k] = 0.1 * torch.randn(v.shape, generator=g)
    ours = fid.FIDInceptionV3().eval()
    ours.load_state_dict(state, strict=True)
    tv.load_state_dict(state, strict=True)
    tv.fc = torch.nn.Identity()
    tv.eval()
    in_7c = {'on': False}

    def avg_pool2d(x, kernel_size, stride=None, padding=0, **kw):
        if in_7c['on']:
            return F.max_pool2d(x, kernel_size, stride, padding)
        return F.avg_pool2d(x, kernel_size, stride, padding, count_include_pad=False)

    shim = types.SimpleNamespace(**{n: getattr(F, n) for n in dir(F) if not n.startswith('_')})
    shim.avg_pool2d = avg_pool2d
    tv.Mixed_7c.register_forward_pre_hook(lambda m, a: in_7c.update(on=True))
    tv.Mixed_7c.register_forward_hook(lambda m, a, o: in_7c.update(on=False))
    x = torch.rand(2, 3, 139, 139, generator=g) * 2 - 1  # the network body on a small input keeps this fast
    original_F = tvi.F
    try:
        tvi.F = shim
        with torch.no_grad():
            ref = tv(x)
    finally:
        tvi.F = original_F
    with torch.no_grad():
        out = ours.pool3(x)
    assert out.shape == (2, 2048)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    with torch.no_grad():  # without the patches the outputs differ, so the check above has teeth
        assert not torch.allclose(tv(x), ref, rtol=1e-4, atol=1e-5)


def test_preprocessing_is_pytorch_fids():
    """FID values compare across tools only with pytorch-fid's resize to 299 and scaling to [-1, 1]."""
    x = torch.rand(2, 3, 32, 48)
    expected = 2 * F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False) - 1
    assert torch.equal(fid.FIDInceptionV3.preprocess(x), expected)


def test_random_init_forward_gives_pool3_features(net, no_onednn):
    """The network gives finite 2048-d pool3 features and refuses [-1, 1] images, a common mistake."""
    with torch.no_grad():
        out = net(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 2048) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        net(torch.rand(1, 3, 64, 64) * 2 - 1)  # images in [-1, 1] are a common mistake


# ------------------------------------------------------------------------------------------------ the weights

def test_weights_file_loads_strictly_without_num_batches_tracked(net, tmp_path):
    """The real file has no BatchNorm counters; a strict load must still succeed, and a re-saved copy too."""
    state = plain_state_dict(net)
    assert len(state) == 472 and type(state) is dict
    path = str(tmp_path / fid.FID_WEIGHTS_NAME)
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    fresh = fid.FIDInceptionV3()
    result = fresh.load_state_dict(loaded, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model = fid.load_inception(path)
    assert not model.training
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v), k
    # a re-saved OrderedDict carries BatchNorm version metadata; load_inception still loads it
    od = OrderedDict((k, v) for k, v in net.state_dict().items() if not k.endswith('num_batches_tracked'))
    od._metadata = net.state_dict()._metadata
    torch.save(od, path)
    fid.load_inception(path)
    torch.save({k: v for k, v in state.items() if k != 'fc.bias'}, path)
    with pytest.raises(RuntimeError, match='not the FID Inception weights'):
        fid.load_inception(path)


def test_missing_weights_give_a_clear_error_without_network(tmp_path, monkeypatch):
    """Offline, missing weights name the URL, the cache path and the flag, without trying forever."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    assert fid.default_weights_path().startswith(str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        fid.find_inception_weights(download=False)
    msg = str(e.value)
    assert fid.FID_WEIGHTS_URL in msg and fid.default_weights_path() in msg and '--inception=' in msg

    def offline(url, dst):
        raise OSError('network is unreachable')
    with pytest.raises(FileNotFoundError, match='network is unreachable') as e:
        fid.load_inception(downloader=offline)
    assert fid.FID_WEIGHTS_URL in str(e.value) and '--inception=' in str(e.value)
    with pytest.raises(FileNotFoundError, match='do not exist'):
        fid.load_inception(str(tmp_path / 'nowhere.pth'))


def test_download_goes_to_the_hub_cache(net, tmp_path, monkeypatch):
    """A download lands where pytorch-fid and torch.hub look for the file, so it happens once."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    calls = []

    def fake_download(url, dst):
        calls.append((url, dst))
        torch.save(plain_state_dict(net), dst)
    model = fid.load_inception(downloader=fake_download)
    assert calls == [(fid.FID_WEIGHTS_URL, fid.default_weights_path())]
    assert isinstance(model, fid.FIDInceptionV3)
    fid.load_inception(downloader=fake_download)  # second call finds the cached file
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------------ Frechet distance

def test_identical_statistics_give_zero():
    """A set compared with itself has distance 0."""
    rng = np.random.default_rng(0)
    mu, sigma = random_stats(rng, 500, 64)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    mu, sigma = random_stats(rng, 40, 64)  # rank-deficient: sqrt of rounding-level eigenvalues adds ~1e-7
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-5


def test_equal_covariances_give_squared_mean_distance():
    """With equal covariances the trace terms cancel: the distance is |mu1 - mu2|^2."""
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(64), rng.standard_normal(64)
    expected = float(np.sum((mu1 - mu2) ** 2))
    assert fid.frechet_distance(mu1, np.eye(64), mu2, np.eye(64)) == pytest.approx(expected, rel=1e-12)
    _, sigma = random_stats(rng, 500, 64)
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize('n1,n2', [(500, 300), (40, 40), (40, 500), (10, 25)])
def test_fast_path_equals_sqrtm_reference(n1, n2):
    """The eigen route equals scipy's sqrtm formula, for well- and ill-conditioned sets."""
    rng = np.random.default_rng(n1 * 1000 + n2)
    mu1, s1 = random_stats(rng, n1, 64)
    mu2, s2 = random_stats(rng, n2, 64, shift=0.3)
    fast = fid.frechet_distance(mu1, s1, mu2, s2)
    ref = fid.frechet_distance_sqrtm(mu1, s1, mu2, s2)
    assert fast == pytest.approx(ref, rel=1e-6)
    # a third route: the eigenvalues of the (non-symmetric) product
    tr = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    third = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert fast == pytest.approx(third, rel=1e-6)


def test_invalid_statistics_are_rejected():
    """Statistics of mismatched sizes or non-square covariances are refused by name."""
    rng = np.random.default_rng(2)
    mu, sigma = random_stats(rng, 200, 16)
    with pytest.raises(ValueError, match='mismatched'):
        fid.frechet_distance(mu, sigma, mu[:8], sigma[:8, :8])
    with pytest.raises(ValueError, match='NaN'):
        fid.frechet_distance(mu, sigma * np.nan, mu, sigma)
    with pytest.raises(ValueError, match='not a covariance'):
        fid.frechet_distance(mu, sigma, mu, -sigma)
    with pytest.raises(ValueError, match='Imaginary'):
        fid.frechet_distance_sqrtm(mu, sigma, mu, -sigma)


def test_nonfinite_trace_retries_with_eps(monkeypatch):
    """A non-finite trace retries with eps on the diagonal, as pytorch-fid does, and stays close to exact."""
    rng = np.random.default_rng(3)
    mu1, s1 = random_stats(rng, 200, 16)
    mu2, s2 = random_stats(rng, 200, 16)
    exact = fid.frechet_distance(mu1, s1, mu2, s2)
    real = fid._trace_sqrt_product
    calls = []

    def fails_once(a, b):
        calls.append(a.copy())
        if len(calls) == 1:
            raise np.linalg.LinAlgError('did not converge')
        return real(a, b)
    monkeypatch.setattr(fid, '_trace_sqrt_product', fails_once)
    with pytest.warns(UserWarning, match='singular'):
        value = fid.frechet_distance(mu1, s1, mu2, s2, eps=1e-6)
    assert np.allclose(calls[1] - calls[0], 1e-6 * np.eye(16))
    assert value == pytest.approx(exact, rel=1e-5)


# ------------------------------------------------------------------------------------------------ statistics

def test_compute_statistics_is_float64_unbiased():
    """Statistics are float64 with the unbiased covariance, as the reference implementations compute them."""
    x = np.random.default_rng(4).standard_normal((30, 5)).astype(np.float32)
    mu, sigma = fid.compute_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64
    xd = x.astype(np.float64)
    np.testing.assert_allclose(sigma, (xd - xd.mean(0)).T @ (xd - xd.mean(0)) / 29, rtol=1e-12)
    with pytest.warns(UserWarning, match='biased'):
        mu, sigma = fid.compute_statistics(x[:4])  # fewer samples than dimensions still works
    assert mu.shape == (5,) and sigma.shape == (5, 5)


def test_folder_statistics_equal_direct_computation(tmp_path):
    """A folder of PNGs gives the statistics of its images fed directly."""
    images = np.random.default_rng(5).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    folder = write_pngs(tmp_path / 'imgs', images)
    mu, sigma = fid.activation_statistics(folder, mean_std_features, batch_size=3, progress=False)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    feats = mean_std_features(x).numpy().astype(np.float64)
    np.testing.assert_allclose(mu, np.mean(feats, axis=0), rtol=1e-6)
    np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-10)
    mu_a, sigma_a = fid.activation_statistics(images, mean_std_features, batch_size=4, progress=False)
    np.testing.assert_allclose(mu_a, mu, rtol=1e-6)
    np.testing.assert_allclose(sigma_a, sigma, rtol=1e-5, atol=1e-10)


def test_bad_files_are_skipped_and_empty_folders_rejected(tmp_path):
    """Non-image files are skipped with a warning; a folder with no image is an error."""
    images = np.random.default_rng(6).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    folder = write_pngs(tmp_path / 'imgs', images)
    (tmp_path / 'imgs' / '002_broken.png').write_bytes(b'not a png at all')
    (tmp_path / 'imgs' / 'notes.txt').write_text('hello')
    with pytest.warns(UserWarning) as record:
        feats = fid.extract_features(folder, mean_std_features, batch_size=2, progress=False)
    messages = ' '.join(str(w.message) for w in record)
    assert 'notes.txt' in messages and '002_broken.png' in messages
    assert feats.shape == (5, 6)  # the five good images, nothing from the bad ones
    clean = fid.extract_features(images, mean_std_features, progress=False)
    np.testing.assert_allclose(np.sort(feats, 0), np.sort(clean, 0), rtol=1e-6)
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(ValueError, match='no images'):
        fid.activation_statistics(str(tmp_path / 'empty'), mean_std_features)
    with pytest.raises(ValueError, match='uint8'):
        fid.activation_statistics(images.astype(np.float32), mean_std_features)


def test_npz_round_trip_in_pytorch_fid_format(tmp_path):
    """Saved statistics use pytorch-fid's .npz keys, so they can be exchanged with it."""
    mu, sigma = random_stats(np.random.default_rng(7), 50, 8)
    path = str(tmp_path / 'stats.npz')
    fid.save_statistics(path, mu, sigma)
    with np.load(path) as f:
        assert sorted(f.keys()) == ['mu', 'sigma']
    mu2, sigma2 = fid.load_or_compute_stats(path, model=None)
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    np.savez_compressed(str(tmp_path / 'bad.npz'), mean=mu)
    with pytest.raises(ValueError, match='mu'):
        fid.load_or_compute_stats(str(tmp_path / 'bad.npz'), model=None)


# ------------------------------------------------------------------------------------------------ command line

def test_cli_on_two_folders_prints_fid_last(tmp_path, capsys):
    """The command line prints the FID as its last line, for scripts to read."""
    rng = np.random.default_rng(8)
    a = write_pngs(tmp_path / 'a', rng.integers(0, 256, (9, 8, 8, 3), dtype=np.uint8))
    b = write_pngs(tmp_path / 'b', rng.integers(0, 200, (9, 8, 8, 3), dtype=np.uint8))
    value = fid.main([a, b, '--batch_size=4', '--device=cpu', '--progress=False'], model=mean_std_features)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1] == f'FID: {value:.6f}'
    expected = fid.frechet_distance(*fid.activation_statistics(a, mean_std_features, progress=False),
                                    *fid.activation_statistics(b, mean_std_features, progress=False))
    assert value == pytest.approx(expected, rel=1e-9)
    out = str(tmp_path / 'a_stats.npz')
    assert fid.main([a, f'--save_stats={out}', '--progress=False'], model=mean_std_features) is None
    mu, sigma = fid.load_or_compute_stats(out, None)
    mu_a, sigma_a = fid.activation_statistics(a, mean_std_features, progress=False)
    np.testing.assert_allclose(mu, mu_a)
    np.testing.assert_allclose(sigma, sigma_a)
    with pytest.raises(SystemExit, match='usage'):
        fid.main([a], model=mean_std_features)


def test_cli_script_on_npz_files_needs_no_weights(tmp_path):
    """Two statistics files need no network and no Inception weights."""
    rng = np.random.default_rng(9)
    s1, s2 = random_stats(rng, 100, 16), random_stats(rng, 100, 16, shift=0.5)
    p1, p2 = str(tmp_path / 'one.npz'), str(tmp_path / 'two.npz')
    fid.save_statistics(p1, *s1)
    fid.save_statistics(p2, *s2)
    env = dict(os.environ, TORCH_HOME=str(tmp_path / 'no_weights_here'))
    run = subprocess.run([sys.executable, 'fid.py', p1, p2], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith('FID: ')
    assert float(last.split()[1]) == pytest.approx(fid.frechet_distance(*s1, *s2), abs=1e-6)
