import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from specdec.data_prep import CacheConfig, CacheDType, CacheError, HiddenStateCache
from specdec.data_prep.cache import FP8_MAX, bytes_per_token, dequantize_fp8, quantize_fp8
from specdec.data_prep.prep import target_hidden_states, write_cache
from specdec.data_prep.templates import Sample
from tests.conftest import REPO_ROOT, make_tiny_llama

LAYERS = [0, 1, 2]  # embeddings, after layer 1, final normed state of the 2-layer tiny Llama
KEY = {"target": "tiny", "layers": LAYERS, "dtype": "bf16", "max_length": 64}
SHARD_TOKENS = 60


def _samples(count: int = 12, seed: int = 0) -> list[Sample]:
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(count):
        length = int(rng.integers(5, 40))
        ids = rng.integers(3, 64, size=length).astype(np.int32)
        mask = rng.random(length) < 0.6
        samples.append(Sample(f"s{index}", ids, mask))
    return samples


def _write(directory: Path, samples: list[Sample], **overrides) -> None:
    key = {**KEY, **overrides.pop("key", {})}
    cfg = CacheConfig(dir=str(directory), shard_tokens=SHARD_TOKENS, batch_tokens=1, **overrides)
    key["dtype"] = CacheDType(cfg.dtype).value
    write_cache(make_tiny_llama(), samples, key=key, cfg=cfg, progress=False)


def test_fp8_error_is_within_e4m3_rounding_of_each_rows_scale() -> None:
    hidden = torch.randn(64, 3, 256) * torch.logspace(-3, 3, 64).view(64, 1, 1)
    values, scale = quantize_fp8(hidden)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (64, 3)
    # e4m3 keeps 3 mantissa bits: half a step is 2^-4 of the value; below 2^-6 (subnormals) steps are 2^-9.
    bound = torch.maximum(hidden.abs() * 2**-4, 2**-10 * scale.unsqueeze(-1)) * (1 + 1e-6)
    assert (dequantize_fp8(values, scale) - hidden).abs().le(bound).all()
    assert values.float().abs().amax(dim=-1).eq(FP8_MAX).all()  # the scale uses the whole range


def test_round_trip_is_bitwise_in_bf16(tmp_path: Path) -> None:
    samples = _samples()
    _write(tmp_path, samples)
    cache = HiddenStateCache(tmp_path, expected_key=KEY)
    assert len(cache) == len(samples)
    # Consecutive shards, each cut at the sample that brings it to SHARD_TOKENS tokens (the last takes the rest).
    next_sample = 0
    for shard in cache.shards:
        assert shard["first_sample"] == next_sample
        next_sample += shard["samples"]
        lengths = [len(sample.input_ids) for sample in samples[shard["first_sample"] : next_sample]]
        assert shard["tokens"] == sum(lengths) and sum(lengths[:-1]) < SHARD_TOKENS
        assert sum(lengths) >= SHARD_TOKENS or shard is cache.shards[-1]
    assert next_sample == len(samples)
    model = make_tiny_llama()
    for index, sample in enumerate(samples):
        read = cache[index]
        assert read["input_ids"].tolist() == sample.input_ids.tolist()
        assert read["loss_mask"].tolist() == sample.loss_mask.tolist()
        expected = target_hidden_states(model, [sample.input_ids], LAYERS)[0].to(torch.bfloat16)
        assert read["hidden"].dtype == torch.bfloat16 and torch.equal(read["hidden"], expected)


def _tensor_bytes(shard: Path) -> int:
    """Bytes of a safetensors file's tensors: the file less its 8-byte header length and its header."""
    data = shard.read_bytes()
    return len(data) - 8 - int.from_bytes(data[:8], "little")


@pytest.mark.parametrize("dtype", [CacheDType.bf16, CacheDType.fp8])
def test_a_shard_holds_bytes_per_token_for_each_token_and_its_offsets(tmp_path: Path, dtype: CacheDType) -> None:
    samples = _samples()
    _write(tmp_path, samples, dtype=dtype, key={"dtype": dtype.value})
    per_token = bytes_per_token(num_layers=len(LAYERS), hidden_size=32, dtype=dtype)
    assert per_token == {CacheDType.bf16: 3 * 32 * 2 + 5, CacheDType.fp8: 2 * (32 + 4) + 32 * 2 + 5}[dtype]
    for shard in HiddenStateCache(tmp_path).shards:
        offsets_bytes = 8 * (shard["samples"] + 1)  # int64
        assert _tensor_bytes(tmp_path / shard["file"]) == shard["tokens"] * per_token + offsets_bytes


def test_round_trip_in_fp8_is_within_its_bound_and_keeps_the_last_layer_as_bf16(tmp_path: Path) -> None:
    samples = _samples()
    _write(tmp_path / "bf16", samples)
    _write(tmp_path / "fp8", samples, dtype=CacheDType.fp8, key={"dtype": "fp8"})
    bf16, fp8 = HiddenStateCache(tmp_path / "bf16"), HiddenStateCache(tmp_path / "fp8")
    for index in range(len(samples)):
        exact, approx = bf16[index]["hidden"].float(), fp8[index]["hidden"].float()
        assert approx.shape == exact.shape == (len(samples[index].input_ids), len(LAYERS), 32)
        scale = exact.abs().amax(dim=-1, keepdim=True) / FP8_MAX
        # fp8 rounding, plus the bf16 rounding of the exact value and of the dequantized one
        assert (approx - exact).abs().le(exact.abs() * (2**-4 + 2**-7) + 2**-9 * scale + 1e-6).all()
        assert not torch.equal(approx[:, :-1], exact[:, :-1])  # the other layers are e4m3
        assert torch.equal(approx[:, -1], exact[:, -1])


def test_the_teacher_from_an_fp8_cache_is_the_teacher_from_a_bf16_cache(tmp_path: Path) -> None:
    # The teacher is softmax(lm_head(final normed state)), the last cached layer; in e4m3 (3 mantissa
    # bits) that state moves by up to 2^-4 of each value, which moves the teacher's probabilities.
    samples = _samples()
    _write(tmp_path / "bf16", samples)
    _write(tmp_path / "fp8", samples, dtype=CacheDType.fp8, key={"dtype": "fp8"})
    bf16, fp8 = HiddenStateCache(tmp_path / "bf16"), HiddenStateCache(tmp_path / "fp8")
    lm_head = make_tiny_llama().lm_head
    with torch.no_grad():
        for index in range(len(samples)):
            teacher_bf16 = torch.softmax(lm_head(bf16[index]["hidden"][:, -1].float()), dim=-1)
            teacher_fp8 = torch.softmax(lm_head(fp8[index]["hidden"][:, -1].float()), dim=-1)
            assert torch.equal(teacher_fp8, teacher_bf16)


def test_a_flipped_byte_is_detected_and_the_shard_named(tmp_path: Path) -> None:
    _write(tmp_path, _samples())
    shard = tmp_path / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    cache = HiddenStateCache(tmp_path)
    cache[0]  # shard 0 is intact
    first_of_shard_1 = cache.shards[1]["first_sample"]
    with pytest.raises(CacheError, match=r"shard-00001.safetensors does not match manifest.json: sha256 expected"):
        cache[first_of_shard_1]


def test_a_truncated_shard_is_detected(tmp_path: Path) -> None:
    _write(tmp_path, _samples())
    shard = tmp_path / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(CacheError, match="shard-00000.safetensors does not match manifest.json"):
        HiddenStateCache(tmp_path)[0]


def test_a_cache_without_manifest_says_to_finish_the_prep(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="manifest.json does not exist: the cache was never finished"):
        HiddenStateCache(tmp_path)


def test_a_reader_expecting_another_key_refuses_and_names_the_difference(tmp_path: Path) -> None:
    _write(tmp_path, _samples(3))
    with pytest.raises(CacheError, match="max_length: 64 in the cache vs 128 now"):
        HiddenStateCache(tmp_path, expected_key={**KEY, "max_length": 128})


def test_prep_with_another_key_refuses_unless_overwrite(tmp_path: Path) -> None:
    _write(tmp_path, _samples(6))
    with pytest.raises(CacheError, match="max_length: 64 in the cache vs 32 now.*cache.overwrite=true"):
        _write(tmp_path, _samples(6), key={"max_length": 32})
    _write(tmp_path, _samples(4, seed=1), key={"max_length": 32}, overwrite=True)
    cache = HiddenStateCache(tmp_path, expected_key={**KEY, "max_length": 32})
    assert len(cache) == 4
    shards = sorted(p.name for p in tmp_path.glob("shard-*.safetensors"))
    assert shards == [s["file"] for s in cache.shards]  # the earlier, larger build left nothing behind


def test_not_enough_free_space_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**6, 10**6 - 100, 100))
    with pytest.raises(CacheError, match=r"needs about 0.00 GB for the cache but only 0.00 GB are free.*fp8"):
        _write(tmp_path, _samples())
    assert not list(tmp_path.glob("shard-*"))


# A prep in a child process, for kill-and-resume and two-rank runs: the tiny Llama, samples from a
# seed, shards of ~60 tokens; SLOW_S sleeps in every forward so a test can kill it between shards.
CHILD = """
import sys, time
from pathlib import Path
import specdec.data_prep.prep as prep
from tests.data_prep.test_cache import _samples, _write
slow = float(sys.argv[2])
forward = prep.target_hidden_states
def slow_forward(*args, **kwargs):
    time.sleep(slow)
    return forward(*args, **kwargs)
prep.target_hidden_states = slow_forward
_write(Path(sys.argv[1]), _samples(24))
"""


def _child(directory: Path, slow_s: float, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory), str(slow_s)], cwd=REPO_ROOT, env={**os.environ, **(env or {})}
    )


def _shard_hashes(directory: Path) -> list[str]:
    return [shard["sha256"] for shard in json.loads((directory / "manifest.json").read_text())["shards"]]


def test_a_killed_prep_resumes_to_the_same_manifest_without_redoing_whole_shards(tmp_path: Path) -> None:
    _write(tmp_path / "whole", _samples(24))
    killed = tmp_path / "killed"
    child = _child(killed, slow_s=0.3)
    deadline = time.monotonic() + 60
    while not (killed / "shard-00002.json").exists():
        assert child.poll() is None and time.monotonic() < deadline, "the child ended before it could be killed"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (killed / "manifest.json").exists()
    finished_before = {p.name: p.stat().st_mtime_ns for p in killed.glob("shard-0000[0-2].safetensors")}
    (killed / "shard-00003.safetensors").write_bytes(b"partial")  # a shard whose record never came

    _write(killed, _samples(24))
    assert _shard_hashes(killed) == _shard_hashes(tmp_path / "whole")
    assert {name: (killed / name).stat().st_mtime_ns for name in finished_before} == finished_before
    assert not list(killed.glob(".*tmp*"))
    assert len(HiddenStateCache(killed)) == 24


@pytest.mark.slow
def test_two_ranks_write_their_own_shards_and_merge_one_manifest(tmp_path: Path) -> None:
    _write(tmp_path / "one", _samples(24))
    ranks = [_child(tmp_path / "two", 0.0, {"RANK": str(r), "WORLD_SIZE": "2"}) for r in (0, 1)]
    assert [rank.wait(timeout=120) for rank in ranks] == [0, 0]
    assert _shard_hashes(tmp_path / "two") == _shard_hashes(tmp_path / "one")
    cache = HiddenStateCache(tmp_path / "two")
    assert [cache[i]["input_ids"].tolist() for i in range(24)] == [s.input_ids.tolist() for s in _samples(24)]


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_prep_removes_the_temporary_files_of_dead_writers_only(tmp_path: Path) -> None:
    samples = _samples()
    _write(tmp_path / "whole", samples)
    directory = tmp_path / "killed"
    _write(directory, samples)
    host = socket.gethostname()
    dead = directory / f".shard-00001.safetensors.tmp-{host}-{_dead_pid()}"
    live = directory / f".shard-00002.safetensors.tmp-{host}-{os.getppid()}"  # another rank, still writing
    elsewhere = directory / f".shard-00003.safetensors.tmp-otherhost-{_dead_pid()}"  # its pid means nothing here
    for planted in (dead, live, elsewhere):
        planted.write_bytes(b"half a shard")

    _write(directory, samples)
    assert not dead.exists()
    assert live.read_bytes() == elsewhere.read_bytes() == b"half a shard"
    assert _shard_hashes(directory) == _shard_hashes(tmp_path / "whole")
    cache = HiddenStateCache(directory)
    assert [cache[i]["input_ids"].tolist() for i in range(len(samples))] == [s.input_ids.tolist() for s in samples]
