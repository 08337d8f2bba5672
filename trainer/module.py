"""The Lightning module that distills any registered drafter from a frozen target.

One training step:
    target_hidden = the cached (offline) or freshly computed (online) target layers   [B, T, L, H]
    inputs        = the drafter kind's training_inputs(draft, batch, target_hidden, lm_head, the inputs wanted)
    loss          = sum over the recipe's objectives of weight * objective(**the inputs it declares)
What `inputs` holds is the drafter kind's business (specdec.trainer.drafters), and the recipe check
makes sure it holds every tensor the recipe's objectives take. Objectives that train the window
policy (stop_head, window_rl) take the acceptance logits of a WindowHead (specdec.eval.window) that
the module owns and applies to the kind's window inputs; when every objective is one of those, the
drafter is frozen and only the head trains.

Logged: train/loss, train/<objective> (unweighted), train/<objective>/<metric>, the drafter's
diagnostics (at Lightning's logging steps only: they cost a pass over the draft logits),
train/tokens_per_s (all ranks together) and lr. The target's tensors (an embedding the drafter
shares, its LM head, the online target itself) are not trained and not written to checkpoints;
online under a strategy that shards parameters (FSDP, ZeRO-3) the target is a submodule, so that the
strategy shards it too. A loss or a gradient that is not finite stops the run before the optimizer
step, so neither the weights nor `last.ckpt` ever hold NaN or inf.
"""

import copy
import time

import lightning as L
import torch
from torch import nn
from transformers import PreTrainedModel, get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from specdec.eval.window import WindowHead
from specdec.trainer.config import OptimConfig, Schedule
from specdec.trainer.drafters import DrafterKind
from specdec.trainer.objectives import OBJECTIVES, WINDOW_INPUTS, WINDOW_POLICY_INPUTS


class TrainingDiverged(RuntimeError):
    pass


class DrafterModule(L.LightningModule):
    def __init__(
        self,
        draft: nn.Module,
        *,
        kind: DrafterKind,
        draft_cfg,  # the recipe's `draft` section, the kind's config dataclass
        objectives: dict,  # name -> its config (weight and fields), from the recipe
        optim: OptimConfig,
        lm_head: torch.Tensor,  # the target's output embedding [V, H]: the teacher's last layer
        target: PreTrainedModel | None = None,  # online mode: computes `hidden` from input_ids
        layers: list[int] | None = None,  # online mode: the target layers to read, as in the cache
        shard_target: bool = False,  # online: register the target as a submodule, for FSDP and ZeRO-3 to shard
        eval_k: int = 4,  # draft tokens per verify step at serving: the depth the diagnostics simulate
        window: WindowHead | None = None,  # the window policy's head, for objectives that take its logits
    ) -> None:
        super().__init__()
        self.draft, self.kind, self.draft_cfg = (
            draft.train(),
            kind,
            draft_cfg,
        )  # shared target modules too: no train-time behaviour, but Lightning expects train mode
        self.objectives, self.optim, self.eval_k = objectives, optim, eval_k
        # Plain attributes, not submodules: frozen, never saved, moved to the device in on_fit_start.
        self.frozen = {"lm_head": lm_head.detach(), "target": target}
        self.layers = layers
        self.shared_keys = {f"draft.{key}" for key in kind.shared_keys(draft)}
        if shard_target and target is not None:
            self.sharded_target = target.requires_grad_(False)
            self.shared_keys |= {f"sharded_target.{key}" for key in target.state_dict()}
            self.strict_loading = False  # DeepSpeed's checkpoints leave the frozen target out
        self._last_step_end: float | None = None
        self.wanted = frozenset(key for name in objectives for key in OBJECTIVES[name].inputs)
        self.window = window
        if self.wanted & WINDOW_POLICY_INPUTS:
            self.wanted |= WINDOW_INPUTS
            if window is None:
                raise ValueError("objectives that train a window policy need its head (window=WindowHead(...))")
        if "window_logits_behaviour" in self.wanted:  # RL's behaviour policy: a frozen copy, refreshed
            self.window_behaviour = copy.deepcopy(window).requires_grad_(False).train()  # checkpointed: resumes keep it
        # a recipe whose objectives all train the window policy leaves the drafter as it is
        self.frozen_draft = bool(self.wanted & WINDOW_POLICY_INPUTS) and all(
            set(OBJECTIVES[name].inputs) & WINDOW_POLICY_INPUTS for name in objectives
        )
        if self.frozen_draft:
            self.draft.requires_grad_(False)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long))  # real tokens trained on, every rank's

    def on_fit_start(self) -> None:
        self.frozen["lm_head"] = self.frozen["lm_head"].to(self.device)
        if self.frozen["target"] is not None and not hasattr(self, "sharded_target"):  # the strategy placed it
            self.frozen["target"].to(self.device)

    @torch.no_grad()
    def target_hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """[B, T, L, H] bfloat16: the cache's field, from the target in the loop when online; None
        when the drafter and its objectives read no target layer."""
        if "hidden" in batch:
            return batch["hidden"]
        if not self.layers:
            return None
        with torch.autocast(self.device.type, enabled=False):  # the target runs in its own dtype, as in prep
            output = self.frozen["target"].base_model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
                use_cache=False,
            )
        return torch.stack([output.hidden_states[layer] for layer in self.layers], dim=2).to(torch.bfloat16)

    def forward_batch(
        self, batch: dict[str, torch.Tensor], *, diagnostics: bool = True
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(weighted loss, metrics) of one batch: the same function for both modes and for tests."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_draft):
            inputs = self.kind.training_inputs(
                self.draft, batch, self.target_hidden(batch), self.frozen["lm_head"], self.draft_cfg, self.wanted
            )
        if self.window is not None:
            inputs |= self.window_inputs(inputs)
        loss, metrics = None, {}
        for name, cfg in self.objectives.items():
            objective = OBJECTIVES[name]
            output = objective.function(**{key: inputs[key] for key in objective.inputs}, cfg=cfg)
            loss = cfg.weight * output.loss if loss is None else loss + cfg.weight * output.loss
            metrics[f"train/{name}"] = output.loss.detach()
            metrics.update({f"train/{name}/{key}": value for key, value in output.metrics.items()})
        if diagnostics:
            metrics.update(self.kind.diagnostics(inputs, self.eval_k))
        return loss, metrics

    def window_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The window head's acceptance logits at the kind's window places, and its threshold; the
        same from the behaviour copy when RL samples from one."""
        features = (inputs["window_hidden"], inputs["window_stats"], inputs["window_step"])
        computed = {"window_logits": self.window(*features), "window_log_threshold": self.window.log_threshold}
        if hasattr(self, "window_behaviour"):
            with torch.no_grad():
                computed["window_logits_behaviour"] = self.window_behaviour(*features)
                computed["window_log_threshold_behaviour"] = self.window_behaviour.log_threshold.detach()
        return computed

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        rl = self.objectives.get("window_rl")
        if hasattr(self, "window_behaviour") and rl is not None and self.global_step % rl.sync_every == 0:
            self.window_behaviour.load_state_dict(self.window.state_dict())

    # ---- the loop ----

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        # The diagnostics only where Lightning writes the logs (its own rule: every n-th optimizer step).
        logging_step = (self.global_step + 1) % self.trainer.log_every_n_steps == 0
        loss, metrics = self.forward_batch(batch, diagnostics=logging_step)
        if not torch.isfinite(loss):
            self._diverged(f"loss {loss.item()}", batch_idx, batch["index"].tolist())
        self._last_batch = (batch_idx, batch["index"].tolist())
        tokens = self.trainer.strategy.reduce(batch["attention_mask"].sum(), reduce_op="sum")  # every rank's batch
        self.tokens_seen += tokens
        now = time.perf_counter()
        if self._last_step_end is not None:
            metrics["train/tokens_per_s"] = torch.tensor(tokens.item() / (now - self._last_step_end))
        self._last_step_end = now
        metrics["train/loss"] = loss.detach()
        metrics["lr"] = torch.tensor(self.optimizers().param_groups[0]["lr"])
        self.log_dict(metrics, prog_bar=False, batch_size=len(batch["input_ids"]))
        self.log("loss", loss.detach(), prog_bar=True, logger=False)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Called once the gradients of the step are accumulated, before clipping and the step. Under
        # DeepSpeed ZeRO-2/3 the gradients live in the engine's partitions (p.grad is None), so only the
        # loss check guards those runs.
        bad = [name for name, p in self.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
        if bad:
            batch_idx, samples = self._last_batch
            self._diverged(f"a non-finite gradient of {', '.join(bad[:3])}", batch_idx, samples)

    def _diverged(self, what: str, batch_idx: int, samples: list[int]) -> None:
        raise TrainingDiverged(
            f"{what} at global step {self.global_step}, batch {batch_idx} of epoch {self.current_epoch} "
            f"(samples {samples}): training stopped before the optimizer step. Lower optim.lr, set "
            "trainer.gradient_clip_val, or inspect those samples; the last checkpoint is intact."
        )

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.optim.lr, weight_decay=self.optim.weight_decay)
        if self.optim.schedule == Schedule.cosine:
            total = max(int(self.trainer.estimated_stepping_batches), 1)
            scheduler = get_cosine_schedule_with_warmup(optimizer, self.optim.warmup_steps, total)
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, self.optim.warmup_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints hold the drafter only ----

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        for key in self.shared_keys:
            checkpoint["state_dict"].pop(key, None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        own = self.state_dict()
        checkpoint["state_dict"].update({key: own[key] for key in self.shared_keys})
