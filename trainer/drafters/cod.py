"""COnditional Drop-token (COD): the training sequence of a parallel drafter (PARD, An et al.,
arXiv 2504.18583, section 3.2; AMD-AGI/PARD pard/pard_train.py at 6f279bf).

A padded batch of length L becomes K blocks, concatenated into one sequence:

    block 0      the real tokens x_0 .. x_{L-1}        position ids 0 .. L-1
    block i>=1   L copies of the mask token m          position ids 0 .. L-1 (they repeat)

and query (i, t), block i at position t, may attend
    (0, s)            for s <= t - i          the real prefix x_0 .. x_{t-i}
    (j, t - (i - j))  for 1 <= j <= i         the chain of i masks that ends at itself
which is what the draft sees at inference when i masks follow the last accepted token x_{t-i}. So
(i, t) predicts x_{t+1}, the (i+1)-th token after its prefix.

COD keeps, in block i >= 1, n_i = floor(L * max(r^i, r_min)) positions drawn uniformly among the
successors {(s + 1) mod L : s in S_{i-1}} of the positions block i-1 kept (S_0 = every position).
Since t in S_i implies t - 1 in S_{i-1}, every kept query keeps its whole mask chain: the drop is
conditional, and a sample costs L * (1 + sum_{i=1..K-1} max(r^i, r_min)) tokens instead of K * L
(3.37 L for PARD-1's K = 8, r = 0.7, r_min = 0.2). The kept positions are the same for every row of
a batch, so one [M, M] mask serves the whole batch: with right padding, a real query never sees a
padded key (its keys sit at positions <= its own).
"""

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CodLayout:
    """The kept tokens of the K blocks, in block order then position order: M tokens."""

    block: torch.Tensor  # [M] int64, the block i of each kept token
    position: torch.Tensor  # [M] int64, its position t (its position id)

    def attention(self) -> torch.Tensor:
        """[M, M] bool: query (i, t) may attend key (j, s) (module docstring)."""
        bq, pq = self.block[:, None], self.position[:, None]
        bk, pk = self.block[None, :], self.position[None, :]
        prefix = (bk == 0) & (pk <= pq - bq)
        chain = (bk >= 1) & (bk <= bq) & (pq - pk == bq - bk)
        return prefix | chain


def kept_counts(length: int, k: int, r: float, r_min: float) -> list[int]:
    """n_i for blocks 0 .. K-1: L, then floor(L * max(r^i, r_min))."""
    return [length] + [math.floor(length * max(r**i, r_min)) for i in range(1, k)]


def cod_layout(length: int, k: int, r: float, r_min: float, generator: torch.Generator) -> CodLayout:
    """The kept (block, position) pairs of a batch of length L, drawn with `generator`."""
    kept = [torch.arange(length)]
    for count in kept_counts(length, k, r, r_min)[1:]:
        successors = (kept[-1] + 1) % length
        chosen = successors[torch.randperm(len(successors), generator=generator)[:count]]
        kept.append(chosen.sort().values)
    block = torch.cat([torch.full_like(positions, i) for i, positions in enumerate(kept)])
    return CodLayout(block=block, position=torch.cat(kept))
