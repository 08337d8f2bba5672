"""The EAGLE-3 drafter's training side (Li et al., "EAGLE-3", arXiv 2503.01840): its recipe fields,
its draft vocabulary, the training-time-test unroll with the teacher it is scored against, its
diagnostics, and its save/load as the native EAGLE-3 directory. The model and its inference session
are in specdec.eval.drafters.eagle3.

One training batch becomes:
    draft_logits    = draft.unroll(features, next tokens, steps=K)               [B, K, T, V_d]
    target_probs    = softmax(lm_head(final)[draft vocab]) at t+k+1 for step k   [B, K, T, V_d]
    loss_mask[k, t] = token t+k+2 is an assistant token, and the target's argmax at t+k+1 is in
                      the draft vocabulary                                       [B, K, T]
Step k at position t predicts token t+k+2: the target itself supplies token t+1 (the pending token
at inference), so the draft's first guess is the one after it, and the teacher is the target's
distribution at t+k+1, the position whose logits predict t+k+2. The loss mask is the mask of the
predicted token t+k+2: a step counts exactly when it drafts a token of an answer.
SpecForge (a6b6b02, eagle3/data.py and TargetHead.preprocess) gates the same step with the mask at
position t+k, two tokens before the one predicted (EAGLE-3's original convention): it never trains
the guess of an answer's first two tokens and does train the guesses of the two tokens after an
answer's end (the template's next header). At serving time the drafter guesses inside answers,
from their second token on (the first is the target's own token after the prompt), which is what
this mask selects.
"""

import copy
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import nn
from transformers import PreTrainedModel

from specdec.eval.drafters.eagle3 import Eagle3Drafter, Eagle3Model, shared_keys
from specdec.eval.drafters.eagle3_dirs import (
    default_target_layers,
    is_eagle3_dir,
    load_eagle3,
    read_eagle3_dir,
    save_eagle3,
    write_sglang,
    write_speculators,
)
from specdec.eval.window import logit_stats
from specdec.trainer.drafters import DrafterKind, Exporter, ExportTarget, register_drafter
from specdec.trainer.drafters.draft_vocab import check_blank, count_loss_tokens, draft_vocab
from specdec.trainer.objectives import WINDOW_INPUTS, WINDOW_POLICY_INPUTS, masked_mean, scatter_rows
from specdec.trainer.objectives.expected_accept import expected_accepted


@dataclass
class Eagle3DraftConfig:
    """EAGLE-3 (Li et al., arXiv 2503.01840): one decoder layer over fused target layers."""

    name: str = "eagle3"
    vocab_size: int = 32000  # draft vocabulary: the most frequent target tokens (EAGLE-3 reference code)
    unroll_steps: int = 7  # draft steps unrolled in training, the training-time test's length (reference code)
    # with objective.ctc: a target token id that answers never contain, kept in the draft vocabulary as
    # CTC's blank (the released CTC-drafter code reuses Llama's <unk>, id 0)
    ctc_blank_id: int | None = None
    # a saved EAGLE-3 directory to start from (its weights and draft vocabulary; vocab_size must match):
    # a trained drafter whose window policy a recipe trains (objective.stop_head, objective.window_rl)
    start: str | None = None

    def target_layers(self, num_layers: int) -> list[int]:
        """Entering layers 2, N//2 and N-3 (EAGLE-3 reference code); the teacher's final normed state
        N follows them in the cache."""
        return [2, num_layers // 2, num_layers - 3]


def new_eagle3(target: PreTrainedModel, d2t: torch.Tensor, t2d: torch.Tensor, *, seed: int) -> Eagle3Model:
    """A freshly initialised float32 EAGLE-3 drafter over a draft vocabulary; the same for the same seed."""
    L.seed_everything(seed, verbose=False)
    draft = Eagle3Model(target.config, draft_vocab_size=len(d2t), embed_tokens=target.get_input_embeddings())
    draft.d2t.copy_(d2t)
    draft.t2d.copy_(t2d)
    return draft  # float32 (the default dtype); the shared embedding stays in the target's dtype


def build(cfg: Eagle3DraftConfig, target, token_samples, seed: int) -> Eagle3Model:
    if cfg.start is not None:
        return start_from(cfg, target)
    counts = count_loss_tokens(token_samples, target.model.config.vocab_size)
    check_blank(counts, cfg.ctc_blank_id, "draft.ctc_blank_id")
    d2t, t2d = draft_vocab(counts, cfg.vocab_size, reserved=cfg.ctc_blank_id)
    share = counts[t2d].sum().item() / max(counts.sum().item(), 1)
    L.pytorch.utilities.rank_zero_info(
        f"draft vocabulary: {len(d2t)} tokens cover {100 * share:.1f}% of the loss tokens"
    )
    return new_eagle3(target.model, d2t, t2d, seed=seed)


def start_from(cfg: Eagle3DraftConfig, target) -> Eagle3Model:
    """The drafter saved at cfg.start, in float32 (the shared embedding stays the target's)."""
    draft, _ = load_eagle3(cfg.start, target.model)
    if len(draft.d2t) != cfg.vocab_size:
        raise ValueError(
            f"draft.start={cfg.start} has a draft vocabulary of {len(draft.d2t)} tokens, but draft.vocab_size="
            f"{cfg.vocab_size}: set draft.vocab_size={len(draft.d2t)} (the drafter's own), or start from another "
            "drafter."
        )
    return serving_copy(draft, torch.float32).train()


def untrained_like(draft: Eagle3Model, target: PreTrainedModel, seed: int) -> Eagle3Model:
    """The start of a drafter trained with `seed` (same vocabulary, same init), in the target's dtype."""
    return new_eagle3(target, draft.d2t, draft.t2d, seed=seed).to(target.dtype).eval()


def serving_copy(draft: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The drafter as it is served (in `dtype`, eval mode), sharing the target's embedding, which
    stays as it is; consumes no randomness, so the training run stays reproducible. Any drafter that
    borrows the target's `embed_tokens` (EAGLE-3, CTC's slots being parameters of its own)."""
    served = copy.deepcopy(draft, memo={id(draft.embed_tokens): draft.embed_tokens})
    for child in served.children():
        if child is not draft.embed_tokens:
            child.to(dtype)
    for parameter in served.parameters(recurse=False):
        parameter.data = parameter.data.to(dtype)
    return served.eval()


# ---- a training batch ----


def shift_left(x: torch.Tensor, by: int) -> torch.Tensor:
    """x[:, t + by] at t along dim 1, zero past the end."""
    return torch.cat([x[:, by:], x.new_zeros(x.shape[0], min(by, x.shape[1]), *x.shape[2:])], dim=1)


def per_step(x: torch.Tensor, steps: int, first: int) -> torch.Tensor:
    """[B, T, ...] -> [B, K, T, ...] with out[:, k, t] = x[:, t + k + first], zero past the end.

    A strided view over one zero-padded copy of x: the K steps share its memory (the teacher of
    every step is the same [B, T, V_d] tensor read at K offsets, not K copies of it)."""
    batch, time = x.shape[:2]
    padded = torch.cat([x, x.new_zeros(batch, steps + first, *x.shape[2:])], dim=1)
    strides = padded.stride()
    return padded.as_strided(
        (batch, steps, time, *x.shape[2:]), (strides[0], strides[1], *strides[1:]), first * strides[1]
    )


@torch.no_grad()
def teacher_rows(
    draft: nn.Module, final: torch.Tensor, loss_mask: torch.Tensor, lm_head: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At each position [B, T] whose next token is an assistant token (0 elsewhere): the target's
    distribution renormalised on the draft vocabulary [B, T, V_d] (float32), whether its argmax is a
    draft token, and the draft id of its most likely draft token. `draft` holds d2t and t2d."""
    batch, time = loss_mask.shape
    teaches = shift_left(loss_mask, 1)  # [B, T]: the logits at t predict an assistant token
    logits = final[teaches].to(lm_head.dtype) @ lm_head.T  # [M, V]
    draft_ids = torch.arange(len(draft.d2t), device=logits.device) + draft.d2t
    rows = torch.softmax(logits[:, draft_ids].float(), dim=-1)  # [M, V_d]
    probs = rows.new_zeros(batch, time, rows.shape[-1])
    probs[teaches] = rows
    in_draft = torch.zeros_like(teaches)
    in_draft[teaches] = draft.t2d[logits.argmax(dim=-1)]
    argmax = torch.zeros_like(loss_mask, dtype=torch.long)
    argmax[teaches] = rows.argmax(dim=-1)
    return probs, in_draft, argmax


@torch.no_grad()
def teacher(
    draft: Eagle3Model, final: torch.Tensor, loss_mask: torch.Tensor, lm_head: torch.Tensor, steps: int
) -> dict[str, torch.Tensor]:
    """The target's distribution on the draft vocabulary where the unrolled steps count, and the masks.

    final [B, T, H] the target's final normed state, loss_mask [B, T] its assistant tokens. Returns
        loss_mask     [B, K, T] bool, the places the objectives count (module docstring); N of them
        target_probs  [N, V_d] float32 at those places, renormalised on the draft vocabulary
        target_argmax [N] the draft id of the target's most likely draft-vocabulary token there
        answer_mask   [B, K, T] bool, token t+k+2 is an assistant token, in the draft vocabulary or not
    The target's LM head runs only at positions whose next token is an assistant token: the others
    teach nothing. At an answer place outside loss_mask the target's argmax is not a draft token, a
    certain rejection at serving time (answer_mask is for the serving-faithful diagnostics).
    """
    probs, in_draft, argmax = teacher_rows(draft, final, loss_mask, lm_head)
    answer = per_step(loss_mask, steps, 2)  # the token step k predicts at t is t+k+2
    counted = answer & per_step(in_draft, steps, 1)
    return {
        "loss_mask": counted,
        "target_probs": per_step(probs, steps, 1)[counted],
        "target_argmax": per_step(argmax, steps, 1)[counted],
        "answer_mask": answer,
    }


def ctc_windows(loss_mask: torch.Tensor, target_argmax: torch.Tensor, windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The CTC labels of the windows that start at the W places where windows [B, T] is True: the
    target's argmax after each of them on the grid of loss_mask [B, K, T] (target_argmax [N] at its
    N places), as ctc_labels [W, K] and ctc_label_mask [W, K], in (b, t) order."""
    grid = scatter_rows(target_argmax, loss_mask)  # [B, K, T]
    return {
        "ctc_labels": grid.transpose(1, 2)[windows],
        "ctc_label_mask": loss_mask.transpose(1, 2)[windows],
    }


def training_inputs(
    draft: Eagle3Model,
    batch: dict[str, torch.Tensor],
    target_hidden: torch.Tensor,  # [B, T, 4, H]: the drafter's three layers, then the final normed state
    lm_head: torch.Tensor,  # [V, H] the target's output embedding
    cfg: Eagle3DraftConfig,
    wanted: frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """draft_logits [N, V_d] of the training-time test where the loss counts, and the teacher there
    (see `teacher`): the drafter's norm and LM head run on those N places only. For objective.ctc,
    the K unrolled steps at each position t where step 0 counts are a window of K frames, labelled
    with the target's argmax after t (`ctc_windows`)."""
    targets = teacher(draft, target_hidden[:, :, -1], batch["loss_mask"], lm_head, cfg.unroll_steps)
    outputs = draft.unroll_outputs(
        target_hidden=target_hidden[:, :, :-1].to(draft.fc.weight.dtype),
        next_ids=shift_left(batch["input_ids"], 1),
        attention_mask=batch["attention_mask"],
        steps=cfg.unroll_steps,
    )
    inputs = {"draft_logits": draft.logits(outputs[targets["loss_mask"]]), **targets}
    if wanted & WINDOW_INPUTS:
        inputs |= window_inputs(draft, outputs, targets["answer_mask"], target_hidden[:, :, -1], lm_head)
    if "frame_logits" in wanted:
        windows = targets["loss_mask"][:, 0]
        inputs |= ctc_windows(targets["loss_mask"], targets["target_argmax"], windows)
        inputs["frame_logits"] = draft.logits(outputs.transpose(1, 2)[windows])  # [W, K, V_d]
        inputs["ctc_blank"] = draft.t2d.cumsum(0)[cfg.ctc_blank_id] - 1  # its draft id
    return inputs


@torch.no_grad()
def window_inputs(
    draft: Eagle3Model, outputs: torch.Tensor, answer_mask: torch.Tensor, final: torch.Tensor, lm_head: torch.Tensor
) -> dict[str, torch.Tensor]:
    """What a window policy sees after each draft token of a chain, and what the verifier did with it,
    at the M answer places of the unroll (answer_mask [B, K, T]: step k at t drafts token t+k+2):
        window_hidden      [M, H]  the drafter's output o that produced the token (no gradient)
        window_stats       [M, 2]  top-1 probability and entropy of its draft distribution
        window_step        [M]     k, the token's place in its chain
        window_accept      [M]     1 when greedy verification accepts it: the draft's argmax is the
                                   target's argmax at t+k+1 over the whole vocabulary
        window_accept_soft [M]     min(1, p(y) / q(y)) of that token y, p the target's full distribution
                                   at t+k+1 and q the draft's: the acceptance probability under sampling
        window_mask        [B, K, T] answer_mask, the grid of the M places
    A chain starts at every t where step 0 counts. The teacher-forced unroll is the chain's state given
    that the tokens before were accepted, which is the only case in which the policy is asked."""
    hidden = outputs[answer_mask]
    logits = draft.logits(hidden).float()
    log_q = torch.log_softmax(logits, dim=-1)
    draft_ids = logits.argmax(dim=-1)
    tokens = draft_ids + draft.d2t[draft_ids]  # target ids
    batch_index, step, position = answer_mask.nonzero().unbind(1)
    at = position + step + 1  # the target's logits there predict token t+k+2
    rows = torch.stack([batch_index, at], dim=1).unique(dim=0, return_inverse=True)
    unique_places, place_row = rows
    target_logits = (final[unique_places[:, 0], unique_places[:, 1]].to(lm_head.dtype) @ lm_head.T).float()
    log_p = target_logits[place_row, tokens] - target_logits.logsumexp(dim=-1)[place_row]
    accept = (target_logits.argmax(dim=-1)[place_row] == tokens).float()
    soft = (log_p - log_q.gather(1, draft_ids[:, None])[:, 0]).exp().clamp(max=1)
    return {
        "window_hidden": hidden.detach(),
        "window_stats": logit_stats(logits),
        "window_step": step,
        "window_accept": accept,
        "window_accept_soft": soft,
        "window_mask": answer_mask,
    }


def check(cfg: Eagle3DraftConfig, objectives: dict) -> list[str]:
    if "ctc" not in objectives:
        return []
    problems = []
    if cfg.ctc_blank_id is None:
        problems.append(
            "objective.ctc with draft.name=eagle3 needs draft.ctc_blank_id: a target token id that answers never "
            "contain, kept in the draft vocabulary as CTC's blank (e.g. 0, SmolLM2's <|endoftext|> or Llama's <unk>)"
        )
    if objectives["ctc"].label_len > cfg.unroll_steps:
        problems.append(
            f"objective.ctc.label_len={objectives['ctc'].label_len}: more labels than the {cfg.unroll_steps} frames "
            "of a window (draft.unroll_steps)"
        )
    return problems


@torch.no_grad()
def diagnostics(inputs: dict[str, torch.Tensor], eval_k: int) -> dict[str, torch.Tensor]:
    """train/acc_step_k for every unrolled step (draft argmax = target argmax where the loss counts),
    and closed-form acceptance lengths over the first k = min(eval.k, K) steps, 1 + sum_k prod_{i<=k}
    alpha_i averaged over chain starts:
        sim_tau: sampled, alpha = sum_x min(p(x), q(x)) with p renormalised on the draft vocabulary,
            over the places the loss counts (a place left out ends the chain);
        sim_tau_greedy: alpha = 1 where the draft's argmax is the target's, same places;
        sim_tau_greedy_served: greedy as served, over every answer place: where the target's argmax
            is not a draft token the step is a certain rejection, where sim_tau_greedy leaves the
            place out. This is the teacher-forced counterpart of a greedy eval/tau.
    """
    draft_logits, target_probs, loss_mask = inputs["draft_logits"], inputs["target_probs"], inputs["loss_mask"]
    steps, k = loss_mask.shape[1], min(eval_k, loss_mask.shape[1])
    agree = scatter_rows((draft_logits.argmax(dim=-1) == inputs["target_argmax"]).float(), loss_mask)
    metrics = {f"train/acc_step_{step}": masked_mean(agree[:, step], loss_mask[:, step]) for step in range(steps)}
    alpha = torch.minimum(target_probs, torch.softmax(draft_logits.float(), dim=-1)).sum(dim=-1)
    answer = inputs["answer_mask"][:, :k]
    closed_forms = {
        "sim_tau": (scatter_rows(alpha, loss_mask)[:, :k], loss_mask[:, :k]),
        "sim_tau_greedy": (agree[:, :k], loss_mask[:, :k]),
        "sim_tau_greedy_served": (agree[:, :k], answer),  # 0 at answer places outside loss_mask
    }
    for name, (values, mask) in closed_forms.items():
        metrics[f"train/{name}"] = 1 + masked_mean(expected_accepted(values, mask), mask[:, 0])
    return metrics


# ---- export ----

SPECULATORS_VERSION = "0.9.0"  # the speculators release whose config classes validate what write_speculators writes


def _layers(checkpoint, target: ExportTarget) -> tuple[int, ...]:
    return checkpoint.target_layers or default_target_layers(target.config.num_hidden_layers)


def write_sglang_dir(source: Path, out: Path, target: ExportTarget, k: int) -> tuple[int, ...]:
    checkpoint = read_eagle3_dir(source)
    layers = _layers(checkpoint, target)
    write_sglang(checkpoint, layers, out, dtype=target.dtype)
    return layers


def write_speculators_dir(source: Path, out: Path, target: ExportTarget, k: int) -> tuple[int, ...]:
    checkpoint = read_eagle3_dir(source)
    layers = _layers(checkpoint, target)
    write_speculators(
        checkpoint,
        layers,
        out,
        dtype=target.dtype,
        verifier=target.name,
        verifier_architectures=list(target.config.architectures),
        speculative_tokens=k,
        speculators_version=SPECULATORS_VERSION,
    )
    return layers


def serve_sglang_dir(where: str, target: ExportTarget, k: int, layers: tuple[int, ...]) -> dict[str, str]:
    """SGLang reads the nested ids; vLLM reads this directory right only when the ids are the
    default, which it assumes for a directory without top-level ids."""
    default = tuple(layers) == default_target_layers(target.config.num_hidden_layers)
    vllm = (
        target.vllm_command({"model": where, "method": "eagle3", "num_speculative_tokens": k})
        if default
        else "export with export.format=speculators: this directory's layer ids are in SGLang's meaning, which "
        "vLLM does not read (they are not the default ones)"
    )
    return {"SGLang": target.sglang_command("EAGLE3", where, k), "vLLM": vllm}


def serve_speculators_dir(where: str, target: ExportTarget, k: int, layers: tuple[int, ...]) -> dict[str, str]:
    return {
        "vLLM": f"vllm serve {where}  # the verifier ({target.name}) is read from speculators_config",
        "SGLang": "export with export.format=sglang (SGLang loads the native EAGLE-3 directory)",
    }


_TAGS = ("speculative-decoding", "draft-model", "eagle3", "specdec")
EXPORTS = {
    "sglang": Exporter(write=write_sglang_dir, serve=serve_sglang_dir, tags=(*_TAGS, "sglang", "vllm")),
    "speculators": Exporter(
        write=write_speculators_dir, serve=serve_speculators_dir, tags=(*_TAGS, "speculators", "vllm")
    ),
}


CTC_INPUTS = frozenset({"frame_logits", "ctc_labels", "ctc_label_mask", "ctc_blank"})
INPUTS = (
    frozenset({"draft_logits", "target_probs", "loss_mask", "target_argmax", "answer_mask"})
    | CTC_INPUTS
    | WINDOW_INPUTS
    | WINDOW_POLICY_INPUTS
)
EAGLE3 = register_drafter(
    "eagle3",
    DrafterKind(
        config=Eagle3DraftConfig,
        build=build,
        untrained_like=untrained_like,
        training_inputs=training_inputs,
        inputs=INPUTS,
        teacher_inputs=INPUTS,  # even the loss mask: a place counts where the target's argmax is a draft token
        diagnostics=diagnostics,
        shared_keys=shared_keys,
        session=Eagle3Drafter,
        serving_copy=serving_copy,
        save=lambda draft, directory, target_config, layers: save_eagle3(
            draft, directory, target_config=target_config, target_layers=layers
        ),
        load=load_eagle3,
        is_saved=is_eagle3_dir,
        module=__name__,
        exports=EXPORTS,
        check=check,
    ),
)
