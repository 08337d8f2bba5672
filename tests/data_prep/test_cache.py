import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from specdec.data_prep import CacheConfig, CacheDType, CacheError, HiddenStateCache
from specdec.data_prep.cache import FP8_MAX, dequantize_fp8, quantize_fp8
from specdec.data_prep.prep import target_hidden_states, write_cache
from specdec.data_prep.templates import Sample
from tests.conftest import REPO_ROOT, make_tiny_llama

LAYERS = [0, 1, 2]  # embeddings, after layer 1, final normed state of the 2-layer tiny Llama
KEY = {"target": "tiny", "layers": LAYERS, "dtype": "bf16", "topk": 0, "max_length": 64}


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
    cfg = CacheConfig(dir=str(directory), shard_tokens=60, batch_tokens=1, **overrides)
    key["dtype"], key["topk"] = CacheDType(cfg.dtype).value, cfg.topk
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
    assert len(cache) == len(samples) and len(cache.shards) > 2
    model = make_tiny_llama()
    for index, sample in enumerate(samples):
        read = cache[index]
        assert read["input_ids"].tolist() == sample.input_ids.tolist()
        assert read["loss_mask"].tolist() == sample.loss_mask.tolist()
        expected = target_hidden_states(model, [sample.input_ids], LAYERS, topk=0)[0]["hidden"].to(torch.bfloat16)
        assert read["hidden"].dtype == torch.bfloat16 and torch.equal(read["hidden"], expected)


def test_round_trip_in_fp8_is_within_its_bound_and_about_half_the_bytes(tmp_path: Path) -> None:
    samples = _samples()
    _write(tmp_path / "bf16", samples)
    _write(tmp_path / "fp8", samples, dtype=CacheDType.fp8, key={"dtype": "fp8"})
    bf16, fp8 = HiddenStateCache(tmp_path / "bf16"), HiddenStateCache(tmp_path / "fp8")
    for index in range(len(samples)):
        exact, approx = bf16[index]["hidden"].float(), fp8[index]["hidden"].float()
        scale = exact.abs().amax(dim=-1, keepdim=True) / FP8_MAX
        # fp8 rounding, plus the bf16 rounding of the exact value and of the dequantized one
        assert (approx - exact).abs().le(exact.abs() * (2**-4 + 2**-7) + 2**-9 * scale + 1e-6).all()
    size = {name: sum(p.stat().st_size for p in (tmp_path / name).glob("*.safetensors")) for name in ("bf16", "fp8")}
    assert size["fp8"] < 0.7 * size["bf16"]  # H=32 here: the per-(token, layer) scale weighs more than at H=576


def test_topk_logits_are_the_targets(tmp_path: Path) -> None:
    samples = _samples(3)
    _write(tmp_path, samples, topk=4)
    read = HiddenStateCache(tmp_path)[1]
    logits = make_tiny_llama()(torch.from_numpy(samples[1].input_ids.astype(np.int64))[None]).logits[0]
    values, ids = logits.topk(4, dim=-1)
    assert torch.equal(read["topk_ids"], ids)
    torch.testing.assert_close(read["topk_logits"].float(), values, rtol=2**-7, atol=1e-5)


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
