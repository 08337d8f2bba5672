"""Each objective against a slow reference written straight from its docstring formula (loops over
steps and positions), on random inputs, for value and gradient; plus hand-computed values and the
invariants: optimum when the draft equals the target, zero gradient on masked positions, 0 for a
fully masked batch."""

import math

import pytest
import torch

from specdec.trainer.objectives import OBJECTIVES
from specdec.trainer.objectives.expected_accept import ExpectedAcceptConfig
from specdec.trainer.objectives.kd import KdConfig
from specdec.trainer.objectives.lk import LkAlphaConfig, LkHybridConfig
from specdec.trainer.objectives.ttt import TttConfig

B, K, T, V = 2, 3, 5, 7
# float32 softmax and reductions against a float64 reference: agreement to a few ulps of float32
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _inputs(seed: int = 0, masked_share: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    draft_logits = torch.randn(B, K, T, V, generator=generator, dtype=torch.float64) * 2
    target_probs = torch.softmax(torch.randn(B, K, T, V, generator=generator, dtype=torch.float64) * 2, -1)
    loss_mask = torch.rand(B, K, T, generator=generator) > masked_share
    return draft_logits.requires_grad_(), target_probs, loss_mask


def _call(name: str, draft_logits, target_probs, loss_mask, cfg):
    """The objective on the counted places only, as the drafters give them (packed rows)."""
    return OBJECTIVES[name].function(
        draft_logits=draft_logits[loss_mask], target_probs=target_probs[loss_mask], loss_mask=loss_mask, cfg=cfg
    )


def _mean(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(values).mean() if values else torch.zeros((), dtype=torch.float64)


def reference_kd(draft_logits, target_probs, loss_mask, cfg):
    terms = []
    for b, k, t in torch.cartesian_prod(torch.arange(B), torch.arange(K), torch.arange(T)).tolist():
        if loss_mask[b, k, t]:
            q = torch.softmax(draft_logits[b, k, t], -1)
            terms.append(-sum(target_probs[b, k, t, x] * torch.log(q[x]) for x in range(V)))
    return _mean(terms)


def reference_ttt(draft_logits, target_probs, loss_mask, cfg):
    total = torch.zeros((), dtype=torch.float64)
    for k in range(K):
        terms = []
        for b in range(B):
            for t in range(T):
                if loss_mask[b, k, t]:
                    q = torch.softmax(draft_logits[b, k, t], -1)
                    terms.append(-(target_probs[b, k, t] * torch.log(q)).sum())
        total = total + cfg.decay**k * _mean(terms)
    return total


def reference_expected_accept(draft_logits, target_probs, loss_mask, cfg):
    chains = []
    for b in range(B):
        for t in range(T):
            if not loss_mask[b, 0, t]:
                continue
            accepted, product = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
            for k in range(K):
                if not loss_mask[b, k, t]:
                    break
                q = torch.softmax(draft_logits[b, k, t], -1)
                product = product * torch.minimum(target_probs[b, k, t], q).sum()
                accepted = accepted + product
            chains.append(accepted)
    return -_mean(chains)


def _alpha_kl(draft_logits, target_probs, b, k, t):
    q = torch.softmax(draft_logits[b, k, t], -1)
    p = target_probs[b, k, t]
    return torch.minimum(p, q).sum(), (p * (p.log() - q.log())).sum()


def reference_lk_alpha(draft_logits, target_probs, loss_mask, cfg):
    positions = torch.nonzero(loss_mask).tolist()
    return _mean([-torch.log(_alpha_kl(draft_logits, target_probs, *index)[0]) for index in positions])


def reference_lk_hybrid(draft_logits, target_probs, loss_mask, cfg):
    terms = []
    for index in torch.nonzero(loss_mask).tolist():
        alpha, kl = _alpha_kl(draft_logits, target_probs, *index)
        weight = math.exp(-cfg.kl_decay * alpha.item())  # a constant: stop-gradient
        terms.append(weight * kl + (1 - weight) * (1 - alpha))
    return _mean(terms)


CASES = {
    "kd": (KdConfig(), reference_kd),
    "ttt": (TttConfig(decay=0.8), reference_ttt),
    "expected_accept": (ExpectedAcceptConfig(), reference_expected_accept),
    "lk_alpha": (LkAlphaConfig(), reference_lk_alpha),
    "lk_hybrid": (LkHybridConfig(kl_decay=3.0), reference_lk_hybrid),
}


# Objectives over other inputs than a teacher on the grid, checked against their slow references
# beside their drafters: PARD's take the data's next tokens (tests/trainer/test_pard.py), CTC takes
# windows of frames and labels (tests/trainer/test_ctc.py, a brute-force sum over alignments), and
# the window policy's take its head's logits at the unroll's places (tests/trainer/test_window.py).
TESTED_ELSEWHERE = {"pard", "pard_cat", "ctc", "stop_head", "window_rl"}


def test_every_registered_objective_has_a_config_and_a_test() -> None:
    assert set(OBJECTIVES) == set(CASES) | TESTED_ELSEWHERE
    assert all(isinstance(CASES[name][0], OBJECTIVES[name].config) for name in CASES)
    assert all(OBJECTIVES[name].inputs == ("draft_logits", "target_probs", "loss_mask") for name in CASES)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_value_and_gradient_match_the_slow_reference(name: str, seed: int) -> None:
    cfg, reference = CASES[name]
    draft_logits, target_probs, loss_mask = _inputs(seed)
    output = _call(name, draft_logits.float(), target_probs.float(), loss_mask, cfg)
    (gradient,) = torch.autograd.grad(output.loss, draft_logits)
    expected = reference(draft_logits, target_probs, loss_mask, cfg)
    (expected_gradient,) = torch.autograd.grad(expected, draft_logits)
    torch.testing.assert_close(output.loss.double(), expected, **TOLERANCE)
    torch.testing.assert_close(gradient, expected_gradient, **TOLERANCE)
    assert gradient[~loss_mask].abs().max() == 0  # masked positions learn nothing


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_fully_masked_batch_gives_zero_and_no_nan(name: str) -> None:
    cfg, _ = CASES[name]
    draft_logits, target_probs, _ = _inputs()
    logits = draft_logits.detach().float().requires_grad_()
    output = _call(name, logits, target_probs.float(), torch.zeros(B, K, T, dtype=torch.bool), cfg)
    output.loss.backward()
    assert output.loss.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(("name", "optimum"), [("expected_accept", -K), ("lk_alpha", 0.0), ("lk_hybrid", 0.0)])
def test_a_draft_equal_to_the_target_is_at_the_optimum(name: str, optimum: float) -> None:
    cfg, _ = CASES[name]
    _, target_probs, _ = _inputs()
    all_valid = torch.ones(B, K, T, dtype=torch.bool)
    output = _call(name, target_probs.log().float(), target_probs.float(), all_valid, cfg)
    assert output.loss.item() == pytest.approx(optimum, abs=1e-5)


def test_kd_by_hand_on_two_tokens() -> None:
    # p = (0.5, 0.5), q = (0.8, 0.2): CE = -(0.5 ln 0.8 + 0.5 ln 0.2) = 0.9163; KL = CE - ln 2 = 0.2231
    draft_logits = torch.log(torch.tensor([0.8, 0.2])).view(1, 1, 1, 2)
    output = _call(
        "kd", draft_logits, torch.tensor([0.5, 0.5]).view(1, 1, 1, 2), torch.ones(1, 1, 1, dtype=torch.bool), KdConfig()
    )
    assert output.loss.item() == pytest.approx(0.9163, abs=1e-4)
    assert output.metrics["kl"].item() == pytest.approx(0.2231, abs=1e-4)


def test_ttt_weighs_step_k_by_decay_to_the_k() -> None:
    # Every step has CE ln 2 (uniform draft over 2 tokens): L = ln 2 * (1 + 0.5 + 0.25)
    output = _call(
        "ttt",
        torch.zeros(1, 3, 4, 2),
        torch.tensor([1.0, 0.0]).expand(1, 3, 4, 2),
        torch.ones(1, 3, 4, dtype=torch.bool),
        TttConfig(decay=0.5),
    )
    assert output.loss.item() == pytest.approx(math.log(2) * 1.75, abs=1e-6)


def test_expected_accept_matches_the_real_verifier_on_a_chain() -> None:
    # A path-independent chain: step k's target p_k and draft q_k do not depend on the drafts before
    # it. Drafts are drawn from q_k and judged by the engine's own rejection-sampling verifier; the
    # mean number accepted must be the closed form sum_k prod_{i<=k} alpha_i.
    from specdec.eval.verify import verify_chain_sampled

    generator = torch.Generator().manual_seed(3)
    steps, vocab, trials = 4, 6, 200_000
    draft_logits = torch.randn(1, steps, 1, vocab, generator=generator)
    target_probs = torch.softmax(torch.randn(1, steps, 1, vocab, generator=generator), -1)
    output = _call(
        "expected_accept", draft_logits, target_probs, torch.ones(1, steps, 1, dtype=torch.bool), ExpectedAcceptConfig()
    )
    q = torch.softmax(draft_logits[0, :, 0], -1)  # [K, V]
    p = target_probs[0, :, 0]
    drafts = torch.multinomial(q, trials, replacement=True, generator=generator).T  # [N, K]
    verdict = verify_chain_sampled(
        draft_tokens=drafts,
        draft_probs=q.expand(trials, -1, -1),
        target_probs=torch.cat([p, p[-1:]]).expand(trials, -1, -1),  # the bonus row is never judged
        generator=generator,
    )
    accepted = verdict.accepted.double()
    standard_error = accepted.std() / trials**0.5
    assert abs(-output.loss.item() - accepted.mean().item()) < 4 * standard_error
    assert output.metrics["sim_tau"].item() == pytest.approx(1 - output.loss.item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_blockwise_cross_entropy_equals_the_eager_one_in_value_and_gradient(dtype: torch.dtype) -> None:
    from specdec.trainer.objectives.cross_entropy import (
        ROWS_PER_BLOCK,
        soft_cross_entropy,
        soft_cross_entropy_reference,
    )

    generator = torch.Generator().manual_seed(0)
    rows = 2 * ROWS_PER_BLOCK + 5  # two whole blocks and a partial one
    logits = (torch.randn(rows, 50, generator=generator) * 3).to(dtype).requires_grad_()
    probs = torch.softmax(torch.randn(rows, 50, generator=generator), -1)
    probs[3] = 0  # a row with no mass (a padded teacher): loss and gradient 0
    weights = torch.rand(rows, generator=generator)
    (gradient,) = torch.autograd.grad((soft_cross_entropy(logits, probs) * weights).sum(), logits)
    expected = soft_cross_entropy_reference(logits, probs)
    (expected_gradient,) = torch.autograd.grad((expected * weights).sum(), logits)
    assert gradient.dtype == dtype and gradient[3].abs().max() == 0
    torch.testing.assert_close(soft_cross_entropy(logits, probs), expected, rtol=1e-6, atol=1e-6)
    # the gradient is rounded to the logits' dtype once, the eager one after float32 arithmetic too
    tolerance = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-4}
    torch.testing.assert_close(gradient, expected_gradient, **tolerance)
