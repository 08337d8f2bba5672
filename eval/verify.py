"""Lossless verification of a drafted chain: greedy, and rejection sampling (Leviathan et al.,
"Fast Inference from Transformers via Speculative Decoding", arXiv 2211.17192, Algorithm 1;
Chen et al., arXiv 2302.01318).

    accept draft d_i (drawn from q_i) with probability min(1, p_i(d_i) / q_i(d_i))
    at the first rejection emit a token from  norm(max(0, p_i - q_i))   (the residual)
    when all K are accepted, emit a bonus token from p_{K+1}

so every emitted token is distributed exactly as the target's p (P(x) = min(p, q)(x) +
(1 - alpha) * residual(x) = p(x)). Greedy is the T = 0 limit: accept while d_i = argmax p_i.
Temperature and top-p are applied identically to the target and the draft (`to_probs`).
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
    accepted: torch.Tensor  # [B] int64: drafts accepted, 0..K
    next_tokens: torch.Tensor  # [B] int64: the correction (accepted < K) or bonus (accepted = K) token


def verify_chain_greedy(*, draft_tokens: torch.Tensor, target_logits: torch.Tensor) -> ChainVerdict:
    """draft_tokens [B, K]; target_logits [B, K+1, V], row i predicting the token after block entry i."""
    choices = target_logits.argmax(dim=-1)  # [B, K+1]
    matches = (draft_tokens == choices[:, :-1]).long()
    accepted = matches.cumprod(dim=1).sum(dim=1)
    return ChainVerdict(accepted, choices.gather(1, accepted[:, None]).squeeze(1))


def residual(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)); falls back to p where p == q leaves nothing (then rejection never happens)."""
    leftover = (target_probs - draft_probs).clamp(min=0)
    total = leftover.sum(dim=-1, keepdim=True)
    return torch.where(total > 0, leftover / total.clamp(min=1e-30), target_probs)


def verify_chain_sampled(
    *,
    draft_tokens: torch.Tensor,  # [B, K], drawn from draft_probs
    draft_probs: torch.Tensor,  # [B, K, V]
    target_probs: torch.Tensor,  # [B, K+1, V]
    generator: torch.Generator | None = None,
) -> ChainVerdict:
    batch, k = draft_tokens.shape
    p = target_probs[:, :k].gather(2, draft_tokens[:, :, None]).squeeze(2)
    q = draft_probs.gather(2, draft_tokens[:, :, None]).squeeze(2)
    uniform = torch.rand(batch, k, generator=generator, device=draft_tokens.device)
    accepted = (uniform * q <= p).long().cumprod(dim=1).sum(dim=1)  # u < min(1, p/q) without dividing
    rows = torch.arange(batch, device=draft_tokens.device)
    final = target_probs[rows, accepted]  # [B, V]
    rejected = accepted < k
    padded_q = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)
    final = torch.where(rejected[:, None], residual(final, padded_q[rows, accepted]), final)
    next_tokens = torch.multinomial(final, 1, generator=generator).squeeze(1)
    return ChainVerdict(accepted, next_tokens)
