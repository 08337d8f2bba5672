"""The window of a drafted chain, for every drafter that takes one (EAGLE-3 and a causal LM token by
token, PARD after its one forward): a fixed window reproduces fixed K token for token, the learned
stop rule drafts on while the predicted chance that all of it is accepted stays above h, the
policy path stays lossless (greedy and sampled), the cost model and the reward on hand-made steps,
and a window head's directory round trip."""

import math

import pytest
import torch

from specdec.eval.drafters.causal_lm import CausalLMDrafter
from specdec.eval.drafters.eagle3 import Eagle3Drafter
from specdec.eval.drafters.pard import PardDrafter
from specdec.eval.engine import SpecConfig, generate
from specdec.eval.verify import Sampling
from specdec.eval.window import (
    FixedWindow,
    LearnedWindow,
    StepCosts,
    WindowHead,
    WindowHeadConfig,
    has_window_head,
    load_window_head,
    logit_stats,
    save_window_head,
    speedup_reward,
)
from tests.eval.helpers import hf_greedy, perturbed
from tests.eval.test_eagle3 import LAYERS, TARGET, _head, small_eagle3_head

PROMPTS = [[1, 5, 7, 9, 11], [1, 3], [1, 20, 21, 22, 23, 24, 25, 30], [4, 6, 8]]
DRAFT = perturbed(TARGET, 0.5)  # a causal LM (and PARD) draft that agrees with the target often, not always
MASK = 63  # PARD's mask token in the 64-token vocabulary


def _session(kind: str, window=None, draft_vocab: int = 64):
    """A drafter of each kind that takes a window: EAGLE-3 and a causal LM decide between draft
    tokens, PARD after its one forward of K masks."""
    if kind == "eagle3":
        return Eagle3Drafter(_head(draft_vocab), LAYERS, window=window)
    if kind == "pard":
        return PardDrafter(DRAFT, MASK, window=window)
    return CausalLMDrafter(DRAFT, window=window)


KINDS = ["eagle3", "causal_lm", "pard"]


def _window_head(threshold: float, seed: int = 0, hidden_size: int = TARGET.config.hidden_size) -> WindowHead:
    torch.manual_seed(seed)
    head = WindowHead(WindowHeadConfig(hidden_size=hidden_size, threshold=threshold))
    with torch.no_grad():
        head.mlp[-1].weight.mul_(20)  # acceptance that varies with the drafter's state ...
        head.mlp[-1].bias.fill_(1.0)  # ... around 0.7 a token: chains of varying length
    return head.eval()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("k", [1, 3, 5])
def test_a_window_that_always_stops_after_k_tokens_reproduces_fixed_k(kind: str, k: int) -> None:
    cfg = SpecConfig(k=k, max_new_tokens=24)
    fixed = generate(TARGET, PROMPTS, drafter=_session(kind), cfg=cfg, eos_token_ids=set())
    windowed = _session(kind, FixedWindow(k))
    result = generate(TARGET, PROMPTS, drafter=windowed, cfg=SpecConfig(k=8, max_new_tokens=24), eos_token_ids=set())
    assert result.new_tokens == fixed.new_tokens
    assert result.accepted == fixed.accepted  # the same steps, accepting the same drafts
    assert {n for row in result.drafted for n in row} == {k}


def test_a_window_drafts_at_least_one_token() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        FixedWindow(0)


def test_the_learned_rule_drafts_on_while_the_product_of_acceptances_stays_above_h() -> None:
    head = _window_head(threshold=0.5)
    window = LearnedWindow(head)
    hidden, logits = torch.randn(3, 4, 32), torch.randn(3, 4, 64)
    window.start(4, torch.device("cpu"))
    go_on = torch.stack([window.go_on(step, hidden[step], logits[step]) for step in range(3)], dim=1)  # [B, 3]
    accept = torch.sigmoid(
        torch.stack([head(hidden[s], logit_stats(logits[s]), torch.full((4,), s)) for s in range(3)], dim=1)
    ).detach()
    expected = accept.cumprod(dim=1) >= 0.5
    assert torch.equal(go_on, expected)
    assert go_on.any() and not go_on.all()


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_output_with_a_learned_window_is_the_targets_own_and_chains_vary_in_length(kind: str) -> None:
    reference = [hf_greedy(TARGET, prompt, 32) for prompt in PROMPTS]
    cfg = SpecConfig(k=6, max_new_tokens=32)
    for batch in ([PROMPTS], [[p] for p in PROMPTS]):
        for prompts in batch:
            drafter = _session(kind, LearnedWindow(_window_head(threshold=0.8)), draft_vocab=32)
            result = generate(TARGET, prompts, drafter=drafter, cfg=cfg, eos_token_ids=set())
            assert result.new_tokens == [reference[PROMPTS.index(p)] for p in prompts]
    lengths = {n for row in result.drafted for n in row}
    assert len(lengths) >= 3 and min(lengths) < 6  # the window decided, per row and step


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("threshold", [0.6, 0.75])  # both draft 1 or 2 tokens a step (0.5: always 2)
def test_sampled_output_with_a_learned_window_follows_the_target_distribution(kind: str, threshold: float) -> None:
    from tests.eval.helpers import chi_square_p_value
    from tests.eval.test_engine import ALPHA, SMALL_DRAFT, SMALL_PROMPT, SMALL_TARGET, _exact_law

    head = small_eagle3_head()
    window_head = _window_head(threshold=threshold, hidden_size=SMALL_TARGET.config.hidden_size)
    sessions = {
        "eagle3": lambda: Eagle3Drafter(head.eval(), LAYERS, window=LearnedWindow(window_head)),
        "causal_lm": lambda: CausalLMDrafter(SMALL_DRAFT, window=LearnedWindow(window_head)),
        "pard": lambda: PardDrafter(SMALL_DRAFT, 5, window=LearnedWindow(window_head)),
    }
    generator, counts = torch.Generator().manual_seed(0), torch.zeros(36, dtype=torch.float64)
    cfg = SpecConfig(k=2, max_new_tokens=2, sampling=Sampling(temperature=1.0))
    drafted = set()
    for _ in range(12):
        drafter = sessions[kind]()
        result = generate(
            SMALL_TARGET, [SMALL_PROMPT] * 1000, drafter=drafter, cfg=cfg, eos_token_ids=set(), generator=generator
        )
        drafted |= {n for row in result.drafted for n in row}
        for a, b in (tokens[:2] for tokens in result.new_tokens):
            counts[a * 6 + b] += 1
    assert drafted == {1, 2}  # rows of different lengths in one batch
    assert chi_square_p_value(counts, _exact_law()) > ALPHA


def test_the_cost_of_a_step_and_the_reward_on_hand_made_steps() -> None:
    costs = StepCosts(verify=(0.040, 0.041, 0.043), draft_per_token=0.002, draft_fixed=0.001)  # verify[0]: plain
    drafted, accepted = torch.tensor([1, 1, 2, 2]), torch.tensor([0, 1, 0, 2])
    seconds = costs.step(drafted)
    torch.testing.assert_close(seconds, torch.tensor([0.044, 0.044, 0.048, 0.048], dtype=torch.float64))
    reward = speedup_reward(accepted, drafted, costs)
    expected = torch.tensor([1 / 0.044, 2 / 0.044, 1 / 0.048, 3 / 0.048], dtype=torch.float64) * 0.040
    torch.testing.assert_close(reward, expected)
    assert reward[3] > reward[1] > 1 > reward[0] > reward[2]  # accepted drafts beat a plain step, rejected ones lose
    with pytest.raises(ValueError, match="at least one token"):
        speedup_reward(torch.tensor([0]), torch.tensor([0]), costs)


def test_a_window_head_round_trips_through_its_directory(tmp_path) -> None:
    head = _window_head(threshold=0.2, seed=3)
    with pytest.raises(FileNotFoundError, match="no window head here"):
        load_window_head(tmp_path)
    save_window_head(head, tmp_path)
    assert has_window_head(tmp_path)
    loaded = load_window_head(tmp_path)
    assert loaded.cfg == head.cfg
    assert math.isclose(loaded.log_threshold.exp().item(), 0.2, rel_tol=1e-6)
    hidden, stats, step = torch.randn(5, 32), torch.rand(5, 2), torch.arange(5)
    torch.testing.assert_close(loaded(hidden, stats, step), head(hidden, stats, step))
