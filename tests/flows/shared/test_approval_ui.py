"""The approval as an approver meets it in the Prefect UI (headless Chromium against a real server with its UI):
the resume dialog shows what is approved (the summary and the timeline), and approving there (the toggle, a reason,
a name, Submit) completes the run with that decision."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from prefect import flow
from prefect.exceptions import ObjectNotFound
from prefect.flow_runs import resume_flow_run
from prefect.settings import PREFECT_API_URL, temporary_settings

from cli.prefect_api import temporary_server
from flows.shared.gates import Approval, request_approval
from flows.shared.report import RecoveryReport
from tests.browser import browser, chromium

SUMMARY = "## Promote devonn-rds-replica?\n\n- fence: devonn-rds-production read-only\n- measured lag: 0.4 s"

TYPE_INTO = """(label, text) => {
  const field = [...document.querySelectorAll('[role=dialog] .schema-form-property')]
    .find(p => p.innerText.startsWith(label)).querySelector('textarea');
  Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set.call(field, text);
  field.dispatchEvent(new Event('input', {bubbles: true}));
  return true;
}"""


@flow(name="ui-approval-probe")
def ui_gated() -> Approval:
    report = RecoveryReport(flow="ui-approval-probe", plan="test", subject="devonn-rds", dry_run=False)
    return request_approval(report, "ui-approval", SUMMARY, approve=False, timeout=timedelta(seconds=240))


@pytest.fixture
def ui_server(tmp_path_factory, monkeypatch) -> Iterator[str]:
    """A Prefect server with its UI (as `drplan serve` and the CLI run it) on a database of its own (not
    ~/.prefect's, where other tests' CLI runs may still be paused), the API in this process's settings."""
    chromium()  # skip (or fail under CI) before starting anything
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect-home")))
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with temporary_server() as api, temporary_settings(updates={PREFECT_API_URL: api}):
        yield api
        APILogWorker.drain_all(timeout=10)  # the runs' logs and events reach this server before it stops, not a
        EventsWorker.drain_all(timeout=10)  # dead address the process would retry at exit


def test_the_ui_dialog_shows_the_summary_and_approving_there_completes_the_run(ui_server, tmp_path):
    api = ui_server
    result: dict = {}
    runner = threading.Thread(target=contextvars.copy_context().run,
                              args=(lambda: result.update(state=ui_gated(return_state=True)),))
    runner.start()
    run = None
    try:
        run = paused_with_its_form(runner)
        approve_in_the_ui(api, run, tmp_path)
        runner.join(60)
    finally:
        if run is not None and runner.is_alive():  # the UI part failed: end the run before its server goes
            resume_flow_run(run.id, run_input={"approve": False, "reason": "test failed"})
            runner.join(60)
    decision = result["state"].result()
    assert (decision.approve, decision.reason, decision.approver) == (True, "lag checked in the dialog", "alice (UI)")


def paused_with_its_form(runner: threading.Thread):
    """The paused run, once its form (schema and description) is stored: the UI reads them when the page opens."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.input import keyset_from_paused_state

    deadline = time.monotonic() + 60
    while True:
        with get_client(sync_client=True) as client:
            for run in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["ui-approval-probe"]))):
                if run.state and run.state.is_paused():
                    try:
                        client.read_flow_run_input(run.id, keyset_from_paused_state(run.state)["schema"])
                        return run
                    except ObjectNotFound:
                        pass
        assert time.monotonic() < deadline and runner.is_alive(), "the run never paused"
        time.sleep(0.5)


def approve_in_the_ui(api: str, run, tmp_path) -> None:
    with browser(tmp_path / "profile") as page:
        page.call("Page.navigate", url=f"{api.removesuffix('/api')}/runs/flow-run/{run.id}")
        page.wait("[...document.querySelectorAll('button')].some(b => b.innerText.trim() === 'Resume')",
                  what="the Resume button")
        page.js("[...document.querySelectorAll('button')].find(b => b.innerText.trim() === 'Resume').click()")
        dialog = page.wait("(t => t?.includes('Approver') && t)(document.querySelector('[role=dialog]')?.innerText)",
                           what="the resume dialog with its form")  # the form is fetched after the dialog opens
        assert "Promote devonn-rds-replica?" in dialog
        assert "fence: devonn-rds-production read-only" in dialog and "measured lag: 0.4 s" in dialog
        assert "Timeline so far" in dialog and "Approver" in dialog
        page.js("document.querySelector('[role=dialog] [role=switch]').click()")
        page.wait("document.querySelector('[role=dialog] [role=switch]').getAttribute('aria-checked') === 'true'",
                  what="the Approve toggle on")
        page.js(f"({TYPE_INTO})('Reason', 'lag checked in the dialog')")
        page.js(f"({TYPE_INTO})('Approver', 'alice (UI)')")
        time.sleep(1)  # the form takes typed values into its model on a debounce, as a person's typing would allow
        page.js("[...document.querySelectorAll('[role=dialog] button')].find(b => b.innerText.trim() === 'Submit')"
                ".click()")
        page.wait("!document.querySelector('[role=dialog]')", what="the dialog to close")
        assert page.console_errors == []
