"""Batch scoring's progress bar: rows scored on stderr when asked, nothing when not."""

import pytest
from mlflow import MlflowClient

from experiments import data
from registry._stages import PRODUCTION, move
from serving.batch import score

pytestmark = pytest.mark.slow


def test_the_bar_counts_every_row_on_stderr_and_is_off_unless_asked(
    register_versions, model_name, tmp_path, capsys
):
    register_versions(model_name)
    move(MlflowClient(), model_name, "1", PRODUCTION)
    source = tmp_path / "in.parquet"
    data.load("builtin:wine").drop(columns=["target"]).to_parquet(source)

    score(model_name, source, tmp_path / "quiet.parquet", chunk_rows=40)
    assert f"score {model_name}" not in capsys.readouterr().err

    score(model_name, source, tmp_path / "out.parquet", chunk_rows=40, progress=True)
    captured = capsys.readouterr()
    last = captured.err.replace("\r", "\n").strip().splitlines()[-1]
    assert last.startswith(f"score {model_name} v1:")
    assert "178/178" in last  # Parquet's footer gives the total
    assert f"score {model_name}" not in captured.out
