"""The PARD drafter (An et al., "PARD: Accelerating LLM Inference with Low-Cost PARallel Draft Model
Adaptation", AMD, arXiv 2504.18583): an ordinary causal LM with the target's tokenizer that drafts K
tokens in one forward. It is trained to read one reserved mask token m: in [..., pending, m, ..., m]
(K-1 masks) the logits at the pending token and at the i-th mask predict d_1 and d_{i+1}, each from
the real prefix alone. K may exceed the K it was trained with (the paper trains 8, evaluates 12):
that is just more masks.

A step appends to row b, after its valid cache entries, the block

    [accepted drafts not yet fed, left-padded to the longest row | pending | m x (K-1)]

The drafts were never fed as real tokens (masks stood in for them), so the ones the verifier accepts
lead the next step's block. Rows accept different numbers of them: a row with fewer gets masked
padding slots on the left (0 in the 2-D attention mask), and positions count only real entries, so
its tokens continue at its valid cache length. At commit the mask entries are dropped: they hold
"a token here", not the accepted one, and the cache must stay what a prefill of the accepted tokens
gives; `kv.keep_accepted` drops them with the padding slots and realigns the rows. A tree comes from
the same forward: q_l (depth l) does not depend on the parent, so EAGLE-2's expansion reads q_l
under every frontier node.

With a window (specdec.eval.window) the forward still drafts K tokens, and the window then cuts
each row's chain where it would have stopped token by token, reading the states that produced
them; the tokens no row keeps are not verified. Deciding after the forward sees the draft's own
confidence at every position; deciding before it could only save the extra masks' share of one
forward, which grows slowly with K (README, "Window length": 10.4, 11.5 and 11.8 ms a step at
K = 1, 2, 4 on this project's CPU).
"""

import torch
from transformers import PreTrainedModel

from specdec.data_prep.padding import pad
from specdec.eval import kv
from specdec.eval.drafters import ChainProposal, DrafterLoadError
from specdec.eval.tree import DraftTree, expand_tree
from specdec.eval.verify import Sampling, to_probs
from specdec.eval.window import Window, chain_lengths


class PardDrafter:
    target_layers: tuple[int, ...] = ()

    def __init__(self, model: PreTrainedModel, mask_token_id: int, window: Window | None = None) -> None:
        vocab_size = model.get_input_embeddings().num_embeddings
        if not 0 <= mask_token_id < vocab_size:
            raise DrafterLoadError(
                f"PARD's mask token {mask_token_id} (`pard_token` of a saved drafter's config.json) is not a token "
                f"of the draft model (ids 0..{vocab_size - 1}); give the reserved id the draft was trained with."
            )
        self.model = model.eval()
        self.mask_token_id = mask_token_id
        self.window = window  # None: every chain has the k tokens asked for

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_hidden: torch.Tensor | None) -> None:
        self.cache, self.mask = kv.prefill(self.model, input_ids, attention_mask), attention_mask
        self.unfed = input_ids[:, :0]  # [B, U]: accepted drafts not yet in the cache, left-padded
        self.unfed_mask = attention_mask[:, :0]  # [B, U]: 1 on the real ones

    def _draft_logits(self, pending: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One forward of [unfed, pending, m x (K-1)]; the logits [B, K, V] of d_1 .. d_K, and the
        draft's final hidden states [B, K, H] that produced them when a window reads them."""
        masks = pending.new_full((len(pending), k - 1), self.mask_token_id)
        tokens = torch.cat([self.unfed, pending[:, None], masks], dim=1)
        block_mask = torch.cat([self.unfed_mask, self.unfed_mask.new_ones(len(pending), k)], dim=1)
        offsets = kv.prefill_positions(block_mask)  # real entries count on from the valid cache length
        mask = kv.unless_all_visible(torch.cat([self.mask, block_mask], dim=1))
        with torch.inference_mode():
            output = kv.append(
                self.model,
                self.cache,
                self.mask,
                tokens,
                offsets,
                mask,
                logits_to_keep=k,
                output_hidden_states=self.window is not None,
            )
        self.block_size = tokens.shape[1]
        return output.logits, output.hidden_states[-1][:, -k:] if self.window is not None else None

    def propose_chain(
        self, pending: torch.Tensor, k: int, sampling: Sampling, generator: torch.Generator | None
    ) -> ChainProposal:
        logits, hidden = self._draft_logits(pending, k)
        if sampling.greedy:
            tokens, probs = logits.argmax(dim=-1), None
        else:  # d_i is drawn from q_i given the prefix alone: independent of d_<i, which rejection sampling allows
            probs = to_probs(logits, sampling)  # [B, K, V]
            tokens = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(len(pending), k)
        if self.window is None:
            return ChainProposal(tokens, probs)
        lengths = chain_lengths(self.window, hidden, logits)
        longest = int(lengths.max())  # the tokens no row kept are not verified
        return ChainProposal(tokens[:, :longest], probs[:, :longest] if probs is not None else None, lengths)

    def propose_tree(self, pending: torch.Tensor, depth: int, width: int) -> DraftTree:
        logprobs = torch.log_softmax(self._draft_logits(pending, depth)[0].float(), dim=-1)  # [B, depth, V]

        def child_logprobs(tree: DraftTree) -> torch.Tensor:
            """q of the next level under each of the W frontier nodes [B, W, V]: the same for all."""
            level = tree.tokens.shape[1] // width
            return logprobs[:, level, None].expand(-1, width, -1)

        return expand_tree(logprobs[:, 0], child_logprobs, depth=depth, width=width)

    def commit(self, block: torch.Tensor, kept: list[list[int]], target_hidden: torch.Tensor | None) -> None:
        slots = self.unfed.shape[1]  # the pending token sits at block entry `slots`
        ours = [list(range(slots - count, slots + 1)) for count in self.unfed_mask.sum(dim=1).tolist()]
        self.mask = kv.keep_accepted(self.cache, self.mask, ours, self.block_size)
        accepted = [block[row, offsets[1:]] for row, offsets in enumerate(kept)]  # chain drafts or tree path
        self.unfed, self.unfed_mask = (tensor.to(block.device) for tensor in pad(accepted, side="left"))

    def select_rows(self, rows: torch.Tensor) -> None:
        self.mask = kv.select_rows(self.cache, self.mask, rows)
        self.unfed, self.unfed_mask = self.unfed[rows], self.unfed_mask[rows]
