"""Tests of data/common.py's reading side: the order train.py reads rows in, the batches it gets, and the readers of
images before encoding."""
import numpy as np
import pytest
import torch

from data.common import (Batches, PreparedSplit, derangement, global_batch_rows, load_split, read_meta,
                         empty_caption_tokens)

N, G = 50, 8   # rows in the split, rows per global batch


def stream(n_steps=25, seed=3):
    return np.concatenate([global_batch_rows(it, G, N, seed=seed) for it in range(n_steps)])   # 200 rows: 4 epochs


def test_global_batches_cover_each_epoch_once():
    """Every row is seen exactly once per epoch, even where a batch straddles two epochs."""
    rows = stream()
    for e in range(4):
        assert sorted(rows[e * N:(e + 1) * N]) == list(range(N))


def test_each_epoch_has_a_new_order():
    """Epoch e's permutation is drawn from (seed, e): the order changes from one epoch to the next."""
    rows = stream()
    assert not np.array_equal(rows[:N], rows[N:2 * N])


def test_a_steps_rows_depend_only_on_seed_and_step():
    """A resumed run at step 7 must read the rows the uninterrupted run read at step 7."""
    assert np.array_equal(global_batch_rows(7, G, N, 3), stream()[56:64])


def test_the_shuffled_teacher_control_never_keeps_a_row_on_its_own_teacher():
    """shuffle_teacher aligns every image to ANOTHER image's embedding: a permutation without fixed point."""
    d = derangement(N)
    assert sorted(d) == list(range(N)) and not np.any(d == np.arange(N))


def test_batches_return_the_split_rows_as_tensors(tiny_data):
    """Batches.get gives long text and codes and float32 teacher rows, equal to the memmapped arrays."""
    split = PreparedSplit(tiny_data, 'train')
    text, codes, teacher = Batches(split, 'cpu', torch.zeros(8, dtype=torch.long), False).get(np.arange(8))
    assert text.dtype == codes.dtype == torch.long and teacher.dtype == torch.float32
    assert torch.equal(codes, torch.from_numpy(np.array(split.codes[:8], dtype=np.int64)))
    assert torch.equal(teacher, torch.from_numpy(np.array(split.teacher[:8], dtype=np.float32)))


def test_dropped_rows_get_the_empty_caption(tiny_data):
    """Prompt dropout for classifier-free guidance swaps in exactly the unconditional caption, nothing else."""
    meta = read_meta(tiny_data)
    uncond = torch.from_numpy(empty_caption_tokens(meta['text_len']).astype(np.int64))
    split = PreparedSplit(tiny_data, 'train')
    drop = np.array([True, False, True, False])
    text, _, _ = Batches(split, 'cpu', uncond, False).get(np.arange(4), drop)
    assert torch.equal(text[0], uncond) and torch.equal(text[2], uncond)
    assert torch.equal(text[1], torch.from_numpy(np.array(split.text[1], dtype=np.int64)))


def test_a_missing_image_split_names_the_command(tmp_path):
    """The tokenizer and teacher trainers read images through load_split: a missing one says what makes it."""
    with pytest.raises(FileNotFoundError, match='prepare.py'):
        load_split(str(tmp_path), 'train')
