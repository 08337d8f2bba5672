"""Training benchmarks on the real SmolLM2 target, each a side-by-side in one run.

    python -m specdec.trainer.benchmark throughput --features DIR [--specforge-json RESULT.json]
    python -m specdec.trainer.benchmark ablation --steps 250 --prompts 32

throughput: specdec's training step on the SpecForge anchor's own inputs (../shared/anchors/specforge:
the same 197 ShareGPT samples, their cached features and draft vocabulary, visited in SpecForge's
order): batch 1, length 512, 4 unrolled steps, draft vocabulary 32000, lr 1e-3 cosine with 1.5%
warm-up, gradient clip 0.5, bf16. Tokens/s counts every token of steps 2..S over the time from the
end of step 1 to the end of step S, as the anchor does (step 1 pays one-off warm-up in both). With
--specforge-json (the line the anchor's run.sh printed, run just before or after on the same
machine) it prints both side by side.

ablation: one drafter per objective set, trained on the same cache for the same steps from the same
start, then decoded on the same MT-Bench prompts against one autoregressive baseline. Each row: the
objectives, the real tokens trained on, the training wall time, train/sim_tau and train/sim_tau_greedy
at the last logged step, and the measured tau and speedup (greedy, chain, K=4).
"""

import argparse
import json
import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from specdec.data_prep import DType, TargetConfig, asset_path, load_target
from specdec.eval.evaluate import evaluate_drafters, write_reports
from specdec.eval.prompts import load_prompts
from specdec.trainer.config import OptimConfig, Schedule, compose_recipe
from specdec.trainer.data import collate
from specdec.trainer.drafters import drafter_kind
from specdec.trainer.drafters.eagle3 import new_eagle3
from specdec.trainer.module import DrafterModule
from specdec.trainer.objectives.ttt import TttConfig
from specdec.trainer.specforge_anchor import read_specforge_samples, read_specforge_vocab, specforge_order
from specdec.trainer.train import eos_token_ids, spec_config, train

# name -> overrides of the recipe's `objective` group
ABLATION = {
    "kd": ["~objective.ttt", "+objective.kd={}"],
    "ttt": [],
    "ttt+expected_accept": ["+objective.expected_accept={}"],
}


class StepClock(L.Callback):
    """Wall-clock time and real tokens at the end of every optimizer step."""

    def __init__(self) -> None:
        self.start = 0.0
        self.ends: list[float] = []
        self.tokens: list[int] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        self.tokens.append(int(batch["attention_mask"].sum()))

    def tokens_per_s(self) -> float:
        """Tokens of steps 2..S over the time from the end of step 1 to the end of step S."""
        return sum(self.tokens[1:]) / (self.ends[-1] - self.ends[0])


def throughput(args: argparse.Namespace) -> None:
    features = Path(args.features)
    samples = read_specforge_samples(features)
    d2t, t2d = read_specforge_vocab(features)
    steps = args.steps or len(samples)
    order = specforge_order(len(samples), args.seed, epoch=0)[:steps]
    dataset = [{"index": index, **sample} for index, sample in enumerate(samples)]
    loader = DataLoader(dataset, sampler=order, batch_size=1, collate_fn=collate)

    target = load_target(TargetConfig(path=str(asset_path("smollm2_gguf")), dtype=DType.bfloat16), seed=args.seed)
    kind = drafter_kind("eagle3")
    draft_cfg = kind.config(vocab_size=len(d2t), unroll_steps=args.unroll_steps)
    draft = new_eagle3(target.model, d2t, t2d, seed=args.seed)  # SpecForge's draft vocabulary, not ours
    module = DrafterModule(
        draft,
        kind=kind,
        draft_cfg=draft_cfg,
        objectives={"ttt": TttConfig(decay=0.8)},
        optim=OptimConfig(lr=args.lr, schedule=Schedule.cosine, warmup_steps=math.ceil(0.015 * steps)),
        lm_head=target.model.get_output_embeddings().weight,
        eval_k=args.unroll_steps,
    )
    clock = StepClock()
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        precision=args.precision,
        max_steps=steps,
        gradient_clip_val=0.5,
        log_every_n_steps=args.log_every_n_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
        use_distributed_sampler=False,
    )
    trainer.fit(module, train_dataloaders=loader)
    ours = {
        "steps": len(clock.tokens),
        "train_tokens": sum(clock.tokens),
        "tokens_per_s": clock.tokens_per_s(),
        "first_step_s": clock.ends[0] - clock.start,
        "wall_s": clock.ends[-1] - clock.start,
        "precision": args.precision,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps({"trainer": "specdec", **ours}))
    if args.specforge_json:
        theirs = json.loads(Path(args.specforge_json).read_text().strip().splitlines()[-1])
        print(f"| same {len(samples)} samples, batch 1, K={args.unroll_steps}, lr {args.lr} | SpecForge | specdec |")
        print("| --- | ---: | ---: |")
        print(f"| steps | {theirs['steps']} | {ours['steps']} |")
        print(f"| train tokens | {theirs['train_tokens']:,} | {ours['train_tokens']:,} |")
        print(f"| tokens/s (steps 2..S) | {theirs['tokens_per_s']:.0f} | {ours['tokens_per_s']:.0f} |")
        print(f"| ratio | 1.00x | {ours['tokens_per_s'] / theirs['tokens_per_s']:.2f}x |")


def ablation(args: argparse.Namespace) -> None:
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
    kind = drafter_kind(cfg.draft.name)
    for name in ABLATION:
        model, layers = kind.load(Path(args.runs) / name / "drafter", target.model)
        drafters[name] = kind.session(model, layers)
    drafters["untrained"] = kind.session(kind.untrained_like(model, target.model, cfg.run.seed), layers)
    prompts = load_prompts(cfg.eval.bench, target.tokenizer, num_prompts=args.prompts)
    reports = evaluate_drafters(
        target.model, drafters, prompts, cfg=spec_config(cfg), eos_token_ids=eos_token_ids(target), bench=cfg.eval.bench
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    speed = commands.add_parser("throughput", help="training tokens/s on the SpecForge anchor's inputs")
    speed.add_argument("--features", required=True, help="the anchor's features dir (its run.sh builds it)")
    speed.add_argument("--specforge-json", help="the JSON line of the anchor's run.sh, for the side-by-side")
    speed.add_argument("--steps", type=int, default=0, help="optimizer steps; 0 = one epoch")
    speed.add_argument("--unroll-steps", type=int, default=4)
    speed.add_argument("--lr", type=float, default=1e-3)
    speed.add_argument("--precision", default="bf16-mixed")
    speed.add_argument("--log-every-n-steps", type=int, default=10)
    speed.add_argument("--seed", type=int, default=0)
    speed.set_defaults(run=throughput)
    compare = commands.add_parser("ablation", help="one drafter per objective set, tau side by side")
    compare.add_argument("--recipe", default="smollm2_eagle3")
    compare.add_argument("--runs", default="runs/ablation", help="one run.dir per objective set below this")
    compare.add_argument("--cache", default="runs/smollm2_eagle3/cache", help="a cache built with the recipe")
    compare.add_argument("--steps", type=int, default=250)
    compare.add_argument("--prompts", type=int, default=32)
    compare.add_argument("--only", nargs="*", default=list(ABLATION), help="train these sets (others are reused)")
    compare.set_defaults(run=ablation)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    args.run(args)


if __name__ == "__main__":
    main()
