"""Tiny models and a chi-square test for the engine tests."""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specdec.eval.drafters import ChainProposal


def tiny_lm(vocab_size: int = 64, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def perturbed(model: LlamaForCausalLM, scale: float, seed: int = 1) -> LlamaForCausalLM:
    """The model with noise on every weight: a drafter that agrees with it some of the time."""
    noisy = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in noisy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * scale * parameter.std())
    return noisy


def hf_greedy(model: LlamaForCausalLM, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    output = model.generate(
        torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    return output[0, len(prompt) :].tolist()


class ConstantDrafter:
    """Always proposes the same token: with a token the target never emits, nothing is accepted."""

    target_layers: tuple[int, ...] = ()

    def __init__(self, token: int) -> None:
        self.token = token

    def begin(self, input_ids, attention_mask, target_hidden) -> None:
        pass

    def propose_chain(self, pending, k, sampling, generator) -> ChainProposal:
        return ChainProposal(torch.full((len(pending), k), self.token), None)

    def commit(self, block, kept, target_hidden) -> None:
        pass

    def select_rows(self, rows) -> None:
        pass


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's test of observed counts against exact probabilities, cells with fewer than
    `min_expected` expected draws merged into one; returns the p-value."""
    total = counts.sum()
    expected = probs * total
    small = expected < min_expected
    observed = torch.cat([counts[~small], counts[small].sum()[None]]).double()
    expected = torch.cat([expected[~small], expected[small].sum()[None]]).double()
    keep = expected > 0
    statistic = ((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2.0, dtype=torch.float64), statistic / 2))
