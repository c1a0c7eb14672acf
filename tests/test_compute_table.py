"""The compute table of `python llm.py scale` (docs/sharded-training.md): training FLOPs of the ImageNet recipe and
the GPU-hours they take, checked against FLOPs counted another way: PyTorch's FlopCounterMode running a forward and
backward of the same GPT (on the meta device, so no memory and no time), and the hours recomputed step by step."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import llm
from model import GPT, GPTConfig, PRESETS


def counted_training_flops(config, batch_size=2):
    """FLOPs of one training step (CE + alignment loss, forward and backward) per sequence, as FlopCounterMode
    counts the matmuls and attention PyTorch actually runs."""
    with torch.device('meta'):
        model = GPT(config)
    text = torch.zeros(batch_size, config.text_len, dtype=torch.long, device='meta')
    codes = torch.zeros(batch_size, config.image_tokens, dtype=torch.long, device='meta')
    teacher = torch.zeros(batch_size, config.teacher_dim, device='meta')
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(text, codes, teacher=teacher)
        (out.loss + out.align_loss).backward()
    return counter.get_total_flops() / batch_size


@pytest.mark.parametrize('name', ['B', 'L', 'XL'])
def test_training_flops_match_what_pytorch_counts(name):
    """Each row's FLOPs per sequence (GPT.flops_per_sequence) is what the model's forward + backward really costs
    at the recipe's shape, to 0.1% (the formula also counts the RMSNorm weights and the projector's biases at 6
    FLOPs per token, which are no matmuls: 0.02% here), and the row's total is that times 300 epochs of
    ImageNet-1k's train images."""
    row, = llm.compute_rows(names=(name,))
    config = GPTConfig(**PRESETS[name], codebook_size=16384, image_tokens=256, text_len=16, teacher_dim=512)
    counted = counted_training_flops(config)
    assert row['flops_per_sequence'] == pytest.approx(counted, rel=1e-3)
    assert row['sequences'] == 300 * 1_281_167
    assert row['flops'] == pytest.approx(counted * 300 * 1_281_167, rel=1e-3)


def test_gpu_hours_follow_from_steps_of_the_recipe():
    """GPU-hours recomputed as the recipe runs: steps of a global batch of 256, each taking batch FLOPs over 8
    GPUs at 40% of 989 TFLOP/s; the node-days are those hours on 8 GPUs."""
    for row in llm.compute_rows(gpus=8, peak=989e12, mfu=0.4):
        steps = 300 * 1_281_167 / 256
        seconds_per_step = 256 * row['flops_per_sequence'] / (8 * 0.4 * 989e12)
        node_hours = steps * seconds_per_step / 3600
        assert row['gpu_hours'] == pytest.approx(8 * node_hours, rel=1e-9)
        assert row['node_days'] == pytest.approx(node_hours / 24, rel=1e-9)


def test_the_text_length_is_the_imagenet_prepare_default():
    """The table's sequence is ImageNet's as this project prepares it: data/imagenet/prepare.py's text length."""
    from data.imagenet.prepare import ImageNetConfig
    assert llm.IMAGENET_TEXT_LEN == ImageNetConfig().text_len


def test_llm_py_scale_prints_the_table(capsys):
    """`python llm.py scale` prints the memory table, then the compute table labelled an estimate, one row a size."""
    llm.main(['scale'])
    out = capsys.readouterr().out
    assert 'an estimate' in out and '40% MFU of 989 TFLOP/s' in out
    for row in llm.compute_rows():
        assert f'| {row["model"]} | {row["params"] / 1e9:.2f}B | {row["flops_per_sequence"]:.3g} | ' \
               f'{row["flops"]:.3g} | {row["gpu_hours"]:,.0f} |' in out
