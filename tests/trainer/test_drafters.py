"""The drafter registry and the EAGLE-3 training side: the loss and gradients on a fixed batch are
those recorded from the trainer before it was made drafter-agnostic, the per-step teacher view
equals K shifted copies, and the serving-faithful diagnostics against a slow count."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from specdec.trainer.config import OptimConfig, compose_recipe
from specdec.trainer.drafters import DRAFTERS, drafter_kind
from specdec.trainer.drafters.draft_vocab import draft_vocab
from specdec.trainer.drafters.eagle3 import Eagle3DraftConfig, new_eagle3, per_step, shift_left
from specdec.trainer.module import DrafterModule
from specdec.trainer.objectives.expected_accept import ExpectedAcceptConfig
from specdec.trainer.objectives.kd import KdConfig
from specdec.trainer.objectives.lk import LkHybridConfig
from specdec.trainer.objectives.ttt import TttConfig
from specdec.trainer.registry import UnknownName
from tests.conftest import make_tiny_llama

GOLDEN = Path(__file__).parent / "goldens" / "eagle3_fixed_batch.safetensors"
# The golden was written by the trainer at 155c4d3 (before the drafter registry), on this batch:
# a tiny random Llama (tests.conftest.make_tiny_llama, seed 0), B=2, T=12 with row 1 padded from 9,
# draft vocabulary 40 from the loss tokens, 3 unrolled steps, ttt + 0.5 kd + 0.25 expected_accept +
# 0.1 lk_hybrid. The refactor reorders no float32 arithmetic of the loss, so loss and gradients
# agree to rounding; the closed-form diagnostics now share expected_accepted's log-space product.
TOLERANCE = {"rtol": 1e-6, "atol": 1e-7}


def _module(draft_cfg: Eagle3DraftConfig, batch: dict[str, torch.Tensor]) -> DrafterModule:
    target = make_tiny_llama(seed=0)
    counts = torch.bincount(batch["input_ids"][batch["loss_mask"]], minlength=target.config.vocab_size)
    d2t, t2d = draft_vocab(counts, draft_cfg.vocab_size)
    objectives = {
        "ttt": TttConfig(decay=0.8),
        "kd": KdConfig(weight=0.5),
        "expected_accept": ExpectedAcceptConfig(weight=0.25),
        "lk_hybrid": LkHybridConfig(weight=0.1),
    }
    return DrafterModule(
        new_eagle3(target, d2t, t2d, seed=0),
        kind=drafter_kind("eagle3"),
        draft_cfg=draft_cfg,
        objectives=objectives,
        optim=OptimConfig(),
        lm_head=target.get_output_embeddings().weight,
        eval_k=3,
    )


def test_eagle3_loss_and_gradients_on_a_fixed_batch_are_unchanged_by_the_registry() -> None:
    golden = load_file(GOLDEN)
    batch = {key.removeprefix("batch."): value for key, value in golden.items() if key.startswith("batch.")}
    module = _module(Eagle3DraftConfig(vocab_size=40, unroll_steps=3), batch)
    loss, metrics = module.forward_batch(batch)
    loss.backward()
    torch.testing.assert_close(loss.detach(), golden["loss"], **TOLERANCE)
    grads = {name: p.grad for name, p in module.draft.named_parameters() if p.grad is not None}
    assert set(grads) == {key.removeprefix("grad.") for key in golden if key.startswith("grad.")}
    for name, grad in grads.items():
        torch.testing.assert_close(grad, golden[f"grad.{name}"], **TOLERANCE, msg=name)
    recorded = {key.removeprefix("metric."): value for key, value in golden.items() if key.startswith("metric.")}
    # ttt's own acc_step_k repeated the module's train/acc_step_k and was dropped; nothing else was
    assert {key for key in recorded if key not in metrics} == {f"train/ttt/acc_step_{k}" for k in range(3)}
    for key in recorded.keys() & metrics.keys():
        torch.testing.assert_close(metrics[key].float(), recorded[key], rtol=1e-5, atol=1e-6, msg=key)


def test_the_per_step_view_equals_k_shifted_copies() -> None:
    x = torch.randn(2, 7, 5)
    view = per_step(x, steps=3, first=1)
    expected = torch.stack([shift_left(x, k + 1) for k in range(3)], dim=1)
    assert torch.equal(view, expected)
    assert view.untyped_storage().nbytes() < expected.untyped_storage().nbytes()  # one padded copy, not K


def test_serving_faithful_diagnostics_count_what_the_verifier_would() -> None:
    # B=1, K=2 steps, T=2 positions, every place an answer token. At (step 0, t=0) the target's argmax
    # is outside the draft vocabulary: trained, that place is left out (t=0 starts no chain); served,
    # t=0 starts a chain that is rejected at once. Everywhere else the draft's argmax is the target's.
    loss_mask = torch.tensor([[[False, True], [True, True]]])
    rows = int(loss_mask.sum())
    inputs = {
        "loss_mask": loss_mask,
        "draft_logits": torch.tensor([[4.0, 0.0]]).expand(rows, -1),
        "target_probs": torch.tensor([[0.9, 0.1]]).expand(rows, -1),
        "target_argmax": torch.zeros(rows, dtype=torch.long),
        "answer_mask": torch.ones(1, 2, 2, dtype=torch.bool),
    }
    metrics = drafter_kind("eagle3").diagnostics(inputs, 2)
    alpha = torch.minimum(torch.tensor([0.9, 0.1]), torch.softmax(torch.tensor([4.0, 0.0]), -1)).sum().item()
    assert metrics["train/sim_tau"].item() == pytest.approx(1 + alpha + alpha**2, abs=1e-6)  # t=1 alone
    assert metrics["train/sim_tau_greedy"].item() == pytest.approx(3.0)  # t=1: both drafts accepted
    assert metrics["train/sim_tau_greedy_served"].item() == pytest.approx(1 + (0 + 2) / 2)  # t=0 counts, with 0
    assert metrics["train/acc_step_0"].item() == 1.0 and metrics["train/acc_step_1"].item() == 1.0


def test_one_registry_idiom_refuses_a_second_module_and_names_the_choices() -> None:
    from dataclasses import replace

    from specdec.trainer.drafters import register_drafter
    from specdec.trainer.objectives import register_objective

    assert set(DRAFTERS) == {"eagle3", "ctc", "pard"}
    with pytest.raises(
        UnknownName, match=r"draft\.name: 'nope' is not a registered drafter; choose one of ctc, eagle3, pard"
    ):
        drafter_kind("nope")
    with pytest.raises(
        ValueError, match="drafter 'eagle3' is registered twice: specdec.trainer.drafters.eagle3 and mine"
    ):
        register_drafter("eagle3", replace(DRAFTERS["eagle3"], module="mine"))
    with pytest.raises(ValueError, match="objective 'kd' is registered twice: specdec.trainer.objectives.kd and tests"):
        register_objective("kd", config=KdConfig)(lambda *, cfg: None)  # a function of this test module
    assert DRAFTERS["eagle3"].module == "specdec.trainer.drafters.eagle3"


def test_a_recipe_whose_objective_takes_what_the_drafter_does_not_give_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from specdec.trainer.config import RecipeError
    from specdec.trainer.objectives import OBJECTIVES, Objective

    def frames_loss(*, frames: torch.Tensor, label_ids: torch.Tensor, cfg: KdConfig):
        raise AssertionError("never called: the recipe is refused first")

    monkeypatch.setitem(OBJECTIVES, "frames_only", Objective(frames_loss, KdConfig, ("frames", "label_ids")))
    assert compose_recipe("tiny", ["+objective.kd={}"]).objective.keys() == {"ttt", "kd"}
    with pytest.raises(RecipeError, match=r"objective\.frames_only: takes frames, label_ids, which draft\.name=eagle3"):
        compose_recipe("tiny", ["+objective.frames_only={}"])
