import dataclasses
import functools
import itertools
import json
import time
from collections.abc import Callable

import pytest
import torch
from transformers import DynamicCache

from specdec.eval import CausalLMDrafter, ChainProposal, Sampling, SpecConfig, engine, evaluate, generate, kv
from specdec.eval import verify as verify_module
from specdec.eval.prompts import Prompt
from specdec.eval.verify import to_probs
from tests.eval.helpers import (
    ConstantDrafter,
    FixedTreeDrafter,
    RaggedDrafter,
    ReferenceChainDrafter,
    ReferenceTreeDrafter,
    chi_square_p_value,
    expected_accepted,
    hf_greedy,
    perturbed,
    sharpened,
    tiny_lm,
)

TARGET = tiny_lm(seed=0)
PROMPTS = [[1, 5, 7, 9, 11], [1, 3], [1, 20, 21, 22, 23, 24, 25, 30], [4]]
NEW_TOKENS = 40
REFERENCE = [hf_greedy(TARGET, prompt, NEW_TOKENS) for prompt in PROMPTS]
DRAFT_MODELS = {
    "always agrees": tiny_lm(seed=0),
    "sometimes agrees": perturbed(TARGET, 0.5),
    "random": tiny_lm(seed=3),
}


def _reference_tree_paths(model, context: list[int], depth: int, width: int) -> set[tuple[int, ...]]:
    """Every root-to-node path of EAGLE-2's expansion, straight from its definition: level l keeps
    the `width` children, among all children of level l-1's nodes, of highest summed log q (full
    forwards, no cache)."""
    level = [(0.0, ())]
    paths: set[tuple[int, ...]] = set()
    for _ in range(depth):
        with torch.no_grad():  # the level's paths have one length: one forward for all of them
            logits = model(torch.tensor([context + list(path) for _, path in level])).logits[:, -1]
        candidates = [
            (score + logprob, (*path, token))
            for (score, path), logprobs in zip(level, torch.log_softmax(logits.float(), -1).tolist(), strict=True)
            for token, logprob in enumerate(logprobs)
        ]
        level = sorted(candidates, key=lambda candidate: candidate[0], reverse=True)[:width]
        paths |= {path for _, path in level}
    return paths


def reference_accepted(drafted_paths: Callable[[list[int]], set[tuple[int, ...]]], k: int) -> list[list[int]]:
    """The accepted counts greedy speculative decoding must record, per prompt and step, computed
    without the engine: `drafted_paths(context)` gives every path the draft proposes after a context
    (from full forwards), a step accepts the longest of them that equals the target's continuation,
    and the output keeps at most NEW_TOKENS tokens (accepted drafts past that do not count)."""
    accepted = []
    for prompt, reference in zip(PROMPTS, REFERENCE, strict=True):
        done, steps = 0, []
        while done < NEW_TOKENS:
            paths = drafted_paths(prompt + reference[:done])
            matched = max(n for n in range(k + 1) if n == 0 or tuple(reference[done : done + n]) in paths)
            kept = min(matched + 1, NEW_TOKENS - done)
            steps.append(min(matched, kept))
            done += kept
        accepted.append(steps)
    return accepted


@functools.cache
def _reference_accepted(drafter: str, width: int, k: int = 4) -> list[list[int]]:
    """What the engine must record with DRAFT_MODELS[drafter] drafting EAGLE-2 trees (or chains)."""
    return reference_accepted(lambda context: _reference_tree_paths(DRAFT_MODELS[drafter], context, k, width), k)


def test_the_autoregressive_loop_is_the_targets_greedy_decode() -> None:
    result = generate(TARGET, PROMPTS, drafter=None, cfg=SpecConfig(max_new_tokens=NEW_TOKENS), eos_token_ids=set())
    assert result.new_tokens == REFERENCE


@pytest.mark.parametrize("width", [1, 3], ids=["chain", "tree"])
@pytest.mark.parametrize("drafter", sorted(DRAFT_MODELS))
@pytest.mark.parametrize("batched", [False, True], ids=["B=1", "B=4"])
def test_greedy_speculative_output_equals_the_target_decode(drafter: str, width: int, batched: bool) -> None:
    cfg = SpecConfig(k=4, tree_width=width, max_new_tokens=NEW_TOKENS)
    groups = [PROMPTS] if batched else [[prompt] for prompt in PROMPTS]
    outputs, accepted = [], []
    for group in groups:
        result = generate(TARGET, group, drafter=CausalLMDrafter(DRAFT_MODELS[drafter]), cfg=cfg, eos_token_ids=set())
        outputs += result.new_tokens
        accepted += result.accepted
    assert outputs == REFERENCE
    assert accepted == _reference_accepted(drafter, width)  # so tau is exactly the reference's


def test_the_reference_acceptance_is_not_trivial() -> None:
    """The exact-acceptance check above means something only if the drafters differ: all 4 drafts of
    every step (40 = 8 steps of 5 tokens), some, and almost none."""
    assert _reference_accepted("always agrees", 1) == [[4] * 8] * 4
    sometimes = [n for row in _reference_accepted("sometimes agrees", 1) for n in row]
    assert len(set(sometimes)) >= 3
    assert sum(sometimes) > sum(n for row in _reference_accepted("random", 1) for n in row)


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


def test_chains_of_a_different_length_per_row_and_step_are_verified_as_drafted() -> None:
    """Every drafted token is the target's own, and so is the padding after each row's length: the
    verifier must accept exactly the drafted length, never the padding, and the output is unchanged."""
    drafter = ReferenceChainDrafter(PROMPTS, REFERENCE)
    result = generate(
        TARGET, PROMPTS, drafter=drafter, cfg=SpecConfig(k=4, max_new_tokens=NEW_TOKENS), eos_token_ids=set()
    )
    assert result.new_tokens == REFERENCE
    assert result.accepted == expected_accepted(drafter.log, len(PROMPTS), NEW_TOKENS)
    drafted = [[length for step in drafter.log for index, length in step if index == p] for p in range(len(PROMPTS))]
    assert result.drafted == drafted
    assert {length for row in drafted for length in row} == {0, 1, 2, 3, 4}  # ragged in every way, empty included


def test_a_real_drafter_cut_to_ragged_lengths_keeps_the_greedy_output() -> None:
    """The causal-LM drafter's cache and lag follow rows whose chains were cut at random lengths."""
    drafter = RaggedDrafter(CausalLMDrafter(perturbed(TARGET, 0.5)), seed=1)
    result = generate(
        TARGET, PROMPTS, drafter=drafter, cfg=SpecConfig(k=4, max_new_tokens=NEW_TOKENS), eos_token_ids=set()
    )
    assert result.new_tokens == REFERENCE
    assert all(
        n <= d
        for row_a, row_d in zip(result.accepted, result.drafted, strict=True)
        for n, d in zip(row_a, row_d, strict=True)
    )
    assert max(n for row in result.accepted for n in row) >= 2


def test_irregular_trees_different_per_row_keep_the_greedy_output() -> None:
    """A root with 3 children, the middle one carrying a chain of 2 (even rows), and a chain of 3
    beside a fork (odd rows): offsets and masks come from the parents, row by row."""
    drafter = ReferenceTreeDrafter(PROMPTS, REFERENCE, vocab_size=64)
    cfg = SpecConfig(k=3, tree_width=2, max_new_tokens=NEW_TOKENS)
    result = generate(TARGET, PROMPTS, drafter=drafter, cfg=cfg, eos_token_ids=set())
    assert result.new_tokens == REFERENCE
    log = [[(p, 3 if step % 2 == 0 else 2) for p in range(len(PROMPTS))] for step in range(NEW_TOKENS)]
    assert result.accepted == expected_accepted(log, len(PROMPTS), NEW_TOKENS)
    assert result.drafted == [[5] * len(row) for row in result.accepted]


class _SlowChainDrafter(ReferenceChainDrafter):
    def propose_chain(self, pending, k, sampling, generator) -> ChainProposal:
        time.sleep(DRAFT_SLEEP_S)
        return super().propose_chain(pending, k, sampling, generator)


DRAFT_SLEEP_S, TARGET_SLEEP_S = 0.03, 0.06  # distinct, so swapped timers fail the lower bounds


def test_draft_and_verify_times_are_recorded_per_step() -> None:
    """Lower bounds from sleeps (the drafter's propose, every target forward) say which timer holds
    what; no timed upper bound, which would depend on the machine."""
    drafter = _SlowChainDrafter(PROMPTS[:2], REFERENCE[:2])
    hook = TARGET.register_forward_pre_hook(lambda *_: time.sleep(TARGET_SLEEP_S))
    try:
        result = generate(
            TARGET, PROMPTS[:2], drafter=drafter, cfg=SpecConfig(k=3, max_new_tokens=8), eos_token_ids=set()
        )
    finally:
        hook.remove()
    steps = len(drafter.log)
    assert len(result.draft_time_s) == len(result.verify_time_s) == steps == max(len(r) for r in result.accepted)
    assert min(result.draft_time_s) >= DRAFT_SLEEP_S and min(result.verify_time_s) >= TARGET_SLEEP_S
    assert sum(result.draft_time_s) + sum(result.verify_time_s) <= result.seconds
    assert result.seconds >= sum(result.verify_time_s) + TARGET_SLEEP_S  # the prefill is in neither


def test_the_report_carries_draft_and_verify_times_and_drafted_lengths(tmp_path) -> None:
    prompts = [Prompt("a", PROMPTS[0]), Prompt("b", PROMPTS[1])]
    references = [hf_greedy(TARGET, prompt, 6) for prompt in PROMPTS[:2]]
    drafter = _SlowChainDrafter(PROMPTS[:2], references)
    generations = []
    original = evaluate.decode_prompts

    def recording_decode(*args, **kwargs):
        generations.append(original(*args, **kwargs))
        return generations[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluate, "decode_prompts", recording_decode)
        reports = evaluate.evaluate_drafters(
            TARGET,
            {"slow": drafter},
            prompts,
            cfg=SpecConfig(k=3, max_new_tokens=6),
            eos_token_ids=set(),
            progress=False,
        )
    evaluate.write_reports(reports, tmp_path / "report.json", "timing")
    written = json.loads((tmp_path / "report.json").read_text())["slow"]
    spec = generations[-1]  # the speculative run (the first is the autoregressive baseline)
    steps = len(spec.draft_time_s)
    assert steps == written["verify_steps"]  # batch 1: one row per verify step
    assert written["draft_ms_total"] == pytest.approx(1000 * sum(spec.draft_time_s))
    assert written["verify_ms_total"] == pytest.approx(1000 * sum(spec.verify_time_s))
    assert written["draft_ms_per_step"] == pytest.approx(written["draft_ms_total"] / steps)
    assert written["verify_ms_per_step"] == pytest.approx(written["verify_ms_total"] / steps)
    assert written["draft_ms_per_step"] >= 1000 * DRAFT_SLEEP_S
    lengths = [length for step in drafter.log[-steps:] for _, length in step]  # the log holds the warm-up too
    assert written["drafted_per_step"] == pytest.approx(sum(lengths) / len(lengths))


def test_drafters_at_their_own_k_share_one_autoregressive_baseline(monkeypatch: pytest.MonkeyPatch) -> None:
    prompts = [Prompt("a", PROMPTS[0]), Prompt("b", PROMPTS[1])]
    drafters = {
        "agrees, k=2": CausalLMDrafter(DRAFT_MODELS["always agrees"]),
        "sometimes, k=5": CausalLMDrafter(DRAFT_MODELS["sometimes agrees"]),
    }
    calls = []  # (drafter name or None for the baseline, k, max_new_tokens) of every generate call
    names = {id(drafter): name for name, drafter in drafters.items()}
    original = evaluate.generate

    def recording_generate(target, batch, *, drafter, cfg, **kwargs):
        calls.append((names.get(id(drafter)), cfg.k, cfg.max_new_tokens))
        return original(target, batch, drafter=drafter, cfg=cfg, **kwargs)

    monkeypatch.setattr(evaluate, "generate", recording_generate)
    cfg = SpecConfig(k=3, max_new_tokens=12)
    reports = evaluate.evaluate_drafters(
        TARGET,
        drafters,
        prompts,
        cfg=cfg,
        configs={"agrees, k=2": dataclasses.replace(cfg, k=2), "sometimes, k=5": dataclasses.replace(cfg, k=5)},
        eos_token_ids=set(),
        batch_size=2,
        progress=False,
    )
    assert [report.k for report in reports.values()] == [2, 5]
    assert [len(report.accept_rate_per_pos) for report in reports.values()] == [2, 5]
    assert [report.drafted_per_step for report in reports.values()] == [2, 5]  # full chains of their own k
    assert reports["agrees, k=2"].ar_tokens_per_s == reports["sometimes, k=5"].ar_tokens_per_s
    assert all(report.greedy_matches_target == 1.0 for report in reports.values())
    # the baseline once (one batch of two), each drafter warmed up (4 tokens) and run at its own k
    assert calls == [
        ("agrees, k=2", 2, 4),
        ("sometimes, k=5", 5, 4),
        (None, 3, 12),
        ("agrees, k=2", 2, 12),
        ("sometimes, k=5", 5, 12),
    ]


def test_a_drafter_config_that_changes_the_baseline_is_refused() -> None:
    prompts = [Prompt("a", PROMPTS[0])]
    cfg = SpecConfig(k=3, max_new_tokens=12)
    configs = {"long": dataclasses.replace(cfg, max_new_tokens=20), "nope": cfg}
    with pytest.raises(ValueError, match=r"configs\['nope'\]: no such drafter; configs\['long'\]: max_new_tokens=20"):
        evaluate.evaluate_drafters(
            TARGET, {"long": CausalLMDrafter(TARGET)}, prompts, cfg=cfg, configs=configs, eos_token_ids=set()
        )


# Sampling losslessness on a 6-token vocabulary: the law of the first new tokens, exactly.
SMALL_TARGET, SMALL_DRAFT = tiny_lm(vocab_size=6, seed=10), tiny_lm(vocab_size=6, seed=11)
SMALL_PROMPT = [1, 2, 3]
SAMPLING = Sampling(temperature=1.0)


def _exact_law(sampling: Sampling = SAMPLING, length: int = 2, target=SMALL_TARGET) -> torch.Tensor:
    """P(the first `length` new tokens) [6**length], by enumeration; cell = the tokens in base 6."""
    law = torch.ones(1, dtype=torch.float64)
    for _ in range(length):
        prefixes = [_digits(cell, len(law)) for cell in range(len(law))]
        with torch.no_grad():
            logits = target(torch.tensor([SMALL_PROMPT + prefix for prefix in prefixes])).logits[:, -1]
        law = (law[:, None] * to_probs(logits, sampling).double()).flatten()
    return law


def _digits(cell: int, cells: int) -> list[int]:
    """The base-6 digits of a cell index among `cells` (a power of 6), most significant first."""
    digits = []
    while cells > 1:
        cells //= 6
        digits.append(cell // cells % 6)
    return digits


def _sampled_counts(
    width: int,
    *,
    make_drafter=lambda: CausalLMDrafter(SMALL_DRAFT),
    target=SMALL_TARGET,
    sampling: Sampling = SAMPLING,
    length: int = 2,
    samples: int = 12_000,
    batch: int = 1_000,
) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(6**length, dtype=torch.float64)
    cfg = SpecConfig(k=2, tree_width=width, max_new_tokens=length, sampling=sampling)
    for _ in range(samples // batch):
        result = generate(
            target,
            [SMALL_PROMPT] * batch,
            drafter=make_drafter(),
            cfg=cfg,
            eos_token_ids=set(),
            generator=generator,
        )
        for tokens in result.new_tokens:
            counts[sum(token * 6**power for power, token in enumerate(reversed(tokens[:length])))] += 1
    return counts


ALPHA = 1e-3  # a correct verifier fails a distribution test with this probability


@pytest.mark.parametrize("width", [1, 2], ids=["chain", "tree"])
def test_sampled_output_follows_the_target_distribution(width: int) -> None:
    assert chi_square_p_value(_sampled_counts(width), _exact_law()) > ALPHA


def test_a_verifier_resampling_from_p_fails_the_distribution_test(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(verify_module, "residual", lambda target_probs, draft_probs: target_probs)
    assert chi_square_p_value(_sampled_counts(1), _exact_law()) < 1e-6


# At T = 0.7 and top-p 0.9 the 6-token models above are nearly uniform (top-p would cut nothing),
# so these tests use peaked ones: the target's most likely token has p = 0.24-0.49 at T = 1, and
# top-p removes 1-2 of the 6 tokens after every prefix.
NUCLEUS = Sampling(temperature=0.7, top_p=0.9)
PEAKED_TARGET, PEAKED_DRAFT = sharpened(tiny_lm(vocab_size=6, seed=10), 8), sharpened(tiny_lm(vocab_size=6, seed=11), 8)
SAMPLED_DRAFTERS = {  # name: (tree width, drafter)
    "chain": (1, lambda: CausalLMDrafter(PEAKED_DRAFT)),
    "ragged chain": (1, lambda: RaggedDrafter(CausalLMDrafter(PEAKED_DRAFT), seed=2, pad_token=5)),
    "top-k tree": (2, lambda: CausalLMDrafter(PEAKED_DRAFT)),
    "irregular tree": (2, FixedTreeDrafter),
}
NUCLEUS_SAMPLES = 12_000  # 216 cells of which about 60 have p > 0: ~200 draws per cell


def _nucleus_counts(name: str) -> torch.Tensor:
    width, make_drafter = SAMPLED_DRAFTERS[name]
    return _sampled_counts(
        width, make_drafter=make_drafter, target=PEAKED_TARGET, sampling=NUCLEUS, length=3, samples=NUCLEUS_SAMPLES
    )


@pytest.mark.parametrize("name", list(SAMPLED_DRAFTERS))
def test_sampled_output_at_temperature_and_top_p_follows_the_target_over_three_tokens(name: str) -> None:
    """The law of the first 3 tokens (216 cells) at T = 0.7, top-p 0.9, chi-square at ALPHA; a
    token that top-p removes is never emitted."""
    counts, law = _nucleus_counts(name), _exact_law(NUCLEUS, length=3, target=PEAKED_TARGET)
    assert (law == 0).any() and counts[law == 0].sum() == 0
    assert chi_square_p_value(counts, law) > ALPHA


def test_the_three_token_test_tells_the_temperature_apart() -> None:
    """Its power: the same draws fail against the target's law at T = 1 without top-p."""
    counts = _nucleus_counts("chain")
    assert chi_square_p_value(counts, _exact_law(SAMPLING, length=3, target=PEAKED_TARGET)) < 1e-9


def test_a_verifier_that_reads_past_the_lengths_fails_the_ragged_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its power for ragged chains: drop the lengths and the padding (token 5, under probabilities
    it was not drawn from) is accepted."""
    original = engine.verify_chain_sampled
    monkeypatch.setattr(engine, "verify_chain_sampled", lambda **kwargs: original(**{**kwargs, "lengths": None}))
    counts = _nucleus_counts("ragged chain")
    assert chi_square_p_value(counts, _exact_law(NUCLEUS, length=3, target=PEAKED_TARGET)) < 1e-9


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


def _first_new_token_index(reference: list[int]) -> int:
    """An index j > 0 whose token does not appear before it, so EOS = reference[j] stops exactly there."""
    return next(j for j in range(1, len(reference)) if reference[j] not in reference[:j])


def test_accepted_drafts_past_max_new_tokens_do_not_count() -> None:
    # the drafter is the target: all 4 drafts are accepted, but the output keeps only 3 tokens
    result = generate(
        TARGET,
        [PROMPTS[0]],
        drafter=CausalLMDrafter(tiny_lm(seed=0)),
        cfg=SpecConfig(k=4, max_new_tokens=3),
        eos_token_ids=set(),
    )
    assert result.new_tokens == [REFERENCE[0][:3]]
    assert result.accepted == [[3]]


def test_accepted_drafts_past_eos_do_not_count() -> None:
    j = _first_new_token_index(REFERENCE[0])
    assert j < 3  # EOS is drafted in the first step, ahead of accepted drafts the output drops
    result = generate(
        TARGET,
        [PROMPTS[0]],
        drafter=CausalLMDrafter(tiny_lm(seed=0)),
        cfg=SpecConfig(k=4, max_new_tokens=NEW_TOKENS),
        eos_token_ids={REFERENCE[0][j]},
    )
    assert result.new_tokens == [REFERENCE[0][: j + 1]]  # ends with EOS
    assert result.accepted == [[j + 1]]  # the drafts up to and including EOS: the ones the output keeps
