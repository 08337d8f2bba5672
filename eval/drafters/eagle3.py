"""The EAGLE-3 drafter (Li et al., "EAGLE-3", arXiv 2503.01840): one decoder layer over the
target's fused features and the token embedding, with its own norm and LM head over a draft
vocabulary.

    g_t    = fc([h^a_t ; h^b_t ; h^c_t])                     three target layers at t: [3H] -> [H]
    x_t    = [input_layernorm(e(x_{t+1})) ; hidden_norm(g_t)]  [2H], the attention input
    o_t    = g_t + attn(x)_t ;  o_t = o_t + mlp(post_attention_layernorm(o_t))
    q(. | x_{<=t+1}) = softmax(lm_head(norm(o_t)))           over V_d tokens; target id = draft id + d2t

Drafting the next token feeds o_t back in place of g (the target's features exist only for accepted
tokens). Training unrolls the same way (the training-time test): at step k the query at position t
stands for position t+k, attends to the step-0 keys at positions <= t and to its own keys from
steps 1..k at position t. Parameter and buffer names follow the native EAGLE-3 checkpoint that
SGLang and vLLM load (fc, midlayer.*, norm, lm_head, d2t, t2d); the embedding is the target's,
frozen and not saved. Checked against SpecForge modeling/draft/llama3_eagle.py (a6b6b02).
Its directories, ours and those other trainers and the engines write, are read and written by
specdec.eval.drafters.eagle3_dirs.
"""

import math

import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import (
    LlamaMLP,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from specdec.eval import kv
from specdec.eval.drafters import ChainProposal
from specdec.eval.tree import DraftTree, ancestor_mask, block_offsets, expand_tree
from specdec.eval.verify import Sampling, to_probs
from specdec.eval.window import Window, draft_on


class Eagle3Attention(nn.Module):
    """Llama attention whose q, k, v read the 2H-wide [embedding ; features] input (or `width`)."""

    def __init__(self, config: LlamaConfig, width: int | None = None) -> None:
        super().__init__()
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        width, bias = width or 2 * config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(width, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(width, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=bias)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x [B, T, 2H] -> q [B, nh, T, hd], k and v [B, nh, T, hd] (kv heads repeated), with RoPE."""
        batch, time, _ = x.shape
        q = self.q_proj(x).view(batch, time, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, time, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, time, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        repeat = self.heads // self.kv_heads
        return q, k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)


class Eagle3Layer(nn.Module):
    def __init__(self, config: LlamaConfig, *, norm_before_residual: bool = False) -> None:
        super().__init__()
        # the residual around attention is g (EAGLE-3, SpecForge) or hidden_norm(g) (a vLLM variant
        # that speculators drafters may be trained with)
        self.norm_before_residual = norm_before_residual
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)

    def attention_input(self, embedding: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_layernorm(embedding), self.hidden_norm(features)], dim=-1)

    def finish(self, features: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """Residuals around attention (its output [B, T, nh*hd]) and the MLP: the layer output o."""
        residual = self.hidden_norm(features) if self.norm_before_residual else features
        hidden = residual + self.self_attn.o_proj(attended)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class Eagle3Model(nn.Module):
    def __init__(
        self,
        config: LlamaConfig,  # the decoder layer's: the target's sizes when specdec builds the drafter
        *,
        draft_vocab_size: int,
        embed_tokens: nn.Embedding,
        norm_before_residual: bool = False,
    ) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.embed_tokens = embed_tokens.requires_grad_(False)  # the target's, shared
        self.fc = nn.Linear(3 * hidden, hidden, bias=False)
        self.midlayer = Eagle3Layer(config, norm_before_residual=norm_before_residual)
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))

    def logits(self, output: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(output))

    def unroll(
        self,
        *,
        target_hidden: torch.Tensor,  # [B, T, 3, H]: the three target layers at each position
        next_ids: torch.Tensor,  # [B, T]: the token after each position (x_{t+1})
        attention_mask: torch.Tensor,  # [B, T]: 1 on real positions
        steps: int,
    ) -> torch.Tensor:
        """The training-time test: draft logits [B, K, T, V_d]; step k at t predicts x_{t+k+2}."""
        outputs = self.unroll_outputs(
            target_hidden=target_hidden, next_ids=next_ids, attention_mask=attention_mask, steps=steps
        )
        return self.logits(outputs)

    def unroll_outputs(
        self,
        *,
        target_hidden: torch.Tensor,  # [B, T, 3, H]
        next_ids: torch.Tensor,  # [B, T]
        attention_mask: torch.Tensor,  # [B, T]
        steps: int,
    ) -> torch.Tensor:
        """The layer outputs o [B, K, T, H] of the training-time test, before the norm and the LM head:
        training applies the head only where the loss counts."""
        batch, time = next_ids.shape
        layer, attention = self.midlayer, self.midlayer.self_attn
        features = self.fc(target_hidden.flatten(2))
        positions = torch.arange(time, device=next_ids.device).expand(batch, -1)
        causal = torch.ones(time, time, dtype=torch.bool, device=next_ids.device).tril()
        visible = causal[None] & attention_mask.bool()[:, None, :]  # step-0 keys: s <= t, real
        scale = 1 / math.sqrt(attention.head_dim)
        keys, values, outputs = [], [], []
        for step in range(steps):
            ids = torch.nn.functional.pad(next_ids[:, step:], (0, step))  # x_{t+1+step}
            cos, sin = self.rotary_emb(features, positions + step)
            q, k, v = attention.project(
                layer.attention_input(self.embed_tokens(ids).to(features.dtype), features), cos, sin
            )
            keys.append(k)
            values.append(v)
            scores = (q @ keys[0].transpose(-1, -2)).float() * scale  # [B, nh, T, T]
            scores = scores.masked_fill(~visible[:, None], torch.finfo(torch.float32).min)
            own = [(q * key).sum(-1).float() * scale for key in keys[1:]]  # same position, steps 1..k
            weights = torch.softmax(torch.cat([scores, *[s[..., None] for s in own]], dim=-1), dim=-1).to(q.dtype)
            attended = weights[..., :time] @ values[0]
            for index, value in enumerate(values[1:]):
                attended = attended + weights[..., time + index, None] * value
            attended = attended.transpose(1, 2).reshape(batch, time, -1)
            features = layer.finish(features, attended)
            outputs.append(features)
        return torch.stack(outputs, dim=1)


def shared_keys(model: nn.Module) -> set[str]:
    """Keys of the target's tensors that a drafter borrows (its `embed_tokens`): not saved, not loaded."""
    return {f"embed_tokens.{name}" for name in dict(model.embed_tokens.named_parameters())}


class Eagle3Drafter:
    """The engine's session over an Eagle3Model. Its cache holds one entry per accepted position t,
    built from the target's features h_t and the next token x_{t+1}. A step first feeds the entries
    that became known (the features of the tokens accepted last step, paired with their successors,
    the last with the pending token), then drafts on its own outputs, as a chain or as a tree;
    those own-feature entries are dropped at commit, since the target's features replace them."""

    can_sit_out = True  # commit works after a step it did not draft (HybridDrafter)

    def __init__(self, model: Eagle3Model, target_layers: tuple[int, ...], window: Window | None = None) -> None:
        self.model = model.eval()
        self.target_layers = target_layers
        self.window = window  # None: every chain has the k tokens asked for

    def begin(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, target_hidden: torch.Tensor | None) -> None:
        batch, device = len(input_ids), input_ids.device
        self.keys = self.values = None
        self.mask = attention_mask[:, :0]
        self.fed = False  # whether this step's propose fed the queue (commit's business)
        # Queued entries: features of context positions, whose next tokens are the context shifted
        # by one and, for the last, the pending token (known at the first propose).
        empty = torch.zeros(batch, 0, len(self.target_layers), self.model.fc.out_features, device=device)
        self.queue_hidden = self._features_dtype(target_hidden) if target_hidden is not None else empty
        self.queue_tokens = input_ids[:, 1:]
        self.queue_mask = attention_mask

    def _attend(self, features: torch.Tensor, tokens: torch.Tensor, offsets: torch.Tensor, visible: torch.Tensor):
        """Append entries (features [B, n, H], tokens [B, n]) at positions valid + offsets; visible
        [B, n, S + n] says which cache entries and new entries each may see. Returns outputs o [B, n, H]."""
        layer, attention = self.model.midlayer, self.model.midlayer.self_attn
        x = layer.attention_input(self.model.embed_tokens(tokens).to(features.dtype), features)
        positions = self.mask.sum(dim=1, keepdim=True) + offsets
        cos, sin = self.model.rotary_emb(features, positions)
        q, k, v = attention.project(x, cos, sin)
        self.keys = k if self.keys is None else torch.cat([self.keys, k], dim=2)
        self.values = v if self.values is None else torch.cat([self.values, v], dim=2)
        attended = torch.nn.functional.scaled_dot_product_attention(
            q, self.keys, self.values, attn_mask=visible[:, None]
        )
        return layer.finish(features, attended.transpose(1, 2).flatten(2))

    def _features_dtype(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.to(self.model.fc.weight.dtype)

    def _target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.model.d2t[draft_ids]

    def _target_probs(self, logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
        """The draft distribution on the target vocabulary: zero outside the draft vocabulary."""
        probs = to_probs(logits, sampling)
        full = probs.new_zeros(*probs.shape[:-1], len(self.model.t2d))
        ids = torch.arange(probs.shape[-1], device=probs.device)
        return full.index_copy(-1, ids + self.model.d2t, probs)

    def _feed_queue(self, pending: torch.Tensor) -> torch.Tensor | None:
        """Append the queued entries (the last one paired with the pending token); the output at
        the last [B, 1, H], from which the first draft is read. None when nothing is queued."""
        queued = self.queue_mask.shape[1]
        self.committed = self.mask.shape[1] + queued  # entries from here on are the draft's own, dropped at commit
        self.fed = True
        if queued == 0:  # a one-token prompt: no target features yet, so nothing to draft from
            return None
        tokens = torch.cat([self.queue_tokens, pending[:, None]], dim=1)  # the successor of each queued entry
        features = self.model.fc(self.queue_hidden.flatten(2))
        past = self.mask.bool()
        # queued entries: left-padded (holes masked); each sees the cache and the queue up to itself
        own = (
            torch.ones(queued, queued, dtype=torch.bool, device=pending.device).tril()
            & self.queue_mask.bool()[:, None, :]
        )
        visible = torch.cat([past[:, None, :].expand(-1, queued, -1), own], dim=2)
        visible |= torch.eye(queued + past.shape[1], dtype=torch.bool, device=pending.device)[past.shape[1] :][None]
        outputs = self._attend(features, tokens, kv.prefill_positions(self.queue_mask), visible)
        self.mask = torch.cat([self.mask, self.queue_mask], dim=1)
        return outputs[:, -1:]

    @torch.inference_mode()
    def propose_chain(
        self, pending: torch.Tensor, k: int, sampling: Sampling, generator: torch.Generator | None
    ) -> ChainProposal:
        batch = len(pending)
        feature = self._feed_queue(pending)
        if feature is None:
            drafts = pending[:, None].expand(-1, k)
            one_hot = None if sampling.greedy else torch.nn.functional.one_hot(drafts, len(self.model.t2d)).float()
            return ChainProposal(drafts, one_hot)
        if self.window is not None:
            self.window.start(batch, pending.device)
        drafts, probs = [], []
        lengths = torch.ones(batch, dtype=torch.long, device=pending.device)
        for step in range(k):
            logits = self.model.logits(feature)[:, -1]
            if sampling.greedy:
                token = self._target_ids(logits.argmax(dim=-1))
            else:
                probs.append(self._target_probs(logits, sampling))
                token = torch.multinomial(probs[-1], 1, generator=generator)[:, 0]
            drafts.append(token)
            if step == k - 1:
                break
            if self.window is not None and not draft_on(
                lengths, self.window.go_on(step, feature[:, -1], logits), step + 1
            ):
                break
            visible = torch.cat(
                [self.mask.bool(), torch.ones(batch, step + 1, dtype=torch.bool, device=pending.device)], 1
            )
            feature = self._attend(
                feature, token[:, None], torch.full((batch, 1), step, device=pending.device), visible[:, None]
            )
        tokens, probs = torch.stack(drafts, dim=1), torch.stack(probs, dim=1) if probs else None
        if self.window is None:
            return ChainProposal(tokens, probs)
        longest = int(lengths.max())  # the tokens no row kept are not verified
        return ChainProposal(tokens[:, :longest], probs[:, :longest] if probs is not None else None, lengths)

    @torch.inference_mode()
    def propose_tree(self, pending: torch.Tensor, depth: int, width: int) -> DraftTree:
        """EAGLE-2's expansion (`expand_tree`) on draft-vocabulary log-probabilities. A level is fed
        as `width` entries at its depth, each seeing the cache, its ancestors and itself, with its
        parent's output as features. The deepest level is not fed."""
        batch, device = len(pending), pending.device
        feature = self._feed_queue(pending)
        if feature is None:  # nothing to draft from: a tree of repeats, as the chain does
            tokens = pending[:, None].expand(-1, depth * width)
            parents = torch.arange(-width, (depth - 1) * width, device=device).clamp(min=-1).expand(batch, -1)
            scores = torch.full(tokens.shape, -math.inf, device=device)  # a guess: a dynamic tree keeps node 0 alone
            scores[:, 0] = 0.0
            return DraftTree(tokens, parents, scores=scores)
        outputs = [feature]  # [B, n, H] blocks: the root's output, then each fed level's, in node order

        def child_logprobs(tree: DraftTree) -> torch.Tensor:
            fed = torch.cat(outputs, dim=1)  # [B, 1 + fed nodes, H]; entry 0 is the root
            parents = (tree.parents[:, -width:] + 1)[..., None].expand(-1, -1, fed.shape[-1])
            visible = torch.cat(
                [self.mask.bool()[:, None, :].expand(-1, width, -1), ancestor_mask(tree)[:, -width:, 1:]], dim=2
            )
            offsets = block_offsets(tree)[:, -width:] - 1  # a node sits one past its parent's position
            tokens = self._target_ids(tree.tokens[:, -width:])
            outputs.append(self._attend(fed.gather(1, parents), tokens, offsets, visible))  # [B, W, H]
            return torch.log_softmax(self.model.logits(outputs[-1]).float(), dim=-1)

        root = torch.log_softmax(self.model.logits(feature)[:, -1].float(), dim=-1)
        tree = expand_tree(root, child_logprobs, depth=depth, width=width)
        return DraftTree(self._target_ids(tree.tokens), tree.parents, scores=tree.scores)

    def commit(self, block: torch.Tensor, kept: list[list[int]], target_hidden: torch.Tensor | None) -> None:
        # Drop the draft's own entries; queue the target's features of the accepted tokens. A step that
        # drafted with something else (HybridDrafter) fed nothing: its entries join the queue, fed at once
        # by the next step this drafter drafts.
        fed, self.fed = self.fed, False
        if fed and self.keys is not None:
            self.keys, self.values = self.keys[:, :, : self.committed], self.values[:, :, : self.committed]
        old = (self.queue_hidden, self.queue_tokens, self.queue_mask) if not fed and self.queue_mask.shape[1] else None
        batch, longest = len(kept), max(len(offsets) for offsets in kept)
        target_hidden = self._features_dtype(target_hidden)
        self.queue_hidden = target_hidden.new_zeros(batch, longest, *target_hidden.shape[2:])
        self.queue_tokens = block.new_zeros(batch, longest - 1)
        self.queue_mask = self.mask.new_zeros(batch, longest)
        for row, offsets in enumerate(kept):
            shift = longest - len(offsets)  # right-aligned: the last entry's successor is the next pending token
            self.queue_hidden[row, shift:] = target_hidden[row, offsets]
            self.queue_tokens[row, shift:] = block[row, offsets[1:]]
            self.queue_mask[row, shift:] = 1
        if old is not None:  # the old queue's last entry is followed by this step's pending token
            self.queue_hidden = torch.cat([old[0], self.queue_hidden], dim=1)
            self.queue_tokens = torch.cat([old[1], block[:, :1], self.queue_tokens], dim=1)
            self.queue_mask = torch.cat([old[2], self.queue_mask], dim=1)

    def select_rows(self, rows: torch.Tensor) -> None:
        if self.keys is not None:
            self.keys, self.values = self.keys[rows], self.values[rows]
        self.mask = self.mask[rows]
        self.queue_hidden, self.queue_tokens, self.queue_mask = (
            self.queue_hidden[rows],
            self.queue_tokens[rows],
            self.queue_mask[rows],
        )
