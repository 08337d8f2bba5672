"""Greedy losslessness on the real SmolLM2 target, with its first 6 layers as an untrained drafter."""

import pytest

from specdec.data_prep import TargetConfig, asset_path, load_target
from specdec.eval import CausalLMDrafter, SpecConfig, generate
from specdec.eval.benchmark import truncated_copy
from specdec.eval.prompts import load_prompts
from tests.eval.helpers import hf_greedy

pytestmark = pytest.mark.slow
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def smollm2():
    target = load_target(TargetConfig(path=str(asset_path("smollm2_gguf"))))
    prompts = [p.token_ids for p in load_prompts("mtbench", target.tokenizer, num_prompts=4)]
    reference = [hf_greedy(target.model, prompt, NEW_TOKENS) for prompt in prompts]
    return target.model, prompts, reference


@pytest.mark.parametrize("width", [1, 2], ids=["chain", "tree"])
def test_speculative_greedy_output_is_the_targets_own(smollm2, width: int) -> None:
    model, prompts, reference = smollm2
    drafter = CausalLMDrafter(truncated_copy(model, 6))
    cfg = SpecConfig(k=4, tree_width=width, max_new_tokens=NEW_TOKENS)
    single = [generate(model, [p], drafter=drafter, cfg=cfg, eos_token_ids=set()).new_tokens[0] for p in prompts]
    batched = generate(model, prompts, drafter=drafter, cfg=cfg, eos_token_ids=set()).new_tokens
    assert single == reference
    assert batched == reference
