"""
Frechet Inception Distance (FID, Heusel et al. 2017, arXiv 1706.08500) computed the way pytorch-fid computes it, so
that our numbers can be compared with the ones people already know.

    python fid.py samples/ data/ref/                        # two image folders
    python fid.py samples/ ref_stats.npz --inception=pt_inception-2015-12-05-6726825d.pth
    python fid.py data/ref/ --save_stats=out/ref_stats.npz   # one folder's statistics, pytorch-fid's .npz format

The last line printed is `FID: <value>`.

The pieces, top to bottom:
- FIDInceptionV3: the TensorFlow Inception graph of 2015-12-05 that every FID number is measured with, written out in
  PyTorch. Module names and shapes follow torchvision's Inception so that pytorch-fid's weights file
  pt_inception-2015-12-05-6726825d.pth (472 tensors) loads strictly. It is NOT torchvision's ImageNet network: it has
  1008 classes, BatchNorm eps 1e-3, average pools that ignore padded zeros (as TensorFlow's do) and, in Mixed_7c, a
  max pool where the paper has an average pool (a quirk of that TF graph, kept for compatibility).
- Preprocessing as pytorch-fid: float [0, 1] -> bilinear resize to 299x299 (align_corners=False, no antialias)
  -> 2x - 1. Features are the 2048-d pool3 activations. Other resize conventions (clean-fid's PIL bicubic, torch-
  fidelity's TF-exact bilinear) give different numbers; report which one you used.
- Statistics: mean and unbiased covariance (np.cov) in float64.
- Frechet distance d^2 = |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)). The trace of the square root only
  needs the eigenvalues of S1 S2, which equal those of the symmetric PSD matrix S1^(1/2) S2 S1^(1/2); two symmetric
  eigendecompositions are several times faster than scipy.linalg.sqrtm and exact up to rounding.
  frechet_distance_sqrtm is pytorch-fid's reference route, kept for tests and benchmarks.

References: mseitzer/pytorch-fid (network patches, preprocessing, .npz format, guards), toshas/torch-fidelity
(from-scratch Inception, eigenvalue route), GaParmar/clean-fid (why resizing conventions matter).
"""
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FID_WEIGHTS_NAME = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = 'https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/' + FID_WEIGHTS_NAME
IMAGE_EXTENSIONS = ('.bmp', '.jpg', '.jpeg', '.pgm', '.png', '.ppm', '.tif', '.tiff', '.webp')  # as pytorch-fid

# -----------------------------------------------------------------------------------------------------------------
# The network


class ConvBN(nn.Module):
    """conv (no bias: BatchNorm has one) -> BatchNorm(eps 1e-3, TensorFlow's value) -> ReLU."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool_tf(x):
    """3x3 stride-1 average pool that, like TensorFlow's, divides by the number of real (not padded) pixels."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b..5d): 1x1 | 1x1->5x5 | 1x1->3x3->3x3 | pool->1x1. Out: 224 + pool_features."""

    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 64, 1)
        self.branch5x5_1 = ConvBN(c_in, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(c_in, pool_features, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(avg_pool_tf(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction (Mixed_6a): stride-2 3x3 | 1x1->3x3->stride-2 3x3 | max pool. Out: 480 + c_in."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = ConvBN(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(c_in, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], 1)


class InceptionC(nn.Module):
    """17x17 block (Mixed_6b..6e) with 7x7 convolutions factored into 1x7 and 7x1. Out: 768."""

    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = ConvBN(c_in, 192, 1)
        self.branch7x7_1 = ConvBN(c_in, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(c_in, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for conv in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                     self.branch7x7dbl_5):
            b7d = conv(b7d)
        bp = self.branch_pool(avg_pool_tf(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction (Mixed_7a). Out: 512 + c_in."""

    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = ConvBN(c_in, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(c_in, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], 1)


class InceptionE(nn.Module):
    """8x8 block (Mixed_7b, 7c) whose 3x3 branches split into parallel 1x3 and 3x1 convolutions. Out: 2048.

    pool='avg' (Mixed_7b) averages without the padded zeros; pool='max' (Mixed_7c) is the TF graph's max pool."""

    def __init__(self, c_in, pool):
        super().__init__()
        assert pool in ('avg', 'max')
        self.pool = pool
        self.branch1x1 = ConvBN(c_in, 320, 1)
        self.branch3x3_1 = ConvBN(c_in, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(c_in, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(c_in, 192, 1)

    def forward(self, x):
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        pooled = avg_pool_tf(x) if self.pool == 'avg' else F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], 1)


class FIDInceptionV3(nn.Module):
    """float images (B, 3, H, W) in [0, 1] -> pool3 features (B, 2048), preprocessed exactly as pytorch-fid."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool='avg')
        self.Mixed_7c = InceptionE(2048, pool='max')
        # The classifier is not used for FID; it is here so the weights file (which has it) loads strictly.
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):
        return self.pool3(self.preprocess(x))

    @staticmethod
    def preprocess(x):
        """float (B, 3, H, W) in [0, 1] -> (B, 3, 299, 299) in [-1, 1], pytorch-fid's convention."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f'FIDInceptionV3 expects float images (B, 3, H, W), got shape {tuple(x.shape)}')
        lo, hi = x.min().item(), x.max().item()
        if lo < -1e-3 or hi > 1 + 1e-3:
            raise ValueError(f'FIDInceptionV3 expects values in [0, 1], got [{lo:.3f}, {hi:.3f}]; '
                             'images in [-1, 1] need (x + 1) / 2 first')
        x = F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)  # (B, 3, 299, 299), no antialias
        return 2 * x - 1                                                # the TF graph's input range [-1, 1]

    def pool3(self, x):
        """Preprocessed (B, 3, 299, 299) -> (B, 2048). Shapes below are for 299x299; any size >= 75 runs."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                    # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))                   # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)                    # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))              # (B, 288, 35, 35)
        x = self.Mixed_6a(x)                                            # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)                                            # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))                             # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))                                       # (B, 2048) global average pool


# -----------------------------------------------------------------------------------------------------------------
# Finding and loading the weights


def default_weights_path():
    """Where torch.hub (and pytorch-fid) keep the file: $TORCH_HOME/hub/checkpoints/pt_inception-...pth."""
    return os.path.join(torch.hub.get_dir(), 'checkpoints', FID_WEIGHTS_NAME)


def find_inception_weights(path=None, download=True, downloader=None):
    """Path of the weights file: `path` if given, else the torch hub cache, else a download into that cache.

    downloader(url, dst) defaults to torch.hub.download_url_to_file (which writes through a temp file); tests pass
    download=False or their own downloader so that they never touch the network."""
    how_to = (f'Get the standard FID Inception weights from\n  {FID_WEIGHTS_URL}\nand either put the file at\n'
              f'  {default_weights_path()}\nor pass its path: python fid.py ... --inception=/path/{FID_WEIGHTS_NAME} '
              f'(in Python: load_inception(path)).')
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'Inception weights {path!r} do not exist. {how_to}')
        return path
    cached = default_weights_path()
    if os.path.isfile(cached):
        return cached
    if not download:
        raise FileNotFoundError(f'no FID Inception weights at {cached}. {how_to}')
    downloader = downloader or torch.hub.download_url_to_file
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    print(f'downloading the FID Inception weights (~91 MB) to {cached}', file=sys.stderr)
    try:
        downloader(FID_WEIGHTS_URL, cached)
    except Exception as e:  # offline, proxy, HTTP error: all end the same way for the user
        raise FileNotFoundError(f'could not download the FID Inception weights ({type(e).__name__}: {e}). '
                                f'{how_to}') from e
    return cached


def load_inception(path=None, device='cpu', download=True, downloader=None):
    """FIDInceptionV3 with the pytorch-fid weights, in eval mode on `device` (see find_inception_weights)."""
    from utils import load_checkpoint
    path = find_inception_weights(path, download=download, downloader=downloader)
    state = load_checkpoint(path, kind='the pytorch-fid Inception weights')
    if not isinstance(state, dict):
        raise RuntimeError(f'{path!r} holds a {type(state).__name__}, not a state dict; expected {FID_WEIGHTS_NAME}')
    model = FIDInceptionV3()
    # The file has no BatchNorm `num_batches_tracked` counters. BatchNorm fills a missing counter in itself when the
    # state dict carries no version metadata, so a strict load still matches every key. dict() drops any metadata a
    # re-saved OrderedDict may carry, so such a copy of the file loads the same way.
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as e:
        raise RuntimeError(f'{path!r} is not the FID Inception weights file {FID_WEIGHTS_NAME} '
                           f'(download it from {FID_WEIGHTS_URL}): {e}') from e
    return model.eval().requires_grad_(False).to(device)


# -----------------------------------------------------------------------------------------------------------------
# Features and statistics


def _list_images(folder):
    """Sorted image files directly inside `folder` (not recursive), warning about other files that are skipped."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'{folder!r} is not a folder of images (or a .npz statistics file)')
    names = sorted(n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n)))
    images = [os.path.join(folder, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS)]
    others = [n for n in names if not n.lower().endswith(IMAGE_EXTENSIONS)]
    if others:
        warnings.warn(f'{folder}: skipping {len(others)} non-image file(s), e.g. {others[:3]}')
    if not images:
        raise ValueError(f'{folder!r} holds no images ({", ".join(IMAGE_EXTENSIONS)}); '
                         'point fid.py at a folder of samples, e.g. the output of sample.py')
    return images


def _read_rgb(path):
    """uint8 (H, W, 3), or None (with a warning) for a file PIL cannot decode."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert('RGB'))
    except Exception as e:  # truncated, corrupt, or not an image despite its extension
        warnings.warn(f'skipping {path}: not a readable image ({type(e).__name__}: {e})')
        return None


def extract_features(images_or_folder, model, batch_size=50, device='cpu', progress=True):
    """Features (N, d) float64 of a folder of images or a uint8 array (N, H, W, 3), `batch_size` at a time.

    `model` maps float (B, 3, H, W) in [0, 1] on `device` to (B, d); it should already be on `device`."""
    from tqdm import tqdm
    if batch_size < 1:
        raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    if isinstance(images_or_folder, (str, os.PathLike)):
        files = _list_images(os.fspath(images_or_folder))
        n, desc = len(files), f'FID features {os.path.basename(os.path.normpath(images_or_folder))}'
        get = lambda i, j: [im for im in (_read_rgb(f) for f in files[i:j]) if im is not None]  # noqa: E731
    else:
        arr = images_or_folder
        if not isinstance(arr, np.ndarray) or arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError('expected a folder path or a uint8 numpy array (N, H, W, 3), got '
                             f'{type(arr).__name__} {getattr(arr, "dtype", "")} {getattr(arr, "shape", "")}')
        n, desc = len(arr), 'FID features'
        get = lambda i, j: list(arr[i:j])  # noqa: E731
    chunks = []
    for i in tqdm(range(0, n, batch_size), desc=desc, unit='batch', disable=not progress):
        batch = get(i, i + batch_size)
        if not batch:
            continue
        sizes = {im.shape for im in batch}
        if len(sizes) > 1:
            raise ValueError(f'images of different sizes {sorted(sizes)} in one set; FID compares images at one '
                             'resolution, resize them first')
        x = torch.from_numpy(np.stack(batch)).to(device)               # (B, H, W, 3) uint8
        x = x.permute(0, 3, 1, 2).float() / 255                         # (B, 3, H, W) in [0, 1], as ToTensor
        with torch.inference_mode():
            feats = model(x).flatten(1)                                  # (B, d)
        chunks.append(feats.cpu().numpy().astype(np.float64))
    if not chunks:
        raise ValueError(f'no readable images in {images_or_folder!r}')
    return np.concatenate(chunks)                                        # (N, d)


def compute_statistics(features):
    """(N, d) features -> mean (d,) and unbiased covariance (d, d), both float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f'need features (N >= 2, d), got shape {features.shape}')
    n, d = features.shape
    if n <= d:
        warnings.warn(f'only {n} samples for {d}-d features: the covariance has rank <= {n - 1} < {d}, so this FID '
                      'is a biased estimate, not comparable with FIDs from more samples (use N > d, ideally >= 10k)')
    return features.mean(axis=0), np.cov(features, rowvar=False)


def activation_statistics(images_or_folder, model, batch_size=50, device='cpu', progress=True):
    """(mu, sigma) of the model's features over a folder of images or a uint8 array (N, H, W, 3)."""
    return compute_statistics(extract_features(images_or_folder, model, batch_size, device, progress))


def save_statistics(path, mu, sigma):
    """Write pytorch-fid's .npz format (keys `mu`, `sigma`) atomically."""
    import io
    from utils import atomic_write_bytes
    if not str(path).endswith('.npz'):
        raise ValueError(f'statistics go to a .npz file, got {path!r}')
    buf = io.BytesIO()
    np.savez(buf, mu=mu, sigma=sigma)
    atomic_write_bytes(buf.getvalue(), path)


def load_or_compute_stats(path_or_dir, model, batch_size=50, device='cpu', progress=True):
    """(mu, sigma) from a pytorch-fid .npz file, or computed over a folder of images with `model`."""
    path = os.fspath(path_or_dir)
    if path.endswith('.npz'):
        if not os.path.isfile(path):
            raise FileNotFoundError(f'statistics file {path!r} does not exist')
        with np.load(path) as f:
            if 'mu' not in f or 'sigma' not in f:
                raise ValueError(f'{path!r} has keys {sorted(f.keys())}; FID statistics need `mu` and `sigma`')
            return f['mu'].astype(np.float64), f['sigma'].astype(np.float64)
    if model is None:
        raise ValueError(f'{path!r} is a folder: computing its statistics needs an Inception model (load_inception())')
    return activation_statistics(path, model, batch_size, device, progress)


# -----------------------------------------------------------------------------------------------------------------
# The Frechet distance


def _as_statistics(mu1, sigma1, mu2, sigma2):
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f'mismatched statistics: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 {sigma1.shape}, '
                         f'sigma2 {sigma2.shape}; were both computed with the same feature layer?')
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError('statistics contain NaN or inf')
    return mu1, sigma1, mu2, sigma2


def _trace_sqrt_product(sigma1, sigma2, tol=1e-5):
    """tr((S1 S2)^(1/2)) = sum sqrt(eig(R S2 R)) with R = S1^(1/2): both matrices are symmetric and similar
    (same eigenvalues), and R S2 R is PSD, so symmetric eigensolvers do all the work."""
    w, v = np.linalg.eigh((sigma1 + sigma1.T) / 2)                       # S1 = V diag(w) V^T
    if w.min() < -tol * max(abs(w).max(), 1e-300):
        raise ValueError(f'sigma1 is not positive semi-definite (eigenvalue {w.min():.3g}): not a covariance')
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T                     # (d, d) S1^(1/2)
    m = root @ ((sigma2 + sigma2.T) / 2) @ root                          # (d, d) similar to S1 S2
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    if lam.min() < -tol * max(abs(lam).max(), 1e-300):
        # a clearly negative eigenvalue makes sqrt(S1 S2) complex: the classic "imaginary component" failure
        raise ValueError(f'S1 S2 has a negative eigenvalue {lam.min():.3g} (largest {lam.max():.3g}); '
                         'sigma2 is not a covariance matrix')
    return np.sqrt(np.clip(lam, 0, None)).sum()                         # rounding negatives count as 0


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """FID between N(mu1, sigma1) and N(mu2, sigma2) without a matrix square root (see _trace_sqrt_product)."""
    mu1, sigma1, mu2, sigma2 = _as_statistics(mu1, sigma1, mu2, sigma2)
    try:
        tr_covmean = _trace_sqrt_product(sigma1, sigma2)
    except np.linalg.LinAlgError:  # the eigensolver did not converge: nudge both diagonals, as pytorch-fid does
        tr_covmean = float('nan')
    if not np.isfinite(tr_covmean):
        warnings.warn(f'FID: the product of the covariances is singular; adding {eps} to both diagonals')
        offset = eps * np.eye(len(mu1))
        tr_covmean = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def frechet_distance_of_features(features1, features2):
    """The Frechet distance between two sets of features (N1, d) and (N2, d) of any network: Inception pool3 (FID),
    a classifier's penultimate layer (the usual stand-in on MNIST-like data), or a ViT's CLS token (FD-DINOv2,
    Stein et al. 2023)."""
    return frechet_distance(*compute_statistics(features1), *compute_statistics(features2))


def frechet_distance_sqrtm(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """The reference route (pytorch-fid's): a full scipy.linalg.sqrtm of S1 S2, with its guards."""
    from scipy import linalg
    mu1, sigma1, mu2, sigma2 = _as_statistics(mu1, sigma1, mu2, sigma2)
    covmean = linalg.sqrtm(sigma1 @ sigma2)  # no `disp=`: deprecated in SciPy 1.17, removed after
    if not np.isfinite(covmean).all():
        warnings.warn(f'FID: the product of the covariances is singular; adding {eps} to both diagonals')
        offset = eps * np.eye(len(mu1))
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f'Imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm(S1 S2): '
                             'the statistics are not valid covariances')
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# -----------------------------------------------------------------------------------------------------------------
# Command line


@dataclass
class FIDConfig:
    inception: str = ''      # path to pt_inception-2015-12-05-6726825d.pth; '' = torch hub cache, else download it
    batch_size: int = 50     # images per Inception forward pass
    device: str = 'auto'     # 'cpu', 'cuda', or 'auto' (cuda when available)
    save_stats: str = ''     # with one folder: write its statistics to this .npz instead of printing a FID
    progress: bool = True    # tqdm bars over the batches


def main(argv=None, model=None):
    """Positional paths (folders or .npz) first, then --key=value options (FIDConfig). Returns the FID or None.

    `model` replaces the Inception network (tests pass a small one so they need no weights)."""
    from configurator import configure
    from utils import pick_device
    usage = ('usage: python fid.py A B [--inception=PATH] [--batch_size=N] [--device=cpu|cuda]\n'
             '       python fid.py DIR --save_stats=OUT.npz   (A, B: image folders or .npz statistics)')
    argv = sys.argv[1:] if argv is None else list(argv)
    if '-h' in argv or '--help' in argv:
        print(usage)
    paths = [a for a in argv if not a.startswith('-')]
    cfg = configure(FIDConfig(), [a for a in argv if a.startswith('-')])
    if len(paths) != (1 if cfg.save_stats else 2):
        raise SystemExit(f'{usage}\n(got {len(paths)} path(s): {paths})')
    device = pick_device(cfg.device)
    if model is None and any(not p.endswith('.npz') for p in paths):  # only folders need the network
        model = load_inception(cfg.inception or None, device=device)
    stats = []
    for p in paths:
        mu, sigma = load_or_compute_stats(p, model, cfg.batch_size, device, cfg.progress)
        print(f'{p}: {len(mu)}-d statistics' + ('' if p.endswith('.npz') else ' (pytorch-fid preprocessing)'))
        stats.append((mu, sigma))
    if cfg.save_stats:
        save_statistics(cfg.save_stats, *stats[0])
        print(f'saved statistics of {paths[0]} to {cfg.save_stats}')
        return None
    fid = frechet_distance(*stats[0], *stats[1])
    print(f'FID: {fid:.6f}')
    return fid


if __name__ == '__main__':
    try:
        main()
    except FileNotFoundError as e:  # missing weights or inputs: the message says what to do, no traceback needed
        raise SystemExit(f'error: {e}')
