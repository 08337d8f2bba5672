"""The console scripts `specdec-prep`, `specdec-train`, `specdec-eval` and `specdec-export`.

Each takes `recipe=NAME` (or `recipe=PATH.yaml`) and `group.key=value` overrides, composes and
checks the config (specdec.trainer.config), writes it to `run.dir/config.yaml`, and runs its
stage. Bad input exits with status 2 and one message, never a traceback.
"""

import logging
import sys
from pathlib import Path

from specdec.data_prep import (
    CacheError,
    SourceError,
    TargetConfig,
    TargetLoadError,
    TemplateError,
    check_same_tokenizer,
    load_target,
    prepare_cache,
)
from specdec.eval import CausalLMDrafter
from specdec.eval.drafters import DrafterLoadError
from specdec.eval.evaluate import EvalReport, evaluate_drafters, write_reports
from specdec.eval.prompts import PromptError, load_prompts
from specdec.trainer.config import (
    RecipeError,
    SpecdecConfig,
    compose_recipe,
    recipe_dir,
    recipe_names,
    recipe_summary,
    to_yaml,
)
from specdec.trainer.drafters import saved_kind
from specdec.trainer.module import TrainingDiverged
from specdec.trainer.registry import UnknownName
from specdec.trainer.train import eos_token_ids, spec_config, train

log = logging.getLogger("specdec")

EXIT_BAD_INPUT = 2

GROUPS = {
    "target": "the frozen target: path (Hub id, directory or .gguf), revision, gguf_file, dtype",
    "draft": "the drafter, chosen by draft.name, and its own fields",
    "data": "conversations: path, format, max_samples, allow_truncated, on_bad_row, max_length, regenerate, ...",
    "cache": "the hidden-state cache: dir, layers, dtype (bf16, fp8), overwrite, shard_tokens, batch_tokens",
    "objective": "objectives by name, each with a weight and its own fields",
    "trainer": "arguments of lightning.Trainer (devices, strategy, precision, max_steps, ...)",
    "optim": "AdamW and its schedule: lr, schedule, warmup_steps, weight_decay",
    "eval": "tau by the verifier: drafter, bench, num_prompts, max_new_tokens, k, tree_width, temperature, out",
    "export": "the exported drafter: format (sglang, speculators, hf), dir",
    "run": "dir (everything of a run goes there) and seed",
}


def _usage(prog: str, purpose: str) -> str:
    recipes = "\n".join(f"  {name:<16} {recipe_summary(recipe_dir() / f'{name}.yaml')}" for name in recipe_names())
    groups = "\n".join(f"  {name:<10} {text}" for name, text in GROUPS.items())
    return (
        f"usage: {prog} recipe=NAME|PATH.yaml [group.key=value ...]\n\n{purpose}\n\n"
        f"recipes:\n{recipes}\n\nconfig groups:\n{groups}\n\n"
        f"example: {prog} recipe=tiny trainer.max_steps=4 run.dir=runs/try\n"
    )


def _split_argv(argv: list[str]) -> tuple[str, list[str]]:
    recipes = [arg.split("=", 1)[1] for arg in argv if arg.startswith("recipe=")]
    if len(recipes) != 1:
        found = "none" if not recipes else ", ".join(recipes)
        raise RecipeError(
            f"give exactly one recipe=NAME (found {found}). The recipes are: {', '.join(recipe_names())}."
        )
    return recipes[0], [arg for arg in argv if not arg.startswith("recipe=")]


def _configure(prog: str, argv: list[str]) -> SpecdecConfig:
    recipe, overrides = _split_argv(argv)
    cfg = compose_recipe(recipe, overrides)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    log.info("%s: recipe %s, resolved config in %s", prog, recipe, run_dir / "config.yaml")
    return cfg


def _main(prog: str, purpose: str, stage, argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(arg in ("-h", "--help") for arg in argv):
        print(_usage(prog, purpose))
        return 0 if argv else EXIT_BAD_INPUT
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = _configure(prog, argv)
        stage(cfg)
    except (
        RecipeError,
        TargetLoadError,
        FileNotFoundError,
        SourceError,
        TemplateError,
        CacheError,
        PromptError,
        TrainingDiverged,
        DrafterLoadError,
        UnknownName,
    ) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _say_not_built(stage: str, issue: int) -> None:
    print(f"{stage} is not built yet (issue #{issue}); the recipe checked out and its config is saved.")


def _print_reports(reports: dict[str, EvalReport], bench: str) -> None:
    first = next(iter(reports.values()))
    print(f"{bench}: {first.num_prompts} prompts, k={first.k}, {first.device}")
    print(f"  autoregressive {first.ar_tokens_per_s:.1f} tokens/s")
    for name, report in reports.items():
        matches = (
            ""
            if report.greedy_matches_target is None
            else f", output = target's greedy: {report.greedy_matches_target:.0%}"
        )
        print(
            f"  {name:<10} tau {report.tau:.3f}  accepted per position "
            + " ".join(f"{r:.2f}" for r in report.accept_rate_per_pos)
            + f"  {report.tokens_per_s:.1f} tokens/s, speedup {report.speedup:.2f}x{matches}"
        )


def _train(cfg: SpecdecConfig) -> None:
    result = train(cfg)
    print(
        f"trained {result.steps} steps on {result.train_tokens} tokens in {result.train_seconds / 60:.1f} min; "
        f"drafter {result.drafter_dir}"
    )
    if result.reports:
        _print_reports(result.reports, cfg.eval.bench)
        print(f"  report {cfg.eval.out}, plot {Path(cfg.eval.out).with_suffix('.png')}")


def _prep(cfg: SpecdecConfig) -> None:
    target = load_target(cfg.target, seed=cfg.run.seed)
    layers = cfg.cache.layers or cfg.draft.target_layers(target.model.config.num_hidden_layers)
    summary = prepare_cache(
        target, target_cfg=cfg.target, data_cfg=cfg.data, cache_cfg=cfg.cache, layers=layers, seed=cfg.run.seed
    )
    state = "complete" if summary.complete else "this rank is done; manifest.json follows when every rank is"
    truncated = f", source cut off at byte {summary.truncated_at_byte}" if summary.truncated_at_byte else ""
    print(f"cache {summary.cache_dir} ({state})")
    print(f"  {summary.samples} samples, {summary.tokens} tokens, {summary.shards} shards, layers {layers}")
    print(
        f"  {summary.bytes_on_disk / 1e6:.1f} MB on disk, "
        f"{summary.bytes_on_disk / summary.tokens:.0f} bytes per token ({cfg.cache.dtype.value})"
    )
    print(
        f"  dropped {summary.dropped_samples} conversations without assistant tokens, "
        f"skipped {summary.skipped_rows} bad rows{truncated}"
    )
    print(f"  target forward with writes: {summary.forward_tokens_per_s:.0f} tokens/s")


def prep_main(argv: list[str] | None = None) -> int:
    purpose = "Run the frozen target over the training data and cache its hidden states on disk."
    return _main("specdec-prep", purpose, _prep, argv)


def train_main(argv: list[str] | None = None) -> int:
    purpose = "Train a drafter against the frozen target; tau is measured by the verifier as it trains."
    return _main("specdec-train", purpose, _train, argv)


def _eval(cfg: SpecdecConfig) -> None:
    if cfg.eval.drafter is None:
        raise RecipeError(
            "eval.drafter: required; give a drafter trained by specdec-train (run.dir/drafter) or a causal LM "
            "(directory or Hub id) that shares the target's tokenizer, e.g. eval.drafter=runs/smollm2_eagle3/drafter."
        )
    target = load_target(cfg.target, seed=cfg.run.seed)
    prompts = load_prompts(
        cfg.eval.bench, target.tokenizer, num_prompts=cfg.eval.num_prompts, chat_template=cfg.data.chat_template
    )
    kind = saved_kind(cfg.eval.drafter)
    if kind is not None:  # trained by specdec-train: compare with its untrained start
        trained, layers = kind.load(Path(cfg.eval.drafter), target.model)
        untrained = kind.untrained_like(trained, target.model, cfg.run.seed)
        drafters = {"trained": kind.session(trained, layers), "untrained": kind.session(untrained, layers)}
    else:
        draft = load_target(TargetConfig(path=cfg.eval.drafter, dtype=cfg.target.dtype), key="eval.drafter")
        check_same_tokenizer(
            target.tokenizer, draft.tokenizer, target_name=cfg.target.path, draft_name=cfg.eval.drafter
        )
        drafters = {"drafter": CausalLMDrafter(draft.model)}
    reports = evaluate_drafters(
        target.model,
        drafters,
        prompts,
        cfg=spec_config(cfg),
        eos_token_ids=eos_token_ids(target),
        batch_size=cfg.eval.batch_size,
        seed=cfg.run.seed,
    )
    out = Path(cfg.eval.out)
    write_reports(reports, out, title=f"{cfg.eval.bench}, k={cfg.eval.k}")
    _print_reports(reports, cfg.eval.bench)
    print(f"  report {out}, plot {out.with_suffix('.png')}")


def eval_main(argv: list[str] | None = None) -> int:
    purpose = "Measure a drafter's tau, acceptance per position and speedup with the real verifier."
    return _main("specdec-eval", purpose, _eval, argv)


def export_main(argv: list[str] | None = None) -> int:
    purpose = "Export a trained drafter for vLLM or SGLang, with a model card, and push it to the Hub."
    return _main("specdec-export", purpose, lambda cfg: _say_not_built("Export", 18), argv)
