"""specdec.data_prep: real assets, target loading, sources, chat templates and loss masks, and the
hidden-state cache (writer and reader)."""

from specdec.data_prep.assets import ASSETS, asset_path
from specdec.data_prep.cache import CacheConfig, CacheDType, CacheError, HiddenStateCache
from specdec.data_prep.prep import PrepSummary, cache_key, prepare_cache, target_hidden_states, training_samples
from specdec.data_prep.sources import Conversation, DataConfig, SourceError, Turn, read_conversations
from specdec.data_prep.target import (
    DType,
    Target,
    TargetConfig,
    TargetLoadError,
    check_same_tokenizer,
    load_target,
    load_target_config,
    load_tokenizer,
)
from specdec.data_prep.templates import Sample, TemplateError, tokenize_conversation

__all__ = [
    "ASSETS",
    "CacheConfig",
    "CacheDType",
    "CacheError",
    "Conversation",
    "DType",
    "DataConfig",
    "HiddenStateCache",
    "PrepSummary",
    "Sample",
    "SourceError",
    "Target",
    "TargetConfig",
    "TargetLoadError",
    "TemplateError",
    "Turn",
    "asset_path",
    "cache_key",
    "check_same_tokenizer",
    "load_target",
    "load_target_config",
    "load_tokenizer",
    "prepare_cache",
    "read_conversations",
    "target_hidden_states",
    "tokenize_conversation",
    "training_samples",
]
