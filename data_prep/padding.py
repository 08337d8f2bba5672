"""Sequences of different lengths as one padded batch: the one padding helper of every stage (the
prep's target forward and the trainer's batches pad on the right, so real tokens never attend to
pads; generation pads on the left, so every row continues at the right edge)."""

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch


def pad(
    sequences: Sequence[torch.Tensor | np.ndarray | list[int]],
    *,
    side: Literal["left", "right"],
    value: int | float | bool = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(padded [B, longest, ...], attention_mask [B, longest] int64, 1 on real entries).

    Rows keep their dtype and trailing dimensions; lists of ints become int64."""
    rows = [torch.as_tensor(np.asarray(row, dtype=np.int64) if isinstance(row, list) else row) for row in sequences]
    longest = max(len(row) for row in rows)
    padded = rows[0].new_full((len(rows), longest, *rows[0].shape[1:]), value)
    attention_mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for index, row in enumerate(rows):
        place = slice(longest - len(row), longest) if side == "left" else slice(0, len(row))
        padded[index, place] = row
        attention_mask[index, place] = 1
    return padded, attention_mask
