"""The CTC drafter's training side (Wen, Gui, Feng, NeurIPS 2024, arXiv 2412.00061): its recipe
fields, its draft vocabulary with the blank reserved, the frames of a training batch with their
labels and teacher, its diagnostics, and its directory. The model and its inference session are in
specdec.eval.drafters.ctc.

One training batch becomes, for the W positions t where frame 0's token counts (token t+2 is an
assistant token and the target's argmax at t+1 is a draft token):
    frame_logits   [W, F, V_d]  the F frames after t, reading the context up to t as at inference
    ctc_labels     [W, F]       the target's argmax (draft ids) at t+1 .. t+F, which predict x_{t+2..t+F+1}
    ctc_label_mask [W, F]       that place counts (same rule as frame 0's)
    ctc_blank      0-dim        the blank's draft id
and, for `kd` and the diagnostics, frame 0 read as the next-token guess, on the multi-step grid with
K = 1: draft_logits [W, V_d], target_probs, target_argmax, loss_mask [B, 1, T], answer_mask. A
later frame has no fixed token to match (which frame emits what is CTC's alignment), so `kd` sees
frame 0 only.
"""

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from transformers import PreTrainedModel

from specdec.eval.drafters.ctc import CtcDrafter, CtcModel, collapse, is_ctc_dir, load_ctc, save_ctc
from specdec.eval.drafters.eagle3 import shared_keys
from specdec.trainer.drafters import DrafterKind, register_drafter
from specdec.trainer.drafters.draft_vocab import check_blank, count_loss_tokens, draft_vocab
from specdec.trainer.drafters.eagle3 import diagnostics, per_step, serving_copy, shift_left, teacher_rows


@dataclass
class CtcDraftConfig:
    """CTC drafter (Wen et al., arXiv 2412.00061): `frames` learned query slots over the target's
    last hidden state, read as a CTC sequence with a blank."""

    name: str = "ctc"
    blank_id: int = 0  # a target token id the answers never contain (the released code reuses Llama's <unk>, id 0)
    frames: int = 6  # query slots, frames per draft (the released code's CTC window)
    vocab_size: int = 32000  # draft vocabulary: the most frequent target tokens, the blank included

    def target_layers(self, num_layers: int) -> list[int]:
        """The target's final normed state N, which the released code's EAGLE-1 head reads too."""
        return [num_layers]


def new_ctc(
    target: PreTrainedModel, d2t: torch.Tensor, t2d: torch.Tensor, *, frames: int, blank_id: int, seed: int
) -> CtcModel:
    """A freshly initialised float32 CTC drafter; the same for the same seed."""
    L.seed_everything(seed, verbose=False)
    blank = int(t2d[:blank_id].sum())  # its draft id: the draft vocabulary is sorted by target id
    draft = CtcModel(
        target.config, draft_vocab_size=len(d2t), frames=frames, blank=blank, embed_tokens=target.get_input_embeddings()
    )
    draft.d2t.copy_(d2t)
    draft.t2d.copy_(t2d)
    return draft


def build(cfg: CtcDraftConfig, target, token_samples, seed: int) -> CtcModel:
    counts = count_loss_tokens(token_samples, target.model.config.vocab_size)
    check_blank(counts, cfg.blank_id, "draft.blank_id")
    d2t, t2d = draft_vocab(counts, cfg.vocab_size, reserved=cfg.blank_id)
    return new_ctc(target.model, d2t, t2d, frames=cfg.frames, blank_id=cfg.blank_id, seed=seed)


def untrained_like(draft: CtcModel, target: PreTrainedModel, seed: int) -> CtcModel:
    blank_id = int(draft.blank + draft.d2t[draft.blank])
    fresh = new_ctc(target, draft.d2t, draft.t2d, frames=draft.frames, blank_id=blank_id, seed=seed)
    return fresh.to(target.dtype).eval()


def training_inputs(
    draft: CtcModel,
    batch: dict[str, torch.Tensor],
    target_hidden: torch.Tensor,  # [B, T, 1, H]: the final normed state, the drafter's feature and the teacher's
    lm_head: torch.Tensor,
    cfg: CtcDraftConfig,
    wanted: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    final, loss_mask = target_hidden[:, :, -1], batch["loss_mask"]
    probs, in_draft, argmax = teacher_rows(draft, final, loss_mask, lm_head)
    counted = per_step(loss_mask, cfg.frames, 2) & per_step(in_draft, cfg.frames, 1)  # [B, F, T]
    windows = counted[:, 0]
    frames = draft.train_frames(
        target_hidden=final,
        next_ids=shift_left(batch["input_ids"], 1),
        attention_mask=batch["attention_mask"],
        windows=windows,
    )
    return {
        "frame_logits": frames,
        "ctc_labels": per_step(argmax, cfg.frames, 1).transpose(1, 2)[windows],
        "ctc_label_mask": counted.transpose(1, 2)[windows],
        "ctc_blank": draft.blank,
        "draft_logits": frames[:, 0],
        "target_probs": shift_left(probs, 1)[windows],
        "target_argmax": shift_left(argmax, 1)[windows],
        "loss_mask": counted[:, :1],
        "answer_mask": per_step(loss_mask, 1, 2),
    }


@torch.no_grad()
def ctc_diagnostics(inputs: dict[str, torch.Tensor], eval_k: int) -> dict[str, torch.Tensor]:
    """Frame 0 as a next-token guess (train/acc_step_0, EAGLE-3's closed forms over one step), and
    train/sim_tau_greedy_collapsed: 1 + the tokens of the collapsed argmax path (at most eval.k) that
    match the target's argmax in turn, up to the first place that does not count, averaged over the
    windows: the teacher-forced counterpart of a greedy chain's eval/tau."""
    metrics = diagnostics(inputs, 1)
    blank, accepted = int(inputs["ctc_blank"]), []
    best = inputs["frame_logits"].argmax(dim=-1).tolist()
    for path, labels, valid in zip(best, inputs["ctc_labels"].tolist(), inputs["ctc_label_mask"].tolist(), strict=True):
        count = 0
        for token, label, counts in zip(collapse(path, blank)[:eval_k], labels, valid, strict=False):
            if not counts or token != label:
                break
            count += 1
        accepted.append(count)
    metrics["train/sim_tau_greedy_collapsed"] = torch.tensor(1 + sum(accepted) / max(len(accepted), 1))
    return metrics


def check(cfg: CtcDraftConfig, objectives: dict) -> list[str]:
    problems = []
    if "ctc" in objectives and objectives["ctc"].label_len > cfg.frames:
        problems.append(
            f"objective.ctc.label_len={objectives['ctc'].label_len}: more labels than the {cfg.frames} frames of a "
            "window (draft.frames)"
        )
    return problems


CTC = register_drafter(
    "ctc",
    DrafterKind(
        config=CtcDraftConfig,
        build=build,
        untrained_like=untrained_like,
        training_inputs=training_inputs,
        inputs=frozenset(
            {"frame_logits", "ctc_labels", "ctc_label_mask", "ctc_blank"}
            | {"draft_logits", "target_probs", "target_argmax", "loss_mask", "answer_mask"}
        ),
        teacher_inputs=frozenset({"ctc_labels", "ctc_label_mask", "target_probs", "target_argmax", "loss_mask"}),
        diagnostics=ctc_diagnostics,
        shared_keys=shared_keys,
        session=CtcDrafter,
        serving_copy=serving_copy,
        save=lambda draft, directory, target_config, layers: save_ctc(
            draft, Path(directory), target_config=target_config, target_layers=layers
        ),
        load=load_ctc,
        is_saved=is_ctc_dir,
        module=__name__,
        exports={},  # no engine serves a CTC drafter: vLLM and SGLang have no collapse-and-verify method
        check=check,
    ),
)
