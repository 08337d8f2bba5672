"""Scale-out on CPU: two DDP ranks (gloo) against one process with the same global batch, a two-rank
run SIGKILLed and resumed, the eval split over the ranks, the strategy objects every recipe builds,
the frozen target under the strategies that shard it, and DeepSpeed checkpoints consolidated from
the layout DeepSpeed's own code writes. FSDP and DeepSpeed training need CUDA (scripts/gpu_check.sh)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from specdec.data_prep import load_target
from specdec.trainer import cli
from specdec.trainer.config import RecipeError, compose_recipe, recipe_names
from specdec.trainer.drafters import drafter_kind
from specdec.trainer.module import DrafterModule
from specdec.trainer.strategies import STRATEGIES, build_strategy, check_strategy, read_checkpoint, wrap_classes
from specdec.trainer.train import draft_from_checkpoint, target_layers

SPECDEC_TRAIN = str(Path(sys.executable).parent / "specdec-train")
# 16 ShareGPT rows, batches of 2 per rank: 4 optimizer steps an epoch, 8 steps = 2 epochs
RUN = ["trainer.max_steps=8", "run.checkpoint_every_n_steps=2", "eval.every_n_steps=4", "eval.num_prompts=3"]
TWO_RANKS = ["trainer.strategy=ddp", "trainer.devices=2"]


def _final_state(run_dir: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """(global step, weights and AdamW state) of last.ckpt."""
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    optimizer = checkpoint["optimizer_states"][0]["state"]
    state = {**checkpoint["state_dict"], **{f"adam.{i}.{k}": v for i, s in optimizer.items() for k, v in s.items()}}
    return checkpoint["global_step"], state


def _train_two_ranks(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """specdec-train with Lightning's own DDP launcher: it starts rank 1 by rerunning the command."""
    command = [SPECDEC_TRAIN, "recipe=tiny", f"run.dir={run_dir}", *RUN, *TWO_RANKS, *overrides]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, start_new_session=True)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    run_dir = tmp_path_factory.mktemp("ddp")
    result = _train_two_ranks(run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result.stdout


@pytest.mark.slow
def test_two_ddp_ranks_reach_the_weights_of_one_process_with_the_same_global_batch(
    two_rank_run, tmp_path: Path
) -> None:
    # DDP averages the ranks' gradients, each a mean over its own batch; one process accumulating
    # the same two batches (rank 0's, then rank 1's: the sampler deals batches out in turn) averages
    # the same two means, so both take the same optimizer steps up to float rounding.
    two_ranks, stdout = two_rank_run
    one = tmp_path / "one"
    assert cli.train_main(["recipe=tiny", f"run.dir={one}", *RUN, "trainer.accumulate_grad_batches=2"]) == 0
    (step_two, found), (step_one, expected) = _final_state(two_ranks), _final_state(one)
    assert step_two == step_one == 8 and found.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=1e-6, msg=key)
    # one report of all 3 prompts (rank 0 decoded 2 of them, rank 1 one), written once, printed once
    report = json.loads((two_ranks / "eval.json").read_text())
    assert {row["num_prompts"] for row in report.values()} == {3}
    assert report["trained"]["greedy_matches_target"] == 1.0
    assert stdout.count("trained 8 steps") == 1 and "tau" in stdout


@pytest.mark.slow
def test_a_two_rank_run_killed_mid_run_resumes_to_the_uninterrupted_weights(two_rank_run, tmp_path: Path) -> None:
    whole, _ = two_rank_run
    killed = tmp_path / "killed"
    # rank 0 SIGKILLs every process of the run once 5 steps are done: the checkpoint of step 4 is the
    # last one, so step 5 trains again after the restart
    script = tmp_path / "killed_run.py"  # a file: Lightning's launcher reruns it for rank 1
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal
            import lightning as L
            from specdec.trainer.config import compose_recipe
            from specdec.trainer.train import train

            class KillAt(L.Callback):
                def on_train_batch_start(self, trainer, *args):
                    if trainer.global_step == 5 and trainer.is_global_zero:
                        os.killpg(os.getpgid(0), signal.SIGKILL)

            cfg = compose_recipe("tiny", {["run.dir=" + str(killed), *RUN, *TWO_RANKS]!r})
            train(cfg, callbacks=[KillAt()], progress=False)
            """
        )
    )
    result = subprocess.run([sys.executable, str(script)], timeout=600, start_new_session=True, capture_output=True)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert not (killed / "drafter").exists()

    resumed = _train_two_ranks(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    (expected_step, expected), (found_step, found) = _final_state(whole), _final_state(killed)
    assert found_step == expected_step == 8
    for key in expected:
        torch.testing.assert_close(found[key], expected[key], rtol=0, atol=1e-6, msg=key)
    # TensorBoard: step 5 was logged by both runs, and the restart's purge_step hides the first one
    events = EventAccumulator(str(killed / "logs"))
    events.Reload()
    steps = [event.step for event in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and len(steps) == 8, steps


# ---- the strategies, without a GPU ----


def test_a_strategy_lightning_cannot_run_here_is_refused_before_anything_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert cli.train_main(["recipe=tiny", f"run.dir={tmp_path}", "trainer.strategy=fsdp"]) == 2
    err = capsys.readouterr().err
    assert "trainer.strategy=fsdp needs CUDA GPUs" in err and "trainer.strategy=ddp" in err
    assert cli.train_main(["recipe=tiny", f"run.dir={tmp_path}", "trainer.strategy=zero9"]) == 2
    err = capsys.readouterr().err
    assert "trainer.strategy=zero9: not a strategy" in err and "deepspeed_stage_3 (ZeRO-3" in err
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("recipe", recipe_names())
def test_every_recipe_builds_each_strategy_with_the_target_frozen_out(recipe: str, tiny_target) -> None:
    cfg = compose_recipe(recipe, ["run.dir=unused"])
    assert cfg.trainer.strategy in STRATEGIES
    wrap = wrap_classes(tiny_target.model)
    assert {cls.__name__ for cls in wrap} == {"LlamaDecoderLayer"}  # FSDP's unit: one decoder layer
    for name in STRATEGIES:
        strategy = build_strategy(name, wrap=wrap)
        if name == "auto":
            assert strategy == "auto"
        elif name == "ddp":
            assert isinstance(strategy, DDPStrategy)
        elif name == "fsdp":
            assert isinstance(strategy, FSDPStrategy) and strategy.sharding_strategy.name == "FULL_SHARD"
            assert strategy.kwargs["use_orig_params"]
            assert strategy.kwargs["auto_wrap_policy"]._module_classes == wrap
        else:
            stage = int(name.split("_")[2])
            assert isinstance(strategy, DeepSpeedStrategy) and strategy.exclude_frozen_parameters
            zero = strategy.config["zero_optimization"]
            assert zero["stage"] == stage
            assert ("offload_optimizer" in zero) == name.endswith("_offload")
            assert ("offload_param" in zero) == (name == "deepspeed_stage_3_offload")
    # the recipes' own choices
    expected = {"pard_llama3": "deepspeed_stage_1", "eagle3_llama3": "ddp"}
    if recipe in expected:
        assert cfg.trainer.strategy == expected[recipe]


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory: pytest.TempPathFactory):
    cfg = compose_recipe("tiny", [f"run.dir={tmp_path_factory.mktemp('t')}"])
    return load_target(cfg.target, seed=cfg.run.seed)


def _tiny_module(tmp_path: Path, target, *, shard_target: bool) -> tuple[object, DrafterModule]:
    cfg = compose_recipe("tiny", [f"run.dir={tmp_path}", "cache.online=true"])
    kind = drafter_kind("eagle3")
    layers, _ = target_layers(cfg, target)
    draft = kind.build(cfg.draft, target, [], cfg.run.seed)
    module = DrafterModule(
        draft,
        kind=kind,
        draft_cfg=cfg.draft,
        objectives=cfg.objective,
        optim=cfg.optim,
        lm_head=target.model.get_output_embeddings().weight,
        target=target.model,
        layers=layers,
        shard_target=shard_target,
    )
    return cfg, module


def test_a_sharded_strategy_holds_the_online_target_as_a_frozen_submodule_left_out_of_checkpoints(
    tmp_path: Path, tiny_target
) -> None:
    _, plain = _tiny_module(tmp_path, tiny_target, shard_target=False)
    _, sharded = _tiny_module(tmp_path, tiny_target, shard_target=True)
    target_names = {name for name, _ in sharded.named_parameters() if name.startswith("sharded_target.")}
    assert target_names and not any(name.startswith("sharded_target.") for name, _ in plain.named_parameters())
    assert not any(p.requires_grad for name, p in sharded.named_parameters() if name in target_names)
    # the optimizer takes the same tensors as without sharding: never the target's
    optimized = {id(p) for group in sharded.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    trainable = {id(p) for p in sharded.draft.parameters() if p.requires_grad}
    assert optimized == trainable and not optimized & {id(p) for p in tiny_target.model.parameters()}
    checkpoint = {"state_dict": sharded.state_dict()}
    sharded.on_save_checkpoint(checkpoint)
    assert not any(key.startswith("sharded_target.") for key in checkpoint["state_dict"])
    assert checkpoint["state_dict"].keys() == {k: 0 for k in plain.state_dict() if k not in plain.shared_keys}.keys()
    sharded.on_load_checkpoint(checkpoint)  # the target's tensors come back from the module itself
    sharded.load_state_dict(checkpoint["state_dict"])


_DEEPSPEED_CHECKPOINT = """
import os, sys
os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[3], RANK="0",
                  WORLD_SIZE="1", LOCAL_RANK="0")
import torch, deepspeed
from specdec.data_prep import load_target
from specdec.trainer.config import compose_recipe
from specdec.trainer.data import TokenSamples, collate
from specdec.trainer.drafters import drafter_kind
from specdec.trainer.module import DrafterModule
from specdec.trainer.train import target_layers, training_set

cfg = compose_recipe("tiny", [f"run.dir={sys.argv[1]}", "cache.online=true", "data.max_samples=4"])
target = load_target(cfg.target, seed=cfg.run.seed)
layers, _ = target_layers(cfg, target)
samples = training_set(cfg, target, layers, progress=False)
kind = drafter_kind("eagle3")
draft = kind.build(cfg.draft, target, samples.token_samples(), cfg.run.seed)
stage = int(sys.argv[2])
module = DrafterModule(draft, kind=kind, draft_cfg=cfg.draft, objectives=cfg.objective, optim=cfg.optim,
                       lm_head=target.model.get_output_embeddings().weight, target=target.model, layers=layers,
                       shard_target=stage == 3)
config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": stage},
          "zero_allow_untested_optimizer": True}
optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
batch = collate([samples[0], samples[1]])
for _ in range(2):
    loss, _ = module.forward_batch(batch, diagnostics=False)
    engine.backward(loss)
    engine.step()
# DeepSpeedStrategy.save_checkpoint: Lightning's checkpoint less its state_dict and optimizer states,
# through the engine, under the tag "checkpoint", frozen parameters left out
client_state = {"epoch": 0, "global_step": 2, "pytorch-lightning_version": "2.6.6", "loops": {}, "callbacks": {}}
engine.save_checkpoint(sys.argv[1] + "/last.ckpt", client_state=client_state, tag="checkpoint",
                       exclude_frozen_parameters=True)
with deepspeed.zero.GatheredParameters(list(module.draft.parameters())):  # whole under ZeRO-3
    torch.save({k: v.detach().float().clone() for k, v in module.draft.state_dict().items()},
               sys.argv[1] + "/expected.pt")
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_a_deepspeed_checkpoint_directory_is_consolidated_into_the_drafter(
    tmp_path: Path, tiny_target, stage: int
) -> None:
    port = str(29400 + stage + os.getpid() % 500)
    result = subprocess.run(
        [sys.executable, "-c", _DEEPSPEED_CHECKPOINT, str(tmp_path), str(stage), port],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = tmp_path / "last.ckpt"
    assert written.is_dir() and (written / "latest").read_text().strip() == "checkpoint"
    state = read_checkpoint(written)
    assert state["global_step"] == 2
    assert not any(key.startswith("sharded_target.") for key in state["state_dict"])  # frozen: never saved
    cfg = compose_recipe("tiny", [f"run.dir={tmp_path}", "cache.online=true"])
    kind = drafter_kind("eagle3")
    draft = draft_from_checkpoint(cfg, kind, tiny_target, state, written)
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    trained = {key: value for key, value in draft.state_dict().items() if key not in kind.shared_keys(draft)}
    assert trained.keys() <= expected.keys()
    for key, value in trained.items():
        torch.testing.assert_close(value.float(), expected[key], rtol=0, atol=1e-6, msg=key)
    untrained = kind.build(cfg.draft, tiny_target, [], cfg.run.seed)
    assert not torch.equal(untrained.fc.weight, draft.fc.weight)  # two AdamW steps moved it
    # specdec-export takes the directory as it takes a checkpoint file
    export = ["recipe=tiny", f"run.dir={tmp_path}", "cache.online=true", f"export.drafter={written}"]
    assert cli.export_main([*export, "export.format=sglang", f"export.dir={tmp_path / 'export'}"]) == 0
    exported = load_file(tmp_path / "export" / "model.safetensors")
    written_fc = exported["fc.weight"]  # in the target's dtype
    torch.testing.assert_close(written_fc, expected["fc.weight"].to(written_fc.dtype), rtol=0, atol=1e-6)


def test_check_strategy_takes_every_listed_name_on_a_gpu_machine_only() -> None:
    check_strategy("ddp", "cpu")
    check_strategy("auto", "cpu")
    for name in ("fsdp", "deepspeed_stage_1", "deepspeed_stage_3_offload"):
        with pytest.raises(RecipeError, match="needs CUDA GPUs"):
            check_strategy(name, "cpu")
