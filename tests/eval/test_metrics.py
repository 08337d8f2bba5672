from specdec.eval.metrics import acceptance_stats


def test_tau_accept_rate_and_per_position_follow_the_vllm_definitions() -> None:
    stats = acceptance_stats([4, 0, 2, 1], k=4)
    assert stats.tau == 1 + 7 / 4
    assert stats.accept_rate == 7 / 16
    assert stats.accept_rate_per_pos == [3 / 4, 2 / 4, 1 / 4, 1 / 4]  # P(first i+1 accepted)
    assert stats.verify_steps == 4


def test_no_verify_steps_is_tau_one() -> None:
    stats = acceptance_stats([], k=3)
    assert (stats.tau, stats.accept_rate, stats.accept_rate_per_pos, stats.verify_steps) == (1.0, 0.0, [0.0] * 3, 0)
