"""Soft-label cross entropy per row, the kernel of `kd` and `ttt`, computed in chunks of rows.

    ce_n = - sum_x p_n(x) log q_n(x),   q_n = softmax(z_n) in float32,   log q_n = z_n - lse(z_n)
    d ce_n / d z_n = (sum_x p_n(x)) q_n - p_n

The eager form materialises float32 copies of the whole [N, V] logits, log q, p * log q and, in the
backward pass, softmax and its product again: about ten passes over N x V floats (N up to K*T rows,
V = 32000 for an EAGLE-3 draft vocabulary), which on a CPU cost as much as the draft's LM head. This
form runs the same arithmetic one block of rows at a time, so each block's temporaries stay in cache;
it saves the per-row lse, recomputes q in the backward pass and writes the gradient in the logits'
dtype. It is the CPU analogue of SpecForge's fused Triton soft cross entropy (core/loss.py, a6b6b02).
`soft_cross_entropy_reference` is the eager form, kept as its reference (tests compare value and
gradient).
"""

import torch

ROWS_PER_BLOCK = 16  # 16 rows x 32000 float32 = 2 MB of temporaries: one core's L2 on the Xeons here


def soft_cross_entropy_reference(draft_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """-sum_x p log q per row: [..., V] -> [...]."""
    return -(target_probs.float() * torch.log_softmax(draft_logits.float(), dim=-1)).sum(dim=-1)


class _BlockwiseSoftCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        losses = logits.new_empty(len(logits), dtype=torch.float32)
        lse = torch.empty_like(losses)
        for start in range(0, len(logits), ROWS_PER_BLOCK):
            block = slice(start, start + ROWS_PER_BLOCK)
            z = logits[block].float()
            lse[block] = z.logsumexp(dim=-1)
            losses[block] = -(probs[block].float() * (z - lse[block, None])).sum(dim=-1)
        ctx.save_for_backward(logits, probs, lse)
        return losses

    @staticmethod
    def backward(ctx, grad_losses: torch.Tensor):
        logits, probs, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for start in range(0, len(logits), ROWS_PER_BLOCK):
            block = slice(start, start + ROWS_PER_BLOCK)
            p = probs[block].float()
            q = (logits[block].float() - lse[block, None]).exp()
            grad[block] = (q * p.sum(dim=-1, keepdim=True) - p) * grad_losses[block, None]
        return grad, None


def soft_cross_entropy(draft_logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """-sum_x p log q per row: [N, V] -> [N] float32; no gradient reaches target_probs."""
    return _BlockwiseSoftCrossEntropy.apply(draft_logits, target_probs.detach())
