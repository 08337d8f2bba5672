"""A plain causal LM as drafter: any Hugging Face model with the target's tokenizer (vLLM's
`draft_model`, SGLang's STANDALONE). It drafts token by token with its own KV cache, which
follows the target's: right-aligned rows, rolled back to the accepted path after every step.

Drafting K tokens takes K forwards: the last draft is never fed. When the verifier accepts it,
it "lags": the next step's first forward feeds it together with the new pending token (rows
without a lagging token get a masked slot there, dropped at commit). With a window
(specdec.eval.window) a row's chain ends at its window's first "stop", read from the model's final
hidden state and logits after each draft token, and drafting ends once every row has stopped.
"""

import torch
from transformers import PreTrainedModel

from specdec.eval import kv
from specdec.eval.drafters import ChainProposal
from specdec.eval.tree import DraftTree, ancestor_mask, block_offsets, expand_tree
from specdec.eval.verify import Sampling, to_probs
from specdec.eval.window import Window, draft_on


class CausalLMDrafter:
    target_layers: tuple[int, ...] = ()

    def __init__(self, model: PreTrainedModel, window: Window | None = None) -> None:
        self.model = model.eval()
        self.window = window  # None: every chain has the k tokens asked for

    def _forward(
        self, tokens: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None, logits_to_keep: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, n, V] of `tokens` [B, n] appended to the cache at positions valid + offsets
        (the last `logits_to_keep` positions only, if set), and the final hidden state of the last
        position [B, H] when a window reads it."""
        with torch.inference_mode():
            output = kv.append(
                self.model,
                self.cache,
                self.mask,
                tokens,
                offsets,
                mask,
                logits_to_keep=logits_to_keep,
                output_hidden_states=self.window is not None,
            )
        return output.logits, output.hidden_states[-1][:, -1] if self.window is not None else None

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_hidden: torch.Tensor | None) -> None:
        self.cache, self.mask = kv.prefill(self.model, input_ids, attention_mask), attention_mask
        self.lagging = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
        self.lag_tokens = torch.zeros(len(input_ids), dtype=torch.long, device=input_ids.device)

    def _feed_pending(self, pending: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """First forward of a step: [lag slot,] pending. Returns the pending token's logits [B, V]
        (and final hidden state [B, H] when a window reads it)."""
        self.slot = bool(self.lagging.any())
        self.past = torch.cat([self.mask, self.lagging[:, None].to(self.mask.dtype)], dim=1) if self.slot else self.mask
        base = self.lagging.long()[:, None]  # the pending token sits one further when a lagging token precedes it
        if self.slot:
            tokens = torch.stack([self.lag_tokens, pending], dim=1)
            offsets = torch.cat([torch.zeros_like(base), base], dim=1)
        else:
            tokens, offsets = pending[:, None], base
        mask = torch.cat([self.past, torch.ones_like(pending)[:, None].to(self.mask.dtype)], dim=1)
        logits, hidden = self._forward(tokens, offsets, kv.unless_all_visible(mask), 1)
        return logits[:, -1], hidden

    def propose_chain(
        self, pending: torch.Tensor, k: int, sampling: Sampling, generator: torch.Generator | None
    ) -> ChainProposal:
        logits, hidden = self._feed_pending(pending)
        base = self.lagging.long()[:, None]
        if self.window is not None:
            self.window.start(len(pending), pending.device)
        lengths = torch.ones_like(pending)
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
            if self.window is not None and not draft_on(lengths, self.window.go_on(step - 1, hidden, logits), step):
                break  # every row stopped: the last draft is fed next step, as d_K is
            mask = torch.cat([self.past, self.past.new_ones(len(pending), step + 1)], dim=1)
            logits, hidden = self._forward(current, base + step, kv.unless_all_visible(mask))
            logits = logits[:, -1]
        drafted = len(tokens)  # the longest row's chain
        self.block_size = int(self.slot) + drafted  # [lag slot,] pending, d_1 .. d_{n-1}
        self.unfed_from = drafted  # target-block offsets >= this are not in the cache
        return ChainProposal(
            torch.cat(tokens, dim=1),
            torch.stack(probs, dim=1) if probs else None,
            lengths if self.window is not None else None,
        )

    def propose_tree(self, pending: torch.Tensor, depth: int, width: int) -> DraftTree:
        root = torch.log_softmax(self._feed_pending(pending)[0].float(), dim=-1)
        base = self.lagging.long()[:, None]

        def child_logprobs(tree: DraftTree) -> torch.Tensor:
            """Feed the frontier (the last W nodes) under the tree mask; their children's log q [B, W, V]."""
            mask = kv.tree_attention_mask(self.past, ancestor_mask(tree)[:, -width:], self.model.dtype)
            logits, _ = self._forward(tree.tokens[:, -width:], base + block_offsets(tree)[:, -width:], mask)
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
