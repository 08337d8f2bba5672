import numpy as np
import torch

from specdec.data_prep.padding import pad


def test_rows_are_padded_on_the_side_asked_with_the_value_asked_and_a_mask() -> None:
    padded, mask = pad([[5, 6, 7], [8]], side="left", value=-1)
    assert padded.tolist() == [[5, 6, 7], [-1, -1, 8]] and padded.dtype == torch.int64
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    padded, mask = pad([np.array([1, 2], dtype=np.int32), np.array([3], dtype=np.int32)], side="right")
    assert padded.tolist() == [[1, 2], [3, 0]] and mask.tolist() == [[1, 1], [1, 0]]


def test_trailing_dimensions_and_dtypes_are_kept() -> None:
    hidden = [torch.ones(2, 3, 4, dtype=torch.bfloat16), torch.full((1, 3, 4), 2.0, dtype=torch.bfloat16)]
    padded, mask = pad(hidden, side="right")
    assert padded.shape == (2, 2, 3, 4) and padded.dtype == torch.bfloat16
    assert padded[1, 0].eq(2).all() and padded[1, 1].eq(0).all() and mask.tolist() == [[1, 1], [1, 0]]
    flags, _ = pad([torch.tensor([True]), torch.tensor([True, True])], side="right")
    assert flags.tolist() == [[True, False], [True, True]]
