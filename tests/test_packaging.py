"""A built wheel holds every module of Stageflow's packages, and the command's own."""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = ("stageflow", "experiments", "registry", "serving", "monitoring")


# What a checkout holds beside the source: venvs, caches, earlier builds, local stores.
NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv*",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".stageflow",
    "mlruns",
    "mlartifacts",
    "test-artifacts",
    "results",
)


def source_modules(tree: Path) -> set[str]:
    """Every ``.py`` file under the package roots, as a path inside a wheel."""
    return {
        path.relative_to(tree).as_posix()
        for root in PACKAGE_ROOTS
        for path in (tree / root).rglob("*.py")
        if "__pycache__" not in path.parts
    }


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_the_command_s_entry_point(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds,
    # and a test leaves the checkout as it found it.
    tree = shutil.copytree(ROOT, tmp_path / "source", ignore=NOT_SOURCE)
    wheels = tmp_path / "wheels"
    # No build isolation: the dev venv's setuptools, so the test needs no network.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["--wheel-dir", str(wheels), str(tree)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("stageflow-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packed = {name for name in archive.namelist() if name.endswith(".py")}
    missing = sorted(source_modules(tree) - packed)
    assert missing == [], f"the wheel lacks {missing}"

    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module = script["stageflow"].split(":", 1)[0]
    assert f"{module.replace('.', '/')}/__init__.py" in packed
