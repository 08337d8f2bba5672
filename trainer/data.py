"""Training batches: samples from the hidden-state cache (offline) or token ids for a target that
runs in the loop (online), in length-bucketed batches whose order is a function of (seed, epoch).

A batch is a dict of
    index           [B]          sample ids (the cache's order, which is the source's)
    input_ids       [B, T]       int64, right-padded
    loss_mask       [B, T]       bool, True on assistant tokens
    attention_mask  [B, T]       int64, 1 on real tokens
    hidden          [B, T, L, H] bfloat16, the cached target layers (offline only; online the
                                 module computes the same field from the target)
Resuming needs no sampler state: the batches of an epoch are fixed by (seed, epoch), and the
sampler is a cursor over that sequence of epochs that a restart places at the restored global step.
It does not use Lightning's epoch counter, which a checkpoint written at the first batch of an epoch
restores one too high (Lightning-AI/pytorch-lightning#18060: the batch progress is saved before the
batch counts as completed), so `train` also turns max_epochs into max_steps.
"""

from collections.abc import Callable, Iterator, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from specdec.data_prep import HiddenStateCache, Sample
from specdec.data_prep.padding import pad


class CachedSamples(Dataset):
    def __init__(self, cache: HiddenStateCache) -> None:
        self.cache = cache
        self.lengths = cache.lengths()

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"index": index, **self.cache[index]}

    def token_samples(self) -> Iterator[dict[str, torch.Tensor]]:
        """input_ids and loss_mask of every sample, without reading the hidden states."""
        for index in range(len(self.cache)):
            yield self.cache.tokens(index)


class TokenSamples(Dataset):
    """Tokenized conversations for online training; the target adds `hidden` in the module."""

    def __init__(self, samples: Sequence[Sample]) -> None:
        self.samples = samples
        self.lengths = [len(sample.input_ids) for sample in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        sample = self.samples[index]
        return {
            "index": index,
            "input_ids": torch.from_numpy(sample.input_ids.astype(np.int64)),
            "loss_mask": torch.from_numpy(sample.loss_mask),
        }

    def token_samples(self) -> Iterator[dict[str, torch.Tensor]]:
        for index in range(len(self)):
            yield self[index]


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Samples as one right-padded batch (the module docstring's fields)."""
    input_ids, attention_mask = pad([item["input_ids"].long() for item in items], side="right")
    batch = {
        "index": torch.tensor([item["index"] for item in items]),
        "input_ids": input_ids,
        "loss_mask": pad([item["loss_mask"].bool() for item in items], side="right")[0],
        "attention_mask": attention_mask,
    }
    if "hidden" in items[0]:
        batch["hidden"] = pad([item["hidden"] for item in items], side="right")[0]
    return batch


def steps_per_epoch(num_samples: int, batch_size: int, *, world: int, accumulate: int) -> int:
    """Optimizer steps in one epoch of LengthBucketBatches."""
    return num_samples // batch_size // world // accumulate


class LengthBucketBatches(Sampler[list[int]]):
    """One rank's batches: epoch e is a permutation seeded by (seed, e), cut into buckets of `bucket`
    batches whose samples are sorted by length (less padding), then the batches in a seeded order.
    Every rank gets the same number of batches, a multiple of `accumulate` (whole optimizer steps,
    so that a step never spans two epochs); the batches left over are dropped.

    The sampler is a cursor: `position` counts this rank's batches since the start of training, and
    each iteration yields the rest of the epoch the cursor is in. `batches_done`, when given, places
    the cursor at each iteration's start (the trainer's restored step times its accumulation): read
    then, not when the loader is built, because Lightning can build it before it restores a
    checkpoint (estimating a cosine schedule's length under max_epochs does). Nothing else about the
    order is state."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world: int = 1,
        accumulate: int = 1,
        bucket: int = 32,
        batches_done: Callable[[], int] | None = None,
    ) -> None:
        if len(lengths) < batch_size * world * accumulate:
            step = f"{accumulate} batches of {batch_size}" if accumulate > 1 else f"one batch of {batch_size}"
            raise ValueError(
                f"{len(lengths)} samples cannot fill {step} on each of {world} ranks; lower data.batch_size or "
                "trainer.accumulate_grad_batches, or give more data (data.max_samples)."
            )
        self.lengths, self.batch_size, self.seed = np.asarray(lengths), batch_size, seed
        self.rank, self.world, self.accumulate, self.bucket = rank, world, accumulate, bucket
        self.position = 0
        self.batches_done = batches_done

    def __len__(self) -> int:
        steps = steps_per_epoch(len(self.lengths), self.batch_size, world=self.world, accumulate=self.accumulate)
        return steps * self.accumulate

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        generator = np.random.default_rng([self.seed, epoch])
        order = generator.permutation(len(self.lengths))
        span = self.batch_size * self.bucket
        batches = []
        for start in range(0, len(order), span):
            chunk = order[start : start + span]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i : i + self.batch_size].tolist() for i in range(0, len(chunk), self.batch_size)]
        batches = [batch for batch in batches if len(batch) == self.batch_size]
        batches = [batches[i] for i in generator.permutation(len(batches))]
        # torch's sampler deals the bucketed batches out to the ranks, the same number to each
        ranks = DistributedSampler(batches, num_replicas=self.world, rank=self.rank, shuffle=False, drop_last=True)
        return [batches[i] for i in ranks][: len(self)]

    def __iter__(self) -> Iterator[list[int]]:
        if self.batches_done is not None:
            self.position = self.batches_done()
        epoch, skip = divmod(self.position, len(self))
        for batch in self.epoch_batches(epoch)[skip:]:
            self.position += 1
            yield batch


class DrafterData(L.LightningDataModule):
    """The training set as Lightning sees it; `dataset` is CachedSamples or TokenSamples."""

    def __init__(self, dataset: CachedSamples | TokenSamples, *, batch_size: int, seed: int) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        batches = LengthBucketBatches(
            self.dataset.lengths,
            self.batch_size,
            seed=self.seed,
            rank=trainer.global_rank if trainer else 0,
            world=trainer.world_size if trainer else 1,
            accumulate=trainer.accumulate_grad_batches if trainer else 1,
            # after a restart: the batches behind the restored step were trained on
            batches_done=(lambda: trainer.global_step * trainer.accumulate_grad_batches) if trainer else None,
        )
        return DataLoader(self.dataset, batch_sampler=batches, collate_fn=collate)
