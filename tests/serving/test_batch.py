"""Batch scoring with the Production version: chunked, complete, recorded."""

import os

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from experiments import data
from registry._stages import PRODUCTION, move
from serving.batch import BATCH_EXPERIMENT, score
from stageflow.errors import StageflowError, UsageError
from stageflow.files import file_digest

pytestmark = pytest.mark.slow


@pytest.fixture
def production(register_versions, model_name):
    """``model_name`` with version 2 (rf) in Production."""
    register_versions(model_name)
    move(MlflowClient(), model_name, "2", PRODUCTION)
    return model_name


@pytest.fixture
def wine_features():
    return data.load("builtin:wine").drop(columns=["target"])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_scoring_in_chunks_matches_the_model_row_for_row(
    production, wine_features, tmp_path, suffix
):
    source, out = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
    if suffix == ".csv":
        wine_features.to_csv(source, index=False)
    else:
        wine_features.to_parquet(source)

    result = score(production, source, out, chunk_rows=40)  # 178 rows → 5 chunks

    scored = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert result.rows == len(scored) == len(wine_features)
    assert list(scored.columns) == [*wine_features.columns, "prediction", "model_version"]
    assert (scored["model_version"] == 2).all()
    expected = mlflow.pyfunc.load_model(f"models:/{production}/2").predict(wine_features)
    assert scored["prediction"].tolist() == list(expected)

    run = MlflowClient().get_run(result.run_id)
    assert run.data.params["version"] == "2"
    assert run.data.params["input_sha256"] == file_digest(source)
    assert run.data.metrics["rows"] == len(wine_features)
    experiment = MlflowClient().get_experiment(run.info.experiment_id)
    assert experiment.name == BATCH_EXPERIMENT


def test_a_missing_column_is_named_and_no_output_is_left(production, wine_features, tmp_path):
    source, out = tmp_path / "in.csv", tmp_path / "out.csv"
    wine_features.drop(columns=["proline"]).to_csv(source, index=False)
    with pytest.raises(UsageError, match="lacks column.*proline"):
        score(production, source, out)
    assert list(tmp_path.iterdir()) == [source]


def test_an_empty_file_is_refused(production, wine_features, tmp_path):
    source = tmp_path / "in.csv"
    wine_features.head(0).to_csv(source, index=False)
    with pytest.raises(UsageError, match="no rows"):
        score(production, source, tmp_path / "out.csv")


def test_no_production_version_is_refused(register_versions, model_name, tmp_path):
    register_versions(model_name)
    source = tmp_path / "in.csv"
    source.write_text("a\n1\n")
    with pytest.raises(StageflowError, match="has no Production version"):
        score(model_name, source, tmp_path / "out.csv")


def test_values_that_do_not_fit_the_schema_name_the_rows(production, wine_features, tmp_path):
    source, out = tmp_path / "in.csv", tmp_path / "out.csv"
    bad = wine_features.astype({"proline": object})
    bad.loc[bad.index[50], "proline"] = "lots"
    bad.to_csv(source, index=False)
    with pytest.raises(UsageError, match="row 51: column 'proline' holds text, not a number"):
        score(production, source, out, chunk_rows=40)
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_scoring_never_writes_through_a_link_planted_at_the_old_staging_name(
    production, wine_features, tmp_path, suffix
):
    source, out = tmp_path / f"in{suffix}", tmp_path / f"out{suffix}"
    if suffix == ".csv":
        wine_features.head(20).to_csv(source, index=False)
    else:
        wine_features.head(20).to_parquet(source)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / f".out{suffix}.partial").symlink_to(victim)  # the name scoring once wrote to
    out.symlink_to(victim)  # and the output's own name

    score(production, source, out)

    assert victim.read_text() == "keep me"
    assert not out.is_symlink()  # the link was replaced, not followed
    scored = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert len(scored) == 20
    assert (out.stat().st_mode & 0o777) == 0o666 & ~_umask()
    assert {p.name for p in tmp_path.iterdir()} == {
        source.name,
        out.name,
        victim.name,
        f".out{suffix}.partial",
    }


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
