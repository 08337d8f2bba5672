"""The export stage behind `specdec-export` (and the end of `specdec-train` when the recipe sets
export.format): the drafter of run.dir (or export.drafter) written as a directory an engine loads,
in the format its kind registers (`DrafterKind.exports`), with

    README.md                  the model card: base model, tags, serve commands, and the tau table
                               read from the eval JSONs that measured this drafter ("not measured"
                               when none did: a number on the card always comes from a report)
    training_recipe.yaml       the resolved recipe it was trained with
    specdec_provenance.json    what was exported from where: format, drafter, cache key, versions

then pushed to the Hub (specdec.trainer.hub) when export.push_to is set. The directory is built
beside export.dir and renamed into place, so an interrupted export leaves the previous one whole.
"""

import glob
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

import torch
from huggingface_hub import get_token
from huggingface_hub.utils import HFValidationError, validate_repo_id

from specdec.data_prep import load_target, load_target_config
from specdec.data_prep.target import DType
from specdec.trainer.config import RecipeError, SpecdecConfig, to_yaml
from specdec.trainer.drafters import Exporter, ExportTarget, drafter_kind, drafter_name, saved_kind
from specdec.trainer.drafters.causal_lm import PLAIN_EXPORTS
from specdec.trainer.hub import plan_push, push
from specdec.trainer.strategies import read_checkpoint
from specdec.trainer.train import draft_from_checkpoint, target_layers

log = logging.getLogger(__name__)

PROVENANCE = "specdec_provenance.json"


@dataclass(frozen=True)
class ExportResult:
    dir: Path
    format: str
    kind: str  # the drafter kind's name, or "causal_lm" for a plain LM
    measured_rows: int  # rows of the card's tau table
    push_plan: str | None  # what a push would write (dry run) or wrote
    url: str | None  # the pushed commit


def is_hub_id(name: str) -> bool:
    """ORG/NAME that is not a local path."""
    if Path(name).expanduser().exists() or name.startswith(("/", ".", "~")) or name.count("/") != 1:
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _base_model(cfg: SpecdecConfig) -> str:
    if cfg.export.base_model is not None:
        return cfg.export.base_model
    return cfg.target.path


def _exporters(source: Path) -> tuple[str, dict[str, Exporter]]:
    kind = saved_kind(source)
    if kind is None:
        return "causal_lm", PLAIN_EXPORTS
    return drafter_name(kind), dict(kind.exports)


def _from_checkpoint(cfg: SpecdecConfig, checkpoint: Path, work: Path) -> Path:
    """A Lightning checkpoint of this recipe's drafter (a file, or DeepSpeed's directory), saved as its
    drafter directory in `work`."""
    target = load_target(cfg.target, seed=cfg.run.seed)
    kind = drafter_kind(cfg.draft.name)
    _, feature_layers = target_layers(cfg, target)
    draft = draft_from_checkpoint(cfg, kind, target, read_checkpoint(checkpoint), checkpoint)
    return kind.save(draft, work / "drafter", target.model.config, feature_layers)


def _source(cfg: SpecdecConfig, work: Path) -> Path:
    given = cfg.export.drafter or str(Path(cfg.run.dir) / "drafter")
    path = Path(given)
    if path.suffix == ".ckpt" and path.exists():  # a file, or DeepSpeed's directory
        return _from_checkpoint(cfg, path, work)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"export.drafter={given}: no drafter there (no config.json). Give the run.dir of a finished specdec-train "
            "run, a drafter directory (run.dir/drafter) or a checkpoint (run.dir/checkpoints/last.ckpt)."
        )
    return path


def _report_rows(patterns: list[str], source: Path) -> list[tuple[str, dict]]:
    """(report file, row) of every eval-JSON row that measured `source` itself (not its untrained start)."""
    rows = []
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            try:
                report = json.loads(Path(path).read_text())
            except (OSError, json.JSONDecodeError) as error:
                log.warning("%s: not read as an eval report (%s); the card leaves it out", path, error)
                continue
            if not isinstance(report, dict):
                continue
            for row in report.values():
                if not isinstance(row, dict) or "tau" not in row:
                    continue
                drafter = row.get("drafter")
                if drafter is None:
                    log.warning("%s: written before reports named their drafter; rerun specdec-eval to use it", path)
                    break
                if Path(drafter).resolve() == source.resolve() and not row.get("untrained"):
                    rows.append((path, row))
    return rows


def _card_table(rows: list[tuple[str, dict]]) -> str:
    if not rows:
        return (
            "Not measured: no eval report of this drafter was found (export.reports). Measure it with "
            "`specdec-eval recipe=... eval.drafter=DIR` and export again; this card never shows a number that a "
            "report did not measure.\n"
        )
    lines = [
        "| bench | prompts | new tokens | K | tree width | temperature | mode | tau | accepted per position | "
        "tokens/s (speedup over the same target without drafting) | device | target dtype | date |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | --- | --- | --- |",
    ]
    for _, row in rows:
        per_position = " ".join(f"{rate:.2f}" for rate in row["accept_rate_per_pos"])
        window = ", learned window (K at most)" if row.get("window") == "policy" else ""
        lines.append(
            f"| {row['bench']} | {row['num_prompts']} | {row['max_new_tokens']} | {row['k']} | {row['tree_width']} | "
            f"{row['temperature']:g} | {row['mode'] or 'default'}{window} | {row['tau']:.3f} | {per_position} | "
            f"{row['tokens_per_s']:.1f} ({row['speedup']:.2f}x) | {row['device']} | "
            f"{row['target_dtype'].removeprefix('torch.')} | {row['date']} |"
        )
    sources = sorted({path for path, _ in rows})
    lines.append("")
    lines.append(
        "tau: tokens per verify step (accepted drafts + the target's own), measured by specdec's verifier, which "
        "keeps the target's output distribution (as vLLM's and SGLang's do); speedup against the same target "
        f"decoding alone, in the same run. From {', '.join(sources)}."
    )
    return "\n".join(lines) + "\n"


def _card(
    cfg: SpecdecConfig, *, kind: str, fmt: str, exporter: Exporter, target: ExportTarget, layers, rows, repo
) -> str:
    base = target.name
    header = ["---"]
    if is_hub_id(base):
        header.append(f"base_model: {base}")
    if exporter.library:
        header += [f"library_name: {exporter.library}", "pipeline_tag: text-generation"]
    if cfg.export.license:
        header.append(f"license: {cfg.export.license}")
    header += ["tags:", *(f"- {tag}" for tag in exporter.tags), "---", ""]
    where = repo or str(Path(cfg.export.dir).resolve())
    commands = exporter.serve(where, target, cfg.eval.k, tuple(layers))
    serve = "\n".join(
        f"{engine}:\n\n```bash\n{command}\n```\n"
        if not command.startswith("export with")
        else f"{engine}: {command}.\n"
        for engine, command in commands.items()
    )
    revision = f" at revision {target.revision}" if target.revision else ""
    local_target = (
        ""
        if is_hub_id(cfg.target.path)
        else (
            f"\nTrained against `{Path(cfg.target.path).name}`, a local copy of the target; {base} names the model it "
            "stands for (export.base_model). Where their weights differ (a quantized copy), so may acceptance.\n"
        )
    )
    layer_line = (
        f"It reads the target's hidden states {list(layers)} (HF `output_hidden_states` ids; "
        f"SGLang's ids {[layer - 1 for layer in layers]}).\n"
        if layers
        else ""
    )
    return "\n".join(
        [
            *header,
            f"# {kind} drafter for {base}",
            "",
            f"A speculative-decoding drafter ({kind}, exported as `{fmt}`) for **{base}**{revision}, trained with "
            f"specdec, recipe `{Path(cfg.run.dir).name}` (`training_recipe.yaml`). Speculative "
            "decoding with it gives the target's own output distribution, faster when drafts are accepted.",
            layer_line,
            local_target,
            "## Serve",
            "",
            serve,
            "## Acceptance",
            "",
            _card_table(rows),
            "## Provenance",
            "",
            f"`training_recipe.yaml` is the resolved recipe; `{PROVENANCE}` names the exported drafter, the cache "
            "key of its training data and the package versions.",
            "",
        ]
    )


def _training_config(cfg: SpecdecConfig) -> Path | None:
    """The resolved recipe specdec-train wrote in the run of the exported drafter (run.dir/config.yaml
    beside run.dir/drafter and run.dir/checkpoints/), if any."""
    given = Path(cfg.export.drafter) if cfg.export.drafter is not None else None
    run_dir = Path(cfg.run.dir) if given is None else given.parent.parent if given.suffix == ".ckpt" else given.parent
    path = run_dir / "config.yaml"
    return path if path.is_file() else None


def _provenance(cfg: SpecdecConfig, source: Path, fmt: str, kind: str, layers) -> dict:
    manifest = Path(cfg.cache.dir) / "manifest.json"
    cache = None
    if manifest.is_file():
        fields = json.loads(manifest.read_text())
        cache = {"dir": cfg.cache.dir, "key": fields.get("key"), "key_hash": fields.get("key_hash")}
    return {
        "format": fmt,
        "drafter_kind": kind,
        "exported_from": str(source.resolve()),
        "target": {"path": cfg.target.path, "revision": cfg.target.revision, "base_model": _base_model(cfg)},
        "target_layers": list(layers),
        "cache": cache,  # None: no cache on disk (trained online, or from token ids alone)
        "exported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": {name: version(name) for name in ("specdec", "torch", "transformers", "safetensors")},
    }


def _replace_dir(staging: Path, out: Path) -> None:
    """Move the finished export into place; a directory there must be an earlier export."""
    if out.exists():
        if not (out / PROVENANCE).is_file():
            raise FileExistsError(
                f"export.dir={out} exists and is not a specdec export (no {PROVENANCE}); choose another export.dir "
                "or remove it."
            )
        shutil.rmtree(out)
    staging.rename(out)


def _check_repo_id(name: str) -> None:
    try:
        validate_repo_id(name)
        valid = name.count("/") == 1
    except HFValidationError:
        valid = False
    if not valid:
        raise RecipeError(f"export.push_to={name}: expected a Hub repo id ORG/NAME (letters, digits, '-', '_', '.').")


def export(cfg: SpecdecConfig) -> ExportResult:
    """Write the drafter for export.format with its card, then push or plan the push."""
    fmt = cfg.export.format.value if cfg.export.format is not None else None
    if cfg.export.push_to is not None:
        _check_repo_id(cfg.export.push_to)
    out = Path(cfg.export.dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as work:
        work = Path(work)
        source = _source(cfg, work)
        kind, exporters = _exporters(source)
        if not exporters:
            raise RecipeError(
                f"{source}: a {kind} drafter, which no serving engine loads (vLLM and SGLang have no {kind} method); "
                "specdec-eval measures it (eval.drafter=...)."
            )
        if fmt is None or fmt not in exporters:
            given = "not set" if fmt is None else f"{fmt}, which does not fit"
            raise RecipeError(
                f"export.format: {given} the {kind} drafter in {source}; it exports as: {', '.join(exporters)} "
                f"(e.g. export.format={next(iter(exporters))})."
            )
        exporter = exporters[fmt]
        target_config = load_target_config(cfg.target)
        dtype = DType(cfg.export.dtype or cfg.target.dtype).value
        target = ExportTarget(
            name=_base_model(cfg),
            revision=cfg.target.revision,
            config=target_config,
            dtype=getattr(torch, dtype),
            tokenizer_cfg=cfg.target,
        )
        staging = work / "export"
        layers = exporter.write(source, staging, target, cfg.eval.k)
        rows = _report_rows(list(cfg.export.reports), source)
        card = _card(
            cfg, kind=kind, fmt=fmt, exporter=exporter, target=target, layers=layers, rows=rows, repo=cfg.export.push_to
        )
        (staging / "README.md").write_text(card)
        trained_with = _training_config(cfg)
        (staging / "training_recipe.yaml").write_text(trained_with.read_text() if trained_with else to_yaml(cfg))
        (staging / PROVENANCE).write_text(json.dumps(_provenance(cfg, source, fmt, kind, layers), indent=1) + "\n")
        _replace_dir(staging, out)
    plan, url = None, None
    if cfg.export.push_to is not None:
        push_plan = plan_push(
            out,
            cfg.export.push_to,
            private=cfg.export.private,
            revision=cfg.export.revision,
            overwrite=cfg.export.overwrite,
        )
        plan = push_plan.describe(token_found=bool(get_token()))
        if not cfg.export.dry_run:
            url = push(out, push_plan)
    return ExportResult(out, fmt, kind, len(rows), plan, url)
