"""Tests of utils.py's learning-rate schedule, the one every trainer (train.py, the shapes tokenizer and teacher)
uses, and of the checkpoint loader's error type."""
import math

import pytest

from utils import CheckpointError, load_checkpoint, lr_schedule


def test_warmup_is_linear_up_to_the_peak():
    """Step it of the warmup gets lr * (it + 1) / warmup_iters, reaching the peak on the last warmup step."""
    assert [lr_schedule(it, 4, 100, 1.0, 0.1) for it in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_cosine_goes_from_the_peak_to_min_lr_at_decay_iters():
    """After warmup a half cosine: the peak at the end of warmup, the midpoint half-way, min_lr from decay_iters on."""
    assert lr_schedule(10, 10, 110, 1.0, 0.1) == pytest.approx(1.0)
    assert lr_schedule(60, 10, 110, 1.0, 0.1) == pytest.approx(0.55)
    assert lr_schedule(110, 10, 110, 1.0, 0.1) == lr_schedule(500, 10, 110, 1.0, 0.1) == 0.1
    assert lr_schedule(35, 10, 110, 1.0, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))


def test_decay_false_keeps_the_peak_after_warmup():
    """LlamaGen's recipe (--decay_lr=False): constant after the warmup."""
    assert lr_schedule(5, 10, 100, 1.0, 0.1, decay=False) == 0.6
    assert lr_schedule(10_000, 10, 100, 1.0, 0.1, decay=False) == 1.0


def test_an_unreadable_checkpoint_raises_its_own_error_type(tmp_path):
    """Callers catch CheckpointError by type, never by matching the message text."""
    path = tmp_path / 'junk.pt'
    path.write_bytes(b'not a checkpoint')
    with pytest.raises(CheckpointError, match='corrupt'):
        load_checkpoint(str(path))
