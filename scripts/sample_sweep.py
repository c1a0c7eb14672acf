"""
Sampling settings against the shapes evaluator: for each cfg_scale / temperature pair, one sample for each of the first
n val prompts of a shapes checkpoint, scored by data/shapes/evaluate.py (prompt accuracy, per-attribute accuracy and
the Frechet distance to real val images in the evaluator's features). sample.py's defaults were chosen with it.

    python scripts/sample_sweep.py --ckpt=out/shapes/ckpt.pt --settings="2/0.7,1.5/0.3,2/0"   # cfg/temperature pairs

Samples are drawn in batches of 250 prompts, batch b from a generator seeded with b's first prompt index, so every
setting sees the same noise. One JSON line per setting on stdout.
"""
import os
import sys
import json
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402
from sample import load_gpt, load_matching_vqgan, load_text_tokenizer, tokenize_prompts, generate_images  # noqa: E402
from data.shapes.evaluate import get_evaluator, real_val_images, evaluate_samples  # noqa: E402


@dataclass
class SweepConfig:
    ckpt: str = 'out/shapes/ckpt.pt'       # a shapes GPT checkpoint of train.py
    settings: str = '2/0.7,1.5/0.3,2/0'    # comma-separated cfg_scale/temperature pairs
    n_prompts: int = 500                   # the first n val captions of the checkpoint's data
    captions: str = 'data/shapes/val_captions.txt'


def main(cfg):
    model, ckpt = load_gpt(cfg.ckpt, 'cpu')
    vq = load_matching_vqgan(ckpt, '', 'cpu')
    prompts = open(cfg.captions).read().splitlines()[:cfg.n_prompts]
    text = tokenize_prompts(prompts, model.config.text_len, load_text_tokenizer(ckpt, ''))   # (n, L)
    evaluator, real = get_evaluator(progress=False), real_val_images()
    results = []
    for pair in cfg.settings.split(','):
        cfg_scale, temperature = map(float, pair.split('/'))
        images = np.concatenate([generate_images(model, vq, text[s:s + 250], nullcontext(),
                                                 torch.Generator().manual_seed(s), cfg_scale, temperature)
                                 for s in range(0, len(prompts), 250)])                   # (n, H, W, 3) uint8
        m = evaluate_samples(images, prompts, evaluator=evaluator, real_images=real)
        row = dict(cfg_scale=cfg_scale, temperature=temperature, n_prompts=len(prompts),
                   **{k: round(float(m[k]), 4) for k in ('prompt_acc', 'obj_shape_acc', 'position_acc', 'count_acc',
                                                         'frechet_evaluator')})
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


if __name__ == '__main__':
    main(configure(SweepConfig(), sys.argv[1:]))
