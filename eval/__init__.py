"""specdec.eval: drafters at inference, the verifier, the speculative decoding engine, metrics,
benchmarks and the training-time eval hook."""

from specdec.eval.drafters import ChainProposal, Drafter
from specdec.eval.drafters.causal_lm import CausalLMDrafter
from specdec.eval.drafters.pard import PardDrafter
from specdec.eval.engine import Generation, SpecConfig, generate
from specdec.eval.tree import DraftTree
from specdec.eval.verify import Sampling

__all__ = [
    "CausalLMDrafter",
    "ChainProposal",
    "DraftTree",
    "Drafter",
    "Generation",
    "PardDrafter",
    "Sampling",
    "SpecConfig",
    "generate",
]
