from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from specdec.eval import CausalLMDrafter, SpecConfig
from specdec.eval.hook import SpecEvalCallback
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
    assert all(1.0 <= t <= 4.0 for t in tau) and tau[-1] > tau[0]  # the drafter learns, tau follows
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
