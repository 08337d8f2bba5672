"""A plain causal LM as drafter: any Hugging Face model with the target's tokenizer (vLLM's
`draft_model`, SGLang's STANDALONE). It drafts token by token with its own KV cache, which
follows the target's: right-aligned rows, rolled back to the accepted path after every step.

Drafting K tokens takes K forwards: the last draft is never fed. When the verifier accepts it,
it "lags": the next step's first forward feeds it together with the new pending token (rows
without a lagging token get a masked slot there, dropped at commit).
"""

import torch
from transformers import PreTrainedModel

from specdec.eval import kv
from specdec.eval.drafters import ChainProposal
from specdec.eval.tree import DraftTree, ancestor_mask, block_offsets, expand_tree
from specdec.eval.verify import Sampling, to_probs


class CausalLMDrafter:
    target_layers: tuple[int, ...] = ()

    def __init__(self, model: PreTrainedModel) -> None:
        self.model = model.eval()

    def _forward(
        self, tokens: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None, logits_to_keep: int = 0
    ) -> torch.Tensor:
        """Logits [B, n, V] of `tokens` [B, n] appended to the cache at positions valid + offsets
        (the last `logits_to_keep` positions only, if set)."""
        with torch.inference_mode():
            output = kv.append(self.model, self.cache, self.mask, tokens, offsets, mask, logits_to_keep=logits_to_keep)
        return output.logits

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_hidden: torch.Tensor | None) -> None:
        self.cache, self.mask = kv.prefill(self.model, input_ids, attention_mask), attention_mask
        self.lagging = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        self.lag_tokens = torch.zeros(len(input_ids), dtype=torch.long, device=input_ids.device)

    def _feed_pending(self, pending: torch.Tensor) -> torch.Tensor:
        """First forward of a step: [lag slot,] pending. Returns the pending token's logits [B, V]."""
        self.slot = bool(self.lagging.any())
        self.past = torch.cat([self.mask, self.lagging[:, None].to(self.mask.dtype)], dim=1) if self.slot else self.mask
        base = self.lagging.long()[:, None]  # the pending token sits one further when a lagging token precedes it
        if self.slot:
            tokens = torch.stack([self.lag_tokens, pending], dim=1)
            offsets = torch.cat([torch.zeros_like(base), base], dim=1)
        else:
            tokens, offsets = pending[:, None], base
        mask = torch.cat([self.past, torch.ones_like(pending)[:, None].to(self.mask.dtype)], dim=1)
        return self._forward(tokens, offsets, kv.unless_all_visible(mask), 1)[:, -1]

    def propose_chain(
        self, pending: torch.Tensor, k: int, sampling: Sampling, generator: torch.Generator | None
    ) -> ChainProposal:
        logits = self._feed_pending(pending)
        base = self.lagging.long()[:, None]
        tokens, probs = [], []
        for step in range(1, k + 1):
            if sampling.greedy:
                current = logits.argmax(dim=-1, keepdim=True)
            else:
                probs.append(to_probs(logits, sampling))
                current = torch.multinomial(probs[-1], 1, generator=generator)
            tokens.append(current)
            if step == k:
                break  # d_K is fed next step, if accepted
            mask = torch.cat([self.past, self.past.new_ones(len(pending), step + 1)], dim=1)
            logits = self._forward(current, base + step, kv.unless_all_visible(mask))[:, -1]
        self.block_size = int(self.slot) + k  # [lag slot,] pending, d_1 .. d_{K-1}
        self.unfed_from = k  # target-block offsets >= this are not in the cache
        return ChainProposal(torch.cat(tokens, dim=1), torch.stack(probs, dim=1) if probs else None)

    def propose_tree(self, pending: torch.Tensor, depth: int, width: int) -> DraftTree:
        root = torch.log_softmax(self._feed_pending(pending).float(), dim=-1)
        base = self.lagging.long()[:, None]

        def child_logprobs(tree: DraftTree) -> torch.Tensor:
            """Feed the frontier (the last W nodes) under the tree mask; their children's log q [B, W, V]."""
            mask = kv.tree_attention_mask(self.past, ancestor_mask(tree)[:, -width:], self.model.dtype)
            logits = self._forward(tree.tokens[:, -width:], base + block_offsets(tree)[:, -width:], mask)
            return torch.log_softmax(logits.float(), dim=-1)

        tree = expand_tree(root, child_logprobs, depth=depth, width=width)
        fed = tree.tokens.shape[1] - width  # the deepest level is not fed: its accepted node lags
        self.block_size = int(self.slot) + 1 + fed
        self.unfed_from = 1 + fed
        return tree

    def commit(self, block: torch.Tensor, kept: list[list[int]], target_hidden: torch.Tensor | None) -> None:
        slot = int(self.slot)
        lagging = self.lagging.tolist()
        ours = []
        for row, offsets in enumerate(kept):
            fed = [slot + offset for offset in offsets if offset < self.unfed_from]
            ours.append(([0] if slot and lagging[row] else []) + fed)
        self.mask = kv.keep_accepted(self.cache, self.mask, ours, self.block_size)
        last = torch.tensor([offsets[-1] for offsets in kept], device=block.device)
        self.lagging = last >= self.unfed_from
        self.lag_tokens = block.gather(1, last[:, None]).squeeze(1)

    def select_rows(self, rows: torch.Tensor) -> None:
        self.mask = kv.select_rows(self.cache, self.mask, rows)
        self.lagging, self.lag_tokens = self.lagging[rows], self.lag_tokens[rows]
