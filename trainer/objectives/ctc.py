"""CTC: a sequence-level loss over a window of draft frames, so that the frames agree with each other
on the tokens that follow, whatever frame emits which token.

    L = mean over windows w of  -(1/U) log sum_{pi in B^-1(y_w)} prod_{j=1..F} q_{w,j}(pi_j)

A window is F frames, the draft's distributions q_{w,1..F} over the draft vocabulary, blank
included; y_w = the target's argmax at the next U = label_len positions (the tokens a greedy target
would emit there; the same as the data's with regenerated answers); B merges repeated symbols, then
drops blanks. The sum over alignments is torch's `ctc_loss` (Graves et al., ICML 2006); dividing by
U and averaging over windows is its reduction="mean", which the released code uses
(nn.CTCLoss(blank=0, reduction="mean")) with weight c_w = 0.01 beside its KD term of 0.1.
Wen, Gui, Feng, "Speculative Decoding with CTC-based Draft Model for LLM Inference Acceleration",
NeurIPS 2024 (arXiv 2412.00061); checked against ZhuofanWen/CTC-drafter train/main.py.

Which frames: the CTC drafter's T query slots after an accepted position (specdec.eval.drafters.ctc),
or, as the released code does on EAGLE-1, the unrolled steps of an EAGLE-3 drafter
(`objective: {ttt: ..., ctc: ...}`; the steps at position t are its chain of drafts after t). A
window counts when its U labels are answer tokens of the draft vocabulary, none is the blank, and
they fit in F frames (U plus the number of adjacent repeats, which need a blank between them, at
most F); the others are left out, not counted as zero. Metrics: `windows` (counted), `infeasible`
(left out because the labels do not fit), `best_path_exact` (the collapsed argmax path of the frames
starts with the U labels: what a greedy chain of the frames would draft).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from specdec.eval.drafters.ctc import collapse
from specdec.trainer.objectives import ObjectiveOutput, register_objective


@dataclass
class CtcConfig:
    """CTC over each window of draft frames against the target's next `label_len` tokens (the frames
    are the drafter's: draft.frames of the ctc drafter, draft.unroll_steps of eagle3)."""

    weight: float = 0.01  # the released code's c_w
    label_len: int = 3  # target tokens per window (released code `fixlen`); at most the frames per window


@register_objective("ctc", config=CtcConfig)
def ctc_loss(
    *,
    frame_logits: torch.Tensor,  # [W, F, V_d] the draft's frames of W windows
    ctc_labels: torch.Tensor,  # [W, F] int64: draft ids of the target's argmax at the next F positions
    ctc_label_mask: torch.Tensor,  # [W, F] bool: that token is an answer token of the draft vocabulary
    ctc_blank: torch.Tensor,  # 0-dim int64: the blank's draft id
    cfg: CtcConfig,
) -> ObjectiveOutput:
    frames, length, blank = frame_logits.shape[1], cfg.label_len, int(ctc_blank)
    if not 1 <= length <= frames:
        raise ValueError(
            f"objective.ctc.label_len={length}: the drafter emits {frames} frames per window; give 1 to {frames} "
            "(or more frames: draft.frames of the ctc drafter, draft.unroll_steps of eagle3)."
        )
    labels = ctc_labels[:, :length]
    labelled = ctc_label_mask[:, :length].all(dim=1) & (labels != blank).all(dim=1)
    needed = length + (labels[:, 1:] == labels[:, :-1]).sum(dim=1)  # a repeat needs a blank between
    counted = labelled & (needed <= frames)
    metrics = {"windows": counted.sum().float(), "infeasible": (labelled & (needed > frames)).sum().float()}
    if not bool(counted.any()):
        return ObjectiveOutput(frame_logits.sum() * 0, metrics)
    log_probs = torch.log_softmax(frame_logits[counted].float(), dim=-1)  # [W', F, V_d]
    labels = labels[counted]
    windows = len(labels)
    loss = F.ctc_loss(
        log_probs.transpose(0, 1),  # [F, W', V_d], time first
        labels,
        input_lengths=torch.full((windows,), frames, dtype=torch.long),
        target_lengths=torch.full((windows,), length, dtype=torch.long),
        blank=blank,
        reduction="mean",
    )
    with torch.no_grad():
        best = log_probs.argmax(dim=-1).tolist()
        exact = [collapse(path, blank)[:length] == label for path, label in zip(best, labels.tolist(), strict=True)]
    metrics["best_path_exact"] = torch.tensor(sum(exact) / windows)
    return ObjectiveOutput(loss, metrics)
