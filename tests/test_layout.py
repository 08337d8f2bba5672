"""The package as DESIGN.md lays it out: every module imports, layers import downward only,
an installed copy works, and the code is ruff clean."""

import ast
import importlib
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

PACKAGES = {"specdec.data_prep": "data_prep", "specdec.eval": "eval", "specdec.trainer": "trainer"}
# trainer -> eval -> data_prep: what each layer must never import.
FORBIDDEN = {
    "specdec.data_prep": ("specdec.eval", "specdec.trainer"),
    "specdec.eval": ("specdec.trainer",),
    "specdec.trainer": (),
}


def _modules() -> list[str]:
    names = []
    for package in PACKAGES:
        module = importlib.import_module(package)
        names.append(package)
        names += [info.name for info in pkgutil.walk_packages(module.__path__, prefix=f"{package}.")]
    return names


@pytest.mark.parametrize("name", _modules())
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_layers_import_downward_only(package: str) -> None:
    for path in sorted((REPO_ROOT / PACKAGES[package]).rglob("*.py")):
        upward = sorted(name for name in _imports(path) if name.startswith(FORBIDDEN[package]))
        assert not upward, f"{path.relative_to(REPO_ROOT)} imports {upward}: layers go trainer -> eval -> data_prep"


def test_ruff_is_clean() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    subprocess.run([ruff, "check", "--quiet", "."], cwd=REPO_ROOT, check=True)
    subprocess.run([ruff, "format", "--check", "--quiet", "."], cwd=REPO_ROOT, check=True)


@pytest.mark.slow
def test_an_installed_copy_has_every_module_and_recipe(tmp_path: Path) -> None:
    # From a copy without build/ (setuptools would reuse files left there) and without the venv.
    source = tmp_path / "src"
    shutil.copytree(
        REPO_ROOT, source, ignore=shutil.ignore_patterns(".*", "build", "*.egg-info", "runs", "__pycache__")
    )
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", target, "."],
        cwd=source,
        check=True,
    )
    # File by file: an import would also find modules through this checkout's editable install.
    folders = {**PACKAGES, "specdec.recipes": "recipes"}
    for package, folder in folders.items():
        installed = target / package.replace(".", "/")
        for source in (REPO_ROOT / folder).rglob("*"):
            if source.suffix in (".py", ".yaml") and "__pycache__" not in source.parts:
                relative = source.relative_to(REPO_ROOT / folder)
                assert (installed / relative).is_file(), f"{package}: {relative} is missing from the installed copy"
    code = "from specdec.trainer.config import recipe_names; print(','.join(recipe_names()))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target)}, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    shipped = sorted(path.stem for path in (REPO_ROOT / "recipes").glob("*.yaml"))
    assert out.stdout.strip() == ",".join(shipped)


# The machinery that trains and measures any drafter; a drafter kind lives in its own files
# (trainer/drafters/<name>.py, eval/drafters/<name>.py) and the registry's import line.
GENERIC_TRAINER = [
    "module",
    "train",
    "cli",
    "data",
    "config",
    "registry",
    "objectives/__init__",
    "drafters/__init__",
    "drafters/causal_lm",
    "export",
    "hub",
    "strategies",
    "requeue",
]


@pytest.mark.parametrize("name", GENERIC_TRAINER)
def test_the_generic_trainer_names_no_drafter_kind(name: str) -> None:
    tree = ast.parse((REPO_ROOT / "trainer" / f"{name}.py").read_text())

    def kind_named(identifier: str | None) -> bool:
        return any(kind in (identifier or "").lower() for kind in ("eagle3", "pard"))

    found = []
    for node in ast.walk(tree):
        # the two registries' import lines (drafter kinds; objectives, one of them PARD's loss) are exempt
        if isinstance(node, ast.ImportFrom) and node.module not in (
            "specdec.trainer.drafters",
            "specdec.trainer.objectives",
        ):
            found += [node.module] if kind_named(node.module) else []
            found += [alias.name for alias in node.names if kind_named(alias.name)]
        if isinstance(node, ast.Name | ast.Attribute):
            identifier = node.id if isinstance(node, ast.Name) else node.attr
            found += [identifier] if kind_named(identifier) else []
    assert not found, f"trainer/{name}.py names a drafter kind: {found}"
