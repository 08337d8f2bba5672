"""Each objective against a slow reference written straight from its docstring formula (loops over
steps and positions), on random inputs, for value and gradient; plus hand-computed values and the
invariants: optimum when the draft equals the target, zero gradient on masked positions, 0 for a
fully masked batch."""

import math

import pytest
import torch

from specdec.trainer.config import OBJECTIVES, ExpectedAcceptConfig, KdConfig, LkAlphaConfig, LkHybridConfig, TttConfig
from specdec.trainer.objectives import OBJECTIVE_FUNCTIONS

B, K, T, V = 2, 3, 5, 7
# float32 softmax and reductions against a float64 reference: agreement to a few ulps of float32
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _inputs(seed: int = 0, masked_share: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    draft_logits = torch.randn(B, K, T, V, generator=generator, dtype=torch.float64) * 2
    target_probs = torch.softmax(torch.randn(B, K, T, V, generator=generator, dtype=torch.float64) * 2, -1)
    loss_mask = torch.rand(B, K, T, generator=generator) > masked_share
    return draft_logits.requires_grad_(), target_probs, loss_mask


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


def test_every_registered_objective_has_a_config_and_a_test() -> None:
    assert set(OBJECTIVE_FUNCTIONS) == set(CASES)
    assert set(OBJECTIVE_FUNCTIONS) <= set(OBJECTIVES)


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_value_and_gradient_match_the_slow_reference(name: str, seed: int) -> None:
    cfg, reference = CASES[name]
    draft_logits, target_probs, loss_mask = _inputs(seed)
    output = OBJECTIVE_FUNCTIONS[name](
        draft_logits=draft_logits.float(), target_probs=target_probs.float(), loss_mask=loss_mask, cfg=cfg
    )
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
    output = OBJECTIVE_FUNCTIONS[name](
        draft_logits=logits,
        target_probs=target_probs.float(),
        loss_mask=torch.zeros(B, K, T, dtype=torch.bool),
        cfg=cfg,
    )
    output.loss.backward()
    assert output.loss.item() == 0 and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(("name", "optimum"), [("expected_accept", -K), ("lk_alpha", 0.0), ("lk_hybrid", 0.0)])
def test_a_draft_equal_to_the_target_is_at_the_optimum(name: str, optimum: float) -> None:
    cfg, _ = CASES[name]
    _, target_probs, _ = _inputs()
    all_valid = torch.ones(B, K, T, dtype=torch.bool)
    output = OBJECTIVE_FUNCTIONS[name](
        draft_logits=target_probs.log().float(), target_probs=target_probs.float(), loss_mask=all_valid, cfg=cfg
    )
    assert output.loss.item() == pytest.approx(optimum, abs=1e-5)


def test_kd_by_hand_on_two_tokens() -> None:
    # p = (0.5, 0.5), q = (0.8, 0.2): CE = -(0.5 ln 0.8 + 0.5 ln 0.2) = 0.9163; KL = CE - ln 2 = 0.2231
    draft_logits = torch.log(torch.tensor([0.8, 0.2])).view(1, 1, 1, 2)
    output = OBJECTIVE_FUNCTIONS["kd"](
        draft_logits=draft_logits,
        target_probs=torch.tensor([0.5, 0.5]).view(1, 1, 1, 2),
        loss_mask=torch.ones(1, 1, 1, dtype=torch.bool),
        cfg=KdConfig(),
    )
    assert output.loss.item() == pytest.approx(0.9163, abs=1e-4)
    assert output.metrics["kl"].item() == pytest.approx(0.2231, abs=1e-4)


def test_ttt_weighs_step_k_by_decay_to_the_k() -> None:
    # Every step has CE ln 2 (uniform draft over 2 tokens): L = ln 2 * (1 + 0.5 + 0.25)
    output = OBJECTIVE_FUNCTIONS["ttt"](
        draft_logits=torch.zeros(1, 3, 4, 2),
        target_probs=torch.tensor([1.0, 0.0]).expand(1, 3, 4, 2),
        loss_mask=torch.ones(1, 3, 4, dtype=torch.bool),
        cfg=TttConfig(decay=0.5),
    )
    assert output.loss.item() == pytest.approx(math.log(2) * 1.75, abs=1e-6)
    assert output.metrics["acc_step_2"].item() == 1.0  # argmax ties go to token 0, the target's


def test_expected_accept_matches_a_monte_carlo_chain() -> None:
    # Path-independent chain: step k accepts with probability alpha_k; the number accepted is
    # the run of successes from step 0. Its mean is sum_k prod_{i<=k} alpha_i.
    generator = torch.Generator().manual_seed(3)
    draft_logits = torch.randn(1, 4, 1, 6, generator=generator)
    target_probs = torch.softmax(torch.randn(1, 4, 1, 6, generator=generator), -1)
    output = OBJECTIVE_FUNCTIONS["expected_accept"](
        draft_logits=draft_logits,
        target_probs=target_probs,
        loss_mask=torch.ones(1, 4, 1, dtype=torch.bool),
        cfg=ExpectedAcceptConfig(),
    )
    alpha = torch.minimum(target_probs, torch.softmax(draft_logits, -1)).sum(-1)[0, :, 0]
    trials = 400_000
    accepted = (torch.rand(trials, 4, generator=generator) < alpha).long().cumprod(1).sum(1).double()
    standard_error = accepted.std() / trials**0.5
    assert abs(-output.loss.item() - accepted.mean().item()) < 4 * standard_error
    assert output.metrics["sim_tau"].item() == pytest.approx(1 - output.loss.item())
