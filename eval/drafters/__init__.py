"""Drafters at inference: what the engine needs from a drafter, and the registry by name.

A drafter is a session over a trained module: `begin` reads the prompt, `propose_chain` /
`propose_tree` draft from the accepted prefix, and `commit` rolls its state back to the path the
verifier accepted. Drafters that read the target's hidden states name the layers
(`target_layers`, HF `output_hidden_states` ids) and receive them for every accepted token.
A new drafter is one file in this package with `@register_drafter(name)` and one import line below.
"""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from specdec.eval.tree import DraftTree
from specdec.eval.verify import Sampling


@dataclass(frozen=True)
class ChainProposal:
    tokens: torch.Tensor  # [B, K] int64
    probs: torch.Tensor | None  # [B, K, V] the distributions the tokens were drawn from; None when greedy


class Drafter(Protocol):
    target_layers: tuple[int, ...]  # target hidden states it reads; () for a plain LM

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_hidden: torch.Tensor | None) -> None:
        """Read the prompt minus its last (pending) token: input_ids, attention_mask [B, T], left-padded;
        target_hidden [B, T, L, H] when target_layers is not empty."""

    def propose_chain(
        self, pending: torch.Tensor, k: int, sampling: Sampling, generator: torch.Generator | None
    ) -> ChainProposal:
        """K tokens following the pending tokens [B]."""

    def propose_tree(self, pending: torch.Tensor, depth: int, width: int) -> DraftTree:
        """A depth x width tree under the pending tokens."""

    def commit(self, block: torch.Tensor, kept: list[list[int]], target_hidden: torch.Tensor | None) -> None:
        """The verifier kept, per row, the entries at offsets kept[b] of the block [B, A] the target
        saw ([pending, drafts...]: 0 = pending, then the accepted path). target_hidden [B, A, L, H]
        holds the target's states for the whole block."""

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows of the batch (the others finished)."""


DRAFTERS: dict[str, Callable[..., Drafter]] = {}


def register_drafter(name: str) -> Callable:
    def register(builder: Callable[..., Drafter]) -> Callable[..., Drafter]:
        if name in DRAFTERS:
            raise ValueError(
                f"drafter {name!r} is registered twice: {DRAFTERS[name].__module__} and {builder.__module__}"
            )
        DRAFTERS[name] = builder
        return builder

    return register


from specdec.eval.drafters import causal_lm, eagle3  # noqa: E402 (they register after the registry exists)

__all__ = ["DRAFTERS", "ChainProposal", "Drafter", "causal_lm", "eagle3", "register_drafter"]
