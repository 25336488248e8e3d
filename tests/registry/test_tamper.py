"""A version's files are verified before every load: the gates, ``score``, ``status`` and
the monitor's reference and re-scoring.

Files are changed the way anyone who can write artifacts could: through the tracking
server's artifact API (``tests.helpers.overwrite_in_store``), never through the registry.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from experiments.data import load
from experiments.train import train
from monitoring import reference
from monitoring.performance import rescore
from registry import STAGING, promote, status
from serving.batch import score
from stageflow import manifest
from stageflow.errors import StageflowError
from tests.helpers import overwrite_in_store

INJECTED = "\nopen({marker!r}, 'w').write('ran')\n"


def test_a_trusted_type_outside_the_allow_list_is_refused_even_where_the_manifest_agrees(
    tmp_path,
):
    contract = tmp_path / manifest.CONTRACT_PATH
    contract.parent.mkdir(parents=True)
    contract.write_text(json.dumps({"skops_trusted_types": ["numpy.dtype", "builtins.eval"]}))

    with pytest.raises(manifest.TamperedVersion, match="builtins.eval") as refused:
        manifest.verify(tmp_path, manifest.digest_tree(tmp_path), "version 1 of m")
    assert "numpy.dtype" not in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.fixture
def trained(tracking_uri, model_name, untime_promotions):
    """A fresh version of its own (its artifacts are changed by the test), under the
    untimed policy; returns (client, name, version)."""
    version = train("builtin:wine", "target", model_name=model_name, family="lr").version
    untime_promotions(model_name)
    return mlflow.MlflowClient(tracking_uri), model_name, str(version)


def original(client, name: str, version: str, path: str, tmp_path: Path) -> str:
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{name}/{version}/{path}", dst_path=str(tmp_path / "orig")
        )
    ).read_text()


@pytest.mark.slow
def test_a_version_registered_by_train_carries_the_digest_of_every_file(trained, tmp_path):
    client, name, version = trained

    files = manifest.recorded(client, name, version)

    copy = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=tmp_path))
    assert files == manifest.digest_tree(copy)
    assert {"MLmodel", "guarded_model.py", "artifacts/pipeline.skops"} <= set(files)
    tags = client.get_model_version(name, version).tags
    assert tags[manifest.MANIFEST_SOURCE_TAG] == manifest.REGISTERED


@pytest.mark.slow
def test_the_manifest_is_read_from_the_client_s_registry_not_the_process_default(trained, tmp_path):
    client, name, version = trained
    expected = manifest.recorded(client, name, version)
    # A process whose default registry is another store (a library user's own setting).
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", elsewhere)
        patch.setenv("MLFLOW_REGISTRY_URI", elsewhere)
        mlflow.set_tracking_uri(elsewhere)
        mlflow.set_registry_uri(elsewhere)
        try:
            assert manifest.record(client, name, version) == expected
            copy = manifest.local_copy(name, version, client, tmp_path / "home", fresh=True)
        finally:
            mlflow.set_tracking_uri(client.tracking_uri)
            mlflow.set_registry_uri(client.tracking_uri)
    assert manifest.digest_tree(copy) == expected


@pytest.mark.slow
def test_the_gates_refuse_a_version_whose_code_file_was_overwritten_in_the_store(trained, tmp_path):
    client, name, version = trained
    marker = tmp_path / "injected"
    code = original(client, name, version, "guarded_model.py", tmp_path)
    overwrite_in_store(
        client, name, version, "guarded_model.py", code + INJECTED.format(marker=str(marker))
    )

    with pytest.raises(StageflowError, match=r"file guarded_model\.py changed since registration"):
        promote(name, version, STAGING, reason="tamper test")

    assert client.get_model_version(name, version).current_stage == "None"
    assert not marker.exists()


@pytest.mark.slow
def test_score_refuses_a_version_whose_pipeline_was_overwritten_in_the_store(trained, tmp_path):
    client, name, version = trained
    rows = tmp_path / "rows.csv"
    load("builtin:wine").drop(columns=["target"]).head(5).to_csv(rows, index=False)
    overwrite_in_store(client, name, version, "artifacts/pipeline.skops", "not a pipeline")
    out = tmp_path / "scored.csv"

    with pytest.raises(
        manifest.TamperedVersion, match=r"file artifacts/pipeline\.skops changed since registration"
    ):
        score(name, rows, out, version=version)

    assert not out.exists()


@pytest.mark.slow
def test_the_monitor_s_rescoring_refuses_a_version_whose_code_file_changed_in_the_store(
    trained, tmp_path
):
    client, name, version = trained
    inputs = load("builtin:wine").drop(columns=["target"]).head(5).add_prefix("input.")
    code = original(client, name, version, "guarded_model.py", tmp_path)
    marker = tmp_path / "ran"

    overwrite_in_store(
        client, name, version, "guarded_model.py", code + INJECTED.format(marker=str(marker))
    )

    with pytest.raises(
        manifest.TamperedVersion, match=r"file guarded_model\.py changed since registration"
    ):
        rescore(client, name, version, inputs)
    assert not marker.exists()


@pytest.mark.slow
def test_the_monitor_refuses_a_reference_changed_in_the_store(trained):
    client, name, version = trained
    overwrite_in_store(client, name, version, "artifacts/reference.json", "{}")

    with pytest.raises(
        manifest.TamperedVersion, match=r"file artifacts/reference\.json changed since registration"
    ):
        reference.load(client, name, version)


@pytest.mark.slow
def test_status_flags_a_production_version_whose_files_changed_in_the_store(trained, tmp_path):
    client, name, version = trained
    promote(name, version, STAGING, reason="tamper test")
    promote(name, version, "Production", reason="tamper test")
    assert status(name).problems == []
    code = original(client, name, version, "guarded_model.py", tmp_path)

    overwrite_in_store(client, name, version, "guarded_model.py", code + "\n# changed\n")

    (problem,) = status(name).problems
    assert f"version {version} of {name}: file guarded_model.py changed" in problem


@pytest.mark.slow
def test_a_version_registered_without_a_manifest_is_sealed_by_its_first_gated_load(
    tracking_uri, model_name, register_versions
):
    client = mlflow.MlflowClient(tracking_uri)
    version, _ = register_versions(model_name)  # mlflow.register_model: no manifest
    assert manifest.recorded(client, model_name, version) is None

    promote(model_name, version, STAGING, reason="first load")

    tags = client.get_model_version(model_name, version).tags
    assert tags[manifest.MANIFEST_SOURCE_TAG].startswith("first load by ")
    assert manifest.recorded(client, model_name, version)
