"""The CTC drafter (Wen, Gui, Feng, "Speculative Decoding with CTC-based Draft Model for LLM
Inference Acceleration", NeurIPS 2024, arXiv 2412.00061): T learned query slots read the accepted
context in one forward and emit T frames, distributions over the draft vocabulary, one id of which
is the blank. A path through the frames, collapsed (repeats merged, then blanks dropped), is a draft.

    c_t     = fc([embed_norm(e(x_{t+1})) ; hidden_norm(h_t)])   an entry per accepted position t: [2H] -> [H]
                                                                (h_t the target's final normed state, as EAGLE-1)
    s_{t,j} = c_t + slot_j                                      query slot j = 1..T after position t
    a_{t,j} = attn(input_layernorm(s_{t,j}))  over the keys and values of c_1..c_t and its own
    o_{t,j} = s_{t,j} + a_{t,j};  o_{t,j} = o_{t,j} + mlp(post_attention_layernorm(o_{t,j}))
    frame j = softmax(lm_head(norm(o_{t,j})))                   over V_d ids, blank included; target id = id + d2t

The context entries only give keys and values (no output of theirs is read), so a step costs the
projection of the entries accepted last step and one pass of T slots through one layer: up to T
drafts from one forward, where EAGLE drafts token by token (3.7 ms a step for SmolLM2's 6 frames on
the CPU default against 8.2 for EAGLE-3's chain of 4; README, "CTC"). Slot j sits at RoPE position t + j.

Inference: the chain is the argmax path, collapsed; a tree (`eval.tree_width` W > 1) is the W best
paths of a beam search over the frames (score = sum of the frames' log-probabilities), each
collapsed, cut to `eval.k` tokens, and merged into a prefix tree (duplicates merged, siblings in
order of score). Drafting is deterministic, so the sampled verifier takes the drafts as one-hot
proposals (a chain accepts d with probability p(d)) or as top-k children (a tree): lossless either
way (tree.py). The released code (ZhuofanWen/CTC-drafter) is an EAGLE-1 head with CTC as an
auxiliary loss; this module is the paper's non-autoregressive draft module, and
`draft.name=eagle3` with `objective.ctc` is the released code's variant.
"""

import json
import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

from specdec.eval import kv
from specdec.eval.drafters import ChainProposal, DrafterLoadError
from specdec.eval.drafters.eagle3 import Eagle3Attention, Eagle3Drafter, shared_keys
from specdec.eval.drafters.eagle3_dirs import LAYER_FIELDS, _layer_config, load_own_state
from specdec.eval.tree import DraftTree
from specdec.eval.verify import Sampling

log = logging.getLogger(__name__)

CTC_ARCHITECTURE = "SpecdecCtcDrafter"


def collapse(path: list[int], blank: int) -> list[int]:
    """CTC's B: merge runs of a repeated symbol, then drop blanks ("a a - a b b" -> "a a b")."""
    merged = [symbol for index, symbol in enumerate(path) if index == 0 or symbol != path[index - 1]]
    return [symbol for symbol in merged if symbol != blank]


class CtcModel(nn.Module):
    def __init__(
        self, config: LlamaConfig, *, draft_vocab_size: int, frames: int, blank: int, embed_tokens: nn.Embedding
    ) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.embed_tokens = embed_tokens.requires_grad_(False)  # the target's, shared
        self.embed_norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.hidden_norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.slots = nn.Parameter(torch.randn(frames, hidden) * config.initializer_range)
        self.input_layernorm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config, width=hidden)
        self.post_attention_layernorm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.mlp = LlamaMLP(config)
        self.norm = LlamaRMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, draft_vocab_size, bias=False)
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.register_buffer("d2t", torch.zeros(draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(config.vocab_size, dtype=torch.bool))
        self.register_buffer("blank", torch.tensor(blank))  # the blank's draft id

    @property
    def frames(self) -> int:
        return len(self.slots)

    def entries(self, target_hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """c [B, n, H] of positions whose final target states are target_hidden [B, n, H] and whose
        next tokens are next_ids [B, n]."""
        embedding = self.embed_tokens(next_ids).to(self.fc.weight.dtype)
        features = target_hidden.to(self.fc.weight.dtype)
        return self.fc(torch.cat([self.embed_norm(embedding), self.hidden_norm(features)], dim=-1))

    def keys_values(self, entries: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention keys and values [B, nh, n, hd] of entries [B, n, H] at positions [B, n]."""
        cos, sin = self.rotary_emb(entries, positions)
        _, keys, values = self.self_attn.project(self.input_layernorm(entries), cos, sin)
        return keys, values

    def frame_logits(
        self,
        base: torch.Tensor,  # [B, M, H]: c_t of M windows per row
        positions: torch.Tensor,  # [B, M]: their t
        keys: torch.Tensor,  # [B, nh, S, hd]: the context's keys and values
        values: torch.Tensor,
        visible: torch.Tensor,  # [B, M, S] bool: the context entries each window reads (those <= t)
    ) -> torch.Tensor:
        """The frames [B, M, T, V_d] of each window: its T slots attend to the visible context and
        to themselves (a slot's own key; slots do not read each other)."""
        batch, windows, frames = *base.shape[:2], self.frames
        slots = (base[:, :, None] + self.slots.to(base.dtype)).flatten(1, 2)  # [B, M*T, H]
        slot_positions = (positions[:, :, None] + 1 + torch.arange(frames, device=base.device)).flatten(1)
        cos, sin = self.rotary_emb(slots, slot_positions)
        q, k, v = self.self_attn.project(self.input_layernorm(slots), cos, sin)  # [B, nh, M*T, hd]
        scale = 1 / math.sqrt(self.self_attn.head_dim)
        context = (q @ keys.transpose(-1, -2)).float() * scale  # [B, nh, M*T, S]
        mask = visible.repeat_interleave(frames, dim=1)[:, None]
        context = context.masked_fill(~mask, torch.finfo(torch.float32).min)
        own = (q * k).sum(-1, keepdim=True).float() * scale  # [B, nh, M*T, 1]
        weights = torch.softmax(torch.cat([context, own], dim=-1), dim=-1).to(q.dtype)
        attended = weights[..., :-1] @ values + weights[..., -1:] * v
        hidden = slots + self.self_attn.o_proj(attended.transpose(1, 2).flatten(2))
        hidden = hidden + self.mlp(self.post_attention_layernorm(hidden))
        return self.lm_head(self.norm(hidden)).view(batch, windows, frames, self.lm_head.out_features)

    def train_frames(
        self,
        *,
        target_hidden: torch.Tensor,  # [B, T, H]: the target's final normed state at each position
        next_ids: torch.Tensor,  # [B, T]: the token after each position
        attention_mask: torch.Tensor,  # [B, T]: 1 on real positions
        windows: torch.Tensor,  # [B, T] bool: the positions whose frames are wanted
    ) -> torch.Tensor:
        """The frames [W, T, V_d] after the W positions where `windows` is True, in (b, t) order, each
        window reading the context up to its position, as at inference."""
        batch, time = next_ids.shape
        entries = self.entries(target_hidden, next_ids)
        keys, values = self.keys_values(entries, torch.arange(time, device=next_ids.device).expand(batch, -1))
        # each row's windows first (stable), padded to the longest row's count
        count = windows.sum(dim=1)
        longest = int(count.max()) if batch else 0
        where = torch.sort((~windows).to(torch.uint8), dim=1, stable=True).indices[:, :longest]  # [B, M]
        real = torch.arange(longest, device=windows.device) < count[:, None]
        base = entries.gather(1, where[..., None].expand(-1, -1, entries.shape[-1]))
        keys_at = torch.arange(time, device=windows.device)
        visible = (keys_at[None, None] <= where[..., None]) & attention_mask.bool()[:, None]  # [B, M, T]
        return self.frame_logits(base, where, keys, values, visible)[real]


# ---- candidate paths ----


def beam_paths(logprobs: torch.Tensor, beams: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `beams` best paths through frames logprobs [B, T, V] by total log-probability, best first:
    (paths [B, P, T], scores [B, P]). Only a frame's top `beams` symbols can be on one of them."""
    top, ids = logprobs.topk(min(beams, logprobs.shape[-1]), dim=-1)  # [B, T, P]
    scores, paths = top[:, 0], ids[:, 0, :, None]
    for frame in range(1, logprobs.shape[1]):
        width = top.shape[-1]
        extended = (scores[:, :, None] + top[:, frame, None, :]).flatten(1)  # [B, P * width]
        scores, best = extended.topk(min(beams, extended.shape[1]))
        parents = paths.gather(1, (best // width)[..., None].expand(-1, -1, paths.shape[-1]))
        paths = torch.cat([parents, ids[:, frame].gather(1, best % width)[..., None]], dim=-1)
    return paths, scores


def prefix_tree(paths: list[list[int]]) -> tuple[list[int], list[int]]:
    """(tokens, parents) of the prefix tree of `paths`, nodes in order of first appearance: a path
    already covered adds nothing, a shared prefix is one chain of nodes."""
    tokens, parents, children = [], [], {}
    for path in paths:
        node = -1
        for token in path:
            if (node, token) not in children:
                children[node, token] = len(tokens)
                tokens.append(token)
                parents.append(node)
            node = children[node, token]
    return tokens, parents


def pad_trees(trees: list[tuple[list[int], list[int]]], device: torch.device) -> DraftTree:
    """Rows of different sizes as one DraftTree: a row is padded with copies of its last node (same
    token, same parent), which neither verifier can take, since each takes the first child with a
    token and a repeated token's mass is gone once it is rejected (tree.py)."""
    nodes = max(len(tokens) for tokens, _ in trees)
    tokens = [row + row[-1:] * (nodes - len(row)) for row, _ in trees]
    parents = [row + row[-1:] * (nodes - len(row)) for _, row in trees]
    sizes = torch.tensor([len(row) for row, _ in trees], device=device)
    return DraftTree(torch.tensor(tokens, device=device), torch.tensor(parents, device=device), sizes)


class CtcDrafter(Eagle3Drafter):
    """The engine's session over a CtcModel. It keeps EAGLE-3's cache of accepted entries (begin,
    commit, select_rows: the target's states of the tokens accepted last step wait in a queue and
    enter at the next step, the last one paired with the pending token); a step projects the queue
    into keys and values, then drafts from the frames of its T slots."""

    def __init__(self, model: CtcModel, target_layers: tuple[int, ...]) -> None:
        super().__init__(model, target_layers)  # type: ignore[arg-type]: the queue reads model.fc alone

    def _frames(self, pending: torch.Tensor) -> torch.Tensor | None:
        """Feed the queue; the frames' log-probabilities [B, T, V_d] after the pending token, or None
        when nothing was ever queued (a one-token prompt: no target state to read)."""
        queued = self.queue_mask.shape[1]
        self.committed, self.fed = self.mask.shape[1] + queued, True
        if queued == 0:
            return None
        tokens = torch.cat([self.queue_tokens, pending[:, None]], dim=1)  # the successor of each queued entry
        entries = self.model.entries(self.queue_hidden[:, :, -1], tokens)
        positions = self.mask.sum(dim=1, keepdim=True) + kv.prefill_positions(self.queue_mask)
        keys, values = self.model.keys_values(entries, positions)
        self.keys = keys if self.keys is None else torch.cat([self.keys, keys], dim=2)
        self.values = values if self.values is None else torch.cat([self.values, values], dim=2)
        self.mask = torch.cat([self.mask, self.queue_mask], dim=1)
        last = self.mask.sum(dim=1, keepdim=True) - 1  # the pending token's predecessor
        logits = self.model.frame_logits(entries[:, -1:], last, self.keys, self.values, self.mask.bool()[:, None])
        return torch.log_softmax(logits[:, 0].float(), dim=-1)

    def _no_context(self, pending: torch.Tensor, k: int) -> torch.Tensor:
        return pending[:, None].expand(-1, k)  # drafts of a row with nothing to read: never better than a guess

    @torch.inference_mode()
    def propose_chain(
        self, pending: torch.Tensor, k: int, sampling: Sampling, generator: torch.Generator | None
    ) -> ChainProposal:
        frames = self._frames(pending)
        blank = int(self.model.blank)
        if frames is None:
            drafts, lengths = self._no_context(pending, k), None
        else:
            paths = [collapse(path, blank)[:k] for path in frames.argmax(dim=-1).tolist()]
            longest = max(1, max(len(path) for path in paths))
            rows = [self._target_ids(torch.tensor(path, dtype=torch.long, device=pending.device)) for path in paths]
            drafts = torch.stack(
                [torch.cat([row, pending[index, None].expand(longest - len(row))]) for index, row in enumerate(rows)]
            )
            lengths = torch.tensor([len(path) for path in paths], device=pending.device)
        one_hot = None if sampling.greedy else torch.nn.functional.one_hot(drafts, len(self.model.t2d)).float()
        return ChainProposal(drafts, one_hot, lengths)

    @torch.inference_mode()
    def propose_tree(self, pending: torch.Tensor, depth: int, width: int) -> DraftTree:
        frames = self._frames(pending)
        if frames is None:
            tokens = self._no_context(pending, depth)
            return DraftTree(tokens, torch.arange(-1, depth - 1, device=pending.device).expand(len(pending), -1))
        blank = int(self.model.blank)
        paths, _ = beam_paths(frames, width)
        trees = []
        for row, row_paths in enumerate(paths.tolist()):
            collapsed = [collapse(path, blank)[:depth] for path in row_paths]
            tokens, parents = prefix_tree([path for path in collapsed if path])
            if not tokens:  # every path collapsed to nothing: the first frame's best token that is not blank
                best = frames[row, 0].clone()
                best[blank] = -math.inf
                tokens, parents = [int(best.argmax())], [-1]
            trees.append((tokens, parents))
        tree = pad_trees(trees, pending.device)
        return DraftTree(self._target_ids(tree.tokens), tree.parents, tree.sizes)


# ---- its directory ----


def save_ctc(model: CtcModel, directory: str | Path, *, target_config: PretrainedConfig, target_layers) -> Path:
    """config.json (the layer's fields, the draft vocabulary's size, frames, the blank as a target
    id, the target layer read) and model.safetensors (float32, without the target's embedding)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fields = {name: getattr(target_config, name) for name in LAYER_FIELDS if hasattr(target_config, name)}
    config = {
        **_layer_config(fields),
        "architectures": [CTC_ARCHITECTURE],
        "draft_vocab_size": model.lm_head.out_features,
        "frames": model.frames,
        "blank_token_id": int(model.blank + model.d2t[model.blank]),
        "specdec_target_layers": list(target_layers),  # HF output_hidden_states ids
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    own = {
        name: (tensor.float() if tensor.is_floating_point() else tensor).contiguous()
        for name, tensor in model.state_dict().items()
        if name not in shared_keys(model)
    }
    save_file(own, str(directory / "model.safetensors"))
    return directory


def is_ctc_dir(directory: str | Path) -> bool:
    config = Path(directory) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("architectures") == [CTC_ARCHITECTURE]


def load_ctc(directory: str | Path, target: nn.Module, target_layers=None) -> tuple[CtcModel, tuple[int, ...]]:
    """The drafter of a directory save_ctc wrote, in the target's dtype, and its target layer."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    if config.get("hidden_size") != target.config.hidden_size:
        raise DrafterLoadError(
            f"{directory / 'config.json'}: hidden_size={config.get('hidden_size')}, the target's is "
            f"{target.config.hidden_size}: a CTC drafter of another target. Give one trained for the same target.path."
        )
    layer = LlamaConfig(**{name: value for name, value in config.items() if name in LAYER_FIELDS})
    layer.vocab_size = target.config.vocab_size
    tensors = load_file(str(directory / "model.safetensors"))
    model = CtcModel(
        layer,
        draft_vocab_size=config["draft_vocab_size"],
        frames=config["frames"],
        blank=0,  # from the tensors
        embed_tokens=target.get_input_embeddings(),
    )
    load_own_state(model, tensors, f"{directory}: not a CTC drafter for this target")
    layers = tuple(config.get("specdec_target_layers") or [target.config.num_hidden_layers])
    if target_layers is not None and tuple(target_layers) != layers:
        log.warning(
            "%s records target layers %s (HF ids); they are used, not the %s given", directory, layers, target_layers
        )
    return model.to(target.dtype).eval().requires_grad_(False), layers
