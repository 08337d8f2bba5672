"""CTC on the training side: the objective against a brute-force sum over every alignment (value and
gradient) and its window rules; the CTC drafter's labels and frames against slow loops over a tiny
target; EAGLE-3's CTC windows against its unroll; the recipe checks; and a tiny CTC run end to end."""

import itertools
import json
from pathlib import Path

import pytest
import torch

from specdec.eval.drafters import DrafterLoadError
from specdec.eval.drafters.ctc import collapse, is_ctc_dir
from specdec.eval.drafters.eagle3 import Eagle3Model
from specdec.trainer import cli
from specdec.trainer.config import RecipeError, compose_recipe
from specdec.trainer.drafters import drafter_kind
from specdec.trainer.drafters.ctc import CtcDraftConfig, new_ctc
from specdec.trainer.drafters.draft_vocab import check_blank, draft_vocab
from specdec.trainer.drafters.eagle3 import Eagle3DraftConfig, new_eagle3, shift_left
from specdec.trainer.objectives.ctc import CtcConfig, ctc_loss
from tests.conftest import make_tiny_llama

# ---- the objective ----


def brute_force(frame_logits: torch.Tensor, labels: list[list[int]], blank: int) -> torch.Tensor:
    """mean over windows of -(1/U) log sum over every path pi in V^F with B(pi) = y of prod_j q_j(pi_j)."""
    probs = torch.softmax(frame_logits, dim=-1)
    frames, vocab = probs.shape[1:]
    losses = []
    for window, label in enumerate(labels):
        total = sum(
            torch.stack([probs[window, j, symbol] for j, symbol in enumerate(path)]).prod()
            for path in itertools.product(range(vocab), repeat=frames)
            if collapse(list(path), blank) == label
        )
        losses.append(-torch.log(total) / len(label))
    return torch.stack(losses).mean()


def _call(frame_logits, labels, mask, blank: int, label_len: int):
    return ctc_loss(
        frame_logits=frame_logits,
        ctc_labels=labels,
        ctc_label_mask=mask,
        ctc_blank=torch.tensor(blank),
        cfg=CtcConfig(label_len=label_len),
    )


@pytest.mark.parametrize("blank", [0, 2])
def test_the_ctc_loss_equals_the_sum_over_every_alignment_in_value_and_gradient(blank: int) -> None:
    generator = torch.Generator().manual_seed(blank)
    frame_logits = (torch.randn(4, 4, 4, generator=generator, dtype=torch.float64) * 2).requires_grad_()
    # repeats (which need a blank between them), a label at the frames' limit, and the blank's neighbours
    labels = torch.tensor([[1, 3, 3, 1], [3, 1, 1, 0], [1, 3, 1, 3], [3, 3, 1, 2]])
    labels[labels == blank] = 1 if blank != 1 else 3
    mask = torch.ones(4, 4, dtype=torch.bool)
    output = _call(frame_logits, labels, mask, blank, label_len=3)
    expected = brute_force(frame_logits, [row[:3] for row in labels.tolist()], blank)
    torch.testing.assert_close(output.loss.double(), expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(output.loss, frame_logits)
    (expected_grad,) = torch.autograd.grad(expected, frame_logits)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)
    assert output.metrics["windows"] == 4 and output.metrics["infeasible"] == 0


def test_windows_that_do_not_count_are_left_out_not_counted_as_zero() -> None:
    generator = torch.Generator().manual_seed(5)
    frame_logits = torch.randn(5, 3, 4, generator=generator, dtype=torch.float64).requires_grad_()
    labels = torch.tensor([[1, 2, 3], [1, 2, 3], [1, 0, 3], [2, 2, 2], [3, 1, 2]])
    mask = torch.ones(5, 3, dtype=torch.bool)
    mask[1, 1] = False  # a label that is not an answer token of the draft vocabulary
    # window 2 has the blank (0) among its labels; window 3's "2 2" needs 3 frames for 2 labels plus
    # its own blank, and "2 2 2" 5 > 3: infeasible; windows 0 and 4 count
    output = _call(frame_logits, labels, mask, blank=0, label_len=3)
    expected = brute_force(frame_logits[[0, 4]], [[1, 2, 3], [3, 1, 2]], blank=0)
    torch.testing.assert_close(output.loss.double(), expected, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(output.loss, frame_logits)
    assert grad[[1, 2, 3]].abs().max() == 0
    assert output.metrics["windows"] == 2 and output.metrics["infeasible"] == 1


def test_no_window_gives_zero_with_zero_gradient_and_too_many_labels_are_refused() -> None:
    frame_logits = torch.randn(2, 3, 4, requires_grad=True)
    output = _call(frame_logits, torch.ones(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool), 0, 2)
    output.loss.backward()
    assert output.loss.item() == 0 and frame_logits.grad.abs().max() == 0
    with pytest.raises(ValueError, match=r"objective\.ctc\.label_len=4: the drafter emits 3 frames per window"):
        _call(frame_logits, torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool), 0, 4)


def test_best_path_exact_reads_the_collapsed_argmax_path() -> None:
    # frames 1 1 - 2 collapse to "1 2": the labels [1, 2] are exact, [1, 1] are not
    logits = torch.full((2, 4, 3), -10.0)
    for window in range(2):
        for frame, symbol in enumerate([1, 1, 0, 2]):
            logits[window, frame, symbol] = 10.0
    labels = torch.tensor([[1, 2, 0, 0], [1, 1, 0, 0]])
    output = _call(logits, labels, torch.ones(2, 4, dtype=torch.bool), blank=0, label_len=2)
    assert output.metrics["best_path_exact"].item() == pytest.approx(0.5)


# ---- the drafters' training inputs ----


def _batch(target, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, target.config.vocab_size, (2, 10), generator=generator)
    attention_mask = torch.ones(2, 10, dtype=torch.long)
    attention_mask[1, 7:] = 0  # right-padded, as training batches are
    loss_mask = torch.zeros(2, 10, dtype=torch.bool)
    loss_mask[0, 3:] = True
    loss_mask[1, 2:7] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask}


def _final_state(target, batch) -> torch.Tensor:
    with torch.no_grad():
        output = target.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
    return output.hidden_states[-1]


def test_the_ctc_drafters_labels_and_frames_are_the_targets_argmax_after_each_window() -> None:
    target = make_tiny_llama(seed=0)
    batch, frames = _batch(target), 3
    counts = torch.bincount(batch["input_ids"][batch["loss_mask"]], minlength=target.config.vocab_size)
    d2t, t2d = draft_vocab(counts, 24, reserved=0)
    draft = new_ctc(target, d2t, t2d, frames=frames, blank_id=0, seed=0)
    final = _final_state(target, batch)
    lm_head = target.get_output_embeddings().weight
    cfg = CtcDraftConfig(frames=frames, vocab_size=24)
    inputs = drafter_kind("ctc").training_inputs(draft, batch, final[:, :, None], lm_head, cfg, frozenset())

    used = torch.nonzero(t2d)[:, 0]  # draft id -> target id
    logits = (final @ lm_head.T).detach()
    windows, labels, masks = [], [], []
    for b in range(2):
        for t in range(10):

            def place(j: int, b=b, t=t) -> tuple[bool, int]:
                """Frame j's place counts (token t+j+2 is an answer token, the argmax at t+j+1 a draft
                token), and the draft id of the argmax on the draft vocabulary there."""
                at = t + j + 1
                if at + 1 >= 10 or not batch["loss_mask"][b, at + 1]:
                    return False, 0
                return bool(t2d[logits[b, at].argmax()]), int(logits[b, at, used].argmax())

            if place(0)[0]:
                windows.append((b, t))
                labels.append([place(j)[1] if place(j)[0] else None for j in range(frames)])
                masks.append([place(j)[0] for j in range(frames)])
    assert inputs["ctc_label_mask"].tolist() == masks
    got = inputs["ctc_labels"].tolist()
    assert [
        [g if m else None for g, m in zip(row, mask, strict=True)] for row, mask in zip(got, masks, strict=True)
    ] == labels
    assert int(inputs["ctc_blank"]) == 0 and int(draft.d2t[0]) == 0  # the blank (target id 0) is draft id 0

    # the frames are the model's training forward at those windows; frame 0 is kd's next-token guess
    window_mask = torch.zeros(2, 10, dtype=torch.bool)
    window_mask[tuple(zip(*windows, strict=True))] = True
    expected = draft.train_frames(
        target_hidden=final,
        next_ids=shift_left(batch["input_ids"], 1),
        attention_mask=batch["attention_mask"],
        windows=window_mask,
    )
    torch.testing.assert_close(inputs["frame_logits"], expected)
    torch.testing.assert_close(inputs["draft_logits"], expected[:, 0])
    assert inputs["loss_mask"].shape == (2, 1, 10) and inputs["loss_mask"][:, 0].equal(window_mask)


def test_eagle3s_ctc_windows_are_its_unrolled_steps_labelled_with_the_targets_argmax() -> None:
    target = make_tiny_llama(seed=0)
    batch, steps = _batch(target, seed=1), 3
    counts = torch.bincount(batch["input_ids"][batch["loss_mask"]], minlength=target.config.vocab_size)
    d2t, t2d = draft_vocab(counts, 24, reserved=0)
    draft: Eagle3Model = new_eagle3(target, d2t, t2d, seed=0)
    with torch.no_grad():
        output = target.model(input_ids=batch["input_ids"], output_hidden_states=True)
    hidden = torch.stack([output.hidden_states[i] for i in (1, 1, 2, 2)], dim=2)
    cfg = Eagle3DraftConfig(vocab_size=24, unroll_steps=steps, ctc_blank_id=0)
    kind = drafter_kind("eagle3")
    lm_head = target.get_output_embeddings().weight
    plain = kind.training_inputs(draft, batch, hidden, lm_head, cfg, frozenset({"draft_logits"}))
    assert "frame_logits" not in plain  # computed only when an objective takes them
    inputs = kind.training_inputs(draft, batch, hidden, lm_head, cfg, frozenset({"frame_logits"}))
    unrolled = draft.unroll(
        target_hidden=hidden[:, :, :-1],
        next_ids=shift_left(batch["input_ids"], 1),
        attention_mask=batch["attention_mask"],
        steps=steps,
    )  # [B, K, T, V_d]
    loss_mask = inputs["loss_mask"]
    windows = loss_mask[:, 0]
    torch.testing.assert_close(inputs["frame_logits"], unrolled.transpose(1, 2)[windows])
    # one head pass serves both: ttt's places are the plain path's, in its order
    torch.testing.assert_close(inputs["draft_logits"], plain["draft_logits"])
    torch.testing.assert_close(inputs["draft_logits"], unrolled[loss_mask])
    grid = torch.zeros_like(loss_mask, dtype=torch.long)
    grid[loss_mask] = inputs["target_argmax"]
    assert inputs["ctc_labels"].equal(grid.transpose(1, 2)[windows])
    assert inputs["ctc_label_mask"].equal(loss_mask.transpose(1, 2)[windows])
    assert int(inputs["ctc_blank"]) == 0


def test_the_draft_vocabulary_keeps_the_blank_and_a_blank_found_in_the_answers_is_refused() -> None:
    counts = torch.tensor([0, 5, 9, 1, 7])
    _, t2d = draft_vocab(counts, 2, reserved=0)
    assert t2d.tolist() == [True, False, True, False, False]
    check_blank(counts, 0, "draft.blank_id")
    with pytest.raises(DrafterLoadError, match=r"draft\.blank_id=3 occurs 1 times among the answer tokens"):
        check_blank(counts, 3, "draft.blank_id")


def test_recipes_that_cannot_make_ctc_windows_are_refused_with_their_keys() -> None:
    with pytest.raises(RecipeError, match=r"objective\.ctc with draft\.name=eagle3 needs draft\.ctc_blank_id"):
        compose_recipe("smollm2_eagle3", ["+objective.ctc={}"])
    with pytest.raises(RecipeError, match=r"objective\.ctc\.label_len=5: more labels than the 4 frames"):
        compose_recipe("smollm2_eagle3", ["+objective.ctc={label_len: 5}", "draft.ctc_blank_id=0"])
    with pytest.raises(RecipeError, match=r"objective\.ctc\.label_len=7: more labels than the 6 frames"):
        compose_recipe("ctc_smollm2", ["objective.ctc.label_len=7"])


TINY_CTC = [
    "draft.name=ctc",
    "~draft.unroll_steps",
    "+draft.frames=4",
    "~objective.ttt",
    "+objective.ctc={weight: 1.0, label_len: 3}",
    "+objective.kd={weight: 0.1}",
    "cache.layers=null",
    "trainer.max_steps=4",
    "eval.every_n_steps=2",
]


@pytest.mark.slow
def test_a_tiny_ctc_run_trains_caches_only_the_final_state_and_reports(tmp_path: Path, capsys) -> None:
    assert cli.train_main(["recipe=tiny", f"run.dir={tmp_path}", *TINY_CTC]) == 0
    out = capsys.readouterr().out
    assert "trained 4 steps" in out and "trained    tau" in out and "untrained  tau" in out
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["key"]["layers"] == [4]  # N alone: the feature and the teacher's state
    assert is_ctc_dir(tmp_path / "drafter")
    # the drafter measures again from its directory, as a tree too
    assert (
        cli.eval_main(
            [
                "recipe=tiny",
                f"run.dir={tmp_path}",
                *TINY_CTC,
                "eval.tree_width=2",
                f"eval.drafter={tmp_path / 'drafter'}",
            ]
        )
        == 0
    )
    assert "tau" in capsys.readouterr().out
    # no engine loads it: export says so in one line
    assert cli.export_main(["recipe=tiny", f"run.dir={tmp_path}", *TINY_CTC, "export.format=hf"]) == 2
    assert "a ctc drafter, which no serving engine loads" in capsys.readouterr().err
