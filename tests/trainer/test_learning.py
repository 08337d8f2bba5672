"""Training learns: on the real SmolLM2 target and real ShareGPT, a short run lowers its loss and
its drafter accepts more than its untrained start, measured in one report by the real verifier."""

from pathlib import Path

import lightning as L
import pytest

from specdec.trainer.config import compose_recipe
from specdec.trainer.train import train


class LossRecorder(L.Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


@pytest.mark.slow
def test_a_short_run_on_smollm2_lowers_the_loss_and_beats_its_untrained_start(tmp_path: Path) -> None:
    overrides = [
        f"run.dir={tmp_path}",
        "data.regenerate=false",  # ShareGPT's answers as written: no generation in a test
        "data.max_samples=64",
        "data.max_length=256",
        "trainer.max_epochs=null",
        "trainer.max_steps=48",
        "trainer.log_every_n_steps=8",
        "eval.every_n_steps=1000",  # the hook measures the last step only
        "eval.num_prompts=4",
        "eval.hook_num_prompts=1",
        "eval.max_new_tokens=32",
    ]
    recorder = LossRecorder()
    result = train(compose_recipe("smollm2_eagle3", overrides), callbacks=[recorder], progress=False)
    assert result.steps == 48
    first, last = recorder.losses[:8], recorder.losses[-8:]
    assert sum(last) / len(last) < 0.8 * sum(first) / len(first)
    # the recipe serves the hybrid (lookup first); the drafter alone at the same K is what learned
    assert result.reports["trained"].mode == "ngram_first"
    trained, untrained = result.reports["trained, fixed K"], result.reports["untrained"]
    assert trained.verify_steps and untrained.verify_steps and trained.k == untrained.k
    assert trained.tau > untrained.tau + 0.05, (trained.tau, untrained.tau)
