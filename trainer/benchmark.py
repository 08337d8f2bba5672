"""The objective ablation on the real SmolLM2 target: one drafter per objective set, trained on the
same cache for the same steps from the same start, then decoded on the same MT-Bench prompts
against one autoregressive baseline, in one run.

    python -m specdec.trainer.benchmark --steps 250 --prompts 32

Each row: the objectives, the real tokens trained on, the training wall time, train/sim_tau and
train/sim_tau_greedy at the last logged step, and the measured tau and speedup (greedy, chain, K=4).
"""

import argparse
import logging
from pathlib import Path

from specdec.data_prep import load_target
from specdec.eval.drafters.eagle3 import Eagle3Drafter, load_eagle3
from specdec.eval.evaluate import evaluate_drafters, write_reports
from specdec.eval.prompts import load_prompts
from specdec.trainer.config import compose_recipe
from specdec.trainer.train import eos_token_ids, spec_config, train, untrained_like

# name -> overrides of the recipe's `objective` group
ABLATION = {
    "kd": ["~objective.ttt", "+objective.kd={}"],
    "ttt": [],
    "ttt+expected_accept": ["+objective.expected_accept={}"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="smollm2_eagle3")
    parser.add_argument("--runs", default="runs/ablation", help="one run.dir per objective set below this")
    parser.add_argument("--cache", default="runs/smollm2_eagle3/cache", help="a cache built with the recipe")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--only", nargs="*", default=list(ABLATION), help="train these sets (others are reused)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rows, drafters = {}, {}
    for name, overrides in ABLATION.items():
        common = [
            f"run.dir={args.runs}/{name}",
            f"cache.dir={args.cache}",
            f"trainer.max_steps={args.steps}",
            f"eval.every_n_steps={args.steps}",  # the hook measures the last step only
        ]
        cfg = compose_recipe(args.recipe, [*common, f"eval.num_prompts={args.prompts}", *overrides])
        if name in args.only:
            result = train(cfg, report=False)
            rows[name] = {"tokens": result.train_tokens, "minutes": result.train_seconds / 60}
        rows.setdefault(name, {"tokens": None, "minutes": None})
        rows[name].update(_last_scalars(Path(cfg.run.dir) / "logs", ["train/sim_tau", "train/sim_tau_greedy"]))
    target = load_target(cfg.target, seed=cfg.run.seed)
    for name in ABLATION:
        model, layers = load_eagle3(Path(args.runs) / name / "drafter", target.model)
        drafters[name] = Eagle3Drafter(model, layers)
    untrained = untrained_like(model, target.model, seed=cfg.run.seed)
    drafters["untrained"] = Eagle3Drafter(untrained, layers)
    prompts = load_prompts(cfg.eval.bench, target.tokenizer, num_prompts=args.prompts)
    reports = evaluate_drafters(
        target.model, drafters, prompts, cfg=spec_config(cfg), eos_token_ids=eos_token_ids(target)
    )
    write_reports(reports, Path(args.runs) / "eval.json", title=f"{cfg.eval.bench}, k={cfg.eval.k}, {args.steps} steps")

    device = reports["untrained"].device
    print(f"{cfg.eval.bench}, {args.prompts} prompts, greedy, K={cfg.eval.k}, {args.steps} steps each, {device}")
    print(f"autoregressive: {reports['untrained'].ar_tokens_per_s:.1f} tokens/s")
    print("| objectives | train tokens | train min | sim_tau | sim_tau greedy | tau | speedup |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, report in reports.items():
        row = rows.get(name, {})
        cells = [
            f"{row['tokens']:,}" if row.get("tokens") else "",
            f"{row['minutes']:.1f}" if row.get("minutes") else "",
            f"{row['train/sim_tau']:.2f}" if "train/sim_tau" in row else "",
            f"{row['train/sim_tau_greedy']:.2f}" if "train/sim_tau_greedy" in row else "",
            f"{report.tau:.2f}",
            f"{report.speedup:.2f}x",
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


def _last_scalars(log_dir: Path, tags: list[str], window: int = 5) -> dict[str, float]:
    """The mean of each tag's last `window` logged values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir)).Reload()
    found = set(events.Tags()["scalars"])
    last = {tag: [event.value for event in events.Scalars(tag)[-window:]] for tag in tags if tag in found}
    return {tag: sum(values) / len(values) for tag, values in last.items()}


if __name__ == "__main__":
    main()
