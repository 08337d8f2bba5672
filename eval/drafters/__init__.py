"""Drafters at inference: what the engine needs from a drafter (the `Drafter` protocol).

A drafter is a session over a trained module: `begin` reads the prompt, `propose_chain` /
`propose_tree` draft from the accepted prefix, and `commit` rolls its state back to the path the
verifier accepted. Drafters that read the target's hidden states name the layers
(`target_layers`, HF `output_hidden_states` ids) and receive them for every accepted token.
A new drafter's model and session are one file in this package; its training side and its
registration by name are in specdec.trainer.drafters.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

from specdec.eval.tree import DraftTree
from specdec.eval.verify import Sampling


@dataclass(frozen=True)
class ChainProposal:
    tokens: torch.Tensor  # [B, K] int64; past lengths[b], padding: any valid ids, never accepted
    probs: torch.Tensor | None  # [B, K, V] the distributions the tokens were drawn from; None when greedy
    lengths: torch.Tensor | None = None  # [B] int64 in 0..K: tokens drafted per row; None = K for every row


class DrafterLoadError(ValueError):
    """A saved drafter that does not fit: the message names the file and what to give instead."""


class Drafter(Protocol):
    target_layers: tuple[int, ...]  # target hidden states it reads; () for a plain LM

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_hidden: torch.Tensor | None) -> None:
        """Read the prompt minus its last (pending) token: input_ids, attention_mask [B, T], left-padded;
        target_hidden [B, T, L, H] when target_layers is not empty."""

    def propose_chain(
        self, pending: torch.Tensor, k: int, sampling: Sampling, generator: torch.Generator | None
    ) -> ChainProposal:
        """Up to K tokens following the pending tokens [B]; rows may stop early (`lengths`)."""

    def propose_tree(self, pending: torch.Tensor, depth: int, width: int) -> DraftTree:
        """A tree under the pending tokens (the roots). EAGLE-2 expansion gives `depth` levels of
        `width` nodes (`expand_tree`); any tree of parents before children verifies."""

    def commit(self, block: torch.Tensor, kept: list[list[int]], target_hidden: torch.Tensor | None) -> None:
        """The verifier kept, per row, the entries at offsets kept[b] of the block [B, A] the target
        saw ([pending, drafts...]: 0 = pending, then the accepted path). target_hidden [B, A, L, H]
        holds the target's states for the whole block."""

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows of the batch (the others finished)."""


__all__ = ["ChainProposal", "Drafter", "DrafterLoadError"]
