"""The data-prep stage: conversations -> token ids and loss masks -> one frozen-target forward ->
the hidden-state cache (specdec.data_prep.cache) that training reads instead of the target.

Samples keep their source order and are grouped into shards of about `cache.shard_tokens` tokens;
rank r of w writes the shards whose index is r mod w, and whichever rank finishes last merges the
shards' records into manifest.json. Inside a shard, samples are batched by length (little padding)
and the shard's bytes depend on nothing else, so a killed prep rerun with the same command skips
the whole shards and ends with the same manifest as an uninterrupted run.
"""

import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save as safetensors_bytes
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from specdec.data_prep.cache import (
    SCHEMA_VERSION,
    CacheConfig,
    CacheDType,
    CacheError,
    atomic_write,
    bytes_per_token,
    key_difference,
    key_hash,
    quantize_fp8,
    record_name,
    remove_dead_writers_files,
    shard_name,
)
from specdec.data_prep.padding import pad
from specdec.data_prep.regenerate import regenerate_answers
from specdec.data_prep.sources import DataConfig, SourceData, read_conversations, source_fingerprint
from specdec.data_prep.target import Target, TargetConfig
from specdec.data_prep.templates import Sample, tokenize_conversation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepSummary:
    cache_dir: Path
    samples: int  # in the whole cache
    tokens: int
    shards: int
    bytes_on_disk: int  # of this cache's shards
    dropped_samples: int  # conversations with no assistant token within data.max_length
    skipped_rows: int  # bad rows skipped under data.on_bad_row=skip
    truncated_at_byte: int | None  # where a cut-off source file ends
    complete: bool  # manifest.json written (False while other ranks still work)
    forward_tokens_per_s: float  # this rank's tokens over its caching wall time


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) from torchrun's or Slurm's environment; (0, 1) when launched alone."""
    for rank_var, world_var in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if rank_var in os.environ and world_var in os.environ:
            return int(os.environ[rank_var]), int(os.environ[world_var])
    return 0, 1


def plan_shards(lengths: list[int], shard_tokens: int) -> list[list[int]]:
    """Consecutive sample indices, cut once a shard holds `shard_tokens` tokens."""
    shards, current, tokens = [], [], 0
    for index, length in enumerate(lengths):
        current.append(index)
        tokens += length
        if tokens >= shard_tokens:
            shards.append(current)
            current, tokens = [], 0
    return [*shards, current] if current else shards


def _length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Positions grouped longest first so that padded tokens (longest x count) stay <= batch_tokens."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches, current = [], []
    for position in order:
        if current and lengths[current[0]] * (len(current) + 1) > batch_tokens:
            batches.append(current)
            current = []
        current.append(position)
    return [*batches, current] if current else batches


@torch.inference_mode()
def target_hidden_states(model: PreTrainedModel, token_ids: list[np.ndarray], layers: list[int]) -> list[torch.Tensor]:
    """One padded forward: per sample, its hidden states [T, L, H] float32."""
    device = model.device
    input_ids, attention_mask = pad(token_ids, side="right")  # real tokens never attend to pads
    output = model.base_model(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask.to(device),
        output_hidden_states=True,
        use_cache=False,
    )
    hidden = torch.stack([output.hidden_states[layer] for layer in layers], dim=2)  # [B, T, L, H]
    return [hidden[row, : len(ids)].float().cpu() for row, ids in enumerate(token_ids)]


def _shard_tensors(samples: list[Sample], hidden_states: list[torch.Tensor], dtype: CacheDType) -> dict:
    lengths = [len(sample.input_ids) for sample in samples]
    tensors = {
        "input_ids": torch.from_numpy(np.concatenate([s.input_ids for s in samples]).astype(np.int32)),
        "loss_mask": torch.from_numpy(np.concatenate([s.loss_mask for s in samples])),
        "offsets": torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int64),
    }
    hidden = torch.cat(hidden_states)  # [N, L, H]
    if dtype == CacheDType.fp8:
        # The last layer is the final normed state the teacher's distribution is computed from: e4m3
        # would perturb the teacher itself, so it stays bf16 (H * 2 more bytes per token).
        tensors["hidden"], tensors["hidden_scale"] = quantize_fp8(hidden[:, :-1])
        tensors["hidden_last"] = hidden[:, -1].to(torch.bfloat16).contiguous()
    else:
        tensors["hidden"] = hidden.to(torch.bfloat16)
    return tensors


class _ShardWriter:
    """Serialises, hashes and writes shards on a background thread while the target computes the
    next one; the shard's record (shard-NNNNN.json) goes to disk only after the shard itself."""

    def __init__(self, directory: Path, key_hash_: str) -> None:
        self.directory, self.key_hash = directory, key_hash_
        self.queue: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue
            try:
                self._write(*item)
            except BaseException as error:  # re-raised on the caller's thread
                self.error = error

    def _write(self, index: int, tensors: dict, record: dict) -> None:
        data = safetensors_bytes(tensors)
        atomic_write(self.directory / shard_name(index), data)
        record = {**record, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "key_hash": self.key_hash}
        atomic_write(self.directory / record_name(index), json.dumps(record).encode())

    def put(self, index: int, tensors: dict, record: dict) -> None:
        self._raise()
        self.queue.put((index, tensors, record))

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise CacheError(f"writing a shard to {self.directory} failed: {self.error}") from self.error


def _done_record(directory: Path, index: int, expected_hash: str) -> dict | None:
    """The record of a shard that a previous run finished under the same key, else None."""
    record_path = directory / record_name(index)
    shard_path = directory / shard_name(index)
    if not (record_path.is_file() and shard_path.is_file()):
        return None
    record = json.loads(record_path.read_text())
    if record.get("key_hash") != expected_hash or record.get("bytes") != shard_path.stat().st_size:
        return None
    return record


def _claim_directory(directory: Path, key: dict, overwrite: bool) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stale in remove_dead_writers_files(directory):
        log.info("removed %s, left by a killed prep", stale)
    key_path = directory / "key.json"
    if key_path.is_file():
        found = json.loads(key_path.read_text())
        if found != key:
            if not overwrite:
                raise CacheError(
                    f"{directory} holds a cache built from another configuration: {key_difference(found, key)}. "
                    "Use another cache.dir, or set cache.overwrite=true to rebuild it here."
                )
            log.warning("cache.overwrite=true: rebuilding %s (%s)", directory, key_difference(found, key))
            (directory / "manifest.json").unlink(missing_ok=True)
    atomic_write(key_path, json.dumps(key, indent=1, sort_keys=True).encode())


def _merge_manifest(directory: Path, key: dict, num_shards: int) -> bool:
    """Write manifest.json once every shard has its record; False while some are missing."""
    expected = key_hash(key)
    records = [_done_record(directory, index, expected) for index in range(num_shards)]
    if any(record is None for record in records):
        return False
    for stale in directory.glob("shard-*"):  # left by an earlier, larger build
        if int(stale.name.split(".")[0].removeprefix("shard-")) >= num_shards:
            stale.unlink()
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "key": key,
        "key_hash": expected,
        "samples": sum(record["samples"] for record in records),
        "tokens": sum(record["tokens"] for record in records),
        "shards": records,
    }
    atomic_write(directory / "manifest.json", json.dumps(manifest, indent=1).encode())
    return True


def _check_free_space(directory: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(directory).free
    log.info("estimated size of the shards still to write: %.2f GB (%.2f GB free)", needed_bytes / 1e9, free / 1e9)
    if needed_bytes > free:
        raise CacheError(
            f"{directory} needs about {needed_bytes / 1e9:.2f} GB for the cache but only {free / 1e9:.2f} GB are "
            "free. Free some space, point cache.dir at a larger disk, or use cache.dtype=fp8 (1 byte per value, "
            "2 for the last layer)."
        )


def write_cache(
    model: PreTrainedModel,
    samples: list[Sample],
    *,
    key: dict[str, Any],
    cfg: CacheConfig,
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> PrepSummary:
    directory = Path(cfg.dir)
    layers = key["layers"]
    _claim_directory(directory, key, cfg.overwrite)
    shards = plan_shards([len(s.input_ids) for s in samples], cfg.shard_tokens)
    expected_hash = key_hash(key)
    pending = [i for i in range(rank, len(shards), world) if _done_record(directory, i, expected_hash) is None]
    pending_tokens = sum(len(samples[j].input_ids) for i in pending for j in shards[i])
    per_token = bytes_per_token(num_layers=len(layers), hidden_size=model.config.hidden_size, dtype=cfg.dtype)
    _check_free_space(directory, pending_tokens * per_token)
    log.info("rank %d/%d: %d of %d shards to write, %d tokens", rank, world, len(pending), len(shards), pending_tokens)

    writer = _ShardWriter(directory, expected_hash)
    start = time.perf_counter()
    bar = tqdm(
        total=pending_tokens, unit="tok", unit_scale=True, desc=f"caching [rank {rank}/{world}]", disable=not progress
    )
    try:
        for index in pending:
            shard_samples = [samples[j] for j in shards[index]]
            lengths = [len(s.input_ids) for s in shard_samples]
            hidden_states: list[torch.Tensor | None] = [None] * len(shard_samples)
            for batch in _length_batches(lengths, cfg.batch_tokens):
                results = target_hidden_states(model, [shard_samples[p].input_ids for p in batch], layers)
                for position, result in zip(batch, results, strict=True):
                    hidden_states[position] = result
                bar.update(sum(lengths[p] for p in batch))
            record = {
                "file": shard_name(index),
                "first_sample": shards[index][0],
                "samples": len(shard_samples),
                "tokens": sum(lengths),
                "ids": [s.id for s in shard_samples],
            }
            writer.put(index, _shard_tensors(shard_samples, hidden_states, cfg.dtype), record)
    finally:
        bar.close()
        writer.close()
    seconds = time.perf_counter() - start
    complete = _merge_manifest(directory, key, len(shards))
    on_disk = sum(
        (directory / shard_name(i)).stat().st_size for i in range(len(shards)) if (directory / shard_name(i)).exists()
    )
    return PrepSummary(
        cache_dir=directory,
        samples=len(samples),
        tokens=sum(len(s.input_ids) for s in samples),
        shards=len(shards),
        bytes_on_disk=on_disk,
        dropped_samples=0,
        skipped_rows=0,
        truncated_at_byte=None,
        complete=complete,
        forward_tokens_per_s=pending_tokens / seconds if seconds > 0 else 0.0,
    )


def cache_key(
    target: Target,
    target_cfg: TargetConfig,
    data_cfg: DataConfig,
    cache_cfg: CacheConfig,
    *,
    layers: list[int],
    seed: int,
) -> dict[str, Any]:
    """What a cache is built from; a prep or a training run whose key differs refuses the cache."""
    template = data_cfg.chat_template or target.tokenizer.chat_template or ""
    random_init = dict(target_cfg.random_init) if target_cfg.random_init is not None else None
    return {
        "target": target.reference,
        "target_dtype": str(target.model.dtype),
        "target_random_init": {"fields": random_init, "seed": seed} if random_init else None,
        "data": source_fingerprint(data_cfg),
        "data_split": data_cfg.split,
        "data_format": str(getattr(data_cfg.format, "value", data_cfg.format)),
        "max_samples": data_cfg.max_samples,
        "allow_truncated": data_cfg.allow_truncated,
        "on_bad_row": str(getattr(data_cfg.on_bad_row, "value", data_cfg.on_bad_row)),
        "regenerate": {
            "max_new_tokens": data_cfg.regenerate_max_new_tokens,
            "temperature": data_cfg.regenerate_temperature,
            "seed": seed,
        }
        if data_cfg.regenerate
        else None,
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "max_turns": data_cfg.max_turns,
        "max_length": data_cfg.max_length,
        "layers": list(layers),
        "dtype": CacheDType(cache_cfg.dtype).value,
    }


_ANSWER_KEY_FIELDS = (
    "target",
    "target_dtype",
    "target_random_init",
    "data",
    "data_split",
    "data_format",
    "max_samples",
    "allow_truncated",
    "on_bad_row",
    "regenerate",
    "chat_template_sha256",
    "max_turns",
    "max_length",
)


def training_samples(
    target: Target, data_cfg: DataConfig, *, key: dict[str, Any], work_dir: Path, seed: int, progress: bool = True
) -> tuple[list[Sample], SourceData, int]:
    """Read, (regenerate,) and tokenize the conversations: the samples with at least one assistant
    token, in source order (sample i of the cache), the source, and how many were dropped. Offline
    prep and online training call this, so both see the same samples."""
    rank, world = distributed_rank()
    source = read_conversations(data_cfg)
    conversations = source.conversations
    if data_cfg.regenerate:
        # Answers depend on the target, the data, the template, the sampling and max_length (answers
        # beyond it are not rewritten), not on the cache's layers: they survive a rebuild of the cache.
        answers_key = {name: key[name] for name in _ANSWER_KEY_FIELDS}
        conversations = regenerate_answers(
            target,
            conversations,
            out_dir=work_dir / f"regenerated-{key_hash(answers_key)}",
            max_new_tokens=data_cfg.regenerate_max_new_tokens,
            temperature=data_cfg.regenerate_temperature,
            batch_size=data_cfg.regenerate_batch_size,
            chat_template=data_cfg.chat_template,
            max_prompt_tokens=data_cfg.max_length,
            seed=seed,
            rank=rank,
            world=world,
            progress=progress,
        )
    samples = []
    for conversation in tqdm(conversations, desc="tokenizing", unit="conv", disable=not progress):
        sample = tokenize_conversation(
            target.tokenizer, conversation, max_length=data_cfg.max_length, chat_template=data_cfg.chat_template
        )
        if sample.loss_mask.any():
            samples.append(sample)
    dropped = len(conversations) - len(samples)
    if dropped:
        log.info("dropped %d conversations with no assistant token within %d tokens", dropped, data_cfg.max_length)
    if not samples:
        raise CacheError(f"data.path={data_cfg.path}: no conversation has an assistant token to learn from.")
    return samples, source, dropped


def prepare_cache(
    target: Target,
    *,
    target_cfg: TargetConfig,
    data_cfg: DataConfig,
    cache_cfg: CacheConfig,
    layers: list[int],
    seed: int = 0,
    progress: bool = True,
) -> PrepSummary:
    """The whole stage: read, (regenerate,) tokenize, run the target, write and merge the shards."""
    num_layers = target.model.config.num_hidden_layers
    bad = [layer for layer in layers if not 0 <= layer <= num_layers]
    if bad or not layers:
        raise CacheError(
            f"cache.layers={list(layers)}: the target has {num_layers} layers, so ids run from 0 (embeddings) "
            f"to {num_layers} (final normed hidden state); {bad or 'an empty list'} is out of range."
        )
    rank, world = distributed_rank()
    key = cache_key(target, target_cfg, data_cfg, cache_cfg, layers=layers, seed=seed)
    samples, source, dropped = training_samples(
        target, data_cfg, key=key, work_dir=Path(cache_cfg.dir), seed=seed, progress=progress
    )
    summary = write_cache(target.model, samples, key=key, cfg=cache_cfg, rank=rank, world=world, progress=progress)
    return replace(
        summary,
        dropped_samples=dropped,
        skipped_rows=len(source.skipped_ids),
        truncated_at_byte=source.truncated_at_byte,
    )
