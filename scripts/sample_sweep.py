"""
Sampling settings against the shapes evaluator: for each cfg_scale / temperature pair, one sample for each of the first
n val prompts of a shapes checkpoint, scored by data/shapes/evaluate.py (prompt accuracy, per-attribute accuracy and
the Frechet distance to real val images in the evaluator's features). sample.py's defaults were chosen with it.

    python scripts/sample_sweep.py --ckpt=out/shapes/ckpt.pt --settings="2/0.7,1.5/0.3,2/0"   # cfg/temperature pairs

Sampling and scoring are the experiment's (scripts/experiment.py, score_checkpoint): every setting sees the same
noise. One JSON line per setting on stdout.
"""
import os
import sys
import json
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configurator import configure  # noqa: E402
from data.shapes.evaluate import get_evaluator, real_val_images  # noqa: E402
from experiment import ExperimentConfig, score_checkpoint  # noqa: E402  (this script's folder is on sys.path)


@dataclass
class SweepConfig:
    ckpt: str = 'out/shapes/ckpt.pt'       # a shapes GPT checkpoint of train.py
    settings: str = '2/0.7,1.5/0.3,2/0'    # comma-separated cfg_scale/temperature pairs
    n_prompts: int = 500                   # the first n val captions of the checkpoint's data
    captions: str = 'data/shapes/val_captions.txt'


def main(cfg):
    prompts = open(cfg.captions).read().splitlines()[:cfg.n_prompts]
    evaluator, real = get_evaluator(progress=False), real_val_images()
    results = []
    for pair in cfg.settings.split(','):
        cfg_scale, temperature = map(float, pair.split('/'))
        m, _ = score_checkpoint(cfg.ckpt, ExperimentConfig(), 'default', prompts, evaluator, real, cfg_scale,
                                temperature)
        row = {'n_prompts': len(prompts), **{k: round(float(m[k]), 4) for k in (
            'cfg_scale', 'temperature', 'prompt_acc', 'obj_shape_acc', 'position_acc', 'count_acc', 'frechet_evaluator')}}
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


if __name__ == '__main__':
    main(configure(SweepConfig(), sys.argv[1:]))
