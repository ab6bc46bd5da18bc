"""The CLI's progress bars (cli/run_progress.py): the progress artifacts of the run it waits for and of its subflows,
read from a real Prefect server; another run's artifact is not shown."""

from __future__ import annotations

import io
from uuid import uuid4

from prefect import flow
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from rich.console import Console

from cli.run_progress import RunProgress


@flow
def download(label: str, done: float) -> None:
    artifact = create_progress_artifact(progress=0.0, key=f"download-{label}", description=f"base backup -> {label}")
    update_progress_artifact(artifact, progress=done)


@flow
def drill(label: str) -> None:
    download(label, 100.0)  # a subflow's, as a restore drill's inside the DR test


def test_the_bars_show_the_waited_for_run_and_its_subflows_only(prefect_server):
    name = f"drill-{uuid4().hex[:8]}"
    drill.with_options(flow_run_name=name)("copy-a")
    download.with_options(flow_run_name=f"other-{uuid4().hex[:8]}")("copy-b", 40.0)  # another run's
    screen = io.StringIO()
    progress = RunProgress(Console(file=screen, width=120), name)
    progress.poll()
    progress.close()
    shown = screen.getvalue()
    assert "base backup -> copy-a" in shown and "100%" in shown
    assert "copy-b" not in shown
