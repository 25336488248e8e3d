"""Fixtures shared by the serving tests."""

from __future__ import annotations

import pytest

from serving.controller import BackgroundServe
from stageflow import processes


@pytest.fixture
def start_serving(tracking_uri, tmp_path):
    """Start ``serve`` on a background thread; every one started is stopped after the test."""
    started: list[BackgroundServe] = []

    def start(model_name: str, **kwargs) -> BackgroundServe:
        running = BackgroundServe(
            model_name,
            processes.free_port(),
            tracking_uri=tracking_uri,
            home=tmp_path,
            poll_interval=0.5,
            **kwargs,
        )
        started.append(running.start())
        return running

    yield start
    for running in started:
        running.stop()
