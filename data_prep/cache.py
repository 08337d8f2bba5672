"""The hidden-state cache on disk: its layout, its key, the fp8 codec, and the reader.

A cache is a directory:
    key.json                       what the cache was built from (written when a prep starts)
    shard-NNNNN.safetensors        many samples back to back: input_ids [N] int32, loss_mask [N] bool,
                                   offsets [n+1] int64, and hidden [N, L, H] bf16; or, with fp8, hidden
                                   [N, L-1, H] e4m3 with hidden_scale [N, L-1] float32 and the last
                                   layer (the teacher's input) as hidden_last [N, H] bf16
    shard-NNNNN.json               that shard's sha256, counts and key hash (written after the shard)
    manifest.json                  schema version, key, every shard (written when all shards exist)
Shards are written under a temporary name and renamed, so a killed prep leaves whole shards only;
the next prep removes the temporary files of writers that died.
Layer ids are Hugging Face `output_hidden_states` indices: 0 is the embeddings, N (the number of
layers) is the final normed hidden state that the LM head reads.
"""

import hashlib
import json
import os
import socket
from bisect import bisect_right
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

SCHEMA_VERSION = 2  # 2: fp8 caches keep the last layer in bf16; no top-k logits
FP8_MAX = 448.0  # largest finite float8_e4m3fn


class CacheDType(str, Enum):
    bf16 = "bf16"
    fp8 = "fp8"  # e4m3 with a per-token, per-layer scale; the last layer (the teacher's input) stays bf16


@dataclass
class CacheConfig:
    dir: str = "${run.dir}/cache"
    layers: list[int] | None = None  # HF output_hidden_states ids; None = what the drafter needs
    dtype: CacheDType = CacheDType.bf16
    overwrite: bool = False  # rebuild a cache that was made from another configuration
    shard_tokens: int = 65536  # samples are grouped into shards of about this many tokens
    batch_tokens: int = 8192  # padded tokens per target forward while caching
    online: bool = False  # train with the target in the loop instead of from this cache (nothing on disk)


class CacheError(RuntimeError):
    pass


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def key_difference(found: dict[str, Any], expected: dict[str, Any]) -> str:
    names = sorted(set(found) | set(expected))
    return "; ".join(
        f"{name}: {found.get(name)!r} in the cache vs {expected.get(name)!r} now"
        for name in names
        if found.get(name) != expected.get(name)
    )


def bytes_per_token(*, num_layers: int, hidden_size: int, dtype: CacheDType) -> int:
    if dtype == CacheDType.bf16:
        hidden = num_layers * hidden_size * 2
    else:  # e4m3 values and a float32 scale per layer, the last layer in bf16
        hidden = (num_layers - 1) * (hidden_size + 4) + hidden_size * 2
    return hidden + 4 + 1  # + input id (int32) + mask (bool)


def quantize_fp8(hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., H] -> (e4m3 values [..., H], float32 scales [...]) with |x| <= 448 * scale per row."""
    hidden = hidden.float()
    scale = hidden.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    return (hidden / scale.unsqueeze(-1)).to(torch.float8_e4m3fn), scale


def dequantize_fp8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return values.float() * scale.unsqueeze(-1)


def temporary_path(path: Path) -> Path:
    """Where a file is written before it is renamed to `path`. The name carries the writer's host and
    pid, so that `remove_dead_writers_files` can tell whose it is."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def atomic_write(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same directory, then rename: readers see all or nothing."""
    tmp = temporary_path(path)
    with tmp.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, path)


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


def remove_dead_writers_files(directory: Path) -> list[Path]:
    """Remove the temporary files that `atomic_write` left in `directory` when its process was killed:
    those of this host whose pid is not running. Other ranks may share the directory, so files of a
    live process, and of other hosts (whose pids cannot be checked from here), are left to them."""
    host = socket.gethostname()
    removed = []
    for tmp in directory.glob(".*.tmp-*"):
        writer_host, _, pid = tmp.name.rpartition(".tmp-")[2].rpartition("-")
        if writer_host == host and pid.isdigit() and not _process_is_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def record_name(index: int) -> str:
    """The shard's record (sha256, counts, key hash), written only after the shard itself."""
    return f"shard-{index:05d}.json"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _rebuild_hint(directory: Path) -> str:
    return (
        f"Delete it and rerun `specdec-prep` with the same recipe and cache.dir={directory}: complete shards "
        "are kept and only this one is rebuilt."
    )


class HiddenStateCache:
    """A finished cache, read by memory map. `cache[i]` is sample i (in source order) as a dict of
    input_ids [T] int64, loss_mask [T] bool and hidden [T, L, H] bfloat16 (an fp8 cache dequantized,
    its last layer as stored). Each shard's sha256 is checked the first time it is opened."""

    def __init__(self, directory: str | Path, expected_key: dict[str, Any] | None = None) -> None:
        self.dir = Path(directory)
        manifest_path = self.dir / "manifest.json"
        if not manifest_path.is_file():
            raise CacheError(
                f"{manifest_path} does not exist: the cache was never finished (or {self.dir} is not a cache). "
                "Run `specdec-prep` with the same recipe: complete shards are kept and the rest is built."
            )
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("schema_version") != SCHEMA_VERSION:
            raise CacheError(
                f"{manifest_path}: schema version {self.manifest.get('schema_version')}, this specdec reads "
                f"{SCHEMA_VERSION}. Rebuild the cache with `specdec-prep ... cache.overwrite=true`."
            )
        if expected_key is not None and self.manifest["key"] != expected_key:
            raise CacheError(
                f"{self.dir} was built from another configuration: "
                f"{key_difference(self.manifest['key'], expected_key)}. Point cache.dir at the matching cache, "
                "or rebuild this one with `specdec-prep ... cache.overwrite=true`."
            )
        self.shards = self.manifest["shards"]
        self._starts = [shard["first_sample"] for shard in self.shards]
        self._open: dict[int, Any] = {}
        self._offsets: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.manifest["samples"]

    @property
    def layers(self) -> list[int]:
        return self.manifest["key"]["layers"]

    def _shard(self, index: int) -> Any:
        if index not in self._open:
            entry = self.shards[index]
            path = self.dir / entry["file"]
            if not path.is_file():
                raise CacheError(f"{path} is missing but listed in manifest.json. {_rebuild_hint(self.dir)}")
            found = file_sha256(path)
            if found != entry["sha256"]:
                raise CacheError(
                    f"{path} does not match manifest.json: sha256 expected {entry['sha256'][:12]}..., found "
                    f"{found[:12]}.... The shard is damaged or came from another run. {_rebuild_hint(self.dir)}"
                )
            handle = safe_open(str(path), framework="pt")
            self._open[index] = handle
            self._offsets[index] = handle.get_tensor("offsets")
        return self._open[index]

    def lengths(self) -> list[int]:
        """Tokens of every sample (opens, and so checks, every shard)."""
        lengths = []
        for index in range(len(self.shards)):
            self._shard(index)
            lengths += self._offsets[index].diff().tolist()
        return lengths

    def _locate(self, index: int) -> tuple[Any, int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} of a cache with {len(self)} samples")
        shard_index = bisect_right(self._starts, index) - 1
        handle = self._shard(shard_index)
        local = index - self._starts[shard_index]
        start, end = self._offsets[shard_index][local : local + 2].tolist()
        return handle, start, end

    @staticmethod
    def _token_fields(handle: Any, start: int, end: int) -> dict[str, torch.Tensor]:
        return {
            "input_ids": handle.get_slice("input_ids")[start:end].long(),
            "loss_mask": handle.get_slice("loss_mask")[start:end],
        }

    def tokens(self, index: int) -> dict[str, torch.Tensor]:
        """Sample `index` without its hidden states: input_ids [T] int64 and loss_mask [T] bool."""
        return self._token_fields(*self._locate(index))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        handle, start, end = self._locate(index)
        sample = self._token_fields(handle, start, end)
        if self.manifest["key"]["dtype"] == CacheDType.fp8.value:
            values = handle.get_slice("hidden")[start:end]
            scale = handle.get_slice("hidden_scale")[start:end]
            last = handle.get_slice("hidden_last")[start:end]  # [T, H]
            sample["hidden"] = torch.cat([dequantize_fp8(values, scale).to(torch.bfloat16), last[:, None]], dim=1)
        else:
            sample["hidden"] = handle.get_slice("hidden")[start:end]
        return sample
