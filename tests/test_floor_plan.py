"""The floor plan's contracts (pyproject's [tool.importlinter]) cover every private module.

import-linter has no wildcard for "modules whose name starts with _", so each stage's
private modules are listed by name; a private module added without its line would be
open to the other stages. This test closes that gap.
"""

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("experiments", "registry", "serving", "monitoring")


def _contracts() -> list[dict]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_private_module_of_a_stage_is_forbidden_to_the_others(stage):
    private = {
        f"{stage}.{path.stem}" for path in (ROOT / stage).glob("_*.py") if path.stem != "__init__"
    }
    guarded = {
        module
        for contract in _contracts()
        if contract["type"] == "forbidden" and stage not in contract["source_modules"]
        for module in contract["forbidden_modules"]
        if module.startswith(f"{stage}.")
    }
    assert private <= guarded, f"add {sorted(private - guarded)} to pyproject's contracts"


def test_every_stage_is_a_layer_and_a_root_package():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layered = " ".join(config["contracts"][0]["layers"])
    for stage in STAGES:
        assert stage in config["root_packages"]
        assert stage in layered
