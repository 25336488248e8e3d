"""A built wheel holds every module of Stageflow's packages, and the command's own."""

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_ROOTS = ("stageflow", "experiments", "registry", "serving", "monitoring")


def source_modules() -> set[str]:
    """Every ``.py`` file under the package roots, as a path inside a wheel."""
    return {
        path.relative_to(ROOT).as_posix()
        for root in PACKAGE_ROOTS
        for path in (ROOT / root).rglob("*.py")
        if "__pycache__" not in path.parts
    }


@pytest.mark.slow
def test_the_wheel_holds_every_module_and_the_command_s_entry_point(tmp_path):
    # No build isolation: the dev venv's setuptools, so the test needs no network.
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q"]
        + ["--wheel-dir", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = tmp_path.glob("stageflow-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packed = {name for name in archive.namelist() if name.endswith(".py")}
    missing = sorted(source_modules() - packed)
    assert missing == [], f"the wheel lacks {missing}"

    script = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module = script["stageflow"].split(":", 1)[0]
    assert f"{module.replace('.', '/')}/__init__.py" in packed
