"""The eval hook: every N training steps and at the last one, decode held-out prompts with the
drafter being trained, through the same engine and verifier as `specdec-eval` and with its batch
size (speculation pays most at small batches, so a bigger hook batch would understate the speedup),
and log what serving will see:
eval/tau, eval/accept_rate, eval/accept_pos_<i>, eval/tokens_per_s and eval/speedup. `eval/tau`
can be the monitor of ModelCheckpoint, so the kept checkpoint is the one that accepts most."""

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

import lightning as L
import torch
from transformers import PreTrainedModel

from specdec.eval.drafters import Drafter
from specdec.eval.engine import SpecConfig
from specdec.eval.evaluate import decode_prompts
from specdec.eval.metrics import acceptance_stats
from specdec.eval.prompts import Prompt


def is_last_step(trainer: L.Trainer) -> bool:
    """The batch that ends training, by max_steps or by the last batch of the last epoch."""
    if trainer.max_steps > 0 and trainer.global_step >= trainer.max_steps:
        return True
    max_epochs = trainer.max_epochs
    return bool(trainer.is_last_batch and max_epochs is not None and 0 < max_epochs <= trainer.current_epoch + 1)


class SpecEvalCallback(L.Callback):
    def __init__(
        self,
        *,
        target: PreTrainedModel,
        prompts: list[Prompt],
        make_drafter: Callable[[L.LightningModule], Drafter],  # an inference session over the module's drafter
        cfg: SpecConfig,
        eos_token_ids: set[int],
        every_n_steps: int,
        batch_size: int = 1,  # prompts decoded together: the report's eval.batch_size
        seed: int = 0,
        # (trainer, module) -> a context in which the target and drafter are whole on every rank (the
        # strategies that shard parameters); each rank decodes its share of the prompts
        full_weights: Callable[[L.Trainer, L.LightningModule], AbstractContextManager] = lambda *_: (
            contextlib.nullcontext()
        ),
    ) -> None:
        self.target, self.prompts, self.make_drafter = target, prompts, make_drafter
        self.cfg, self.eos_token_ids, self.every_n_steps = cfg, eos_token_ids, every_n_steps
        self.batch_size, self.seed, self.full_weights = batch_size, seed, full_weights
        self.ar_tokens_per_s: float | None = None  # the target is frozen: measured once
        self.evaluated_step: int | None = None  # global_step of the weights last decoded

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a resumed run starts at the step its checkpoint was evaluated at (or step 0: never evaluated)
        self.evaluated_step = trainer.global_step
        # the target decodes where the drafter trains (a cached run never moved it off the CPU)
        self.target.to(pl_module.device)

    def _decode(self, drafter: Drafter | None):
        return decode_prompts(
            self.target,
            self.prompts,
            drafter=drafter,
            cfg=self.cfg,
            eos_token_ids=self.eos_token_ids,
            batch_size=self.batch_size,
            seed=self.seed,
            desc="eval hook",
            progress=False,
        )

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # This runs after every micro-batch; with gradient accumulation global_step moves only every
        # accumulate_grad_batches of them, so the weights of a step are decoded once, at the first.
        if trainer.global_step == self.evaluated_step:
            return
        periodic = trainer.global_step > 0 and trainer.global_step % self.every_n_steps == 0
        if not (periodic or is_last_step(trainer)):
            return
        self.evaluated_step = trainer.global_step
        was_training = pl_module.training
        pl_module.eval()
        try:
            with self.full_weights(trainer, pl_module):
                if self.ar_tokens_per_s is None:
                    baseline = self._decode(None)
                    self.ar_tokens_per_s = baseline.num_new_tokens / baseline.seconds
                result = self._decode(self.make_drafter(pl_module))
        finally:
            pl_module.train(was_training)
        stats = acceptance_stats([n for row in result.accepted for n in row], self.cfg.k)
        tokens_per_s = result.num_new_tokens / result.seconds
        metrics = {
            "eval/tau": stats.tau,
            "eval/accept_rate": stats.accept_rate,
            "eval/tokens_per_s": tokens_per_s,
            "eval/speedup": tokens_per_s / self.ar_tokens_per_s,
            **{f"eval/accept_pos_{i}": rate for i, rate in enumerate(stats.accept_rate_per_pos)},
        }
        # Straight to the loggers at this step (self.log would repeat the values at later steps), and
        # into callback_metrics on every rank, so that ModelCheckpoint(monitor="eval/tau") agrees.
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})
