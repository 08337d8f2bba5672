"""specdec.trainer: the recipe schema and the console scripts (next: objectives, the module, export)."""

from specdec.trainer.config import RecipeError, SpecdecConfig, compose_recipe, recipe_names, validate

__all__ = ["RecipeError", "SpecdecConfig", "compose_recipe", "recipe_names", "validate"]
