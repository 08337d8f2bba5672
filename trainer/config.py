"""The recipe schema: one dataclass per config group, composed into `SpecdecConfig`.

A recipe (recipes/NAME.yaml) names `schema` first in its defaults list and fills in what differs;
Hydra composes it with the command line's `key=value` overrides and this module checks the result.
`draft` and `objective` are chosen by name, so their fields come from the dataclass registered
under that name (specdec.trainer.drafters, specdec.trainer.objectives); everything else is fixed by
the schema. Every problem is
collected and reported at once, with its dotted key, as a `RecipeError`.
"""

from dataclasses import dataclass, field, fields
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from specdec.data_prep import CacheConfig, DataConfig, DType, TargetConfig, asset_path
from specdec.trainer.drafters import DRAFTERS
from specdec.trainer.objectives import OBJECTIVES

# `${asset:NAME}` in a recipe is the path of a file shipped in a PyPI wheel (specdec.data_prep.assets).
OmegaConf.register_new_resolver("asset", lambda name: str(asset_path(name)), replace=True)


class RecipeError(ValueError):
    pass


# ---- drafters and objectives, chosen by name ----
# Each registers with its config dataclass (specdec.trainer.drafters, specdec.trainer.objectives).


def draft_configs() -> dict[str, type]:
    """draft.name -> its dataclass."""
    return {name: kind.config for name, kind in DRAFTERS.items()}


def objective_configs() -> dict[str, type]:
    """objective name -> its dataclass."""
    return {name: objective.config for name, objective in OBJECTIVES.items()}


# ---- the loop, the optimizer, eval, export, the run ----


@dataclass
class TrainerConfig:
    """Keyword arguments of `lightning.Trainer`, passed through unchanged."""

    accelerator: str = "auto"
    devices: Any = "auto"  # int, list of ids, or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # "ddp", "fsdp", "deepspeed_stage_1", ...
    precision: str = "32-true"  # "bf16-mixed", "bf16-true", ...
    max_steps: int = -1
    max_epochs: int | None = None
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    log_every_n_steps: int = 10


class Schedule(str, Enum):
    constant = "constant"
    cosine = "cosine"


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-4
    schedule: Schedule = Schedule.cosine
    warmup_steps: int = 0
    weight_decay: float = 0.0


@dataclass
class CompareConfig:
    """One row of a specdec-eval comparison: a drafter, how it is served, and its draft shape."""

    name: str = MISSING  # its row in the report
    # a drafter saved by specdec-train (run.dir/drafter), or a causal LM (directory or Hub id) that
    # shares the target's tokenizer
    drafter: str = MISSING
    untrained: bool = False  # the saved drafter's untrained start instead (the kind's untrained_like)
    mode: str | None = None  # a serving mode of the drafter's kind (its `modes`); None = its default session
    k: int | None = None  # draft tokens per verify step (a tree's depth); None = eval.k
    tree_width: int | None = None  # 1 = a chain, W > 1 = a tree; None = eval.tree_width
    tree_min_confidence: float | None = None  # a tree's dynamic size; None = eval.tree_min_confidence
    window: str | None = None  # fixed | policy (k is then the most it drafts); None = eval.window
    window_threshold: float | None = None  # the policy's h instead of the one it was trained with
    ngram_first: bool | None = None  # the hybrid: n-gram lookup where it finds a draft, this drafter elsewhere


@dataclass
class EvalConfig:
    """Tau measured by the engine and verifier of specdec.eval, in specdec-eval and the eval hook."""

    # specdec-eval: a drafter saved by specdec-train (run.dir/drafter, measured beside its untrained
    # start), or a causal LM (directory or Hub id) that shares the target's tokenizer
    drafter: str | None = None
    bench: str = "mtbench"  # mtbench | humaneval | sharegpt | a jsonl file of prompts
    num_prompts: int = 32
    max_new_tokens: int = 128
    k: int = 4  # draft tokens per verify step (the depth of a tree)
    tree_width: int = 1  # 1 = chain drafts; W > 1 = trees of k levels of W nodes (EAGLE-style top-k)
    # EAGLE-2's dynamic tree: keep the nodes whose path the drafter gives at least this probability
    # (the best one always), so each row and step verifies a tree sized by the drafter's confidence;
    # 0 = every node of the k x tree_width tree
    tree_min_confidence: float = 0.0
    # fixed: every chain has k tokens; policy: the drafter's learned stop policy (saved beside it by a
    # run with objective.stop_head or window_rl) drafts up to k, per row and step
    window: str = "fixed"
    # the zero-training baseline measured beside the drafter in the training report and specdec-eval:
    # prompt lookup (n-gram) drafting, as transformers' prompt_lookup_num_tokens; 0 = not measured
    ngram: int = 2
    # the hybrid: n-gram lookup drafts (up to 8, as the lookup row) where it finds a draft, the drafter
    # elsewhere (an EAGLE-3 or CTC chain of up to k, windowed or not); for the trained drafter of the
    # training report and specdec-eval's chain rows
    ngram_first: bool = False
    # benches the training report also measures (the trained drafter beside the n-gram baseline)
    extra_benches: list[str] = field(default_factory=list)
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    batch_size: int = 1  # prompts decoded together
    every_n_steps: int = 100  # eval hook period during training
    hook_num_prompts: int = 8  # prompts the hook decodes: the bench's next ones after the num_prompts of the report
    out: str = "${run.dir}/eval.json"  # the report; the acceptance plot goes beside it as .png
    # when given, specdec-eval measures these rows instead of eval.drafter, against one baseline
    compare: list[CompareConfig] = field(default_factory=list)
    # the target layers (HF output_hidden_states ids) an EAGLE-3 drafter directory reads, for one
    # that records none or records them wrongly; None = what the directory records, else [2, N//2, N-3]
    target_layers: list[int] | None = None


class ExportFormat(str, Enum):
    sglang = "sglang"  # native EAGLE-3 directory, layer ids in SGLang's meaning
    speculators = "speculators"  # vllm-project/speculators directory (vLLM)
    hf = "hf"  # plain transformers causal LM (PARD, plain drafters)


@dataclass
class ExportConfig:
    """specdec-export (and the end of specdec-train, when `format` is set): the drafter written for an
    engine, with a model card, and optionally pushed to the Hub."""

    format: ExportFormat | None = None  # None: specdec-train does not export; specdec-export needs one
    dir: str = "${run.dir}/export"
    drafter: str | None = None  # a drafter directory or a checkpoint (.ckpt); None = run.dir/drafter
    # the target's Hub id, for the card's base_model and the speculators verifier; None = target.path
    # when it is a Hub id (a local target leaves base_model out)
    base_model: str | None = None
    # eval JSONs (paths or glob patterns) whose rows measured this drafter: the card's tau table
    reports: list[str] = field(default_factory=lambda: ["${run.dir}/eval*.json"])
    dtype: DType | None = None  # of the weights written; None = target.dtype
    license: str | None = None  # the card's license; None = left out
    push_to: str | None = None  # ORG/NAME on the Hub; None = no push
    private: bool = True  # a new repo is private unless this is false
    revision: str | None = None  # the branch pushed to (created from main when missing); None = main
    overwrite: bool = False  # push into a repo that exists (its files are replaced)
    dry_run: bool = False  # list the files and the repo the push would write, with no network


@dataclass
class RunConfig:
    dir: str = MISSING  # everything of a run goes here: config.yaml, cache, logs, checkpoints
    seed: int = 0
    checkpoint_every_n_steps: int = 100  # run.dir/checkpoints/last.ckpt, which a rerun with the same run.dir resumes
    # TensorBoard's run: run.dir/logs when null, else run.dir/logs/<log_version> (slurm/train.sbatch: the job id)
    log_version: str | None = None


@dataclass
class SpecdecConfig:
    target: TargetConfig = field(default_factory=lambda: TargetConfig(path=MISSING))
    draft: Any = field(default_factory=dict)  # one of draft_configs(), by draft.name
    data: DataConfig = field(default_factory=lambda: DataConfig(path=MISSING))
    cache: CacheConfig = field(default_factory=CacheConfig)
    objective: Any = field(default_factory=dict)  # name -> one of objective_configs()
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    run: RunConfig = field(default_factory=RunConfig)


def _schema_node() -> DictConfig:
    node = OmegaConf.structured(SpecdecConfig)
    node.draft = {}
    node.objective = {}
    # Fields of the named draft and objectives are checked by validate(), against their own
    # dataclass; without this Hydra would demand `+draft.k=...` for keys a recipe did not set.
    OmegaConf.set_struct(node.draft, False)
    OmegaConf.set_struct(node.objective, False)
    return node


ConfigStore.instance().store(name="schema", node=_schema_node())


def _typed(kind: type, values: dict[str, Any], key: str, problems: list[str]) -> Any:
    """`values` checked against the dataclass `kind`; problems are appended with their dotted key."""
    node = OmegaConf.structured(kind)
    for name, value in values.items():
        try:
            node.merge_with({name: value})
        except OmegaConfBaseException as error:
            if name not in node:
                allowed = ", ".join(f.name for f in fields(kind))
                problems.append(f"{key}.{name}: unknown key; {kind.__name__} has: {allowed}")
            else:
                problems.append(f"{key}.{name}: {str(error).splitlines()[0]}")
    for missing in sorted(OmegaConf.missing_keys(node)):
        problems.append(f"{key}.{missing}: required, but the recipe does not set it")
    return node


# (dotted key, check, what is expected): values that type-check but make no sense.
_RANGES = [
    ("target.random_init", lambda v: v is None or OmegaConf.is_dict(v), "null or a mapping of config fields"),
    ("data.max_length", lambda v: v > 0, "a positive number of tokens"),
    ("data.regenerate_max_new_tokens", lambda v: v > 0, "a positive number of tokens"),
    ("data.regenerate_temperature", lambda v: v >= 0, "0 (greedy) or a positive temperature"),
    ("data.regenerate_batch_size", lambda v: v > 0, "a positive number of conversations"),
    ("data.max_turns", lambda v: v is None or v > 0, "null (every turn) or a positive number of turns"),
    ("cache.shard_tokens", lambda v: v > 0, "a positive number of tokens"),
    ("cache.batch_tokens", lambda v: v > 0, "a positive number of tokens"),
    ("data.batch_size", lambda v: v > 0, "a positive number of sequences"),
    ("data.max_samples", lambda v: v is None or v > 0, "null or a positive count"),
    ("optim.lr", lambda v: v > 0, "a positive learning rate"),
    ("draft.frames", lambda v: v > 0, "at least one query slot"),
    ("objective.ctc.label_len", lambda v: v > 0, "at least one label per window"),
    ("objective.stop_head.labels", lambda v: v in ("soft", "greedy"), "soft (min(1, p/q)) or greedy"),
    ("objective.stop_head.threshold", lambda v: 0 < v <= 1, "a probability in (0, 1]"),
    ("objective.window_rl.group_size", lambda v: v >= 2, "at least 2 rollouts (advantages are relative)"),
    ("objective.window_rl.temperature", lambda v: v > 0, "a positive temperature"),
    ("objective.window_rl.sync_every", lambda v: v >= 1, "at least 1"),
    ("objective.window_rl.clip", lambda v: v > 0, "a positive clip range"),
    ("eval.window", lambda v: v in ("fixed", "policy"), "fixed (eval.k tokens) or policy (the learned window)"),
    ("optim.warmup_steps", lambda v: v >= 0, "zero or more steps"),
    ("eval.k", lambda v: v >= 1, "at least one draft token"),
    ("eval.num_prompts", lambda v: v >= 1, "at least one prompt"),
    ("eval.temperature", lambda v: v >= 0, "0 (greedy) or a positive temperature"),
    ("eval.every_n_steps", lambda v: v >= 1, "at least 1"),
    ("eval.hook_num_prompts", lambda v: v >= 1, "at least one prompt"),
    ("run.checkpoint_every_n_steps", lambda v: v >= 1, "at least 1"),
    ("eval.tree_width", lambda v: v >= 1, "1 (a chain) or more"),
    ("eval.tree_min_confidence", lambda v: 0 <= v < 1, "a probability in [0, 1): 0 keeps the whole tree"),
    ("eval.top_p", lambda v: 0 < v <= 1, "a probability in (0, 1]"),
    ("eval.batch_size", lambda v: v >= 1, "at least one prompt"),
    ("eval.max_new_tokens", lambda v: v >= 1, "at least one token"),
    # fields of one drafter kind (PARD's); a recipe of another kind has no such key and skips them
    ("draft.k", lambda v: v >= 1, "at least one block"),
    ("draft.r", lambda v: 0 < v <= 1, "a keep ratio in (0, 1]"),
    ("draft.r_min", lambda v: 0 <= v <= 1, "a keep ratio in [0, 1]"),
    ("draft.num_layers", lambda v: v is None or v >= 1, "null (every layer) or at least one layer"),
    ("draft.lora.r", lambda v: v >= 0, "0 (no adapter) or a positive rank"),
]


def validate(cfg: DictConfig) -> SpecdecConfig:
    """Check a composed recipe and return it as typed dataclasses, or raise one RecipeError."""
    # Interpolations first: a ${asset:...} whose wheel is missing says how to install it.
    problems = _interpolation_problems(cfg, prefix="")
    if problems:
        raise RecipeError("; ".join(problems))
    OmegaConf.resolve(cfg)
    problems = [f"{key}: required, but the recipe does not set it" for key in sorted(_missing(cfg))]

    drafts, objective_types = draft_configs(), objective_configs()
    draft_name = cfg.draft.get("name")
    if draft_name not in drafts:
        problems.append(f"draft.name: {draft_name!r} is not a drafter; choose one of {', '.join(drafts)}")
        draft = None
    else:
        draft = _typed(drafts[draft_name], OmegaConf.to_container(cfg.draft), "draft", problems)

    if not cfg.objective:
        problems.append(f"objective: empty; give at least one of {', '.join(objective_types)} with a weight")
    objectives = {}
    for name, values in cfg.objective.items():
        if name not in objective_types:
            problems.append(f"objective.{name}: not an objective; choose from {', '.join(objective_types)}")
            continue
        if values is None:
            problems.append(
                f"objective.{name}: null; give its fields ({{}} for the defaults) or drop it with ~objective.{name}"
            )
            continue
        objectives[name] = _typed(objective_types[name], OmegaConf.to_container(values), f"objective.{name}", problems)
        if objectives[name].weight <= 0:
            problems.append(f"objective.{name}.weight: {objectives[name].weight}; expected a positive weight")

    kind = DRAFTERS.get(draft_name)
    for name in objectives:
        needs = set(OBJECTIVES[name].inputs) if name in OBJECTIVES else set()
        if kind is not None and not needs <= kind.inputs:
            problems.append(
                f"objective.{name}: takes {', '.join(sorted(needs - kind.inputs))}, which draft.name={draft_name} "
                f"does not give (it gives {', '.join(sorted(kind.inputs))}); choose another objective or drafter"
            )

    if kind is not None and not problems:  # the pair, once each checks out on its own
        problems += kind.check(OmegaConf.to_object(draft), {n: OmegaConf.to_object(o) for n, o in objectives.items()})

    for key, check, expected in _RANGES:
        value = OmegaConf.select(cfg, key)
        if value is not None and value != MISSING and not check(value):
            problems.append(f"{key}: {value!r}; expected {expected}")

    if problems:
        raise RecipeError("; ".join(problems))
    typed = OmegaConf.to_object(cfg)
    typed.draft = OmegaConf.to_object(draft)
    typed.objective = {name: OmegaConf.to_object(node) for name, node in objectives.items()}
    return typed


def _missing(cfg: DictConfig) -> set[str]:
    return {key for key in OmegaConf.missing_keys(cfg) if not key.startswith(("draft.", "objective."))}


def _interpolation_problems(node: DictConfig | ListConfig, prefix: str) -> list[str]:
    problems = []
    keys = range(len(node)) if isinstance(node, ListConfig) else node.keys()
    for key in keys:
        full_key = f"{prefix}[{key}]" if isinstance(node, ListConfig) else f"{prefix}{key}"
        if OmegaConf.is_missing(node, key):
            continue  # reported by validate() with the other missing values
        try:
            value = node[key]
        except OmegaConfBaseException as error:
            problems.append(f"{full_key}: {str(error.__cause__ or error).splitlines()[0]}")
            continue
        if isinstance(value, (DictConfig, ListConfig)):
            problems += _interpolation_problems(value, f"{full_key}." if isinstance(value, DictConfig) else full_key)
    return problems


# ---- recipes ----


def recipe_dir() -> Path:
    return Path(str(resources.files("specdec.recipes")))


def recipe_names() -> list[str]:
    return sorted(path.stem for path in recipe_dir().glob("*.yaml"))


def recipe_summary(path: Path) -> str:
    """The recipe's first comment line: what it trains."""
    for line in path.read_text().splitlines():
        if line.startswith("#") and not line.startswith("# @"):
            return line.lstrip("# ").strip()
    return ""


def _recipe_path(recipe: str) -> Path:
    if recipe.endswith((".yaml", ".yml")):
        path = Path(recipe).expanduser().resolve()
        if not path.is_file():
            raise RecipeError(f"recipe={recipe}: no such file ({path}).")
        return path
    if recipe not in recipe_names():
        raise RecipeError(
            f"recipe={recipe}: no such recipe. The recipes are: {', '.join(recipe_names())} "
            "(or give the path of your own .yaml, whose defaults list starts with `schema`)."
        )
    return recipe_dir() / f"{recipe}.yaml"


def _override_problem(error: Exception) -> str:
    cause = error.__cause__
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)) and cause.full_key:
        kind = cause.object_type
        allowed = f"; {kind.__name__} has: {', '.join(f.name for f in fields(kind))}" if kind else ""
        return f"{cause.full_key}: unknown key{allowed}"
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        return f"{cause.full_key}: {str(cause).splitlines()[0]}"
    return str(error).splitlines()[0]


def compose_recipe(recipe: str, overrides: list[str]) -> SpecdecConfig:
    """A recipe name (or .yaml path) plus `key=value` overrides, composed by Hydra and validated."""
    path = _recipe_path(recipe)
    # The compose API, not @hydra.main: no change of working directory and no outputs/ folders.
    with initialize_config_dir(config_dir=str(path.parent), version_base=None):
        try:
            cfg = compose(config_name=path.stem, overrides=overrides)
        except HydraException as error:
            raise RecipeError(f"recipe={recipe}: {_override_problem(error)}") from None
        except Exception as error:  # OmegaConf can fail outside its own exception types on odd overrides
            raise RecipeError(f"recipe={recipe}: could not apply {' '.join(overrides)}: {error}") from None
    if OmegaConf.get_type(cfg) is not SpecdecConfig:
        raise RecipeError(
            f"recipe={recipe} ({path}) is not checked against the schema: its first lines must be "
            "`defaults: [schema, _self_]`."
        )
    try:
        return validate(cfg)
    except RecipeError as error:
        raise RecipeError(f"recipe={recipe}: {error}") from None


def to_yaml(cfg: SpecdecConfig) -> str:
    """The resolved config as YAML that is itself a recipe (`recipe=run_dir/config.yaml`)."""
    return "defaults: [schema, _self_]\n" + OmegaConf.to_yaml(OmegaConf.structured(cfg))
