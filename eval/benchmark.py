"""Engine benchmark on the real SmolLM2 target and MT-Bench prompts, every figure from one run,
in fp32 and bf16:
- autoregressive decoding: our engine's loop vs transformers `generate`;
- an oracle drafter that proposes the target's own greedy continuation (tau = K+1): the engine's
  ceiling and its overhead;
- an untrained plain drafter (SmolLM2's first 6 layers) through our engine and through
  transformers' assisted generation (`generate(assistant_model=...)`, K constant), tau and speed.

    python -m specdec.eval.benchmark --prompts 4 --max-new-tokens 128
"""

import argparse
import copy
import logging
import time

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from specdec.data_prep import TargetConfig, asset_path, load_target
from specdec.eval.drafters import ChainProposal
from specdec.eval.drafters.causal_lm import CausalLMDrafter
from specdec.eval.engine import SpecConfig, generate
from specdec.eval.prompts import load_prompts


class OracleDrafter:
    """Proposes a continuation known in advance (the target's own greedy one): all drafts accepted."""

    target_layers: tuple[int, ...] = ()

    def __init__(self, prompts: list[list[int]], continuations: list[list[int]]) -> None:
        # keyed by the prompt minus its last token, which is what `begin` sees
        self.continuations = {tuple(p[:-1]): c for p, c in zip(prompts, continuations, strict=True)}

    def begin(self, input_ids, attention_mask, target_hidden) -> None:
        self.rows = [
            self.continuations[tuple(ids[mask.bool()].tolist())]
            for ids, mask in zip(input_ids, attention_mask, strict=True)
        ]
        self.done = [0] * len(input_ids)  # new tokens emitted per row

    def propose_chain(self, pending, k, sampling, generator) -> ChainProposal:
        drafts = []
        for row, continuation in enumerate(self.rows):
            ahead = continuation[self.done[row] : self.done[row] + k]
            drafts.append(ahead + [0] * (k - len(ahead)))
        return ChainProposal(torch.tensor(drafts, device=pending.device), None)

    def commit(self, block, kept, target_hidden) -> None:
        self.done = [done + len(offsets) for done, offsets in zip(self.done, kept, strict=True)]

    def select_rows(self, rows) -> None:
        self.rows = [self.rows[r] for r in rows.tolist()]
        self.done = [self.done[r] for r in rows.tolist()]


def truncated_copy(model: PreTrainedModel, layers: int) -> PreTrainedModel:
    """The target's first `layers` decoder layers, embeddings, norm and head: an untrained draft."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = layers
    config.__dict__.pop("quantization_config", None)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    draft = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    draft.load_state_dict(model.state_dict(), strict=False)
    return draft.eval()


def _hf_generate(target, prompts, max_new_tokens, assistant=None, k=4):
    """tokens/s and new tokens per target forward of transformers' generate, one prompt at a time."""
    calls = []
    hook = target.register_forward_pre_hook(lambda *_: calls.append(1))
    if assistant is not None:
        assistant.generation_config.num_assistant_tokens = k
        assistant.generation_config.num_assistant_tokens_schedule = "constant"
        assistant.generation_config.assistant_confidence_threshold = 0.0  # always draft k tokens
    tokens, start = 0, time.perf_counter()
    try:
        for prompt in prompts:
            ids = torch.tensor([prompt])
            output = target.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                assistant_model=assistant,
                pad_token_id=target.generation_config.eos_token_id,
            )
            tokens += output.shape[1] - ids.shape[1]
    finally:
        hook.remove()
    return tokens / (time.perf_counter() - start), tokens / len(calls)


def _ours(target, prompts, drafter, cfg, eos):
    """tokens/s and new tokens per verify step of the specdec engine, one prompt at a time."""
    results = [generate(target, [prompt], drafter=drafter, cfg=cfg, eos_token_ids=eos) for prompt in prompts]
    tokens = sum(result.num_new_tokens for result in results)
    steps = sum(len(result.accepted[0]) for result in results) if drafter is not None else tokens
    return [r.new_tokens[0] for r in results], tokens / sum(r.seconds for r in results), tokens / steps


def oracle_continuations(target, prompts, cfg, eos, rounds: int = 10) -> list[list[int]]:
    """The target's greedy continuations as the engine verifies them. In fp32 that is plain greedy
    decoding; in bf16 a forward over K+1 tokens and K+1 one-token forwards round differently, so
    near-ties flip: feed each run's output back as the oracle until it no longer changes."""
    continuations, _, _ = _ours(target, prompts, None, cfg, eos)
    for _ in range(rounds):
        outputs, _, _ = _ours(target, prompts, OracleDrafter(prompts, continuations), cfg, eos)
        if outputs == continuations:
            break
        continuations = outputs
    return continuations


def run(dtype: str, prompts: list[list[int]], max_new_tokens: int, k: int, draft_layers: int) -> list[tuple]:
    target = load_target(TargetConfig(path=str(asset_path("smollm2_gguf")), dtype=dtype)).model
    eos = {target.generation_config.eos_token_id}
    cfg = SpecConfig(k=k, max_new_tokens=max_new_tokens)
    generate(target, prompts[:1], drafter=None, cfg=SpecConfig(max_new_tokens=4), eos_token_ids=eos)  # warm-up
    rows = []
    hf_ar, _ = _hf_generate(target, prompts, max_new_tokens)
    rows.append(("autoregressive, transformers generate", hf_ar, 1.0))
    _, ar_rate, _ = _ours(target, prompts, None, cfg, eos)
    rows.append(("autoregressive, specdec engine", ar_rate, 1.0))
    oracle = OracleDrafter(prompts, oracle_continuations(target, prompts, cfg, eos))
    _, rate, tau = _ours(target, prompts, oracle, cfg, eos)
    rows.append((f"oracle drafter, K={k}", rate, tau))
    draft = truncated_copy(target, draft_layers)
    _, rate, tau = _ours(target, prompts, CausalLMDrafter(draft), cfg, eos)
    rows.append((f"untrained {draft_layers}-layer drafter, specdec engine", rate, tau))
    rate, tau = _hf_generate(target, prompts, max_new_tokens, assistant=draft, k=k)
    rows.append((f"untrained {draft_layers}-layer drafter, transformers assisted", rate, tau))
    return [(name, rate, rate / hf_ar, tau) for name, rate, tau in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=4, help="MT-Bench questions (first turns)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--draft-layers", type=int, default=6)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tokenizer = load_target(TargetConfig(path=str(asset_path("smollm2_gguf")), random_init={"num_hidden_layers": 1}))
    prompts = [p.token_ids for p in load_prompts("mtbench", tokenizer.tokenizer, num_prompts=args.prompts)]
    print(f"SmolLM2-135M-Instruct, {args.prompts} MT-Bench prompts, {args.max_new_tokens} new tokens, greedy, batch 1")
    for dtype in ("float32", "bfloat16"):
        print(f"\n{dtype}: {'':<46}{'tokens/s':>9}{'vs generate':>13}{'tokens/step':>13}")
        for name, rate, ratio, tau in run(dtype, prompts, args.max_new_tokens, args.k, args.draft_layers):
            print(f"  {name:<54}{rate:>9.1f}{ratio:>12.2f}x{tau:>13.2f}")


if __name__ == "__main__":
    main()
