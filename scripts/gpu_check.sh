#!/usr/bin/env bash
# The GPU check of the scale-out: on a machine with CUDA, `tiny` in online mode (the target in the
# loop, so FSDP and ZeRO-3 shard it) under ddp, fsdp, deepspeed_stage_2 and deepspeed_stage_3, then
# `smollm2_eagle3` for a few hundred steps on one GPU; one line per run: steps, tokens/s, final loss, tau.
#
#   bash scripts/setup.sh && bash scripts/gpu_check.sh [OUT_DIR]     (default runs/gpu_check)
#
# Uses every visible GPU (at most 8) for the tiny runs. CPU-side prep is kept small (no regeneration).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/gpu_check}"
train=.venv/bin/specdec-train
gpus=$(.venv/bin/python -c "import torch; print(min(torch.cuda.device_count(), 8))")
if [ "$gpus" = 0 ]; then
    echo "gpu_check: no CUDA device visible to torch (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'));" \
         "install a CUDA build of torch on a GPU machine first" >&2
    exit 2
fi
mkdir -p "$out"

summary() {  # summary NAME RUN_DIR SECONDS: one line from the run's TensorBoard logs and eval.json
    .venv/bin/python - "$@" <<'PY'
import json, sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
name, run, seconds = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
events = EventAccumulator(str(run / "logs")); events.Reload()
loss = events.Scalars("train/loss")
speed = [e.value for e in events.Scalars("train/tokens_per_s")][5:] or [float("nan")]
report = json.loads((run / "eval.json").read_text())
print(f"{name:<28} steps {loss[-1].step + 1:>4}  {sorted(speed)[len(speed) // 2]:>9.0f} tokens/s (median, all ranks)  "
      f"final loss {loss[-1].value:.3f}  tau {report['trained']['tau']:.3f} (untrained {report['untrained']['tau']:.3f})  "
      f"{seconds:.0f} s")
PY
}

lines=()
for strategy in ddp fsdp deepspeed_stage_2 deepspeed_stage_3; do
    run="$out/tiny_$strategy"
    rm -rf "$run"
    start=$(date +%s)
    "$train" recipe=tiny run.dir="$run" trainer.accelerator=gpu trainer.devices="$gpus" trainer.strategy="$strategy" \
        trainer.precision=bf16-mixed trainer.max_steps=100 cache.online=true eval.every_n_steps=50 \
        >"$run.log" 2>&1 || { echo "gpu_check: tiny under $strategy failed; see $run.log" >&2; tail -20 "$run.log" >&2; exit 1; }
    lines+=("$(summary "tiny $strategy x$gpus" "$run" $(( $(date +%s) - start )))")
done
run="$out/smollm2_eagle3"
rm -rf "$run"
start=$(date +%s)
"$train" recipe=smollm2_eagle3 run.dir="$run" trainer.accelerator=gpu trainer.devices=1 trainer.max_steps=300 \
    data.regenerate=false data.max_samples=640 eval.every_n_steps=100 export.format=null \
    >"$run.log" 2>&1 || { echo "gpu_check: smollm2_eagle3 failed; see $run.log" >&2; tail -20 "$run.log" >&2; exit 1; }
lines+=("$(summary "smollm2_eagle3 x1" "$run" $(( $(date +%s) - start )))")

echo "gpu_check on $(.venv/bin/python -c 'import torch; print(torch.cuda.get_device_name(0))') x$gpus:"
printf '%s\n' "${lines[@]}"
