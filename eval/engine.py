"""The speculative decoding engine: draft, verify in one target forward, keep the accepted path.

One loop serves every use: `specdec-eval`, the training-time eval hook and the benchmarks; with no
drafter it is plain autoregressive decoding on the same code path (the baseline of every speedup).
Prompts are batched with left padding; rows finish at different times and leave the batch. Drafts
are chains, whose length may differ per row and step (`ChainProposal.lengths`), or trees of any
shape (`DraftTree`), which the engine can cut per row to the nodes the drafter is confident in
(EAGLE-2's dynamic tree, `cfg.tree_min_confidence`; the drafter still sees its whole tree). Per
verify step it records, per row, how many tokens were drafted and how many accepted drafts the
output keeps (none past EOS or max_new_tokens), and for the batch the time spent drafting and
verifying (CUDA synchronised before each clock read).
"""

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel

from specdec.data_prep.padding import pad
from specdec.eval import kv
from specdec.eval.drafters import ChainProposal, Drafter
from specdec.eval.tree import (
    DraftTree,
    ancestor_mask,
    block_offsets,
    prune_tree,
    verify_tree_greedy,
    verify_tree_sampled,
)
from specdec.eval.verify import Sampling, to_probs, verify_chain_greedy, verify_chain_sampled


@dataclass(frozen=True)
class SpecConfig:
    k: int = 4  # drafted tokens per verify step: chain length, or tree depth
    tree_width: int = 1  # 1 = a chain; W > 1 = a tree of k levels of W nodes
    # a tree keeps the nodes whose path the drafter gives at least this probability (EAGLE-2's dynamic
    # tree, `prune_tree`); 0 keeps every node
    tree_min_confidence: float = 0.0
    max_new_tokens: int = 128
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class Generation:
    new_tokens: list[list[int]]  # per prompt, in prompt order; ends with EOS when one was emitted
    accepted: list[list[int]]  # per prompt and verify step: accepted drafts that the output keeps
    drafted: list[list[int]]  # per prompt and verify step: tokens drafted (chain length, or tree nodes)
    draft_time_s: list[float]  # per verify step of the batch: the drafter's propose and commit
    verify_time_s: list[float]  # per verify step: target forward, verification, target KV rollback
    seconds: float  # wall time of the whole generation, prefill included

    @property
    def num_new_tokens(self) -> int:
        return sum(len(tokens) for tokens in self.new_tokens)


class _TargetState:
    """The frozen target with its KV cache over the accepted tokens (all but the pending one)."""

    def __init__(self, model: PreTrainedModel, layers: tuple[int, ...]) -> None:
        self.model, self.layers = model, layers
        self.cache = DynamicCache(config=model.config)
        self.mask: torch.Tensor

    def forward(
        self, tokens: torch.Tensor, offsets: torch.Tensor, attention_mask: torch.Tensor | None, logits_to_keep: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits [B, n, V] (the last `logits_to_keep` only, if set) and the drafter's hidden states."""
        output = kv.append(
            self.model,
            self.cache,
            self.mask,
            tokens,
            offsets,
            attention_mask,
            logits_to_keep=logits_to_keep,
            output_hidden_states=bool(self.layers),
        )
        hidden = torch.stack([output.hidden_states[i] for i in self.layers], dim=2) if self.layers else None
        return output.logits, hidden


@dataclass(frozen=True)
class _Block:
    tokens: torch.Tensor  # [B, A]: the pending token, then the drafts
    offsets: torch.Tensor  # [A] or [B, A]: positions after the valid cache entries
    attention_mask: torch.Tensor | None
    drafted: torch.Tensor  # [B] int64: drafted tokens per row
    chain: ChainProposal | None
    tree: DraftTree | None
    # a pruned tree: the drafter's whole tree, and each verified node's index in it [B, N']
    drafted_tree: DraftTree | None = None
    tree_nodes: torch.Tensor | None = None

    def for_drafter(self, kept: list[list[int]], hidden: torch.Tensor | None):
        """(block, kept offsets, target states) as the drafter proposed them: a pruned tree's verified
        nodes put back at their places in its whole tree (entries it dropped are never kept)."""
        if self.tree_nodes is None:
            return self.tokens, kept, hidden
        nodes = self.tree_nodes.tolist()
        kept = [[0] + [1 + nodes[row][offset - 1] for offset in offsets[1:]] for row, offsets in enumerate(kept)]
        tokens = torch.cat([self.tokens[:, :1], self.drafted_tree.tokens], dim=1)
        if hidden is None:
            return tokens, kept, None
        batch, size = self.tree_nodes.shape
        real = torch.arange(size, device=hidden.device) < self.drafted[:, None]
        places = torch.where(real, 1 + self.tree_nodes, tokens.shape[1])  # padding copies go to a spare entry
        full = hidden.new_zeros(batch, tokens.shape[1] + 1, *hidden.shape[2:])
        full[:, 0] = hidden[:, 0]
        full[torch.arange(batch, device=hidden.device)[:, None], places] = hidden[:, 1:]
        return tokens, kept, full[:, :-1]


def _draft(drafter: Drafter | None, pending: torch.Tensor, state: _TargetState, cfg: SpecConfig, generator) -> _Block:
    device = pending.device
    if drafter is None:
        tokens, drafted = pending[:, None], torch.zeros_like(pending)
        offsets = torch.zeros(1, dtype=torch.long, device=device)
        return _Block(tokens, offsets, kv.block_mask(state.mask, 1), drafted, None, None)
    if cfg.tree_width == 1:
        chain = drafter.propose_chain(pending, cfg.k, cfg.sampling, generator)
        tokens = torch.cat([pending[:, None], chain.tokens], dim=1)
        drafted = (
            chain.tokens.new_full(pending.shape, chain.tokens.shape[1]) if chain.lengths is None else chain.lengths
        )
        # drafts past a row's length are padding: fed like the others (causal attention keeps them
        # from every entry before them), never accepted, and dropped from the cache at rollback
        offsets = torch.arange(tokens.shape[1], device=device)
        return _Block(tokens, offsets, kv.block_mask(state.mask, tokens.shape[1]), drafted, chain, None)
    tree = drafted_tree = drafter.propose_tree(pending, cfg.k, cfg.tree_width)
    nodes = None
    if cfg.tree_min_confidence > 0:
        if drafted_tree.scores is None:
            raise ValueError(
                f"tree_min_confidence={cfg.tree_min_confidence}: {type(drafter).__name__} builds trees without "
                "EAGLE-2's path scores (a CTC drafter's are beam paths), so there is nothing to size them by; "
                "leave the threshold at 0 for it."
            )
        tree, nodes = prune_tree(drafted_tree, cfg.tree_min_confidence)
    tokens = torch.cat([pending[:, None], tree.tokens], dim=1)
    mask = kv.tree_attention_mask(state.mask, ancestor_mask(tree), state.model.dtype)
    drafted = tree.tokens.new_full(pending.shape, tree.tokens.shape[1]) if tree.sizes is None else tree.sizes
    return _Block(tokens, block_offsets(tree), mask, drafted, None, tree, drafted_tree, nodes)


def _verify(logits: torch.Tensor, block: _Block, sampling: Sampling, generator):
    """(accepted [B], next tokens [B], kept block offsets per row) for the step's drafts."""
    if block.tree is not None:
        verdict = (
            verify_tree_greedy(block.tree, target_logits=logits)
            if sampling.greedy
            else verify_tree_sampled(block.tree, target_probs=to_probs(logits, sampling), generator=generator)
        )
        return verdict.accepted, verdict.next_tokens, [[0] + [1 + node for node in path] for path in verdict.paths]
    if block.chain is None:  # autoregressive: a "chain" of no drafts
        first = logits[:, 0]
        nxt = (
            first.argmax(-1)
            if sampling.greedy
            else torch.multinomial(to_probs(first, sampling), 1, generator=generator)[:, 0]
        )
        return torch.zeros_like(nxt), nxt, [[0]] * len(nxt)
    if sampling.greedy:
        verdict = verify_chain_greedy(
            draft_tokens=block.chain.tokens, target_logits=logits, lengths=block.chain.lengths
        )
    else:
        verdict = verify_chain_sampled(
            draft_tokens=block.chain.tokens,
            draft_probs=block.chain.probs,
            target_probs=to_probs(logits, sampling),
            lengths=block.chain.lengths,
            generator=generator,
        )
    return verdict.accepted, verdict.next_tokens, [list(range(n + 1)) for n in verdict.accepted.tolist()]


def _clock(device: torch.device) -> float:
    """perf_counter once the device has run what was queued, so GPU work lands in the span that queued it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _kept_count(emitted: list[int], room: int, eos_token_ids: set[int]) -> int:
    """How many of a row's emitted tokens (accepted drafts, then the next token) the output keeps:
    up to the first EOS, included, and at most `room`."""
    for count, token in enumerate(emitted[:room], start=1):
        if token in eos_token_ids:
            return count
    return min(len(emitted), room)


@torch.inference_mode()
def generate(
    target: PreTrainedModel,
    prompts: list[list[int]],
    *,
    drafter: Drafter | None,
    cfg: SpecConfig,
    eos_token_ids: set[int],
    generator: torch.Generator | None = None,
) -> Generation:
    """Continue every prompt (token ids, chat template applied) for up to cfg.max_new_tokens tokens."""
    device = target.device
    start = time.perf_counter()
    ids, mask = (tensor.to(device) for tensor in pad(prompts, side="left"))  # rows continue at the right edge
    state = _TargetState(target, drafter.target_layers if drafter else ())
    state.mask = mask[:, :0]
    context, context_mask, pending = ids[:, :-1], mask[:, :-1], ids[:, -1]
    hidden = None
    if context.shape[1]:
        # the prefill's logits are never read: the pending token's come with the first block
        positions = kv.prefill_positions(context_mask)
        _, hidden = state.forward(context, positions, kv.unless_all_visible(context_mask), 1)
        state.mask = context_mask
    if drafter is not None:
        drafter.begin(context, context_mask, hidden)

    rows = list(range(len(prompts)))  # prompt index of each batch row still generating
    new_tokens: list[list[int]] = [[] for _ in prompts]
    accepted: list[list[int]] = [[] for _ in prompts]
    drafted: list[list[int]] = [[] for _ in prompts]
    draft_time_s: list[float] = []
    verify_time_s: list[float] = []
    while rows:
        drafting = _clock(device)
        block = _draft(drafter, pending, state, cfg, generator)
        verifying = _clock(device)
        logits, hidden = state.forward(block.tokens, block.offsets.expand(len(rows), -1), block.attention_mask)
        num_accepted, next_tokens, kept = _verify(logits, block, cfg.sampling, generator)
        state.mask = kv.keep_accepted(state.cache, state.mask, kept, block.tokens.shape[1])
        committing = _clock(device)
        if drafter is not None:
            drafter.commit(*block.for_drafter(kept, hidden))
        done = _clock(device)
        draft_time_s.append(verifying - drafting + done - committing)
        verify_time_s.append(committing - verifying)

        finished = []
        block_tokens, next_list, drafted_list = block.tokens.tolist(), next_tokens.tolist(), block.drafted.tolist()
        for row, (prompt_index, num, offsets) in enumerate(zip(rows, num_accepted.tolist(), kept, strict=True)):
            out = new_tokens[prompt_index]
            emitted = [block_tokens[row][offset] for offset in offsets[1:]] + [next_list[row]]
            count = _kept_count(emitted, cfg.max_new_tokens - len(out), eos_token_ids)
            out.extend(emitted[:count])
            if out[-1] in eos_token_ids or len(out) == cfg.max_new_tokens:
                finished.append(row)
            if drafter is not None:
                accepted[prompt_index].append(min(num, count))  # the drafts come first in `emitted`
                drafted[prompt_index].append(drafted_list[row])
        pending = next_tokens
        if finished:
            keep_rows = torch.tensor(
                [r for r in range(len(rows)) if r not in finished], device=device, dtype=torch.long
            )
            rows = [rows[r] for r in keep_rows.tolist()]
            if not rows:
                break
            state.mask = kv.select_rows(state.cache, state.mask, keep_rows)
            pending = pending[keep_rows]
            if drafter is not None:
                drafter.select_rows(keep_rows)
    return Generation(
        new_tokens=new_tokens,
        accepted=accepted,
        drafted=drafted,
        draft_time_s=draft_time_s,
        verify_time_s=verify_time_s,
        seconds=_clock(device) - start,
    )
