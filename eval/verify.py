"""Lossless verification of a drafted chain: greedy, and rejection sampling (Leviathan et al.,
"Fast Inference from Transformers via Speculative Decoding", arXiv 2211.17192, Algorithm 1;
Chen et al., arXiv 2302.01318).

    accept draft d_i (drawn from q_i) with probability min(1, p_i(d_i) / q_i(d_i))
    at the first rejection emit a token from  norm(max(0, p_i - q_i))   (the residual)
    when all K are accepted, emit a bonus token from p_{K+1}

so every emitted token is distributed exactly as the target's p (P(x) = min(p, q)(x) +
(1 - alpha) * residual(x) = p(x)). Greedy is the T = 0 limit: accept while d_i = argmax p_i.
Temperature and top-p are applied identically to the target and the draft (`to_probs`). Rows may
draft different lengths (K is then the longest): row b's chain is its first lengths[b] drafts, and
the verdict is the one its own K = lengths[b] would give, so padding is never accepted.
"""

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def to_probs(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """[..., V] logits -> float32 probabilities after temperature and top-p (nucleus) filtering."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)  # float32 whatever the model dtype
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p  # keeps the token that crosses
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


@dataclass(frozen=True)
class ChainVerdict:
    accepted: torch.Tensor  # [B] int64: drafts accepted, 0..lengths[b]
    next_tokens: torch.Tensor  # [B] int64: the correction (accepted < length) or bonus (accepted = length) token


def _within(lengths: torch.Tensor | None, batch: int, k: int, device: torch.device) -> torch.Tensor:
    """[B, K] bool: True at the drafted positions of each row, False on its padding."""
    if lengths is None:
        return torch.ones(batch, k, dtype=torch.bool, device=device)
    return torch.arange(k, device=device) < lengths[:, None]


def verify_chain_greedy(
    *,
    draft_tokens: torch.Tensor,  # [B, K]; row b drafted its first lengths[b], the rest is padding
    target_logits: torch.Tensor,  # [B, K+1, V]: entry i predicts the token after block entry i
    lengths: torch.Tensor | None = None,  # [B] int64 in 0..K; None = every row drafted K
) -> ChainVerdict:
    """Accept the longest drafted prefix equal to the target's argmax; padding is never accepted,
    and the next token is the argmax after the last accepted entry (causal attention: entry i never
    sees the padding after it)."""
    batch, k = draft_tokens.shape
    choices = target_logits.argmax(dim=-1)  # [B, K+1]
    matches = (draft_tokens == choices[:, :-1]) & _within(lengths, batch, k, draft_tokens.device)
    accepted = matches.long().cumprod(dim=1).sum(dim=1)
    return ChainVerdict(accepted, choices.gather(1, accepted[:, None]).squeeze(1))


def residual(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)); falls back to p where p == q leaves nothing (then rejection never happens)."""
    leftover = (target_probs - draft_probs).clamp(min=0)
    total = leftover.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, leftover / total.clamp(min=1e-30), target_probs)


def verify_chain_sampled(
    *,
    draft_tokens: torch.Tensor,  # [B, K], drawn from draft_probs; past lengths[b], padding
    draft_probs: torch.Tensor,  # [B, K, V]
    target_probs: torch.Tensor,  # [B, K+1, V]
    lengths: torch.Tensor | None = None,  # [B] int64 in 0..K; None = every row drafted K
    generator: torch.Generator | None = None,
) -> ChainVerdict:
    """Row b accepts d_i (i < lengths[b]) while u_i < p_i(d_i) / q_i(d_i); at the first rejection the
    next token comes from the residual, and when all lengths[b] drafts are accepted from p at entry
    lengths[b] (the bonus). u is uniform on [0, 1), so the test is strict: p(d) = 0 never accepts."""
    batch, k = draft_tokens.shape
    within = _within(lengths, batch, k, draft_tokens.device)
    p = target_probs[:, :k].gather(2, draft_tokens[:, :, None]).squeeze(2)
    q = draft_probs.gather(2, draft_tokens[:, :, None]).squeeze(2)
    uniform = torch.rand(batch, k, generator=generator, device=draft_tokens.device)
    accepted = ((uniform * q < p) & within).long().cumprod(dim=1).sum(dim=1)  # u < min(1, p/q) without dividing
    rows = torch.arange(batch, device=draft_tokens.device)
    final = target_probs[rows, accepted]  # [B, V]
    rejected = accepted < within.sum(dim=1)
    padded_q = torch.cat([draft_probs, draft_probs.new_zeros(batch, 1, draft_probs.shape[-1])], dim=1)  # K may be 0
    final = torch.where(rejected[:, None], residual(final, padded_q[rows, accepted]), final)
    next_tokens = torch.multinomial(final, 1, generator=generator).squeeze(1)
    return ChainVerdict(accepted, next_tokens)
