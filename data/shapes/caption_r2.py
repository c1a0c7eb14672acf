"""
How much of a teacher's embedding the caption alone predicts: a ridge regression (closed form, numpy) from caption
features to the embedding, fitted on the train split and scored on val (R^2). What the caption predicts, the GPT
already has in its context; 1 - R^2 is the share of the target that could tell it something new.

    python data/shapes/caption_r2.py --data_dir=data/shapes              # reads meta.json, captions, teacher.bin

The encode step (data/shapes/prepare.py --stage=encode) records the same number in meta.json (teacher_caption_r2).

Caption features: counts of every caption word and of every pair of words inside one phrase (a caption's phrases
are split at "and" and at "on a ... background"), with multi-word names kept whole ("top left", "left of") and
"a", "in", "the" dropped. The pairs let a linear model bind attributes to each other and to their cell ("red" with
"top_left"), which a plain bag of words cannot do when a caption names two objects. Features seen in fewer than
`min_count` train captions are dropped. R^2 is pooled over the D dimensions: 1 - sum of squared errors / sum of
squares about the val mean (sklearn's variance-weighted R^2). It is a linear, caption-only lower bound on what is
predictable: a deeper model could predict more.
"""
import os
import sys
import itertools
from collections import Counter
from dataclasses import dataclass

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from data.shapes.world import CELL_NAMES  # noqa: E402

_MULTIWORD = sorted(CELL_NAMES + ('left of', 'right of'), key=len, reverse=True)  # longest first: 'top left' > 'left'
_STOPWORDS = {'a', 'in', 'the'}


def caption_phrases(text):
    """'a large red circle in the top left and two small blue squares on a striped background' ->
    [['large', 'red', 'circle', 'top_left'], ['two', 'small', 'blue', 'squares'], ['striped', 'background']]."""
    text = ' ' + text.strip() + ' '
    for name in _MULTIWORD:
        text = text.replace(f' {name} ', f" {name.replace(' ', '_')} ")
    text = text.replace(' on a ', ' and ')  # the background phrase is a phrase of its own
    return [[w for w in part.split() if w not in _STOPWORDS] for part in text.split(' and ') if part.strip()]


def caption_terms(text):
    """The features of one caption: its words and the sorted word pairs within each phrase ('red|top_left')."""
    terms = []
    for words in caption_phrases(text):
        terms += words
        terms += ['|'.join(sorted(p)) for p in itertools.combinations(words, 2)]
    return terms


def caption_features(captions, vocab=None, min_count=5):
    """-> (float64 (N, F) feature counts, vocab). Without a vocab, it is built from these captions (terms seen in at
    least min_count of them, sorted); with one, terms outside it are ignored."""
    terms = [caption_terms(c) for c in captions]
    if vocab is None:
        seen = Counter(t for ts in terms for t in set(ts))
        vocab = sorted(t for t, n in seen.items() if n >= min_count)
    index = {t: j for j, t in enumerate(vocab)}
    X = np.zeros((len(captions), len(vocab)))
    for i, ts in enumerate(terms):
        for t in ts:
            if t in index:
                X[i, index[t]] += 1
    return X, vocab


def ridge_fit(X, Y, alpha):
    """Ridge regression with an unpenalised intercept, closed form: W = (Xc^T Xc + alpha I)^-1 Xc^T Yc on centred X, Y.
    -> (W (F, D), x_mean (F,), y_mean (D,)); predict with (X - x_mean) @ W + y_mean."""
    x_mean, y_mean = X.mean(0), Y.mean(0)
    Xc, Yc = X - x_mean, Y - y_mean
    W = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(X.shape[1]), Xc.T @ Yc)  # (F, D)
    return W, x_mean, y_mean


def r2_score(Y, Y_pred):
    """Pooled R^2 over all dimensions: 1 - sum (Y - Y_pred)^2 / sum (Y - mean(Y))^2."""
    Y, Y_pred = np.asarray(Y, dtype=np.float64), np.asarray(Y_pred, dtype=np.float64)
    return float(1 - ((Y - Y_pred) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum())


def caption_r2(train_captions, train_emb, val_captions, val_emb, alpha=1.0, min_count=5):
    """Fit caption features -> embedding on train, score on val. -> dict(r2 (val), r2_train, n_features, alpha)."""
    X, vocab = caption_features(train_captions, min_count=min_count)
    Xv, _ = caption_features(val_captions, vocab)
    Y, Yv = np.asarray(train_emb, dtype=np.float64), np.asarray(val_emb, dtype=np.float64)
    W, x_mean, y_mean = ridge_fit(X, Y, alpha)
    return dict(r2=r2_score(Yv, (Xv - x_mean) @ W + y_mean), r2_train=r2_score(Y, (X - x_mean) @ W + y_mean),
                n_features=len(vocab), alpha=alpha)


@dataclass
class R2Config:
    data_dir: str = 'data/shapes'   # an encoded shapes folder (meta.json, {split}_captions.txt, {split}_teacher.bin)
    alpha: float = 1.0              # ridge penalty on the feature counts
    min_count: int = 5              # drop features seen in fewer train captions


def main(argv):
    from configurator import configure
    from data.common import PreparedSplit, read_meta
    cfg = configure(R2Config(), argv)
    meta = read_meta(cfg.data_dir, 'python data/shapes/prepare.py --stage=encode')
    data = {}
    for split in ('train', 'val'):
        with open(os.path.join(cfg.data_dir, f'{split}_captions.txt')) as f:
            data[split] = (f.read().splitlines(), np.asarray(PreparedSplit(cfg.data_dir, split, meta).teacher))
    r = caption_r2(*data['train'], *data['val'], alpha=cfg.alpha, min_count=cfg.min_count)
    teacher = meta.get('teacher_kind', meta['teacher'].get('name'))
    print(f'{cfg.data_dir}: teacher {teacher} (D = {meta["teacher_dim"]}): caption -> embedding ridge R^2 '
          f'{r["r2"]:.3f} on val ({r["r2_train"]:.3f} on train; {r["n_features"]} caption features, alpha {cfg.alpha})')
    return r


if __name__ == '__main__':
    main(sys.argv[1:])
