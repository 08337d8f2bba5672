"""specdec.data_prep: real assets, target loading (and, next, sources, templates and the cache)."""

from specdec.data_prep.assets import ASSETS, asset_path
from specdec.data_prep.target import (
    DType,
    Target,
    TargetConfig,
    TargetLoadError,
    check_same_tokenizer,
    load_target,
    load_tokenizer,
)

__all__ = [
    "ASSETS",
    "DType",
    "Target",
    "TargetConfig",
    "TargetLoadError",
    "asset_path",
    "check_same_tokenizer",
    "load_target",
    "load_tokenizer",
]
