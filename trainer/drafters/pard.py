"""The PARD drafter's training side (An et al., "PARD", arXiv 2504.18583; AMD-AGI/PARD at 6f279bf):
its recipe fields, the draft built from a small causal LM of the target's family (optionally its
first layers only, optionally with a LoRA adapter), the COD blocks of a batch with their labels
and, for PARD-2's objective, the target's weights and distribution; saved as a plain Hugging Face
directory with `pard_token` and `spd_type: pard` in its config, which vLLM's parallel drafting
reads. The inference session is specdec.eval.drafters.pard.

One training batch becomes (specdec.trainer.drafters.cod for the blocks):
    loss_mask [B, K, T]  step i of the chain that starts after x_n counts: block i at position
                         t = n + i, which COD kept, predicts x_{t+1}, an assistant token (the draft
                         guesses answers when it serves; any real token with loss_on_prompts, as
                         PARD-1 trains); the grid of the multi-step objectives
    draft_logits [N, V]  the draft's logits at those N places, in loss_mask.nonzero() order
    labels [N]           x_{t+1}
and, when an objective takes them (the target's final normed state is then cached):
    target_probs [N, V]  p_T(. | x_{<=t})
    gold_weights [N]     w(i, t) = prod_{s=1..i} p_T(x_{t+1-s} | x_{<=t-s})
and, for objectives that train a window policy (stop_head, window_rl), what it sees after each draft
token and what the verifier did with it (`window_inputs`).
"""

import copy
import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from omegaconf import MISSING
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, PreTrainedModel

from specdec.data_prep import TargetConfig, load_target
from specdec.eval import kv
from specdec.eval.drafters import DrafterLoadError
from specdec.eval.drafters.causal_lm import CausalLMDrafter
from specdec.eval.drafters.pard import PardDrafter
from specdec.eval.window import logit_stats
from specdec.trainer.drafters import DrafterKind, Exporter, register_drafter
from specdec.trainer.drafters.causal_lm import serve_commands, write_causal_lm_dir
from specdec.trainer.drafters.cod import cod_layout
from specdec.trainer.objectives import WINDOW_INPUTS, WINDOW_POLICY_INPUTS, masked_mean, scatter_rows


@dataclass
class LoraSettings:
    """A LoRA adapter (peft) trained instead of every weight; merged into the saved drafter."""

    r: int = 0  # rank; 0 = no adapter, every weight trains
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )


@dataclass
class PardDraftConfig:
    """PARD (An et al., arXiv 2504.18583): a small LM of the target's family drafts K tokens at once."""

    name: str = "pard"
    init: str = MISSING  # Hub id, directory or .gguf of the causal LM the draft starts from
    mask_token_id: int = MISSING  # a reserved id of the tokenizer, used for every mask slot (no vocabulary resize)
    k: int = 8  # blocks trained: draft tokens per forward (PARD-1 `para_num`); serving may use more
    r: float = 0.7  # COD keep ratio r^i of block i (PARD-1 `down_sample_ration`)
    r_min: float = 0.2  # its floor (PARD-1 `down_sample_ration_min`)
    num_layers: int | None = None  # keep the init's first N decoder layers (with its norm and head); None = all
    # learn every token of a conversation, prompts too, as PARD-1 does; false: the answers only (PARD-2)
    loss_on_prompts: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)

    def target_layers(self, num_layers: int) -> list[int]:
        """PARD reads no target features (its teacher, for PARD-2, is the final state)."""
        return []


# ---- the model ----


def keep_first_layers(model: PreTrainedModel, num_layers: int, key: str) -> None:
    """Cut the decoder to its first `num_layers` layers; the final norm and the head stay."""
    decoder = model.get_decoder()
    if not 1 <= num_layers <= len(decoder.layers):
        raise DrafterLoadError(
            f"{key}={num_layers}: the draft's init has {len(decoder.layers)} decoder layers; keep 1 to "
            f"{len(decoder.layers)} of them, or null for all."
        )
    decoder.layers = decoder.layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]


def new_pard(cfg: PardDraftConfig, dtype: torch.dtype) -> PreTrainedModel:
    """The draft's start: cfg.init, cut to cfg.num_layers, with the PARD keys in its config."""
    model = load_target(TargetConfig(path=cfg.init, dtype=str(dtype).removeprefix("torch.")), key="draft.init").model
    # A GGUF init is de-quantized as it loads: what trains and is saved are plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if cfg.num_layers is not None:
        keep_first_layers(model, cfg.num_layers, key="draft.num_layers")
    vocab_size = model.get_input_embeddings().num_embeddings
    if not 0 <= cfg.mask_token_id < vocab_size:
        raise DrafterLoadError(
            f"draft.mask_token_id={cfg.mask_token_id} is not a row of the draft's embedding ({vocab_size} "
            "rows): give a reserved id of the tokenizer, such as 128020 for Llama-3."
        )
    model.config.pard_token = cfg.mask_token_id  # read by vLLM's parallel drafting
    model.config.spd_type = "pard"
    model.config.specdec_pard = {"init": cfg.init, "k": cfg.k}  # the untrained start is rebuilt from these
    return model


def check_mask_token_unused(mask_token_id: int, token_samples) -> None:
    """A mask id that occurs in the data would teach the draft two meanings for one token."""
    for number, sample in enumerate(token_samples):
        if bool((sample["input_ids"] == mask_token_id).any()):
            raise DrafterLoadError(
                f"draft.mask_token_id={mask_token_id} occurs in the training data (sample {number}, counting from 0 "
                "in the data's order): the mask must be a token the tokenizer never produces from text; choose a "
                "reserved or special id."
            )


def build(cfg: PardDraftConfig, target, token_samples, seed: int) -> torch.nn.Module:
    L.seed_everything(seed, verbose=False)  # LoRA's initialisation
    check_mask_token_unused(cfg.mask_token_id, token_samples)
    model = new_pard(cfg, torch.float32).train().requires_grad_(True)
    if cfg.lora.r > 0:
        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=list(cfg.lora.target_modules),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    L.pytorch.utilities.rank_zero_info(
        f"PARD draft from {cfg.init}: {model.config.num_hidden_layers} layers, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, {trainable / 1e6:.1f}M trained"
    )
    return model


def merged(draft: torch.nn.Module) -> PreTrainedModel:
    """A copy of the draft as one plain model: a LoRA adapter merged into its weights."""
    if isinstance(draft, PeftModel):
        return copy.deepcopy(draft).merge_and_unload()
    return copy.deepcopy(draft)


def untrained_like(draft: torch.nn.Module, target: PreTrainedModel, seed: int) -> PreTrainedModel:
    """The draft's start (its init, cut to the same layers), in the target's dtype: reloaded from
    the init the saved config names."""
    settings = draft.config.specdec_pard
    cfg = PardDraftConfig(
        init=settings["init"], mask_token_id=draft.config.pard_token, num_layers=draft.config.num_hidden_layers
    )
    try:
        return new_pard(cfg, target.dtype).eval()
    except (OSError, RuntimeError) as error:
        raise DrafterLoadError(
            f"the drafter's untrained start is its init {settings['init']}, which could not be loaded ({error}); "
            "make it available, or measure the drafter alone with eval.compare."
        ) from error


def serving_copy(draft: torch.nn.Module, dtype: torch.dtype) -> PreTrainedModel:
    return merged(draft).to(dtype).eval()


def save(draft: torch.nn.Module, directory: Path, target_config, layers) -> Path:
    """A plain Hugging Face directory (config.json with pard_token and spd_type, safetensors), in
    the target's dtype."""
    model = merged(draft).to(getattr(target_config, "dtype", None) or torch.float32)
    model.save_pretrained(directory)
    return Path(directory)


def is_saved(directory: Path) -> bool:
    config = Path(directory) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("spd_type") == "pard"


def load(directory: Path, target: PreTrainedModel, target_layers=None) -> tuple[PreTrainedModel, tuple[int, ...]]:
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=target.dtype)
    return model.eval().requires_grad_(False), ()


def parallel_session(draft: PreTrainedModel, layers: tuple[int, ...]) -> PardDrafter:
    return PardDrafter(draft, mask_token_id=draft.config.pard_token)


# ---- a training batch ----


def batch_generator(batch: dict[str, torch.Tensor]) -> torch.Generator:
    """COD's randomness, a function of the batch's samples: a resumed run draws the same blocks."""
    return torch.Generator().manual_seed(zlib.crc32(batch["index"].cpu().numpy().tobytes()))


def gold_log_probs(final: torch.Tensor, input_ids: torch.Tensor, lm_head: torch.Tensor) -> torch.Tensor:
    """log p_T(x_{t+1} | x_{<=t}) at every position [B, T] (0 at the last), row block by row block."""
    batch, time, hidden = final.shape
    rows, nxt = final.reshape(-1, hidden), torch.roll(input_ids, -1, dims=1).reshape(-1)
    out = torch.empty(len(rows), dtype=torch.float32, device=final.device)
    for start in range(0, len(rows), 256):
        logits = (rows[start : start + 256].to(lm_head.dtype) @ lm_head.T).float()
        out[start : start + 256] = logits.gather(1, nxt[start : start + 256, None])[:, 0] - logits.logsumexp(-1)
    out = out.view(batch, time)
    out[:, -1] = 0
    return out


def training_inputs(
    draft: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    target_hidden: torch.Tensor | None,  # [B, T, 1, H] the final normed state when a teacher is needed
    lm_head: torch.Tensor,
    cfg: PardDraftConfig,
    wanted: frozenset[str] = frozenset(),  # the window's inputs are computed only when wanted; the rest always
) -> dict[str, torch.Tensor]:
    input_ids, device = batch["input_ids"], batch["input_ids"].device
    rows, time = input_ids.shape
    layout = cod_layout(time, cfg.k, cfg.r, cfg.r_min, batch_generator(batch))
    block, position = layout.block.to(device), layout.position.to(device)
    tokens = torch.where(block == 0, input_ids[:, position], cfg.mask_token_id)  # [B, M]
    additive = kv.additive_mask(layout.attention().to(device), next(draft.parameters()).dtype)
    hidden = draft.get_decoder()(
        input_ids=tokens,
        attention_mask=additive[None, None].expand(rows, 1, -1, -1),
        position_ids=position.expand(rows, -1),
        use_cache=False,
    ).last_hidden_state  # [B, M, H]

    # (i, t) predicts x_{t+1}: counted when its prefix x_{<=t-i} exists and x_{t+1} is learned
    learned = batch["attention_mask"].bool() if cfg.loss_on_prompts else batch["loss_mask"]
    learned_next = torch.roll(learned, -1, dims=1)
    learned_next[:, -1] = False
    counted = learned_next[:, position] & (position >= block)  # [B, M]
    labels = torch.roll(input_ids, -1, dims=1)[:, position][counted]
    # on the objectives' grid, step i of the chain that starts after x_n: block i at position n + i
    sample, token = counted.nonzero(as_tuple=True)
    loss_mask = torch.zeros(rows, cfg.k, time, dtype=torch.bool, device=device)
    loss_mask[sample, block[token], position[token] - block[token]] = True
    inputs = {
        "draft_logits": draft.get_output_embeddings()(hidden[counted]),
        "labels": labels,
        "loss_mask": loss_mask,
    }
    if target_hidden is not None:
        final = target_hidden[:, :, -1]
        at, depth = position[token], block[token]
        with torch.no_grad():
            # the teacher at (b, t) serves every block that predicts x_{t+1}: its head runs once per position
            places, place_of = torch.unique(sample * time + at, return_inverse=True)
            teacher = (final.flatten(0, 1)[places].to(lm_head.dtype) @ lm_head.T).float()
            gold = gold_log_probs(final, input_ids, lm_head).cumsum(dim=1)  # C[t] = sum_{u<=t} log g_{u+1}
            # sum_{s=1..i} log p_T(x_{t+1-s} | x_{<=t-s}) = C[t-1] - C[t-1-i]
            gold = torch.cat([gold.new_zeros(rows, 1), gold], dim=1)  # gold[:, t] = C[t-1]
            weights = (gold[sample, at] - gold[sample, at - depth]).exp()
        inputs |= {"target_probs": torch.softmax(teacher, dim=-1)[place_of], "gold_weights": weights}
        if "window_hidden" in wanted:
            inputs |= window_inputs(hidden[counted], inputs["draft_logits"], inputs["target_probs"], loss_mask)
    return inputs


@torch.no_grad()
def window_inputs(
    hidden: torch.Tensor, draft_logits: torch.Tensor, target_probs: torch.Tensor, loss_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """What a window policy sees after each draft token of a chain, and what the verifier did with it,
    at the N places of loss_mask [B, K, T] (step i of the chain after x_n: block i at n + i):
        window_hidden      [N, H]  the draft's final hidden state that produced the token
        window_stats       [N, 2]  top-1 probability and entropy of its distribution
        window_step        [N]     i, the token's place in its chain
        window_accept      [N]     1 when greedy verification accepts it: the draft's argmax is the target's
        window_accept_soft [N]     min(1, p(y) / q(y)) of that token y: its acceptance under sampling
        window_mask        [B, K, T] loss_mask
    Block i reads the real prefix x_{<=n} and i masks, as serving does once d_1..d_i were accepted:
    the only case in which the window is asked about token i. The chains are whole when every block
    is kept (draft.r = r_min = 1), as a window recipe trains them."""
    log_q = torch.log_softmax(draft_logits.float(), dim=-1)
    tokens = draft_logits.argmax(dim=-1)
    log_p = target_probs.gather(1, tokens[:, None])[:, 0].clamp(min=1e-30).log()
    return {
        "window_hidden": hidden.detach(),
        "window_stats": logit_stats(draft_logits),
        "window_step": loss_mask.nonzero()[:, 1],
        "window_accept": (target_probs.argmax(dim=-1) == tokens).float(),
        "window_accept_soft": (log_p - log_q.gather(1, tokens[:, None])[:, 0]).exp().clamp(max=1),
        "window_mask": loss_mask,
    }


@torch.no_grad()
def diagnostics(inputs: dict[str, torch.Tensor], eval_k: int) -> dict[str, torch.Tensor]:
    """train/acc_block_i (the draft's argmax is x_{t+1}) per block, and sim_tau_greedy = 1 +
    sum_k prod_{i<=k} acc_block_i over the first min(eval.k, K) blocks: the acceptance length if
    the blocks erred independently (a parallel draft's K guesses share one forward, not one chain)."""
    loss_mask = inputs["loss_mask"]
    agree = scatter_rows((inputs["draft_logits"].argmax(dim=-1) == inputs["labels"]).float(), loss_mask)
    accuracy = [masked_mean(agree[:, i], loss_mask[:, i]) for i in range(loss_mask.shape[1])]
    metrics = {f"train/acc_block_{i}": value for i, value in enumerate(accuracy)}
    chain = torch.stack(accuracy[: min(eval_k, len(accuracy))]).cumprod(dim=0)
    metrics["train/sim_tau_greedy"] = 1 + chain.sum()
    return metrics


EXPORTS = {
    "hf": Exporter(
        write=write_causal_lm_dir,
        serve=lambda where, target, k, layers: serve_commands(where, target, k, parallel=True),
        tags=("speculative-decoding", "draft-model", "pard", "specdec", "vllm", "sglang"),
        library="transformers",
    )
}

PARD = register_drafter(
    "pard",
    DrafterKind(
        config=PardDraftConfig,
        build=build,
        untrained_like=untrained_like,
        training_inputs=training_inputs,
        inputs=frozenset({"draft_logits", "labels", "loss_mask", "target_probs", "gold_weights"})
        | WINDOW_INPUTS
        | WINDOW_POLICY_INPUTS,
        teacher_inputs=frozenset({"target_probs", "gold_weights", "window_accept", "window_accept_soft"}),
        diagnostics=diagnostics,
        shared_keys=lambda draft: set(),
        session=parallel_session,
        serving_copy=serving_copy,
        save=save,
        load=load,
        is_saved=is_saved,
        module=__name__,
        modes={"parallel": parallel_session, "causal_lm": lambda draft, layers: CausalLMDrafter(draft)},
        exports=EXPORTS,
    ),
)
