import itertools

import pytest
import torch
from transformers import DynamicCache

from specdec.eval import CausalLMDrafter, Sampling, SpecConfig, generate, kv
from specdec.eval import verify as verify_module
from tests.eval.helpers import ConstantDrafter, chi_square_p_value, hf_greedy, perturbed, tiny_lm

TARGET = tiny_lm(seed=0)
PROMPTS = [[1, 5, 7, 9, 11], [1, 3], [1, 20, 21, 22, 23, 24, 25, 30], [4]]
NEW_TOKENS = 40
REFERENCE = [hf_greedy(TARGET, prompt, NEW_TOKENS) for prompt in PROMPTS]
DRAFTERS = {
    "always agrees": lambda: CausalLMDrafter(tiny_lm(seed=0)),
    "sometimes agrees": lambda: CausalLMDrafter(perturbed(TARGET, 0.5)),
    "random": lambda: CausalLMDrafter(tiny_lm(seed=3)),
}


def _tau(accepted: list[list[int]]) -> float:
    steps = [n for row in accepted for n in row]
    return 1 + sum(steps) / len(steps)


def test_the_autoregressive_loop_is_the_targets_greedy_decode() -> None:
    result = generate(TARGET, PROMPTS, drafter=None, cfg=SpecConfig(max_new_tokens=NEW_TOKENS), eos_token_ids=set())
    assert result.new_tokens == REFERENCE


@pytest.mark.parametrize("width", [1, 3], ids=["chain", "tree"])
@pytest.mark.parametrize("drafter", sorted(DRAFTERS))
@pytest.mark.parametrize("batched", [False, True], ids=["B=1", "B=4"])
def test_greedy_speculative_output_equals_the_target_decode(drafter: str, width: int, batched: bool) -> None:
    cfg = SpecConfig(k=4, tree_width=width, max_new_tokens=NEW_TOKENS)
    groups = [PROMPTS] if batched else [[prompt] for prompt in PROMPTS]
    outputs, accepted = [], []
    for group in groups:
        result = generate(TARGET, group, drafter=DRAFTERS[drafter](), cfg=cfg, eos_token_ids=set())
        outputs += result.new_tokens
        accepted += result.accepted
    assert outputs == REFERENCE
    if drafter == "always agrees" and width == 1:
        assert _tau(accepted) > 4.5  # every step accepts all 4 drafts but the last, cut at max_new_tokens
    if drafter == "sometimes agrees":
        assert 1.3 < _tau(accepted) < 4.5


def test_drafts_that_never_agree_are_all_rejected_and_the_output_is_unchanged() -> None:
    never = next(t for t in range(64) if all(t not in ref for ref in REFERENCE))
    result = generate(
        TARGET,
        PROMPTS,
        drafter=ConstantDrafter(never),
        cfg=SpecConfig(k=3, max_new_tokens=NEW_TOKENS),
        eos_token_ids=set(),
    )
    assert result.new_tokens == REFERENCE
    assert {n for row in result.accepted for n in row} == {0}


def test_rows_stop_at_eos_at_different_times() -> None:
    eos = REFERENCE[0][5]  # a token the first prompt emits early
    expected = [hf_greedy(TARGET, prompt, NEW_TOKENS, eos=eos) for prompt in PROMPTS]
    assert len({len(e) for e in expected}) > 1
    drafter = CausalLMDrafter(perturbed(TARGET, 0.5))
    result = generate(
        TARGET, PROMPTS, drafter=drafter, cfg=SpecConfig(k=4, max_new_tokens=NEW_TOKENS), eos_token_ids={eos}
    )
    assert result.new_tokens == expected


def test_after_a_rejection_the_cache_equals_a_fresh_prefill_of_the_accepted_prefix() -> None:
    prompts = [[1, 5, 7, 9], [1, 3]]
    ids = torch.tensor([[1, 5, 7, 9], [0, 0, 1, 3]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    cache = DynamicCache(config=TARGET.config)
    with torch.inference_mode():
        TARGET(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), cache=cache)
        block = torch.tensor([[11, 12, 13], [14, 15, 16]])  # [pending, d1, d2] per row
        block_mask = torch.cat([mask, torch.ones_like(block)], dim=1)
        TARGET(
            input_ids=block, attention_mask=block_mask, position_ids=kv.positions(mask, torch.arange(3)), cache=cache
        )
        kept = [[0, 1, 2], [0]]  # row 0 accepted both drafts, row 1 rejected the first
        new_mask = kv.keep_accepted(cache, mask, kept, block_size=3)
        for row, accepted in enumerate([[11, 12, 13], [14]]):
            fresh = DynamicCache(config=TARGET.config)
            TARGET(input_ids=torch.tensor([prompts[row] + accepted]), cache=fresh)
            valid = new_mask[row].bool()
            for layer, fresh_layer in zip(cache.layers, fresh.layers, strict=True):
                torch.testing.assert_close(layer.keys[row][:, valid], fresh_layer.keys[0], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(layer.values[row][:, valid], fresh_layer.values[0], rtol=1e-5, atol=1e-5)
    assert new_mask.tolist() == [[1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1]]


# Sampling losslessness on a 6-token vocabulary: the law of the first two new tokens, exactly.
SMALL_TARGET, SMALL_DRAFT = tiny_lm(vocab_size=6, seed=10), tiny_lm(vocab_size=6, seed=11)
SMALL_PROMPT = [1, 2, 3]
SAMPLING = Sampling(temperature=1.0)


def _exact_law() -> torch.Tensor:
    law = torch.zeros(36, dtype=torch.float64)
    with torch.no_grad():
        first = torch.softmax(SMALL_TARGET(torch.tensor([SMALL_PROMPT])).logits[0, -1].double(), -1)
        for a in range(6):
            second = torch.softmax(SMALL_TARGET(torch.tensor([[*SMALL_PROMPT, a]])).logits[0, -1].double(), -1)
            law[a * 6 : a * 6 + 6] = first[a] * second
    return law


def _sampled_counts(width: int, samples: int = 12_000, batch: int = 1_000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(36, dtype=torch.float64)
    cfg = SpecConfig(k=2, tree_width=width, max_new_tokens=2, sampling=SAMPLING)
    for _ in range(samples // batch):
        result = generate(
            SMALL_TARGET,
            [SMALL_PROMPT] * batch,
            drafter=CausalLMDrafter(SMALL_DRAFT),
            cfg=cfg,
            eos_token_ids=set(),
            generator=generator,
        )
        for a, b in (tokens[:2] for tokens in result.new_tokens):
            counts[a * 6 + b] += 1
    return counts


ALPHA = 1e-3  # a correct verifier fails a distribution test with this probability


@pytest.mark.parametrize("width", [1, 2], ids=["chain", "tree"])
def test_sampled_output_follows_the_target_distribution(width: int) -> None:
    assert chi_square_p_value(_sampled_counts(width), _exact_law()) > ALPHA


def test_a_verifier_resampling_from_p_fails_the_distribution_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_module, "residual", lambda target_probs, draft_probs: target_probs)
    assert chi_square_p_value(_sampled_counts(1), _exact_law()) < 1e-6


def test_tau_agrees_with_transformers_assisted_generation() -> None:
    draft_model = perturbed(TARGET, 0.5)
    draft_model.generation_config.num_assistant_tokens = 4
    draft_model.generation_config.num_assistant_tokens_schedule = "constant"
    draft_model.generation_config.assistant_confidence_threshold = 0.0
    calls = []
    hook = TARGET.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        tokens = sum(len(hf_greedy_assisted(prompt, draft_model)) for prompt in PROMPTS)
    finally:
        hook.remove()
    hf_tokens_per_step = tokens / len(calls)
    ours = [
        generate(
            TARGET,
            [p],
            drafter=CausalLMDrafter(draft_model),
            cfg=SpecConfig(k=4, max_new_tokens=NEW_TOKENS),
            eos_token_ids=set(),
        )
        for p in PROMPTS
    ]
    our_tokens_per_step = sum(r.num_new_tokens for r in ours) / sum(len(r.accepted[0]) for r in ours)
    assert abs(our_tokens_per_step - hf_tokens_per_step) / hf_tokens_per_step < 0.02


def hf_greedy_assisted(prompt: list[int], draft_model) -> list[int]:
    output = TARGET.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        assistant_model=draft_model,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return output[0, len(prompt) :].tolist()


def test_the_batch_never_changes_a_rows_output() -> None:
    for prompts in itertools.permutations(PROMPTS[:3]):
        result = generate(
            TARGET,
            list(prompts),
            drafter=CausalLMDrafter(perturbed(TARGET, 0.5)),
            cfg=SpecConfig(k=3, max_new_tokens=16),
            eos_token_ids=set(),
        )
        assert result.new_tokens == [REFERENCE[PROMPTS.index(p)][:16] for p in prompts]
