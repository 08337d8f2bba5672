"""The Lightning module that distills a drafter from a frozen target.

One training step, for the EAGLE-3 drafter:
    features, final  = the cached (offline) or freshly computed (online) target layers: the three
                       the drafter reads, and the final normed state N the target's LM head reads
    draft_logits     = draft.unroll(features, next tokens, steps=K)          [B, K, T, V_d]
    target_probs     = softmax(lm_head(final)[t2d]) at t+k+1 for step k      [B, K, T, V_d]
    loss_mask[k, t]  = assistant token at t+k+2, and the target's argmax at t+k+1 is in the draft vocab
    loss             = sum over objectives of weight * objective(draft_logits, target_probs, loss_mask)
Step k at position t predicts token t+k+2: the target itself supplies token t+1 (the pending
token at inference), so the draft's first guess is the one after it.

Logged: train/loss, train/<objective> (unweighted), train/<objective>/<metric>, train/acc_step_k
(draft argmax = target argmax), train/sim_tau (1 + expected accepted drafts under sampling,
closed form over eval.k steps), train/sim_tau_greedy (the same under greedy verification),
train/tokens_per_s and lr. The target's tensors (its embedding, which the drafter shares, and
its LM head) are not trained and not written to checkpoints.
"""

import math
import time

import lightning as L
import torch
from transformers import PreTrainedModel

from specdec.eval.drafters.eagle3 import Eagle3Model, shared_keys
from specdec.trainer.config import ExpectedAcceptConfig, OptimConfig, Schedule
from specdec.trainer.objectives import OBJECTIVE_FUNCTIONS, masked_mean
from specdec.trainer.objectives.expected_accept import expected_accept_loss


class TrainingDiverged(RuntimeError):
    pass


def shift_left(x: torch.Tensor, by: int) -> torch.Tensor:
    """x[:, t + by] at t along dim 1, zero past the end."""
    return torch.cat([x[:, by:], x.new_zeros(x.shape[0], min(by, x.shape[1]), *x.shape[2:])], dim=1)


class DrafterModule(L.LightningModule):
    def __init__(
        self,
        draft: Eagle3Model,
        *,
        objectives: dict,  # name -> its config (weight and fields), from the recipe
        optim: OptimConfig,
        steps: int,  # unrolled draft steps K
        lm_head: torch.Tensor,  # the target's output embedding [V, H]: the teacher's last layer
        target: PreTrainedModel | None = None,  # online mode: computes `hidden` from input_ids
        layers: list[int] | None = None,  # online mode: the target layers to read, as in the cache
        eval_k: int = 4,  # draft tokens per verify step at serving: the depth sim_tau simulates
    ) -> None:
        super().__init__()
        self.draft = draft
        draft.embed_tokens.train()  # the target's, shared: no train-time behaviour, but Lightning expects train mode
        self.objectives, self.optim, self.steps, self.eval_k = objectives, optim, steps, min(eval_k, steps)
        # Plain attributes, not submodules: frozen, never saved, moved to the device in on_fit_start.
        self.frozen = {"lm_head": lm_head.detach(), "target": target}
        self.layers = layers
        self.shared_keys = {f"draft.{key}" for key in shared_keys(draft)}
        self._last_step_end: float | None = None
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))  # real tokens trained on

    # ---- the teacher and the batch ----

    def on_fit_start(self) -> None:
        self.frozen["lm_head"] = self.frozen["lm_head"].to(self.device)
        if self.frozen["target"] is not None:
            self.frozen["target"].to(self.device)

    @torch.no_grad()
    def target_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, T, L, H] bfloat16: the cache's field, from the target in the loop when online."""
        if "hidden" in batch:
            return batch["hidden"]
        with torch.autocast(self.device.type, enabled=False):  # the target runs in its own dtype, as in prep
            output = self.frozen["target"].base_model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
                use_cache=False,
            )
        return torch.stack([output.hidden_states[layer] for layer in self.layers], dim=2).to(torch.bfloat16)

    @torch.no_grad()
    def teacher(self, final: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """target_probs [B, K, T, V_d] float32 and loss_mask [B, K, T] bool for the unrolled steps."""
        head = self.frozen["lm_head"]
        logits = final.to(head.dtype) @ head.T  # [B, T, V]
        in_draft = self.draft.t2d[logits.argmax(dim=-1)]
        draft_ids = torch.arange(len(self.draft.d2t), device=logits.device) + self.draft.d2t
        probs = torch.softmax(logits[..., draft_ids].float(), dim=-1)  # renormalised on the draft vocabulary
        target_probs = torch.stack([shift_left(probs, k + 1) for k in range(self.steps)], dim=1)
        mask = torch.stack(
            [shift_left(loss_mask, k + 2) & shift_left(in_draft, k + 1) for k in range(self.steps)], dim=1
        )
        return target_probs, mask

    def forward_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted loss, metrics) of one batch: the same function for both modes and for tests."""
        hidden = self.target_hidden(batch)
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        draft_logits = self.draft.unroll(
            target_hidden=hidden[:, :, :-1].to(self.draft.fc.weight.dtype),
            next_ids=shift_left(input_ids, 1),
            attention_mask=attention_mask,
            steps=self.steps,
        )
        target_probs, loss_mask = self.teacher(hidden[:, :, -1], batch["loss_mask"])
        inputs = {"draft_logits": draft_logits, "target_probs": target_probs, "loss_mask": loss_mask}
        loss, metrics = draft_logits.new_zeros((), dtype=torch.float32), {}
        for name, cfg in self.objectives.items():
            output = OBJECTIVE_FUNCTIONS[name](**inputs, cfg=cfg)
            loss = loss + cfg.weight * output.loss
            metrics[f"train/{name}"] = output.loss.detach()
            metrics.update({f"train/{name}/{key}": value for key, value in output.metrics.items()})
        metrics.update(self.diagnostics(**inputs))
        return loss, metrics

    @torch.no_grad()
    def diagnostics(
        self, *, draft_logits: torch.Tensor, target_probs: torch.Tensor, loss_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        k = self.eval_k
        agree = (draft_logits.argmax(dim=-1) == target_probs.argmax(dim=-1)) & loss_mask  # [B, K, T]
        metrics = {
            f"train/acc_step_{step}": masked_mean(agree[:, step].float(), loss_mask[:, step])
            for step in range(self.steps)
        }
        sampled = expected_accept_loss(
            draft_logits=draft_logits[:, :k],
            target_probs=target_probs[:, :k],
            loss_mask=loss_mask[:, :k],
            cfg=ExpectedAcceptConfig(),
        )
        metrics["train/sim_tau"] = sampled.metrics["sim_tau"]
        # greedy: a draft is accepted when it and every earlier one are the target's argmax
        accepted = agree[:, :k].float().cumprod(dim=1).sum(dim=1)
        metrics["train/sim_tau_greedy"] = 1 + masked_mean(accepted, loss_mask[:, 0])
        return metrics

    # ---- the loop ----

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, metrics = self.forward_batch(batch)
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss {loss.item()} at global step {self.global_step}, batch {batch_idx} of epoch "
                f"{self.current_epoch} (samples {batch['index'].tolist()}): training stopped. Lower optim.lr, "
                "set trainer.gradient_clip_val, or inspect those samples; the last checkpoint is intact."
            )
        self.tokens_seen += batch["attention_mask"].sum()
        now = time.perf_counter()
        if self._last_step_end is not None:
            metrics["train/tokens_per_s"] = torch.tensor(
                batch["attention_mask"].sum().item() / (now - self._last_step_end)
            )
        self._last_step_end = now
        metrics["train/loss"] = loss.detach()
        metrics["lr"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        self.log_dict(metrics, prog_bar=False, batch_size=len(batch["input_ids"]))
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup, cosine = self.optim.warmup_steps, self.optim.schedule == Schedule.cosine

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if not cosine:
                return 1.0
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints hold the drafter only ----

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        for key in self.shared_keys:
            checkpoint["state_dict"].pop(key, None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        own = self.state_dict()
        checkpoint["state_dict"].update({key: own[key] for key in self.shared_keys})
