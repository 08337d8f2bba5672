"""specdec.recipes: the YAML recipes `specdec-* recipe=NAME` composes (schema: specdec.trainer.config)."""
