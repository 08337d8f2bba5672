"""The n-gram "prompt lookup" drafter, the zero-training baseline (Saxena, prompt lookup decoding,
https://github.com/apoorvumang/prompt-lookup-decoding): drafts are copied from the row's own text.

With S the row's sequence so far (prompt and generated tokens, the pending one last) and N the
largest n-gram size, for n = min(N, len(S) - 1) down to 1: the windows of S equal to its last n
tokens, taken in order of position, the first whose continuation is not empty gives the draft, the
up to K tokens that follow it in S; a window at the very end of S has no continuation. The draft is
cut before its first EOS, and is then final even if empty (no later window is tried). If no window
matches, the row drafts nothing (`ChainProposal.lengths` 0) and the target decodes alone. This is
transformers' `PromptLookupCandidateGenerator.get_candidates` (v5.24.0,
transformers/generation/candidate_generator.py, lines 1061-1154) per row, without its two extras:
the `max_length` cap (the engine stops at max_new_tokens and drops what follows) and the
`logits_processor` check of forbidden tokens (the engine has no logits processors).

A row keeps an index from each n-gram (n <= N) of its accepted tokens to their start positions, so
a step costs one dictionary look-up per n, whatever the length of the text. Drafts are
deterministic, so the sampled verifier takes them as one-hot proposals (a draft d is accepted with
probability p(d)): lossless. A tree (`eval.tree_width` W > 1) merges into a prefix tree the first W
distinct continuations in the same order (largest n first, then by position), each cut to `depth`
tokens and before its first EOS; the first is the chain's draft whenever that is not empty.
"""

from collections.abc import Iterable, Iterator

import torch

from specdec.eval.drafters import ChainProposal
from specdec.eval.drafters.ctc import pad_trees, prefix_tree
from specdec.eval.tree import DraftTree
from specdec.eval.verify import Sampling


class NgramIndex:
    """One row's accepted tokens and, for each n-gram of them (n <= max_ngram), its start positions
    in increasing order."""

    def __init__(self, max_ngram: int) -> None:
        self.max_ngram = max_ngram
        self.tokens: list[int] = []
        self.starts: dict[tuple[int, ...], list[int]] = {}

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            for n in range(1, min(self.max_ngram, end) + 1):
                self.starts.setdefault(tuple(self.tokens[end - n :]), []).append(end - n)

    def continuations(self, pending: int, k: int) -> Iterator[list[int]]:
        """The up-to-k-token continuations in tokens + [pending] of the windows equal to its last n
        tokens: n from the largest down to 1, windows by position, empty continuations skipped."""
        tokens = self.tokens
        for n in range(min(self.max_ngram, len(tokens)), 0, -1):
            ngram = (*tokens[len(tokens) - n + 1 :], pending)
            # the indexed windows lie within `tokens`, so each has at least the pending token after it
            for start in self.starts.get(ngram, ()):
                yield [*tokens[start + n : start + n + k], pending][:k]


def _before_eos(tokens: list[int], eos_token_ids: frozenset[int]) -> list[int]:
    for index, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[:index]
    return tokens


class NgramDrafter:
    """The engine's session: an NgramIndex per row, fed the prompt at `begin` and the kept block
    entries (pending token included) at `commit`; the pending token of a step is looked up with the
    row's tokens but enters the index only once committed."""

    target_layers: tuple[int, ...] = ()

    def __init__(self, vocab_size: int, *, max_ngram: int = 2, eos_token_ids: Iterable[int] = ()) -> None:
        if max_ngram < 1:
            raise ValueError(
                f"NgramDrafter(max_ngram={max_ngram}): the largest n-gram to match must be at least 1 "
                "(transformers' prompt lookup default is 2)."
            )
        self.vocab_size = vocab_size  # the one-hot draft probabilities of sampled decoding
        self.max_ngram = max_ngram
        self.eos_token_ids = frozenset(eos_token_ids)
        self.rows: list[NgramIndex] = []

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_hidden: torch.Tensor | None) -> None:
        self.rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True):
            row = NgramIndex(self.max_ngram)
            row.extend(token for token, real in zip(ids, mask, strict=True) if real)
            self.rows.append(row)

    def draft(self, row: int, pending: int, k: int) -> list[int]:
        """The chain drafted after `pending` for row `row`: up to k tokens, [] when nothing matches."""
        first = next(self.rows[row].continuations(pending, k), [])
        return _before_eos(first, self.eos_token_ids)

    def propose_chain(
        self, pending: torch.Tensor, k: int, sampling: Sampling, generator: torch.Generator | None
    ) -> ChainProposal:
        pending_ids = pending.tolist()
        drafts = [self.draft(row, token, k) for row, token in enumerate(pending_ids)]
        longest = max(1, *(len(draft) for draft in drafts))
        padded = [draft + [token] * (longest - len(draft)) for draft, token in zip(drafts, pending_ids, strict=True)]
        tokens = torch.tensor(padded, dtype=torch.long, device=pending.device)
        lengths = torch.tensor([len(draft) for draft in drafts], dtype=torch.long, device=pending.device)
        # the drafts are certain, so q is one-hot: the verifier accepts draft d with probability p(d)
        one_hot = None if sampling.greedy else torch.nn.functional.one_hot(tokens, self.vocab_size).float()
        return ChainProposal(tokens, one_hot, lengths)

    def propose_tree(self, pending: torch.Tensor, depth: int, width: int) -> DraftTree:
        """The prefix tree of the first `width` distinct non-empty continuations (after the EOS cut).
        Both verifiers read every node of a row (sizes only count them), so a row cannot be left
        empty beside others: a row without a continuation guesses its pending token once."""
        trees = []
        for row, token in enumerate(pending.tolist()):
            paths: list[list[int]] = []
            for continuation in self.rows[row].continuations(token, depth):
                path = _before_eos(continuation, self.eos_token_ids)
                if path and path not in paths:
                    paths.append(path)
                    if len(paths) == width:
                        break
            trees.append(prefix_tree(paths or [[token]]))
        return pad_trees(trees, pending.device)

    def commit(self, block: torch.Tensor, kept: list[list[int]], target_hidden: torch.Tensor | None) -> None:
        # kept[b] starts with offset 0, the pending token; the next pending token comes with the next proposal
        for row, entries, offsets in zip(self.rows, block.tolist(), kept, strict=True):
            row.extend(entries[offset] for offset in offsets)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.rows = [self.rows[row] for row in rows.tolist()]


__all__ = ["NgramDrafter", "NgramIndex"]
