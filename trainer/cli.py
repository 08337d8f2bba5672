"""The console scripts `specdec-prep`, `specdec-train`, `specdec-eval` and `specdec-export`.

Each takes `recipe=NAME` (or `recipe=PATH.yaml`) and `group.key=value` overrides, composes and
checks the config (specdec.trainer.config), writes it to `run.dir/config.yaml` (specdec-eval and
specdec-export to their own file beside it), and runs its stage. Bad input exits with status 2 and
one message, never a traceback.
"""

import logging
import math
import sys
from dataclasses import replace
from pathlib import Path

from torch import nn

from specdec.data_prep import (
    CacheError,
    SourceError,
    Target,
    TargetConfig,
    TargetLoadError,
    TemplateError,
    check_same_tokenizer,
    load_target,
    prepare_cache,
)
from specdec.eval import CausalLMDrafter
from specdec.eval.drafters import Drafter, DrafterLoadError
from specdec.eval.drafters.hybrid import HybridDrafter
from specdec.eval.evaluate import EvalReport, evaluate_drafters, write_reports
from specdec.eval.prompts import PromptError, load_prompts
from specdec.eval.window import LearnedWindow, has_window_head, load_window_head
from specdec.trainer.config import (
    CompareConfig,
    RecipeError,
    SpecdecConfig,
    compose_recipe,
    recipe_dir,
    recipe_names,
    recipe_summary,
    to_yaml,
)
from specdec.trainer.drafters import drafter_name, saved_kind
from specdec.trainer.export import export
from specdec.trainer.hub import HubError
from specdec.trainer.module import TrainingDiverged
from specdec.trainer.registry import UnknownName
from specdec.trainer.requeue import JobRequeued
from specdec.trainer.strategies import launched_process_group
from specdec.trainer.train import NGRAM_K, eos_token_ids, ngram_drafter, spec_config, target_layers, train

log = logging.getLogger("specdec")

EXIT_BAD_INPUT = 2

GROUPS = {
    "target": "the frozen target: path (Hub id, directory or .gguf), revision, gguf_file, dtype",
    "draft": "the drafter, chosen by draft.name, and its own fields",
    "data": "conversations: path, format, max_samples, allow_truncated, on_bad_row, max_length, regenerate, ...",
    "cache": "the hidden-state cache: dir, layers, dtype (bf16, fp8), overwrite, shard_tokens, batch_tokens",
    "objective": "objectives by name, each with a weight and its own fields",
    "trainer": "arguments of lightning.Trainer (devices, num_nodes, precision, max_steps, ...); strategy: auto, "
    "ddp, fsdp, deepspeed_stage_1/2/3 (and _2_offload, _3_offload)",
    "optim": "AdamW and its schedule: lr, schedule, warmup_steps, weight_decay",
    "eval": "tau by the verifier: drafter (or compare: rows of drafter (or ngram), untrained, mode, k, tree_width, "
    "tree_min_confidence, window, window_threshold), bench, num_prompts, max_new_tokens, k, tree_width, "
    "tree_min_confidence (EAGLE-2's dynamic tree), window (fixed, policy), ngram, extra_benches, temperature, "
    "target_layers, out",
    "export": "the exported drafter: format (sglang, speculators, hf), dir, drafter, base_model, reports, dtype, "
    "license; the push: push_to, private, revision, overwrite, dry_run",
    "run": "dir (everything of a run goes there), seed, checkpoint_every_n_steps, log_version (TensorBoard run)",
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


# the resolved config each stage writes in run.dir: the training's stays config.yaml, the recipe of
# the drafter there, whatever is measured or exported from it later
CONFIG_FILES = {"specdec-eval": "eval-config.yaml", "specdec-export": "export-config.yaml"}


def _configure(prog: str, argv: list[str]) -> SpecdecConfig:
    recipe, overrides = _split_argv(argv)
    cfg = compose_recipe(recipe, overrides)
    run_dir = Path(cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CONFIG_FILES.get(prog, "config.yaml")
    path.write_text(to_yaml(cfg))
    log.info("%s: recipe %s, resolved config in %s", prog, recipe, path)
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
        HubError,
        FileExistsError,
    ) as error:
        print(f"{prog}: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _print_reports(reports: dict[str, EvalReport], bench: str) -> None:
    first = next(iter(reports.values()))
    print(f"{bench}: {first.num_prompts} prompts, {first.device}")
    print(f"  autoregressive {first.ar_tokens_per_s:.1f} tokens/s")
    width = max(10, *map(len, reports))
    for name, report in reports.items():
        matches = (
            ""
            if report.greedy_matches_target is None
            else f", output = target's greedy: {report.greedy_matches_target:.0%}"
        )
        print(
            f"  {name:<{width}} tau {report.tau:.3f}  k={report.k}"
            + (f" tree_width={report.tree_width}" if report.tree_width > 1 else "")
            + (
                f" dynamic (min confidence {report.tree_min_confidence:g}, {report.drafted_per_step:.2f} nodes/step)"
                if report.tree_min_confidence > 0 and report.tree_width > 1
                else ""
            )
            + (f" {report.mode}" if report.mode else "")
            + (f" learned window, {report.drafted_per_step:.2f} drafted/step" if report.window == "policy" else "")
            + ", accepted per position "
            + " ".join(f"{r:.2f}" for r in report.accept_rate_per_pos)
            + f"  {report.tokens_per_s:.1f} tokens/s, speedup {report.speedup:.2f}x, "
            + f"draft {report.draft_ms_per_step:.1f} ms/step{matches}"
        )


def _print_costs(reports: dict[str, EvalReport]) -> None:
    """The cost model the run measured: a verify step's time by the number of drafts it checked."""
    for name, report in reports.items():
        if report.window == "policy" and report.verify_ms_by_drafted:
            counts = " ".join(f"{n}:{count}" for n, count in enumerate(report.drafted_histogram))
            costs = " ".join(f"{n}:{ms:.1f}" for n, ms in report.verify_ms_by_drafted.items())
            print(f"  {name}: steps by tokens drafted {counts}; verify ms by tokens drafted {costs}")


def _train(cfg: SpecdecConfig) -> None:
    try:
        result = train(cfg)
    except JobRequeued as requeued:  # not a failure: the job's next start resumes
        print(f"specdec-train: {requeued}")
        return
    if not result.is_global_zero:
        return
    print(
        f"trained {result.steps} steps on {result.train_tokens} tokens in {result.train_seconds / 60:.1f} min; "
        f"drafter {result.drafter_dir}"
    )
    if result.reports:
        for bench in [cfg.eval.bench, *cfg.eval.extra_benches]:
            rows = {name: report for name, report in result.reports.items() if report.bench == bench}
            _print_reports(rows, bench)
            _print_costs(rows)
        print(f"  report {cfg.eval.out}, plot {Path(cfg.eval.out).with_suffix('.png')}")
    if cfg.export.format is not None and result.reports:
        _export(cfg)


def _export(cfg: SpecdecConfig) -> None:
    result = export(cfg)
    measured = f"tau from {result.measured_rows} report rows" if result.measured_rows else "tau not measured"
    print(f"exported the {result.kind} drafter as {result.format} to {result.dir} (model card: {measured})")
    for path in sorted(result.dir.rglob("*")):
        if path.is_file():
            print(f"  {path.relative_to(result.dir)}  {path.stat().st_size / 1e6:.2f} MB")
    if result.push_plan is not None:
        print(("dry run, nothing sent: " if result.url is None else "") + result.push_plan)
    if result.url is not None:
        print(f"pushed: {result.url}")


def _prep(cfg: SpecdecConfig) -> None:
    target = load_target(cfg.target, seed=cfg.run.seed)
    layers, _ = target_layers(cfg, target)
    if not layers:
        raise RecipeError(
            f"draft.name={cfg.draft.name} with objectives {', '.join(cfg.objective)} reads no target layer, so "
            "there is nothing to cache: run specdec-train directly (it tokenizes, and regenerates when "
            "data.regenerate=true, by itself)."
        )
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


def _eval_rows(cfg: SpecdecConfig) -> list[tuple[str, CompareConfig]]:
    """(dotted key, row) of each drafter specdec-eval measures: the rows of eval.compare, or else
    eval.drafter, beside its untrained start when specdec-train saved it."""
    if cfg.eval.compare:
        return [(f"eval.compare[{i}]", row) for i, row in enumerate(cfg.eval.compare)]
    if cfg.eval.drafter is None:
        raise RecipeError(
            "eval.drafter: required; give a drafter trained by specdec-train (run.dir/drafter) or a causal LM "
            "(directory or Hub id) that shares the target's tokenizer, e.g. eval.drafter=runs/smollm2_eagle3/drafter "
            "(or rows to measure side by side in eval.compare)."
        )
    lookup = CompareConfig(name="ngram", drafter=NGRAM, window="fixed", k=max(cfg.eval.k, NGRAM_K))
    ngram = [("eval.ngram", lookup)] if cfg.eval.ngram else []
    if saved_kind(cfg.eval.drafter) is None:
        return [("eval", CompareConfig(name="drafter", drafter=cfg.eval.drafter)), *ngram]
    return [
        ("eval", CompareConfig(name="trained", drafter=cfg.eval.drafter)),
        ("eval", CompareConfig(name="untrained", drafter=cfg.eval.drafter, untrained=True, window="fixed")),
        *ngram,
    ]


NGRAM = "ngram"  # eval.compare[].drafter naming the n-gram lookup drafter (eval.ngram-grams)


def _window_problems(key: str, row: CompareConfig, default: str) -> list[str]:
    window = row.window or default
    if window not in ("fixed", "policy"):
        return [f"{key}.window: {window!r}; expected fixed or policy"]
    if window == "fixed":
        return [] if row.window_threshold is None else [f"{key}.window_threshold: set, but the window is fixed"]
    if row.window_threshold is not None and not 0 < row.window_threshold <= 1:
        return [f"{key}.window_threshold: {row.window_threshold}; expected a probability in (0, 1]"]
    if row.drafter == NGRAM or not has_window_head(row.drafter) or (row.tree_width or 1) > 1 or row.mode:
        return [
            f"{key}.window: policy, but {row.drafter} has no window head (drafter/window/, saved by specdec-train "
            "with objective.stop_head or window_rl) or the row is a tree or another mode; the learned window serves "
            "chains of the drafter's default session"
        ]
    return []


def _check_rows(rows: list[tuple[str, CompareConfig]], window: str = "fixed") -> None:
    """Refuse, in one message, every row that cannot be measured: a name used twice, k below 1, and
    what only the drafter's directory tells (its kind, so its serving modes and whether it has an
    untrained start). Runs before the target loads; the config check cannot look at directories."""
    problems, first_with_name = [], {}
    for key, row in rows:
        if row.name in first_with_name:
            problems.append(
                f"{key}.name: {row.name!r} is also the name of {first_with_name[row.name]}; each row needs its own"
            )
        first_with_name.setdefault(row.name, key)
        if row.k is not None and row.k < 1:
            problems.append(f"{key}.k: {row.k}; expected null (eval.k) or at least one draft token")
        if row.tree_width is not None and row.tree_width < 1:
            problems.append(f"{key}.tree_width: {row.tree_width}; expected null (eval.tree_width), 1 or more")
        if row.tree_min_confidence is not None and not 0 <= row.tree_min_confidence < 1:
            problems.append(
                f"{key}.tree_min_confidence: {row.tree_min_confidence}; expected a probability in [0, 1) "
                "(0 keeps the whole tree)"
            )
        problems += _window_problems(key, row, window)
        if row.ngram_first and (row.drafter == NGRAM or (row.tree_width or 1) > 1 or row.mode is not None):
            problems.append(
                f"{key}.ngram_first: the hybrid drafts chains with a trained drafter's default session beside the "
                "n-gram lookup; drop it for this row"
            )
        if row.drafter == NGRAM:
            if row.untrained or row.mode is not None:
                problems.append(f"{key}: the n-gram lookup drafter has no untrained start and no modes; drop them")
            continue
        kind = saved_kind(row.drafter)
        if kind is None:
            not_saved = f"{row.drafter} is not a drafter saved by specdec-train, so it is served as a causal LM"
            if row.untrained:
                problems.append(
                    f"{key}.untrained: true, but {not_saved}, which has no untrained start; drop untrained, "
                    "or give a drafter directory that specdec-train wrote (run.dir/drafter)"
                )
            if row.mode not in (None, "causal_lm"):
                problems.append(f"{key}.mode: {row.mode!r}, but {not_saved}, token by token; set null (or causal_lm)")
        elif row.mode is not None and row.mode not in kind.modes:
            name = drafter_name(kind)
            others = f", or one of its other modes: {', '.join(sorted(kind.modes))}" if kind.modes else ""
            problems.append(
                f"{key}.mode: {row.mode!r} is not a serving mode of the {name} drafter in {row.drafter}; "
                f"choose null (its default session){others}"
            )
    if problems:
        raise RecipeError("; ".join(problems))


def _drafter_model(cfg: SpecdecConfig, target: Target, path: str, *, key: str) -> tuple[nn.Module, tuple[int, ...]]:
    """(model, feature layers) of the drafter saved in `path`, or of the causal LM there (no features)."""
    kind = saved_kind(path)
    given = tuple(cfg.eval.target_layers) if cfg.eval.target_layers is not None else None
    if kind is not None:
        model, layers = kind.load(Path(path), target.model, given)
        if given is not None and not layers:
            raise RecipeError(
                f"eval.target_layers={list(given)}: the drafter in {path} reads no target layer; drop it."
            )
        return model, layers
    if Path(path).is_dir() and not (Path(path) / "config.json").is_file():
        raise DrafterLoadError(
            f"{key}={path}: a directory without config.json, so not a drafter. A trainer's raw output (SpecForge's "
            "output_dir holds pickled training_state.pt files) must be exported first, e.g. `specforge export --to "
            "sglang --checkpoint DIR --draft-config CONFIG --output-dir OUT`; then give OUT."
        )
    draft = load_target(TargetConfig(path=path, dtype=cfg.target.dtype), key=key)
    check_same_tokenizer(target.tokenizer, draft.tokenizer, target_name=cfg.target.path, draft_name=path)
    return draft.model, ()


def _row_drafters(cfg: SpecdecConfig, target: Target, rows: list[tuple[str, CompareConfig]]) -> dict[str, Drafter]:
    """Each row's drafter as it serves; a directory is loaded once however many rows read it."""
    models = {}  # (drafter, untrained) -> (model, its feature layers)
    drafters = {}
    for key, row in rows:
        if row.drafter == NGRAM:
            drafters[row.name] = ngram_drafter(cfg, target, eos_token_ids(target))
            continue
        kind = saved_kind(row.drafter)
        if (row.drafter, False) not in models:
            models[row.drafter, False] = _drafter_model(cfg, target, row.drafter, key=f"{key}.drafter")
        if (row.drafter, row.untrained) not in models:  # untrained: a saved drafter's start (_check_rows)
            trained, layers = models[row.drafter, False]
            models[row.drafter, True] = kind.untrained_like(trained, target.model, cfg.run.seed), layers
        model, layers = models[row.drafter, row.untrained]
        if kind is None:
            drafters[row.name] = CausalLMDrafter(model)
        else:
            drafters[row.name] = (kind.session if row.mode is None else kind.modes[row.mode])(model, layers)
        if (row.window or cfg.eval.window) == "policy":
            drafters[row.name] = _with_window(drafters[row.name], row, target)
        if _ngram_first(row, cfg):
            if not getattr(drafters[row.name], "can_sit_out", False):  # sessions whose commit needs no propose
                raise RecipeError(f"{key}.ngram_first: {row.drafter} is not an EAGLE-3 or CTC drafter; drop it")
            drafters[row.name] = HybridDrafter(
                ngram_drafter(cfg, target, eos_token_ids(target)), drafters[row.name], trained_k=row.k or cfg.eval.k
            )
    return drafters


def _ngram_first(row: CompareConfig, cfg: SpecdecConfig) -> bool:
    return (
        row.drafter != NGRAM
        and not row.untrained
        and row.mode is None
        and (row.tree_width or cfg.eval.tree_width) == 1  # eval.ngram_first leaves a tree row as it is
        and (row.ngram_first if row.ngram_first is not None else cfg.eval.ngram_first)
    )


def _engine_k(row: CompareConfig, cfg: SpecdecConfig) -> int:
    """A row's k; the hybrid's lookup drafts as far as the n-gram row does (its drafter up to the row's k)."""
    k = row.k or cfg.eval.k
    return max(k, NGRAM_K) if _ngram_first(row, cfg) else k


def _with_window(session: Drafter, row: CompareConfig, target: Target) -> Drafter:
    """The session drafting up to k tokens a step, as the window head saved beside the drafter decides."""
    head = load_window_head(row.drafter).to(target.model.device)
    if row.window_threshold is not None:
        head.log_threshold.data.fill_(math.log(row.window_threshold))
    session.window = LearnedWindow(head)
    return session


def _eval(cfg: SpecdecConfig) -> None:
    rows = _eval_rows(cfg)
    _check_rows(rows, cfg.eval.window)
    target = load_target(cfg.target, seed=cfg.run.seed)
    prompts = load_prompts(
        cfg.eval.bench, target.tokenizer, num_prompts=cfg.eval.num_prompts, chat_template=cfg.data.chat_template
    )
    spec = spec_config(cfg)
    with launched_process_group() as rank:  # srun -n N: each task decodes its share, one report
        reports = evaluate_drafters(
            target.model,
            _row_drafters(cfg, target, rows),
            prompts,
            cfg=spec,
            configs={
                row.name: replace(
                    spec,
                    k=_engine_k(row, cfg),
                    tree_width=row.tree_width or spec.tree_width,
                    tree_min_confidence=(
                        spec.tree_min_confidence if row.tree_min_confidence is None else row.tree_min_confidence
                    ),
                )
                for _, row in rows
                if row.k is not None
                or row.tree_width is not None
                or row.tree_min_confidence is not None
                or _ngram_first(row, cfg)
            },
            eos_token_ids=eos_token_ids(target),
            batch_size=cfg.eval.batch_size,
            seed=cfg.run.seed,
            bench=cfg.eval.bench,
        )
    if rank > 0:
        return
    reports = {
        row.name: replace(
            reports[row.name],
            drafter=row.drafter,
            untrained=row.untrained,
            mode=row.mode or ("ngram_first" if _ngram_first(row, cfg) else None),
            window=row.window or cfg.eval.window,
        )
        for _, row in rows
    }
    out = Path(cfg.eval.out)
    ks = "/".join(str(k) for k in sorted({report.k for report in reports.values()}))
    write_reports(reports, out, title=f"{cfg.eval.bench}, k={ks}")
    _print_reports(reports, cfg.eval.bench)
    _print_costs(reports)
    print(f"  report {out}, plot {out.with_suffix('.png')}")


def eval_main(argv: list[str] | None = None) -> int:
    purpose = "Measure a drafter's tau, acceptance per position and speedup with the real verifier."
    return _main("specdec-eval", purpose, _eval, argv)


def export_main(argv: list[str] | None = None) -> int:
    purpose = (
        "Export a trained drafter for vLLM or SGLang (export.format), with a model card whose tau table comes from\n"
        "its eval reports, and push it to the Hub (export.push_to; export.dry_run=true lists the files)."
    )
    return _main("specdec-export", purpose, _export, argv)
