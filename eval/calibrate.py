"""Measure what a verify step costs on this machine, for the window policy's reward.

The engine decodes a few prompts plainly, then once per window n = 1..K (a fixed window of n
tokens), and times its steps: c_verify(0) is a plain decoding step (the reward's unit), c_verify(n)
the mean verify time of the steps that drafted n tokens, and drafting is fitted by least squares as
draft_fixed + n * draft_per_token over all steps.
"""

import torch
from transformers import PreTrainedModel

from specdec.eval.engine import SpecConfig, generate
from specdec.eval.window import FixedWindow, StepCosts


def calibrate_costs(
    target: PreTrainedModel,
    drafter,  # a session with a `window` attribute (Eagle3Drafter)
    prompts: list[list[int]],
    *,
    max_k: int,
    eos_token_ids: set[int],
    max_new_tokens: int = 24,
) -> StepCosts:
    cfg = SpecConfig(k=max_k, max_new_tokens=max_new_tokens)
    saved, verify, points = drafter.window, [], []
    try:
        generate(target, prompts[:1], drafter=None, cfg=cfg, eos_token_ids=eos_token_ids)  # warm-up
        for n in range(max_k + 1):
            drafter.window = FixedWindow(max(n, 1))
            seconds = []
            for prompt in prompts:
                result = generate(
                    target, [prompt], drafter=drafter if n else None, cfg=cfg, eos_token_ids=eos_token_ids
                )
                seconds += result.verify_time_s[1:]  # the first step runs after the prefill's allocations
                points += [(n, time_s) for time_s in result.draft_time_s[1:] if n]
            verify.append(sum(seconds) / max(len(seconds), 1))
    finally:
        drafter.window = saved
    counts = torch.tensor([float(n) for n, _ in points], dtype=torch.float64)
    times = torch.tensor([time_s for _, time_s in points], dtype=torch.float64)
    design = torch.stack([torch.ones_like(counts), counts], dim=1)
    fixed, per_token = torch.linalg.lstsq(design, times[:, None]).solution[:, 0].tolist()
    device = "cuda" if target.device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    return StepCosts(
        tuple(verify),
        max(per_token, 0.0),
        max(fixed, 0.0),
        source=f"measured: {len(prompts)} prompts x {max_new_tokens} tokens per window 0 (plain)..{max_k}, {device}",
    )
