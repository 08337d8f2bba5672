import torch

from specdec.eval.metrics import acceptance_stats, expected_acceptance_length


def test_tau_accept_rate_and_per_position_follow_the_vllm_definitions() -> None:
    stats = acceptance_stats([4, 0, 2, 1], k=4)
    assert stats.tau == 1 + 7 / 4
    assert stats.accept_rate == 7 / 16
    assert stats.accept_rate_per_pos == [3 / 4, 2 / 4, 1 / 4, 1 / 4]  # P(first i+1 accepted)
    assert stats.verify_steps == 4


def test_sim_tau_by_hand() -> None:
    p = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    q = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # alpha = 0.5 at both steps: 1 + 0.5 + 0.25
    assert expected_acceptance_length(target_probs=p, draft_probs=q) == 1.75
    assert expected_acceptance_length(target_probs=p, draft_probs=p) == 3.0  # a perfect draft: 1 + K


def test_sim_tau_matches_a_monte_carlo_chain_when_alpha_does_not_depend_on_the_path() -> None:
    generator = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(3, 5, generator=generator), -1)
    q = torch.softmax(torch.randn(3, 5, generator=generator), -1)
    alpha = torch.minimum(p, q).sum(-1)
    trials = 200_000
    accepted = (torch.rand(trials, 3, generator=generator) < alpha).long().cumprod(1).sum(1)
    assert abs(expected_acceptance_length(target_probs=p, draft_probs=q) - (1 + accepted.double().mean())) < 0.01


def test_sim_tau_of_a_fully_masked_batch_is_one() -> None:
    p = torch.full((2, 3, 4), 0.25)
    assert expected_acceptance_length(target_probs=p, draft_probs=p, valid=torch.zeros(2, dtype=torch.bool)) == 1.0
