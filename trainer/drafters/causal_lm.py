"""Full causal LMs as exported drafters: PARD's, and any plain small LM that shares the target's
tokenizer (vLLM's `draft_model`, SGLang's STANDALONE). The export is an ordinary transformers
directory, loadable with AutoModelForCausalLM: config, safetensors weights in the export's dtype,
generation config and the target's tokenizer.
"""

from pathlib import Path

from transformers import AutoModelForCausalLM

from specdec.data_prep import load_tokenizer
from specdec.trainer.drafters import Exporter, ExportTarget


def write_causal_lm_dir(source: Path | str, out: Path, target: ExportTarget, k: int) -> tuple[int, ...]:
    model = AutoModelForCausalLM.from_pretrained(source, dtype=target.dtype)
    model.save_pretrained(out)  # safetensors
    load_tokenizer(target.tokenizer_cfg).save_pretrained(out)
    return ()


def serve_commands(where: str, target: ExportTarget, k: int, *, parallel: bool) -> dict[str, str]:
    """vLLM's draft model (PARD: its parallel drafting, which reads pard_token) and SGLang's
    STANDALONE, which drafts token by token."""
    spec = {"model": where, "method": "draft_model", "num_speculative_tokens": k}
    if parallel:
        spec["parallel_drafting"] = True
    sglang = target.sglang_command("STANDALONE", where, k)
    if parallel:
        sglang += "  # token by token: SGLang has no parallel drafting"
    return {"vLLM": target.vllm_command(spec), "SGLang": sglang}


PLAIN_EXPORTS = {
    "hf": Exporter(
        write=write_causal_lm_dir,
        serve=lambda where, target, k, layers: serve_commands(where, target, k, parallel=False),
        tags=("speculative-decoding", "draft-model", "specdec", "vllm", "sglang"),
        library="transformers",
    )
}
