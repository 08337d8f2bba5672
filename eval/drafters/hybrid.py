"""N-gram lookup first, a trained drafter where lookup finds nothing (the window policy's hybrid).

Prompt lookup (specdec.eval.drafters.ngram) drafts for free, and what it finds (a span the text
already contains) is often accepted for several tokens; elsewhere it drafts nothing. A step whose
rows all find a lookup draft uses it; any other step asks the trained drafter, with its window if
it has one. The trained drafter does no work on lookup steps: it queues the target's features of
the tokens those steps accept and feeds them the next time it drafts (Eagle3Drafter.commit), so
its state after any mix of steps is the one it would have had drafting every step. Lookup drafts up
to the engine's k; the trained drafter up to its own `trained_k` (its best chain is often shorter).
"""

import torch

from specdec.eval.drafters import ChainProposal, Drafter
from specdec.eval.drafters.ngram import NgramDrafter
from specdec.eval.tree import DraftTree
from specdec.eval.verify import Sampling


class HybridDrafter:
    def __init__(self, lookup: NgramDrafter, trained: Drafter, trained_k: int | None = None) -> None:
        self.lookup, self.trained, self.trained_k = lookup, trained, trained_k
        self.target_layers = trained.target_layers
        self.lookup_steps = self.trained_steps = 0

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_hidden: torch.Tensor | None) -> None:
        self.lookup.begin(input_ids, attention_mask, None)
        self.trained.begin(input_ids, attention_mask, target_hidden)

    def propose_chain(
        self, pending: torch.Tensor, k: int, sampling: Sampling, generator: torch.Generator | None
    ) -> ChainProposal:
        found = self.lookup.propose_chain(pending, k, sampling, generator)
        if found.lengths is not None and bool((found.lengths > 0).all()):
            self.lookup_steps += 1
            return found
        self.trained_steps += 1
        return self.trained.propose_chain(pending, min(k, self.trained_k or k), sampling, generator)

    def propose_tree(self, pending: torch.Tensor, depth: int, width: int) -> DraftTree:
        raise ValueError("the n-gram-first hybrid drafts chains; set tree_width=1 for it")

    def commit(self, block: torch.Tensor, kept: list[list[int]], target_hidden: torch.Tensor | None) -> None:
        self.lookup.commit(block, kept, None)
        self.trained.commit(block, kept, target_hidden)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.lookup.select_rows(rows)
        self.trained.select_rows(rows)
