from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from specdec.eval import CausalLMDrafter, SpecConfig
from specdec.eval.evaluate import decode_prompts
from specdec.eval.hook import SpecEvalCallback
from specdec.eval.metrics import acceptance_stats
from specdec.eval.prompts import Prompt
from tests.eval.helpers import perturbed, tiny_lm


class _DistillDraft(L.LightningModule):
    """A tiny causal-LM drafter trained on the target's greedy next tokens: enough to move tau."""

    def __init__(self, target) -> None:
        super().__init__()
        self.target = target
        self.drafter = perturbed(target, 2.0)

    def training_step(self, batch, batch_idx):
        (ids,) = batch
        with torch.no_grad():
            labels = self.target(ids).logits.argmax(-1)
        logits = self.drafter(ids).logits
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())

    def configure_optimizers(self):
        return torch.optim.Adam(self.drafter.parameters(), lr=3e-3)


def test_the_hook_logs_tau_from_the_engine_to_tensorboard(tmp_path: Path) -> None:
    target = tiny_lm(seed=0)
    module = _DistillDraft(target)
    hook = SpecEvalCallback(
        target=target,
        prompts=[Prompt("a", [1, 5, 7]), Prompt("b", [1, 9])],
        make_drafter=lambda m: CausalLMDrafter(m.drafter),
        cfg=SpecConfig(k=3, max_new_tokens=12),
        eos_token_ids=set(),
        every_n_steps=10,
    )
    best = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "ckpt", monitor="eval/tau", mode="max", every_n_train_steps=10, save_top_k=1
    )
    data = torch.utils.data.TensorDataset(torch.randint(1, 64, (320, 16), generator=torch.Generator().manual_seed(0)))
    trainer = L.Trainer(
        max_steps=40,
        logger=L.pytorch.loggers.TensorBoardLogger(tmp_path, name="run"),
        callbacks=[hook, best],
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        accelerator="cpu",
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=8))
    events = EventAccumulator(str(next(tmp_path.glob("run/version_*")))).Reload()
    tau = [event.value for event in events.Scalars("eval/tau")]
    assert [event.step for event in events.Scalars("eval/tau")] == [10, 20, 30, 40]
    assert tau[-1] > tau[0]  # the drafter learns, tau follows
    # the last value is the engine's tau for the final weights (greedy decoding is deterministic)
    final = decode_prompts(
        target,
        hook.prompts,
        drafter=CausalLMDrafter(module.drafter.eval()),
        cfg=hook.cfg,
        eos_token_ids=set(),
        batch_size=1,
        seed=0,
        desc="check",
        progress=False,
    )
    assert tau[-1] == pytest.approx(acceptance_stats([n for row in final.accepted for n in row], k=3).tau)
    assert "eval/accept_pos_2" in events.Tags()["scalars"] and "eval/speedup" in events.Tags()["scalars"]
    assert float(best.best_model_score) == max(tau)  # checkpoints can be chosen by the measured tau


def test_the_hook_decodes_in_the_reports_batch_size(monkeypatch) -> None:
    """Speculation pays most at small batches: the hook measures the batch size serving uses."""
    from specdec.eval import evaluate

    target, batches, generate = tiny_lm(seed=0), [], evaluate.generate

    def counting_generate(target, prompts, **kwargs):
        batches.append(len(prompts))
        return generate(target, prompts, **kwargs)

    monkeypatch.setattr(evaluate, "generate", counting_generate)
    hook = SpecEvalCallback(
        target=target,
        prompts=[Prompt(name, [1, 5 + i]) for i, name in enumerate("abc")],
        make_drafter=lambda m: CausalLMDrafter(m),
        cfg=SpecConfig(k=2, max_new_tokens=4),
        eos_token_ids=set(),
        every_n_steps=1,
        batch_size=2,
    )
    trainer = SimpleNamespace(global_step=1, is_global_zero=False, loggers=[], callback_metrics={})
    hook.on_train_batch_end(trainer, perturbed(target, 1.0), None, None, 0)
    assert batches == [2, 1, 2, 1]  # autoregressive, then speculative, each as 2 + 1
    assert {"eval/tau", "eval/speedup"} <= set(trainer.callback_metrics)


@pytest.mark.parametrize(
    "stop", [{"max_steps": 3}, {"max_epochs": 1}], ids=["by max_steps", "by the last batch of the last epoch"]
)
def test_with_gradient_accumulation_the_hook_runs_once_per_optimizer_step(stop: dict) -> None:
    """global_step moves once per 2 micro-batches: the hook must not decode again at the second one,
    and the end of training (step 3, not a multiple of 2) still gets its one decode."""
    target = tiny_lm(seed=0)
    module = _DistillDraft(target)
    decoded_at = []

    def make_drafter(m: L.LightningModule) -> CausalLMDrafter:
        decoded_at.append(m.trainer.global_step)
        return CausalLMDrafter(m.drafter)

    hook = SpecEvalCallback(
        target=target,
        prompts=[Prompt("a", [1, 5, 7])],
        make_drafter=make_drafter,
        cfg=SpecConfig(k=2, max_new_tokens=4),
        eos_token_ids=set(),
        every_n_steps=2,
    )
    data = torch.utils.data.TensorDataset(torch.randint(1, 64, (6, 8), generator=torch.Generator().manual_seed(0)))
    trainer = L.Trainer(
        **stop,
        accumulate_grad_batches=2,
        logger=False,
        callbacks=[hook],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        accelerator="cpu",
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=1))  # 6 micro-batches = 3 optimizer steps
    assert trainer.global_step == 3
    assert decoded_at == [2, 3]
