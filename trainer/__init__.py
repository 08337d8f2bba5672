"""specdec.trainer: the recipe schema, drafter kinds and objectives (each registered by name), the
Lightning module and data module, the training stage, benchmarks and the console scripts."""

from specdec.trainer.config import RecipeError, SpecdecConfig, compose_recipe, recipe_names, validate

__all__ = ["RecipeError", "SpecdecConfig", "compose_recipe", "recipe_names", "validate"]
