"""`trainer.strategy` by name: Lightning's own strategy objects, set up for a drafter and its frozen
target, and what the end of training needs from them (a consolidated checkpoint, full weights for
the verifier).

    auto                Lightning's choice: one device, or DDP when there are several
    ddp                 every rank holds the drafter, its optimizer state and (online) the whole target
    fsdp                FULL_SHARD: parameters, gradients and optimizer state sharded over the ranks, one
                        unit per decoder layer; online, the frozen target's layers are sharded too
    deepspeed_stage_1   ZeRO-1: optimizer state sharded
    deepspeed_stage_2   ZeRO-2: and gradients
    deepspeed_stage_3   ZeRO-3: and parameters, the frozen target's included (online)
    deepspeed_stage_2_offload, deepspeed_stage_3_offload: optimizer state (and, stage 3, parameters) in CPU memory

Only the drafter trains: the target is frozen (requires_grad False), the optimizer takes trainable
parameters only, so it never has gradients or optimizer state under any strategy, and checkpoints
leave it out (DeepSpeed's exclude_frozen_parameters; DrafterModule.on_save_checkpoint otherwise).
DeepSpeed writes a checkpoint as a directory of shards; `read_checkpoint` consolidates it with
Lightning's convert_zero_checkpoint_to_fp32_state_dict for the drafter directory and export.
FSDP and DeepSpeed run on CUDA GPUs only (Lightning refuses them on CPU).
"""

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, Strategy
from torch import nn

from specdec.trainer.config import RecipeError

STRATEGIES = {
    "auto": "Lightning's choice (one device, or DDP over several)",
    "ddp": "data parallel; every rank holds the whole drafter and (online) target",
    "fsdp": "FSDP FULL_SHARD; shards the drafter and (online) the target",
    "deepspeed_stage_1": "ZeRO-1; shards optimizer state",
    "deepspeed_stage_2": "ZeRO-2; shards optimizer state and gradients",
    "deepspeed_stage_2_offload": "ZeRO-2 with optimizer state in CPU memory",
    "deepspeed_stage_3": "ZeRO-3; shards parameters too, the online target's included",
    "deepspeed_stage_3_offload": "ZeRO-3 with parameters and optimizer state in CPU memory",
}
GPU_ONLY = frozenset(name for name in STRATEGIES if name == "fsdp" or name.startswith("deepspeed"))
# the strategies under which a rank holds a shard of each parameter, not the whole tensor
SHARDS_PARAMETERS = frozenset({"fsdp", "deepspeed_stage_3", "deepspeed_stage_3_offload"})


def check_strategy(name: str, accelerator: str) -> None:
    """Refuse a strategy name Lightning would not take here, before any model is loaded."""
    if name not in STRATEGIES:
        choices = "; ".join(f"{key} ({text})" for key, text in STRATEGIES.items())
        raise RecipeError(f"trainer.strategy={name}: not a strategy. Choose one of: {choices}.")
    if name in GPU_ONLY and (accelerator == "cpu" or not torch.cuda.is_available()):
        raise RecipeError(
            f"trainer.strategy={name} needs CUDA GPUs (Lightning runs FSDP and DeepSpeed on GPUs only), and "
            f"{'trainer.accelerator=cpu' if accelerator == 'cpu' else 'this machine has none'}. On CPU train with "
            "trainer.strategy=ddp (gloo) or auto; scripts/gpu_check.sh runs every strategy on a GPU machine."
        )


def wrap_classes(*models: nn.Module) -> set[type[nn.Module]]:
    """The decoder-layer classes of `models` (transformers' _no_split_modules): FSDP's units."""
    names = {name for model in models for name in getattr(model, "_no_split_modules", None) or ()}
    return {type(module) for model in models for module in model.modules() if type(module).__name__ in names}


def build_strategy(name: str, *, wrap: set[type[nn.Module]]) -> Strategy | str:
    """Lightning's strategy object for `name` (check_strategy first); `wrap` are FSDP's unit classes."""
    if name == "auto":
        return "auto"
    if name == "ddp":
        return DDPStrategy()
    if name == "fsdp":
        # use_orig_params: the root unit mixes the frozen target's embedding and norm with trainable
        # drafter tensors; "full" checkpoints are one file, read like any other
        return FSDPStrategy(auto_wrap_policy=wrap, sharding_strategy="FULL_SHARD", use_orig_params=True)
    stage = int(name.split("_")[2])
    offload = name.endswith("_offload")
    return DeepSpeedStrategy(
        stage=stage,
        offload_optimizer=offload,
        offload_parameters=offload and stage == 3,
        exclude_frozen_parameters=True,  # the frozen target (and the embedding a drafter shares) stays out
    )


def read_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint as one dict: a file (torch.load, weights only), or DeepSpeed's
    directory consolidated to fp32 (DeepSpeed's reader unpickles: give it checkpoints your own runs wrote)."""
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=True)
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        return convert_zero_checkpoint_to_fp32_state_dict(path, Path(work) / "consolidated.ckpt")


def checkpoint_step(path: Path) -> int | None:
    """The global step a checkpoint file was saved at, read without loading its tensors (mmap); None
    for a DeepSpeed directory."""
    if not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"]


@contextlib.contextmanager
def full_weights(trainer: L.Trainer, module: nn.Module) -> Iterator[None]:
    """Every parameter of `module` whole on each rank for the duration (the verifier decodes with the
    target and drafter as served); a no-op unless the strategy shards parameters."""
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False):
            yield
    elif isinstance(strategy, DeepSpeedStrategy) and strategy.config["zero_optimization"]["stage"] == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield
    else:
        yield


@contextlib.contextmanager
def launched_process_group() -> Iterator[int]:
    """For a stage without a Trainer (specdec-eval): the process group of the tasks srun or torchrun
    launched, with ranks from Lightning's cluster environments; yields this task's rank (0 when
    launched alone, with no process group)."""
    found = [env() for env in (SLURMEnvironment, TorchElasticEnvironment) if env.detect()]
    if not found or found[0].world_size() == 1 or dist.is_initialized():
        yield dist.get_rank() if dist.is_initialized() else 0
        return
    env = found[0]
    # gloo: what the ranks exchange are Python objects (each rank's decoded prompts)
    address = f"tcp://{env.main_address}:{env.main_port}"
    dist.init_process_group("gloo", init_method=address, rank=env.global_rank(), world_size=env.world_size())
    try:
        yield env.global_rank()
    finally:
        dist.barrier()
        dist.destroy_process_group()
