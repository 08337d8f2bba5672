"""The PARD drafter's training side: COD against a brute-force layout, the draft's logits at every
counted place against a plain forward of what inference feeds it, the PARD-1 and PARD-2 objectives
and gold weights against slow loops, resume-exact COD draws, LoRA training and its merged save,
the refused inputs, and pard_llama3 end to end on tiny models."""

import itertools
import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from specdec.data_prep import TargetConfig, asset_path, load_target, load_tokenizer
from specdec.eval.drafters import DrafterLoadError
from specdec.trainer import cli
from specdec.trainer.config import OptimConfig, Schedule, compose_recipe
from specdec.trainer.drafters import drafter_kind
from specdec.trainer.drafters.cod import cod_layout, kept_counts
from specdec.trainer.drafters.pard import (
    LoraSettings,
    PardDraftConfig,
    batch_generator,
    build,
    is_saved,
    load,
    save,
    serving_copy,
    training_inputs,
    untrained_like,
)
from specdec.trainer.module import DrafterModule
from specdec.trainer.objectives.pard import PardConfig, pard_loss
from specdec.trainer.objectives.pard_cat import PardCatConfig, pard_cat_loss
from specdec.trainer.train import target_layers
from tests.eval.helpers import tiny_lm

MASK = 63  # the mask of the 64-token tiny models: w57 of the tiny tokenizer, absent from the samples below
# float32 forwards of the same model by two routes (one packed COD sequence vs a plain causal one):
# a few ulps of the logits, summed over 2 layers
LOGITS_ATOL = 1e-4


# ---- COD: the layout against a brute force from its definition ----


def _brute_force_sees(length: int, k: int) -> set[tuple[tuple[int, int], tuple[int, int]]]:
    """Every (query, key) pair of the full K x L grid: (i, t) sees (0, s) iff s <= t - i, and
    (j, t - (i - j)) for 1 <= j <= i."""
    pairs = set()
    for i, t in itertools.product(range(k), range(length)):
        pairs |= {((i, t), (0, s)) for s in range(t - i + 1)}
        pairs |= {((i, t), (j, t - (i - j))) for j in range(1, i + 1) if t - (i - j) >= 0}
    return pairs


COD_CASES = [  # (L, K, r, r_min, seed)
    (12, 4, 0.7, 0.2, 0),
    (17, 8, 0.7, 0.2, 1),
    (9, 5, 0.5, 0.3, 2),
    (20, 3, 0.9, 0.1, 3),
    (7, 7, 0.6, 0.0, 4),  # r_min 0: the last blocks keep a single position, or none
]


@pytest.mark.parametrize(("length", "k", "r", "r_min", "seed"), COD_CASES)
def test_cod_layout_equals_a_brute_force_from_the_definition(length, k, r, r_min, seed) -> None:
    layout = cod_layout(length, k, r, r_min, torch.Generator().manual_seed(seed))
    tokens = list(zip(layout.block.tolist(), layout.position.tolist(), strict=True))
    assert tokens == sorted(set(tokens)), "kept tokens in block then position order, no repeat"
    kept = set(tokens)

    sees = _brute_force_sees(length, k)
    expected = torch.tensor([[(query, key) in sees for key in tokens] for query in tokens])
    assert torch.equal(layout.attention(), expected)

    counts = kept_counts(length, k, r, r_min)
    assert counts == [length] + [math.floor(length * max(r**i, r_min)) for i in range(1, k)]
    for i in range(k):
        positions = {t for b, t in tokens if b == i}
        assert len(positions) == counts[i]
        if i >= 1:
            previous = {t for b, t in tokens if b == i - 1}
            assert positions <= {(s + 1) % length for s in previous}
    for row, (i, t) in zip(layout.attention(), tokens, strict=True):
        if i == 0:
            continue
        # the whole chain is kept: (i - j, t - j) for 1 <= j < i wherever t - j >= 0
        assert all((i - j, t - j) in kept for j in range(1, i) if t - j >= 0)
        prefix = max(t - i + 1, 0)
        chain = sum(1 for j in range(1, i + 1) if t - (i - j) >= 0)
        assert chain == (i if t >= i else t + 1)
        assert int(row.sum()) == prefix + chain

    exact = length * (1 + sum(max(r**i, r_min) for i in range(1, k)))
    assert len(tokens) == sum(counts)
    assert 0 <= exact - len(tokens) < k - 1 + 1e-9  # one floor per block i >= 1


def test_pard1_cod_costs_3_37_tokens_per_token() -> None:
    """K=8, r=0.7, r_min=0.2 (PARD-1): 1 + 0.7 + 0.49 + 0.343 + 0.2401 + 3 * 0.2 = 3.3731 L."""
    length = 4096
    layout = cod_layout(length, 8, 0.7, 0.2, torch.Generator().manual_seed(0))
    assert abs(len(layout.block) / length - 3.3731) < 7 / length


# ---- a training batch: labels, the loss mask, and logits equal to inference's ----


def _draft() -> LlamaForCausalLM:
    draft = tiny_lm(vocab_size=64, seed=3).float()
    draft.config.pard_token, draft.config.spd_type = MASK, "pard"  # what new_pard sets
    return draft


def _batch(lengths: tuple[int, ...] = (15, 9), index: tuple[int, ...] = (5, 11), seed: int = 0) -> dict:
    """Right-padded rows (pad id 0) of tokens 3..62 (never the mask), answers from position 3 on."""
    generator = torch.Generator().manual_seed(seed)
    time = max(lengths)
    input_ids = torch.zeros(len(lengths), time, dtype=torch.long)
    attention_mask = torch.zeros(len(lengths), time, dtype=torch.long)
    loss_mask = torch.zeros(len(lengths), time, dtype=torch.bool)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = torch.randint(3, MASK, (length,), generator=generator)
        attention_mask[row, :length] = 1
        loss_mask[row, 3:length] = True
    return {
        "index": torch.tensor(index),
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "loss_mask": loss_mask,
    }


CFG = PardDraftConfig(init="unused", mask_token_id=MASK, k=4, r=0.7, r_min=0.2)


def _places(loss_mask: torch.Tensor) -> list[tuple[int, int, int]]:
    """(b, i, t) of the counted places, in loss_mask.nonzero() order: loss_mask[b, i, n] is block i
    at position t = n + i, step i of the chain that starts after x_n."""
    return [(b, i, n + i) for b, i, n in loss_mask.nonzero().tolist()]


@pytest.mark.parametrize("loss_on_prompts", [False, True], ids=["answers", "every token (PARD-1)"])
def test_labels_and_loss_mask_are_the_next_learned_token_at_each_kept_place(loss_on_prompts: bool) -> None:
    batch, cfg = _batch(), replace(CFG, loss_on_prompts=loss_on_prompts)
    with torch.no_grad():
        inputs = training_inputs(_draft(), batch, None, torch.empty(0), cfg)
    layout = cod_layout(batch["input_ids"].shape[1], CFG.k, CFG.r, CFG.r_min, batch_generator(batch))
    kept = set(zip(layout.block.tolist(), layout.position.tolist(), strict=True))
    places = _places(inputs["loss_mask"])
    assert len(places) == len(inputs["labels"]) == len(inputs["draft_logits"]) > 0
    for (b, _, t), label in zip(places, inputs["labels"].tolist(), strict=True):
        assert label == batch["input_ids"][b, t + 1]
    time = batch["input_ids"].shape[1]
    learned = batch["attention_mask"].bool() if loss_on_prompts else batch["loss_mask"]
    expected = {(b, i, t) for b in range(2) for i, t in kept if t >= i and t + 1 < time and learned[b, t + 1]}
    assert any(not batch["loss_mask"][b, t + 1] for b, _, t in places) == loss_on_prompts  # prompt tokens
    assert set(places) == expected
    assert {i for _, i, _ in places} == set(range(CFG.k))  # every block counts somewhere


def test_draft_logits_at_each_counted_place_equal_a_plain_forward_of_prefix_and_masks() -> None:
    """The 4-D mask and the repeated position ids reproduce inference: (i, t) is what the draft
    computes at the last of x_0 .. x_{t-i} followed by i masks, for a right-padded batch of 2."""
    draft, batch = _draft(), _batch()
    with torch.no_grad():
        inputs = training_inputs(draft, batch, None, torch.empty(0), CFG)
        places = _places(inputs["loss_mask"])
        for (b, i, t), logits in zip(places, inputs["draft_logits"], strict=True):
            context = batch["input_ids"][b, : t - i + 1].tolist() + [MASK] * i
            expected = draft(torch.tensor([context])).logits[0, -1]
            torch.testing.assert_close(logits, expected, atol=LOGITS_ATOL, rtol=0)
    assert {b for b, _, _ in places} == {0, 1}


def test_window_inputs_at_each_place_are_what_the_serving_window_reads_and_the_verifiers_verdict() -> None:
    """A window recipe keeps every block (r = r_min = 1), so each chain is whole. At (i, t) the window
    sees the draft's final hidden state and logits after x_0 .. x_{t-i} and i masks, as PardDrafter
    reads them after its forward; the greedy verdict is argmax q = argmax p, the soft one min(1, p/q)."""
    batch, hidden, cfg = _batch(), 16, replace(CFG, r=1.0, r_min=1.0)
    generator = torch.Generator().manual_seed(7)
    target_hidden = torch.randn(2, batch["input_ids"].shape[1], 1, hidden, generator=generator)
    lm_head = torch.randn(64, hidden, generator=generator)
    draft = _draft()
    with torch.no_grad():
        inputs = training_inputs(draft, batch, target_hidden, lm_head, cfg, frozenset({"window_hidden"}))
    places = _places(inputs["loss_mask"])
    assert torch.equal(inputs["window_mask"], inputs["loss_mask"])
    time = batch["input_ids"].shape[1]
    for i in range(cfg.k):  # whole chains: step i after x_n counts wherever x_{n+i+1} is an answer token
        assert torch.equal(inputs["loss_mask"][:, i, : time - 1 - i], batch["loss_mask"][:, i + 1 :].bool())
    probs = torch.softmax(target_hidden[:, :, 0].double() @ lm_head.double().T, dim=-1)
    for n, (b, i, t) in enumerate(places):
        context = batch["input_ids"][b, : t - i + 1].tolist() + [MASK] * i
        with torch.no_grad():
            output = draft(torch.tensor([context]), output_hidden_states=True)
        served_hidden = output.hidden_states[-1][0, -1]
        torch.testing.assert_close(inputs["window_hidden"][n], served_hidden, atol=LOGITS_ATOL, rtol=0)
        q = torch.softmax(output.logits[0, -1].double(), dim=-1)
        token = int(q.argmax())
        assert inputs["window_step"][n] == i
        assert inputs["window_accept"][n] == float(int(probs[b, t].argmax()) == token)
        expected_soft = min(1.0, probs[b, t, token].item() / q[token].item())
        assert inputs["window_accept_soft"][n].item() == pytest.approx(expected_soft, rel=1e-3)
        torch.testing.assert_close(inputs["window_stats"][n, 0].double(), q.max(), rtol=1e-4, atol=1e-5)
    assert 0 < inputs["window_accept"].sum() < len(places)  # both verdicts occur


# ---- the objectives and PARD-2's gold weights against slow loops ----


def _packed(seed: int, n: int = 9, vocab: int = 6):
    generator = torch.Generator().manual_seed(seed)
    draft_logits = (torch.randn(n, vocab, generator=generator) * 2).requires_grad_()
    labels = torch.randint(0, vocab, (n,), generator=generator)
    target_probs = torch.softmax(torch.randn(n, vocab, generator=generator) * 2, dim=-1)
    target_probs[0] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # 0 log 0 = 0
    target_probs[1, :3] = 0
    target_probs[1] /= target_probs[1].sum()
    gold_weights = torch.rand(n, generator=generator) * torch.tensor([1.0, 0.5, 0.1, 0.01] * 2 + [1.0])
    return draft_logits, labels, target_probs, gold_weights


def test_pard_loss_is_the_mean_cross_entropy_of_the_counted_places() -> None:
    draft_logits, labels, _, _ = _packed(0)
    loss = pard_loss(draft_logits=draft_logits, labels=labels, cfg=PardConfig()).loss
    expected = sum(-torch.log_softmax(row.double(), dim=-1)[y] for row, y in zip(draft_logits, labels, strict=True))
    torch.testing.assert_close(loss.double(), expected / len(labels), rtol=1e-6, atol=1e-7)

    empty = torch.zeros(0, 6, requires_grad=True)
    nothing = pard_loss(draft_logits=empty, labels=torch.zeros(0, dtype=torch.long), cfg=PardConfig()).loss
    nothing.backward()
    assert nothing.item() == 0 and torch.equal(empty.grad, torch.zeros(0, 6))


def _pard_cat_reference(draft_logits, labels, target_probs, gold_weights, cfg) -> torch.Tensor:
    """The docstring: ce_weight * sum w CE / sum w + kl_weight * sum w KL(p_T || q) / sum w, row by row."""
    ce, kl, total = 0, 0, float(sum(gold_weights.double()))
    for row, label, probs, weight in zip(draft_logits, labels, target_probs.double(), gold_weights, strict=True):
        log_q = torch.log_softmax(row.double(), dim=-1)
        ce = ce - weight * log_q[label]
        kl = kl + weight * sum(p * (math.log(p) - log_q[x]) for x, p in enumerate(probs.tolist()) if p > 0)
    return cfg.ce_weight * ce / total + cfg.kl_weight * kl / total


@pytest.mark.parametrize("cfg", [PardCatConfig(), PardCatConfig(ce_weight=0.7, kl_weight=0.3)], ids=str)
def test_pard_cat_loss_and_gradient_equal_the_docstring_formula(cfg: PardCatConfig) -> None:
    draft_logits, labels, target_probs, gold_weights = _packed(1)
    loss = pard_cat_loss(
        draft_logits=draft_logits, labels=labels, target_probs=target_probs, gold_weights=gold_weights, cfg=cfg
    ).loss
    (grad,) = torch.autograd.grad(loss, draft_logits)
    reference_logits = draft_logits.detach().double().requires_grad_()
    expected = _pard_cat_reference(reference_logits, labels, target_probs, gold_weights, cfg)
    (expected_grad,) = torch.autograd.grad(expected, reference_logits)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-4, atol=1e-6)


def test_gold_weights_and_target_probs_equal_the_targets_probabilities_row_by_row() -> None:
    """w(i, t) = prod_{s=1..i} p_T(x_{t+1-s} | x_{<=t-s}), p_T(. | x_{<=u}) = softmax(final_u @ lm_head.T)."""
    batch, hidden = _batch(), 16
    generator = torch.Generator().manual_seed(7)
    target_hidden = torch.randn(2, batch["input_ids"].shape[1], 1, hidden, generator=generator)
    lm_head = torch.randn(64, hidden, generator=generator) * 0.3  # weights spread over (0, 1), not all ~0
    with torch.no_grad():
        inputs = training_inputs(_draft(), batch, target_hidden, lm_head, CFG)
    probs = torch.softmax(target_hidden[:, :, 0].double() @ lm_head.double().T, dim=-1)  # [B, T, V]
    places = _places(inputs["loss_mask"])
    assert len(places) == len(inputs["gold_weights"]) == len(inputs["target_probs"])
    ids = batch["input_ids"]
    for (b, i, t), weight, target_probs in zip(places, inputs["gold_weights"], inputs["target_probs"], strict=True):
        expected = math.prod(probs[b, t - s, ids[b, t + 1 - s]].item() for s in range(1, i + 1))
        assert weight.item() == pytest.approx(expected, rel=1e-4, abs=1e-12)
        torch.testing.assert_close(target_probs.double(), probs[b, t], rtol=1e-4, atol=1e-6)
    weights = inputs["gold_weights"][inputs["loss_mask"].nonzero()[:, 1] == 0]
    assert torch.equal(weights, torch.ones_like(weights))  # block 0: w = 1


# ---- COD's draws are a function of the batch ----


def test_the_same_batch_draws_the_same_blocks_and_other_samples_draw_others() -> None:
    draft, lengths = _draft(), (15, 9)
    with torch.no_grad():
        first = training_inputs(draft, _batch(lengths, index=(5, 11)), None, torch.empty(0), CFG)
        again = training_inputs(draft, _batch(lengths, index=(5, 11)), None, torch.empty(0), CFG)
        other = training_inputs(draft, _batch(lengths, index=(6, 11)), None, torch.empty(0), CFG)
    assert torch.equal(first["loss_mask"], again["loss_mask"])
    assert torch.equal(first["draft_logits"], again["draft_logits"])
    assert not torch.equal(first["loss_mask"], other["loss_mask"])
    layouts = [cod_layout(15, 4, 0.7, 0.2, batch_generator({"index": torch.tensor(i)})) for i in ([5, 11], [11, 5])]
    assert not torch.equal(layouts[0].position, layouts[1].position)  # the order of the samples counts too


# ---- build: LoRA, the merged save, the untrained start ----


def _samples(count: int = 2, length: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        {
            "index": index,
            "input_ids": torch.randint(3, MASK, (length,), generator=generator),
            "loss_mask": torch.arange(length) >= 3,
        }
        for index in range(count)
    ]


def test_lora_trains_only_the_adapter_and_saves_a_plain_merged_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    cfg = PardDraftConfig(init=str(tiny_llama_dir), mask_token_id=MASK, k=3, lora=LoraSettings(r=4))
    samples = _samples()
    draft = build(cfg, None, samples, seed=0)
    assert isinstance(draft, PeftModel)
    before = {name: p.detach().clone() for name, p in draft.named_parameters()}
    module = DrafterModule(
        draft,
        kind=drafter_kind("pard"),
        draft_cfg=cfg,
        objectives={"pard": PardConfig()},
        optim=OptimConfig(lr=1e-2, schedule=Schedule.constant),
        lm_head=torch.empty(0),
    )
    optimizer = module.configure_optimizers()["optimizer"]
    batch = _batch((12, 12), index=(0, 1))
    batch["input_ids"] = torch.stack([sample["input_ids"] for sample in samples])
    for _ in range(2):  # lora_B starts at 0, so lora_A moves from the second step on
        loss, _ = module.forward_batch(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {name for name, p in draft.named_parameters() if not torch.equal(p, before[name])}
    lora = {name for name in before if "lora_" in name}
    assert lora and changed == lora  # and every base weight is bit-identical

    draft.eval()
    input_ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = draft(input_ids=input_ids).logits
        served = serving_copy(draft, torch.float32)
        assert type(served) is LlamaForCausalLM and not any("lora" in key for key in served.state_dict())
        torch.testing.assert_close(served(input_ids=input_ids).logits, expected, atol=1e-5, rtol=0)
        assert isinstance(draft, PeftModel) and draft.peft_config  # the copy left the training draft alone

        target = load_target(TargetConfig(path=str(tiny_llama_dir))).model
        directory = save(draft, tmp_path / "drafter", target.config, ())
        config = json.loads((directory / "config.json").read_text())
        assert config["pard_token"] == MASK and config["spd_type"] == "pard"
        assert is_saved(directory) and not (directory / "adapter_config.json").exists()
        loaded, layers = load(directory, target)
        assert type(loaded) is LlamaForCausalLM and layers == ()
        torch.testing.assert_close(loaded(input_ids=input_ids).logits, expected, atol=1e-5, rtol=0)
    assert not is_saved(tiny_llama_dir)  # a plain causal LM is not a PARD drafter


def test_num_layers_keeps_the_first_layers_and_untrained_like_rebuilds_the_start(tiny_llama_dir: Path) -> None:
    cfg = PardDraftConfig(init=str(tiny_llama_dir), mask_token_id=MASK, num_layers=1)
    draft = build(cfg, None, _samples(), seed=0)
    init = load_target(TargetConfig(path=str(tiny_llama_dir))).model
    assert draft.config.num_hidden_layers == 1 and len(draft.model.layers) == 1
    kept = {key: value for key, value in init.state_dict().items() if "layers.1." not in key}
    assert draft.state_dict().keys() == kept.keys()
    assert all(torch.equal(draft.state_dict()[key], value) for key, value in kept.items())
    untrained = untrained_like(draft, init, seed=0)
    assert untrained.config.num_hidden_layers == 1 and untrained.config.pard_token == MASK
    assert all(torch.equal(untrained.state_dict()[key], value) for key, value in kept.items())


# ---- refused inputs ----


def test_a_mask_id_found_in_the_training_data_is_refused(tiny_llama_dir: Path) -> None:
    samples = _samples(3)
    samples[2]["input_ids"][4] = MASK
    cfg = PardDraftConfig(init=str(tiny_llama_dir), mask_token_id=MASK)
    with pytest.raises(DrafterLoadError, match=r"draft.mask_token_id=63 occurs in the training data \(sample 2,"):
        build(cfg, None, samples, seed=0)


def test_more_layers_than_the_init_has_is_refused(tiny_llama_dir: Path) -> None:
    cfg = PardDraftConfig(init=str(tiny_llama_dir), mask_token_id=MASK, num_layers=3)
    with pytest.raises(DrafterLoadError, match=r"draft.num_layers=3: the draft's init has 2 decoder layers"):
        build(cfg, None, _samples(), seed=0)


def test_a_mask_id_outside_the_embedding_is_refused(tiny_llama_dir: Path) -> None:
    cfg = PardDraftConfig(init=str(tiny_llama_dir), mask_token_id=64)
    with pytest.raises(DrafterLoadError, match=r"draft.mask_token_id=64 is not a row of the draft's embedding"):
        build(cfg, None, _samples(), seed=0)


# ---- pard_llama3 end to end on tiny models ----


def _tiny_llama3(directory: Path, tokenizer, *, hidden: int, layers: int, seed: int) -> Path:
    """A random Llama with Llama-3's 128256-row vocabulary, and SmolLM2's tokenizer (49152 tokens)
    beside it: mask id 128020 is then a row the tokenizer never produces, as in Llama-3."""
    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,  # as Llama-3.2-1B
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.mark.slow
def test_pard_llama3_trains_saves_and_reports_on_tiny_models(tmp_path: Path) -> None:
    """recipe=pard_llama3 as written (bf16-mixed, K=8, r=0.7, r_min=0.2, lr 1e-5, accumulate 2, eval.k=12,
    max_length 512, batch 4), with only what this machine forces overridden:
      target.path, draft.init   tiny local models: the Hub ids (Llama-3.1-8B, Llama-3.2-1B) need the network
      trainer.*                 one CPU: the recipe asks for 8 GPUs and DeepSpeed ZeRO-1
      trainer.max_steps=2       two optimizer steps (4 batches) instead of 4 epochs
      data.*                    the local ShareGPT asset for the Hub dataset, 8 samples of it, cut at max_length
      eval.*                    2 report prompts and 1 for the hook, 8 new tokens, instead of 80 x 256
    """
    tokenizer = load_tokenizer(TargetConfig(path=str(asset_path("smollm2_gguf"))))
    target_dir = _tiny_llama3(tmp_path / "target", tokenizer, hidden=64, layers=3, seed=0)
    draft_dir = _tiny_llama3(tmp_path / "draft", tokenizer, hidden=32, layers=2, seed=1)
    run_dir = tmp_path / "run"
    argv = [
        "recipe=pard_llama3",
        f"target.path={target_dir}",
        f"draft.init={draft_dir}",
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.strategy=auto",
        "trainer.max_steps=2",
        f"data.path={asset_path('sharegpt')}",
        "data.allow_truncated=true",
        "data.max_samples=8",
        "eval.num_prompts=2",
        "eval.max_new_tokens=8",
        "eval.hook_num_prompts=1",
        f"run.dir={run_dir}",
    ]
    assert cli.train_main(argv) == 0

    drafter = run_dir / "drafter"
    assert is_saved(drafter)
    config = json.loads((drafter / "config.json").read_text())
    assert config["pard_token"] == 128020 and config["num_hidden_layers"] == 2 and config["vocab_size"] == 128256
    report = json.loads((run_dir / "eval.json").read_text())
    assert set(report) == {"trained", "untrained", "ngram"}
    assert report["trained"]["k"] == report["untrained"]["k"] == report["ngram"]["k"] == 12
    assert report["trained"]["greedy_matches_target"] == 1.0
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    # the recipe's export.format=hf: the run ends with a plain causal LM directory and its card
    exported = AutoModelForCausalLM.from_pretrained(run_dir / "export")
    assert (exported.config.pard_token, exported.config.spd_type) == (128020, "pard")
    card = (run_dir / "export" / "README.md").read_text()
    assert "base_model:" not in card  # the target here is a local directory, not a Hub id
    assert f"| {report['trained']['tau']:.3f} |" in card and '"parallel_drafting": true' in card


# ---- which target layers a PARD recipe caches ----


@pytest.mark.parametrize(
    ("objectives", "layers"),
    [(["pard"], []), (["pard_cat"], [30]), (["pard", "pard_cat"], [30])],
    ids=["pard: none", "pard_cat: the final state", "both"],
)
def test_only_an_objective_that_takes_the_teacher_makes_pard_read_the_target(objectives, layers) -> None:
    """PARD-1 trains from token ids (no cache, no target forward); PARD-2 needs the final normed
    state, from which the target's distribution and gold-token probabilities follow."""
    overrides = ["~objective.pard", *[f"+objective.{name}={{}}" for name in objectives]]
    cfg = compose_recipe("pard_smollm2", overrides)
    target = SimpleNamespace(model=SimpleNamespace(config=SimpleNamespace(num_hidden_layers=30)))
    assert target_layers(cfg, target) == (layers, ())


@pytest.mark.slow
def test_pard_smollm2_window_trains_a_window_head_on_a_frozen_pard_drafter_and_serves_it(tmp_path: Path) -> None:
    """recipe=pard_smollm2_window as written (a saved PARD drafter frozen, K=8 with every block kept,
    stop_head on greedy verdicts, eval.window=policy), on tiny models: the draft is narrower than the
    target, so the head must read the draft's hidden size; the teacher is the target's final layer.
    Samples are cut to 96 tokens and batches to 2: with Llama-3's 128k vocabulary, 8 whole blocks of
    512 tokens would hold 16 GB of logits."""
    tokenizer = load_tokenizer(TargetConfig(path=str(asset_path("smollm2_gguf"))))
    target_dir = _tiny_llama3(tmp_path / "target", tokenizer, hidden=64, layers=3, seed=0)
    draft_dir = _tiny_llama3(tmp_path / "draft", tokenizer, hidden=32, layers=2, seed=1)
    run_dir = tmp_path / "run"
    argv = [
        "recipe=pard_smollm2_window",
        f"target.path={target_dir}",
        f"draft.init={draft_dir}",
        f"cache.dir={tmp_path / 'cache'}",
        "cache.layers=[3]",
        "trainer.max_steps=2",
        "data.regenerate=false",
        "data.max_samples=8",
        "data.max_length=96",
        "data.batch_size=2",
        "eval.num_prompts=2",
        "eval.max_new_tokens=8",
        "eval.hook_num_prompts=1",
        "eval.ngram=0",
        f"run.dir={run_dir}",
    ]
    assert cli.train_main(argv) == 0
    drafter = run_dir / "drafter"
    head = json.loads((drafter / "window" / "config.json").read_text())
    assert head["hidden_size"] == 32 and head["threshold"] == pytest.approx(0.1)
    start = AutoModelForCausalLM.from_pretrained(draft_dir).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(drafter).state_dict()
    assert all(torch.equal(start[name].to(tensor.dtype), tensor) for name, tensor in saved.items())  # frozen
    report = json.loads((run_dir / "eval.json").read_text())
    assert set(report) == {"trained", "trained, fixed K"}
    assert report["trained"]["window"] == "policy" and report["trained, fixed K"]["window"] == "fixed"
    assert all(row["greedy_matches_target"] == 1.0 and row["k"] == 8 for row in report.values())
    assert sum(report["trained"]["drafted_histogram"]) == report["trained"]["verify_steps"]
