"""The training step: the teacher's alignment against a slow loop, online == offline, the batches,
resume after a kill, and the NaN stop."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

from specdec.data_prep import HiddenStateCache, Sample, load_target
from specdec.eval.drafters.eagle3_dirs import load_eagle3, save_eagle3
from specdec.trainer import cli
from specdec.trainer.config import compose_recipe
from specdec.trainer.data import CachedSamples, LengthBucketBatches, TokenSamples, collate
from specdec.trainer.drafters import drafter_kind
from specdec.trainer.drafters.eagle3 import serving_copy, teacher
from specdec.trainer.module import DrafterModule
from specdec.trainer.objectives import OBJECTIVES
from specdec.trainer.train import target_layers, training_set


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory):
    """The tiny recipe's target, a cache of 8 ShareGPT samples, and a module over it."""
    run_dir = tmp_path_factory.mktemp("tiny")
    cfg = compose_recipe("tiny", [f"run.dir={run_dir}", "data.max_samples=8", "data.max_length=64"])
    target = load_target(cfg.target, seed=cfg.run.seed)
    layers, _ = target_layers(cfg, target)
    cached = training_set(cfg, target, layers, progress=False)
    kind = drafter_kind("eagle3")
    draft = kind.build(cfg.draft, target, cached.token_samples(), cfg.run.seed)
    module = DrafterModule(
        draft,
        kind=kind,
        draft_cfg=cfg.draft,
        objectives=cfg.objective,
        optim=cfg.optim,
        lm_head=target.model.get_output_embeddings().weight,
        target=target.model,
        layers=layers,
    )
    return cfg, target, layers, cached, module


def test_the_teacher_is_the_targets_distribution_at_t_plus_k_plus_1(tiny_run) -> None:
    _, target, _, cached, module = tiny_run
    batch = collate([cached[0], cached[1]])
    final = batch["hidden"][:, :, -1].float()
    steps = module.draft_cfg.unroll_steps
    head = target.model.get_output_embeddings().weight
    taught = teacher(module.draft, batch["hidden"][:, :, -1], batch["loss_mask"], head, steps)
    mask, rows = taught["loss_mask"], iter(zip(taught["target_probs"], taught["target_argmax"], strict=True))
    head = head.float()
    draft_ids = torch.arange(len(module.draft.d2t)) + module.draft.d2t
    lengths = batch["attention_mask"].sum(dim=1)
    for b in range(2):
        for k in range(steps):
            for t in range(batch["input_ids"].shape[1]):
                source = t + k + 1  # the target's logits here predict token t + k + 2
                predicted_is_learned = source + 1 < lengths[b] and batch["loss_mask"][b, source + 1]
                assert taught["answer_mask"][b, k, t] == bool(predicted_is_learned)
                if not predicted_is_learned:
                    assert not mask[b, k, t]
                    continue
                logits = final[b, source] @ head.T
                assert mask[b, k, t] == module.draft.t2d[logits.argmax()]
                if mask[b, k, t]:  # the packed rows come in (b, k, t) order
                    probs, argmax = next(rows)
                    expected = torch.softmax(logits[draft_ids], dim=-1)
                    torch.testing.assert_close(probs, expected, atol=1e-5, rtol=1e-4)
                    assert argmax == expected.argmax()
    assert next(rows, None) is None


def test_online_and_offline_give_the_same_loss(tiny_run) -> None:
    *_, cached, module = tiny_run
    tokens = [cached.cache.tokens(i) for i in range(len(cached))]
    online = TokenSamples(
        [Sample(str(i), t["input_ids"].int().numpy(), t["loss_mask"].numpy()) for i, t in enumerate(tokens)]
    )
    indices = [0, 2, 4]
    offline_batch = collate([cached[i] for i in indices])
    online_batch = collate([online[i] for i in indices])
    assert "hidden" not in online_batch
    torch.testing.assert_close(online_batch["input_ids"], offline_batch["input_ids"])
    torch.testing.assert_close(module.target_hidden(online_batch), offline_batch["hidden"], atol=0.05, rtol=0.02)
    offline_loss, _ = module.forward_batch(offline_batch)
    online_loss, _ = module.forward_batch(online_batch)
    assert offline_loss.item() > 0
    torch.testing.assert_close(online_loss, offline_loss, rtol=2e-3, atol=1e-4)


def test_masked_positions_get_no_gradient_and_the_loss_reaches_the_drafter(tiny_run) -> None:
    _, _, _, cached, module = tiny_run
    batch = collate([cached[2], cached[4]])
    batch["loss_mask"][1] = False  # row 1 holds no answer token: none of its positions counts
    hidden = batch["hidden"].float().requires_grad_()
    batch["hidden"] = hidden
    wanted = frozenset(key for name in module.objectives for key in OBJECTIVES[name].inputs)
    lm_head = module.frozen["lm_head"]
    inputs = module.kind.training_inputs(module.draft, batch, hidden, lm_head, module.draft_cfg, wanted)
    assert wanted <= set(inputs) <= module.kind.inputs  # what the recipe check promises objectives is what they get
    inputs["draft_logits"].retain_grad()
    module.zero_grad()
    loss, _ = module.forward_batch(batch)  # the same inputs again, through the module's own path
    loss.backward()
    trained = [p for p in module.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    assert module.draft.embed_tokens.weight.grad is None  # the target's embedding stays frozen
    # what a masked position reads gets no gradient: all of row 1's features, and (row 0) the logits
    # of every masked (step, position)
    assert hidden.grad[1].abs().max() == 0 and hidden.grad[0].abs().max() > 0
    module.zero_grad()
    draft_logits = inputs["draft_logits"]
    (draft_grad,) = torch.autograd.grad(
        sum(
            objective.function(**{k: inputs[k] for k in objective.inputs}, cfg=cfg).loss * cfg.weight
            for objective, cfg in [(OBJECTIVES[name], cfg) for name, cfg in module.objectives.items()]
        ),
        draft_logits,
    )
    mask = inputs["loss_mask"]
    assert mask[0].any() and not mask[1].any()
    assert len(draft_logits) == mask.sum()  # logits exist only where the loss counts
    assert draft_grad.abs().sum(-1).min() > 0


def test_the_batches_of_an_epoch_cover_every_sample_once_and_depend_on_the_epoch() -> None:
    lengths = [5, 50, 7, 30, 9, 12, 40, 3, 22, 18, 11]
    batches = LengthBucketBatches(lengths, 2, seed=1, bucket=2)
    first = list(batches)
    assert len(first) == len(batches) == 5 and all(len(b) == 2 for b in first)
    assert len({i for b in first for i in b}) == 10  # one sample of 11 left out, none twice
    assert first == batches.epoch_batches(0)  # a function of (seed, epoch)
    assert list(batches) == batches.epoch_batches(1) != first  # the cursor moved on to epoch 1
    ranks = [LengthBucketBatches(lengths, 2, seed=1, rank=r, world=2) for r in range(2)]
    per_rank = [list(r) for r in ranks]
    assert len(per_rank[0]) == len(per_rank[1]) == 2
    assert not {i for b in per_rank[0] for i in b} & {i for b in per_rank[1] for i in b}


def test_a_restart_continues_from_the_restored_position_whatever_epoch_lightning_counts() -> None:
    lengths = list(range(1, 21))
    batches = LengthBucketBatches(lengths, 2, seed=0)
    whole = [batch for _ in range(3) for batch in batches]  # three epochs in one go
    for position in [3, len(batches) - 1, len(batches), len(batches) + 1]:  # mid, last, end, first of the next
        restarted = LengthBucketBatches(lengths, 2, seed=0)
        restarted.position = position
        resumed = [batch for _ in range(3) for batch in restarted]
        assert resumed[: len(whole) - position] == whole[position:], position


def test_too_few_samples_for_one_batch_per_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="3 samples cannot fill one batch of 2 on each of 2 ranks"):
        LengthBucketBatches([4, 5, 6], 2, seed=0, world=2)


def test_a_saved_drafter_loads_with_the_same_outputs(tiny_run, tmp_path: Path) -> None:
    _, target, layers, cached, module = tiny_run
    directory = save_eagle3(module.draft, tmp_path, target_config=target.model.config, target_layers=layers[:-1])
    assert not any(key.startswith("embed_tokens") for key in load_file(directory / "model.safetensors"))
    config = LlamaConfig.from_pretrained(directory)  # transformers' own config class wrote it
    assert (config.architectures, config.num_hidden_layers, config.draft_vocab_size) == (
        ["LlamaForCausalLMEagle3"],
        1,
        module.draft.lm_head.out_features,
    )
    loaded, loaded_layers = load_eagle3(directory, target.model)
    assert loaded_layers == tuple(layers[:-1])
    batch = collate([cached[1]])
    inputs = {
        "target_hidden": batch["hidden"][:, :, :-1].float(),
        "next_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "steps": 2,
    }
    with torch.no_grad():
        torch.testing.assert_close(loaded.unroll(**inputs), module.draft.unroll(**inputs))


def test_the_cache_gives_lengths_and_tokens_without_hidden_states(tiny_run) -> None:
    cfg, *_ = tiny_run
    cache = HiddenStateCache(cfg.cache.dir)
    assert cache.lengths() == [len(cache[i]["input_ids"]) for i in range(len(cache))]
    assert set(cache.tokens(0)) == {"input_ids", "loss_mask"}
    assert isinstance(CachedSamples(cache)[0]["index"], int)


# ---- whole runs ----

_KILLED_RUN = """
import os, signal, sys
import lightning as L
from specdec.trainer.config import compose_recipe
from specdec.trainer.train import train

class KillAfter(L.Callback):
    # At the start of the next batch: Lightning runs ModelCheckpoint after every other callback, so
    # by then the step's checkpoint (if it is a checkpoint step) is on disk, as for a real kill.
    def on_train_batch_start(self, trainer, *args):
        if trainer.global_step == int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no final checkpoint

cfg = compose_recipe("tiny", [f"run.dir={sys.argv[1]}", *sys.argv[3:]])
train(cfg, callbacks=[KillAfter()], progress=False)
"""


def _final_state(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    optimizer = checkpoint["optimizer_states"][0]["state"]
    state = {**checkpoint["state_dict"], **{f"adam.{i}.{k}": v for i, s in optimizer.items() for k, v in s.items()}}
    return checkpoint["global_step"], state


# 8 ShareGPT rows, batches of 2: an epoch of 3 or 4 batches. The run is SIGKILLed after each step in
# `kills`, one kill after the other, then run to the end, and must end bitwise where an uninterrupted
# run ends. Checkpoints every step with kills at steps 1-5 put a checkpoint at every position of an
# epoch, its last batch and the first batch of the next included (the one Lightning restores with its
# epoch count one too high); with accumulation 2 a step is 2 batches; with checkpoints every 2 steps
# a kill after step 5 trains step 5 again; `max_epochs` runs stop by epochs, counted right after a kill.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "kills"),
    [
        (["run.checkpoint_every_n_steps=1", "trainer.max_steps=7"], [1, 2, 3, 4, 5]),
        (["run.checkpoint_every_n_steps=1", "trainer.max_steps=4", "trainer.accumulate_grad_batches=2"], [1, 2, 3]),
        (["run.checkpoint_every_n_steps=2", "trainer.max_steps=8"], [5]),
        (["run.checkpoint_every_n_steps=1", "trainer.max_steps=-1", "trainer.max_epochs=3"], [3, 4]),
        # max_steps under a recipe's max_epochs with a cosine schedule: Lightning builds the loader
        # before it restores the checkpoint (to size the schedule), so the cursor is read at iteration
        (
            ["run.checkpoint_every_n_steps=2", "trainer.max_steps=8", "trainer.max_epochs=4", "optim.schedule=cosine"],
            [5],
        ),
    ],
    ids=["every-position", "accumulate-2", "between-checkpoints", "max-epochs", "cosine-under-max-epochs"],
)
def test_a_run_killed_again_and_again_resumes_to_the_same_weights(
    tmp_path: Path, overrides: list[str], kills: list[int]
) -> None:
    overrides = [*overrides, "data.max_samples=8", "eval.every_n_steps=100"]
    every = int(overrides[0].split("=")[1])
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert cli.train_main(["recipe=tiny", f"run.dir={whole}", *overrides]) == 0
    for kill in kills:
        result = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(killed), str(kill), *overrides], check=False)
        assert result.returncode == -signal.SIGKILL
        state = torch.load(killed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        assert state["global_step"] == kill - kill % every and not (killed / "drafter").exists()
        assert not [p for p in (killed / "checkpoints").iterdir() if p.name.startswith(".")]  # no half-written file
    assert cli.train_main(["recipe=tiny", f"run.dir={killed}", *overrides]) == 0
    (expected_step, expected), (found_step, found) = _final_state(whole), _final_state(killed)
    assert found_step == expected_step >= max(kills) + 1
    assert expected.keys() == found.keys()
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=0, msg=key)


def test_a_drafter_for_another_target_is_refused_with_its_file_named(tiny_run, tmp_path: Path) -> None:
    from transformers import LlamaConfig

    from specdec.eval.drafters import DrafterLoadError
    from specdec.eval.drafters.eagle3 import Eagle3Model

    _, target, *_ = tiny_run
    other = LlamaConfig(
        vocab_size=target.model.config.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    draft = Eagle3Model(other, draft_vocab_size=16, embed_tokens=torch.nn.Embedding(other.vocab_size, 32))
    directory = save_eagle3(draft, tmp_path, target_config=other, target_layers=[1, 2, 3])
    with pytest.raises(DrafterLoadError, match=r"hidden_size=32 \(target_hidden_size=None\), the target.s is 64"):
        load_eagle3(directory, target.model)


def test_the_hook_measures_a_served_copy_that_leaves_the_training_drafter_alone(tiny_run) -> None:
    _, _, _, cached, module = tiny_run
    rng = torch.get_rng_state()
    served = serving_copy(module.draft, torch.bfloat16)
    assert torch.equal(torch.get_rng_state(), rng)  # no re-init: the training run's randomness is untouched
    assert served.embed_tokens is module.draft.embed_tokens and served.embed_tokens.weight.dtype == torch.float32
    assert served.fc.weight.dtype == torch.bfloat16 and module.draft.fc.weight.dtype == torch.float32
    assert served.fc.weight.data_ptr() != module.draft.fc.weight.data_ptr() and not served.training
    batch = collate([cached[1]])
    inputs = {"next_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "steps": 2}
    with torch.no_grad():
        trained = module.draft.unroll(target_hidden=batch["hidden"][:, :, :-1].float(), **inputs)
        served_logits = served.unroll(target_hidden=batch["hidden"][:, :, :-1], **inputs)
    assert (served_logits.argmax(-1) == trained.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize(
    ("poison", "what"),
    [("loss", "loss nan"), ("gradient", "a non-finite gradient of draft.")],  # sqrt at 0: finite loss, nan gradient
)
def test_a_non_finite_loss_or_gradient_stops_the_run_before_the_weights_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, poison: str, what: str
) -> None:
    from dataclasses import replace

    from specdec.trainer.objectives import ObjectiveOutput

    ttt = OBJECTIVES["ttt"]
    calls = []

    def poisoned(**inputs):
        calls.append(1)
        output = ttt.function(**inputs)
        if len(calls) != 3:
            return output
        nan = output.loss * float("nan") if poison == "loss" else (inputs["draft_logits"].sum() * 0).sqrt()
        return ObjectiveOutput(output.loss + nan, output.metrics)

    monkeypatch.setitem(OBJECTIVES, "ttt", replace(ttt, function=poisoned))
    assert cli.train_main(["recipe=tiny", f"run.dir={tmp_path}", "run.checkpoint_every_n_steps=1"]) == 2
    err = capsys.readouterr().err
    assert f"specdec-train: {what}" in err and "Traceback" not in err
    assert "at global step 2, batch 2 of epoch 0 (samples [" in err and "training stopped" in err
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    assert all(value.isfinite().all() for value in state["state_dict"].values() if value.is_floating_point())


@pytest.mark.slow
def test_last_ckpt_holds_the_final_step_when_it_is_not_a_multiple_of_the_period(tmp_path: Path) -> None:
    overrides = ["trainer.max_steps=7", "run.checkpoint_every_n_steps=3", "eval.every_n_steps=100"]
    assert cli.train_main(["recipe=tiny", f"run.dir={tmp_path}", *overrides]) == 0
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 7
