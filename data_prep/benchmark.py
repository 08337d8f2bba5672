"""Prep benchmark on the real SmolLM2 target and ShareGPT, every figure from one run:
bare target forward tokens/s vs prep tokens/s (forward + hidden-state extraction + shard writes),
and bytes per token of the bf16 and fp8 caches vs a per-sample `torch.save` of the same tensors
(SpecForge's offline layout).

    python -m specdec.data_prep.benchmark --samples 64
"""

import argparse
import logging
import tempfile
import time
from pathlib import Path

import torch

from specdec.data_prep.assets import asset_path
from specdec.data_prep.cache import CacheConfig, CacheDType
from specdec.data_prep.padding import pad
from specdec.data_prep.prep import _length_batches, cache_key, plan_shards, write_cache
from specdec.data_prep.sources import DataConfig, read_conversations
from specdec.data_prep.target import TargetConfig, load_target
from specdec.data_prep.templates import tokenize_conversation


@torch.inference_mode()
def bare_forward_tokens_per_s(model, samples, cfg: CacheConfig) -> float:
    """The target alone, on exactly the batches the prep runs."""
    start, tokens = time.perf_counter(), 0
    for shard in plan_shards([len(s.input_ids) for s in samples], cfg.shard_tokens):
        lengths = [len(samples[i].input_ids) for i in shard]
        for batch in _length_batches(lengths, cfg.batch_tokens):
            rows = [samples[shard[p]].input_ids for p in batch]
            input_ids, mask = pad(rows, side="right")
            model.base_model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
            tokens += sum(len(r) for r in rows)
    return tokens / (time.perf_counter() - start)


def torch_save_bytes_per_token(samples, model, layers: list[int], directory: Path) -> float:
    """SpecForge's offline layout: one torch.save per sample of input_ids, loss_mask, the three
    auxiliary layers concatenated [T, 3H] and the last hidden state [T, H], in bf16."""
    from specdec.data_prep.prep import target_hidden_states

    total_bytes, total_tokens = 0, 0
    for index, sample in enumerate(samples):
        hidden = target_hidden_states(model, [sample.input_ids], layers)[0].to(torch.bfloat16)
        record = {
            "input_ids": torch.from_numpy(sample.input_ids.astype("int64")),
            "loss_mask": torch.from_numpy(sample.loss_mask.astype("int64")),
            "hidden_state": hidden[:, :3].flatten(1).clone(),
            "target_hidden_states": hidden[:, 3].clone(),
        }
        path = directory / f"data_{index}.ckpt"
        torch.save(record, path)
        total_bytes += path.stat().st_size
        total_tokens += len(sample.input_ids)
    return total_bytes / total_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=64, help="ShareGPT conversations")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-tokens", type=int, default=8192)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    target_cfg = TargetConfig(path=str(asset_path("smollm2_gguf")))
    target = load_target(target_cfg)
    data_cfg = DataConfig(path=str(asset_path("sharegpt")), allow_truncated=True, max_samples=args.samples)
    data_cfg.max_length = args.max_length
    conversations = read_conversations(data_cfg).conversations
    samples = [tokenize_conversation(target.tokenizer, c, max_length=args.max_length) for c in conversations]
    samples = [s for s in samples if s.loss_mask.any()]
    tokens = sum(len(s.input_ids) for s in samples)
    n = target.model.config.num_hidden_layers
    layers = [2, n // 2, n - 3, n]

    with tempfile.TemporaryDirectory() as tmp:
        rates, sizes, bare = {}, {}, []
        for dtype in (CacheDType.bf16, CacheDType.fp8):
            bare.append(bare_forward_tokens_per_s(target.model, samples, CacheConfig(batch_tokens=args.batch_tokens)))
            cfg = CacheConfig(dir=f"{tmp}/{dtype.value}", dtype=dtype, batch_tokens=args.batch_tokens)
            key = cache_key(target, target_cfg, data_cfg, cfg, layers=layers, seed=0)
            summary = write_cache(target.model, samples, key=key, cfg=cfg, progress=False)
            rates[dtype], sizes[dtype] = summary.forward_tokens_per_s, summary.bytes_on_disk / tokens
        saved = Path(tmp) / "torch_save"
        saved.mkdir()
        torch_save = torch_save_bytes_per_token(samples, target.model, layers, saved)

    bare_rate = sum(bare) / len(bare)
    print(f"SmolLM2-135M-Instruct, {len(samples)} ShareGPT samples, {tokens} tokens, layers {layers}, CPU fp32")
    print(f"{'':<34}{'tokens/s':>10}{'vs bare':>9}{'bytes/token':>13}{'vs torch.save':>15}")
    print(f"{'bare target forward':<34}{bare_rate:>10.0f}{1:>9.2f}{'':>13}")
    for dtype in (CacheDType.bf16, CacheDType.fp8):
        label = f"prep, cache {dtype.value}"
        print(
            f"{label:<34}{rates[dtype]:>10.0f}{rates[dtype] / bare_rate:>9.2f}"
            f"{sizes[dtype]:>13.0f}{sizes[dtype] / torch_save:>15.2f}"
        )
    print(f"{'per-sample torch.save (SpecForge)':<34}{'':>10}{'':>9}{torch_save:>13.0f}{1:>15.2f}")
    print(f"fp8 / bf16 bytes: {sizes[CacheDType.fp8] / sizes[CacheDType.bf16]:.3f}")


if __name__ == "__main__":
    main()
