"""The window policy's objectives: SpecDec++'s weighted BCE against its formula; GRPO's pieces
(leading runs, group-relative advantages, the decisions' log-probability, the clipped surrogate) on
hand-made groups; window_rl's rollouts and rewards on a hand-made grid; EAGLE-3's window inputs
against a slow loop over a tiny target; and tiny runs end to end: a stop head trained on a frozen
drafter, RL from it with the step costs calibrated and recorded, and specdec-eval serving it."""

import json
import math
from pathlib import Path

import pytest
import torch

from specdec.trainer import cli
from specdec.trainer.drafters.eagle3 import Eagle3DraftConfig, new_eagle3, window_inputs
from specdec.trainer.objectives.stop_head import StopHeadConfig, stop_head_loss
from specdec.trainer.objectives.window_rl import (
    MeasuredCosts,
    WindowRlConfig,
    clipped_surrogate,
    decision_log_prob,
    group_advantages,
    leading_run,
    window_rl_loss,
)
from tests.conftest import make_tiny_llama

COSTS = MeasuredCosts(verify=[0.040, 0.041, 0.042, 0.043], draft_per_token=0.002, draft_fixed=0.001)


@pytest.mark.parametrize("labels", ["soft", "greedy"])
def test_the_stop_head_loss_is_specdecs_weighted_bce(labels: str) -> None:
    torch.manual_seed(0)
    logits = torch.randn(12, requires_grad=True)
    greedy, soft = (torch.rand(12) < 0.4).float(), torch.rand(12)
    output = stop_head_loss(
        window_logits=logits, window_accept=greedy, window_accept_soft=soft, cfg=StopHeadConfig(labels=labels)
    )
    y = soft if labels == "soft" else greedy
    sigma = torch.sigmoid(logits)
    numerator = sum(6 * (1 - y[i]) * -torch.log(1 - sigma[i]) + y[i] * -torch.log(sigma[i]) for i in range(12))
    expected = numerator / (6 * (1 - y).sum() + y.sum())
    torch.testing.assert_close(output.loss, expected)
    output.loss.backward()
    assert logits.grad.abs().sum() > 0


def test_leading_runs_and_group_advantages_on_hand_made_groups() -> None:
    flags = torch.tensor([[True, True, False, True], [False, True, True, True], [True, True, True, True]])
    assert leading_run(flags).tolist() == [2, 0, 4]
    rewards = torch.tensor([[1.0, 2.0, 3.0, 2.0], [1.5, 1.5, 1.5, 1.5], [0.0, 0.0, 0.0, 4.0]])
    centred = group_advantages(rewards, scale_by_std=False)  # Dr. GRPO: the reward's own scale
    torch.testing.assert_close(centred, torch.tensor([[-1.0, 0.0, 1.0, 0.0], [0.0] * 4, [-1.0, -1.0, -1.0, 3.0]]))
    advantages = group_advantages(rewards, scale_by_std=True)  # GRPO
    std = math.sqrt(0.5)
    torch.testing.assert_close(advantages[0], torch.tensor([-1 / std, 0.0, 1 / std, 0.0]), atol=1e-5, rtol=1e-5)
    assert advantages[1].tolist() == [0.0] * 4  # a group that ties teaches nothing
    torch.testing.assert_close(advantages[2], torch.tensor([-1, -1, -1, 3]) / math.sqrt(3), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(advantages.sum(dim=1), torch.zeros(3), atol=1e-5, rtol=0)


def test_the_log_probability_of_a_rollouts_decisions() -> None:
    go_logits = torch.tensor([[0.5, -1.0, 2.0]])  # one chain start; decision i: draft token i + 1?
    go, stop = torch.sigmoid(go_logits)[0], torch.sigmoid(-go_logits)[0]
    drafted = torch.tensor([[1, 2, 3]])  # three rollouts, with room for 3 tokens
    got = decision_log_prob(go_logits, drafted, room=torch.tensor([3])).exp()[0]
    expected = [stop[0], go[0] * stop[1], go[0] * go[1]]  # the third ends the chain: no stop decision
    torch.testing.assert_close(got, torch.stack(expected))
    # a chain with room for one token: it drafts that token and decides nothing
    short = decision_log_prob(go_logits, torch.tensor([[1]]), room=torch.tensor([1])).exp()
    assert short.item() == 1.0


def test_the_clipped_surrogate_on_hand_made_ratios() -> None:
    log_prob = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.9]]))  # ratios against a behaviour log-prob of 0
    advantages = torch.tensor([[1.0, -1.0, -1.0, 1.0]])
    loss, clipped = clipped_surrogate(log_prob, torch.zeros_like(log_prob), advantages, clip=0.2)
    # min(rho A, clip(rho) A): 1.2 (clipped above), -0.8 (clip(0.5) = 0.8 is smaller), -1.1, 0.9
    torch.testing.assert_close(loss, -torch.tensor((1.2 - 0.8 - 1.1 + 0.9) / 4))
    assert clipped.item() == 0.5


def _grid(accepts: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """A [1, K, T] window grid with one chain start per row of `accepts` (every step counts)."""
    mask = torch.ones(1, len(accepts[0]), len(accepts), dtype=torch.bool)
    values = torch.tensor(accepts).T[None]  # [1, K, T]
    return mask, values[mask]


def test_window_rl_rewards_rollouts_by_the_measured_cost_of_their_steps() -> None:
    # chain 0 accepts its first two drafts, chain 1 none; a policy that always goes on (huge acceptance
    # logits, threshold 1e-6) drafts all 3 and one that never does drafts 1, in every rollout
    mask, accept = _grid([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    costs = COSTS
    for logit, drafted, accepted in ((50.0, 3, [2, 0]), (-50.0, 1, [1, 0])):
        logits = torch.full_like(accept, logit, requires_grad=True)
        output = window_rl_loss(
            window_logits=logits,
            window_log_threshold=torch.tensor(math.log(1e-6)),
            window_logits_behaviour=logits.detach(),
            window_log_threshold_behaviour=torch.tensor(math.log(1e-6)),
            window_accept=accept,
            window_accept_soft=accept,
            window_mask=mask,
            cfg=WindowRlConfig(group_size=4, costs=costs),
        )
        step = costs.verify[drafted] + costs.draft_fixed + drafted * costs.draft_per_token
        expected = sum((a + 1) / step * costs.verify[0] for a in accepted) / 2
        assert output.metrics["drafted"].item() == drafted
        assert output.metrics["accepted"].item() == sum(accepted) / 2
        assert math.isclose(output.metrics["reward"].item(), expected, rel_tol=1e-5)
        assert output.loss.item() == 0  # every rollout of a group the same: no advantage


def test_window_rl_moves_the_policy_towards_the_faster_window() -> None:
    # every chain accepts all 3 drafts: drafting more is always faster, so the gradient raises the go-on logits
    mask, accept = _grid([[1.0, 1.0, 1.0]] * 16)
    torch.manual_seed(0)
    logits = torch.zeros_like(accept, requires_grad=True)
    threshold = torch.tensor(math.log(0.25), requires_grad=True)
    output = window_rl_loss(
        window_logits=logits,
        window_log_threshold=threshold,
        window_logits_behaviour=logits.detach(),
        window_log_threshold_behaviour=threshold.detach(),
        window_accept=accept,
        window_accept_soft=accept,
        window_mask=mask,
        cfg=WindowRlConfig(group_size=8, costs=COSTS, temperature=1.0),
    )
    output.loss.backward()
    assert logits.grad.sum() < 0 and threshold.grad > 0  # descent raises acceptance logits and lowers h
    assert 1 < output.metrics["drafted"].item() < 3


def test_eagle3s_window_inputs_against_a_slow_loop_over_a_tiny_target() -> None:
    target = make_tiny_llama(seed=0)
    draft = new_eagle3(target, torch.arange(8) * 0, torch.zeros(target.config.vocab_size, dtype=torch.bool), seed=1)
    draft.d2t.copy_(torch.arange(8) * 2 - torch.arange(8))  # draft id i is target id 2i
    draft.t2d.zero_()[torch.arange(8) * 2] = True
    torch.manual_seed(0)
    batch, time, steps = 2, 7, 3
    outputs = torch.randn(batch, steps, time, target.config.hidden_size)
    answer = torch.rand(batch, steps, time) < 0.6
    final = torch.randn(batch, time + steps + 1, target.config.hidden_size)
    lm_head = target.lm_head.weight.detach()
    got = window_inputs(draft, outputs, answer, final, lm_head)
    rows = answer.nonzero().tolist()
    assert got["window_step"].tolist() == [k for _, k, _ in rows]
    for index, (b, k, t) in enumerate(rows):
        q = torch.softmax(draft.logits(outputs[b, k, t]).float(), dim=-1)
        token = int(q.argmax()) * 2
        p = torch.softmax((final[b, t + k + 1] @ lm_head.T).float(), dim=-1)
        assert got["window_accept"][index].item() == float(int(p.argmax()) == token)
        torch.testing.assert_close(got["window_accept_soft"][index], (p[token] / q.max()).clamp(max=1))
        torch.testing.assert_close(got["window_stats"][index, 0], q.max())
        torch.testing.assert_close(got["window_stats"][index, 1], -(q * q.log()).sum())
    assert Eagle3DraftConfig().start is None


@pytest.mark.slow
def test_a_stop_head_then_rl_on_a_frozen_tiny_drafter_and_specdec_eval_serving_it(tmp_path: Path, capsys) -> None:
    base, sup, rl = tmp_path / "base", tmp_path / "sup", tmp_path / "rl"
    assert cli.train_main(["recipe=tiny", f"run.dir={base}", "eval.ngram=0"]) == 0
    window = ["~objective.ttt", "eval.k=3", f"cache.dir={base}/cache", "trainer.max_steps=4"]
    assert (
        cli.train_main(
            [
                "recipe=tiny",
                f"run.dir={sup}",
                f"draft.start={base}/drafter",
                *window,
                "+objective.stop_head={labels: greedy}",
            ]
        )
        == 0
    )
    frozen = {name: t for name, t in _tensors(base / "drafter").items()}
    assert _tensors(sup / "drafter").keys() == frozen.keys()
    assert all(torch.equal(frozen[name], t) for name, t in _tensors(sup / "drafter").items())  # drafter untouched
    report = json.loads((sup / "eval.json").read_text())
    assert report["trained"]["window"] == "policy" and report["trained, fixed K"]["window"] == "fixed"
    assert "untrained" not in report and "ngram" in report  # the frozen drafter has no start of its own here
    assert sum(report["trained"]["drafted_histogram"]) == report["trained"]["verify_steps"]

    assert (
        cli.train_main(
            [
                "recipe=tiny",
                f"run.dir={rl}",
                f"draft.start={sup}/drafter",
                *window,
                "+objective.window_rl={group_size: 4}",
                "eval.ngram=0",
            ]
        )
        == 0
    )
    costs = json.loads((rl / "window_costs.json").read_text())
    assert len(costs["verify"]) == 4 and all(c > 0 for c in costs["verify"]) and "measured" in costs["source"]
    assert (rl / "drafter" / "window" / "model.safetensors").is_file()
    capsys.readouterr()
    compare = (
        f"eval.compare=[{{name: policy, drafter: {rl}/drafter, window: policy}}, "
        f"{{name: strict, drafter: {rl}/drafter, window: policy, window_threshold: 1.0}}, "
        f"{{name: fixed, drafter: {rl}/drafter, k: 2}}, {{name: lookup, drafter: ngram}}]"
    )
    assert cli.eval_main(["recipe=tiny", f"run.dir={rl}", "eval.k=3", compare, f"eval.out={rl}/compare.json"]) == 0
    rows = json.loads((rl / "compare.json").read_text())
    assert rows["strict"]["drafted_histogram"][1] == rows["strict"]["verify_steps"]  # h = 1: one token every step
    assert rows["fixed"]["drafted_per_step"] == 2 and rows["lookup"]["window"] == "fixed"
    assert all(row["greedy_matches_target"] == 1 for row in rows.values())
    assert "learned window" in capsys.readouterr().out
    # a policy row for a drafter without a window head is refused before anything loads
    bad = f"eval.compare=[{{name: policy, drafter: {base}/drafter, window: policy}}]"
    assert cli.eval_main(["recipe=tiny", f"run.dir={rl}", bad]) == 2
    assert "no window head" in capsys.readouterr().err


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def test_recorded_step_costs_that_do_not_cover_the_runs_k_are_refused(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from specdec.trainer.train import measured_costs

    (tmp_path / "window_costs.json").write_text(json.dumps({"verify": [0.04, 0.041, 0.042], "draft_per_token": 0.002}))
    cfg = SimpleNamespace(eval=SimpleNamespace(k=2), draft=SimpleNamespace(unroll_steps=2))
    assert measured_costs(tmp_path, None, None, [], cfg, set()).verify == [0.04, 0.041, 0.042]  # read back
    cfg.eval.k = 4
    with pytest.raises(ValueError, match="window_costs.json: the recorded step costs cover windows up to 2"):
        measured_costs(tmp_path, None, None, [], cfg, set())
