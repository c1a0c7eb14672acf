"""
The Fashion-MNIST classifier the metrics use (data/fashion/evaluate.py): its test accuracy is the ceiling of the
class accuracy a generator can score, and its penultimate features are the space of the Frechet distance that
stands in for FID on MNIST-like data.

    python data/fashion/classifier.py                      # -> out/fashion_classifier/classifier.pt, minutes on a CPU

A small CNN (three 3x3 conv blocks 32 -> 64 -> 128 with max-pooling, then a 256-wide hidden layer: the features, then
10 logits), on the grey image (the mean of R, G, B, so a generator's slight colour casts do not matter), trained
with Adam and random 2-px shifts on the 60,000 train images; scored on the 10,000 test images (val split).
"""
import os
import sys
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import configure  # noqa: E402
from utils import atomic_torch_save, load_checkpoint, lr_schedule, pick_device  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSIFIER_KIND = 'arra-fashion-classifier'


@dataclass
class ClassifierConfig:
    data_dir: str = HERE                   # {train,val}_images.npy and _labels.npy (python data/fashion/prepare.py)
    out_dir: str = 'out/fashion_classifier'
    width: int = 32                        # channels of the first conv block (x2, x4 after)
    hidden: int = 256                      # the penultimate (feature) width
    epochs: int = 2
    batch_size: int = 128
    lr: float = 2e-3
    n_train: int = 0                       # 0 = all train images
    seed: int = 1337
    device: str = 'cpu'


class FashionCNN(nn.Module):
    def __init__(self, width=32, hidden=256, n_classes=10):
        super().__init__()
        w = width
        self.convs = nn.ModuleList([nn.Conv2d(1, w, 3, padding=1), nn.Conv2d(w, 2 * w, 3, padding=1),
                                    nn.Conv2d(2 * w, 4 * w, 3, padding=1)])
        self.norms = nn.ModuleList([nn.BatchNorm2d(c) for c in (w, 2 * w, 4 * w)])
        self.fc = nn.Linear(4 * w * 4 * 4, hidden)
        self.head = nn.Linear(hidden, n_classes)

    @staticmethod
    def prepare(images):
        """uint8 (B, H, W, 3) numpy or tensor -> float (B, 1, H, W): the grey image, centred on 0."""
        x = torch.from_numpy(np.array(images)).float().mean(-1, keepdim=True)      # (B, H, W, 1)
        return x.permute(0, 3, 1, 2) / 127.5 - 1.0

    def features(self, x):  # (B, 1, 32, 32) -> (B, hidden): the penultimate layer
        for conv, norm in zip(self.convs, self.norms):
            x = F.max_pool2d(F.relu(norm(conv(x))), 2)                          # 32 -> 16 -> 8 -> 4
        return F.relu(self.fc(x.flatten(1)))                                    # (B, hidden)

    def forward(self, x):  # -> (B, 10) logits
        return self.head(self.features(x))


def load_labelled(data_dir, split):
    images = np.load(os.path.join(data_dir, f'{split}_images.npy'), mmap_mode='r')
    path = os.path.join(data_dir, f'{split}_labels.npy')
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: run `python data/fashion/prepare.py --source=DIR` first')
    return images, np.load(path)


@torch.no_grad()
def run(model, images, batch_size=500):
    """uint8 (N, H, W, 3) -> (logits (N, 10), features (N, hidden)) float32 numpy, in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    logits, feats = [], []
    for i in range(0, len(images), batch_size):
        f = model.features(model.prepare(images[i:i + batch_size]).to(device))
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
    return torch.cat(logits).numpy(), torch.cat(feats).numpy()


def accuracy(model, images, labels):
    return float((run(model, images)[0].argmax(1) == np.asarray(labels)).mean())


def train(cfg, progress=True):
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    train_images, train_labels = load_labelled(cfg.data_dir, 'train')
    val_images, val_labels = load_labelled(cfg.data_dir, 'val')
    n = cfg.n_train or len(train_images)
    x_all = FashionCNN.prepare(train_images[:n])                               # (n, 1, 32, 32)
    y_all = torch.from_numpy(train_labels[:n].astype(np.int64))
    model = FashionCNN(cfg.width, cfg.hidden).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    steps = cfg.epochs * (n // cfg.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    bar = tqdm(range(steps), desc='classifier', disable=not progress)
    for it in bar:
        for group in opt.param_groups:
            group['lr'] = lr_schedule(it, steps // 20, steps, cfg.lr, cfg.lr / 20)
        rows = torch.randint(n, (cfg.batch_size,), generator=gen)
        dy, dx = torch.randint(-2, 3, (2,), generator=gen).tolist()             # one random shift per batch
        x = torch.roll(x_all[rows], shifts=(dy, dx), dims=(2, 3)).to(device)
        loss = F.cross_entropy(model.train()(x), y_all[rows].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if it % 50 == 0:
            bar.set_postfix(loss=f'{loss.item():.3f}')
    test_acc = accuracy(model, val_images, val_labels)
    seconds = time.time() - t0
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = os.path.join(cfg.out_dir, 'classifier.pt')
    atomic_torch_save(dict(kind=CLASSIFIER_KIND, model=model.state_dict(), config=asdict(cfg),
                           test_accuracy=test_acc, train_seconds=seconds), path)
    print(f'trained {steps} steps ({cfg.epochs} epochs of {n:,}) in {seconds:.0f}s; test accuracy '
          f'{test_acc:.4f} on {len(val_labels):,} test images; saved {path}')
    return dict(test_accuracy=test_acc, train_seconds=seconds, path=path)


def load_classifier(path, device='cpu'):
    """The classifier written by train(), in eval mode, frozen."""
    ckpt = load_checkpoint(path, kind='python data/fashion/classifier.py')
    if not isinstance(ckpt, dict) or ckpt.get('kind') != CLASSIFIER_KIND:
        raise ValueError(f'{path} is not a Fashion-MNIST classifier: train one with '
                         f'`python data/fashion/classifier.py`')
    model = FashionCNN(ckpt['config']['width'], ckpt['config']['hidden'])
    model.load_state_dict(ckpt['model'], strict=True)
    model.test_accuracy = ckpt.get('test_accuracy')
    return model.to(device).eval().requires_grad_(False)


if __name__ == '__main__':
    config = configure(ClassifierConfig(), sys.argv[1:])
    print(config)
    train(config)
