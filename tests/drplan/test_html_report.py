"""The DR test's HTML page, rendered from a report and a real evidence chain of three records (the oldest written
before parts kept their measured values): each part's verdict and trend, the objectives per tier and data class,
one chart per measured value across the history, findings, the next due date, escaping; and the page opened in
headless Chromium (no console message, a screenshot that is not blank)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import zlib
from collections import Counter
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest

from drplan.dr_test_part import Measure, Part
from drplan.evidence import QUARTER, DirStore, append, history, record_name
from drplan.html_report import render, trend
from drplan.plan import Objectives
from drplan.results import Status
from flows.dr_test import DrTestReport
from tests.browser import chromium as chromium_binary

STARTED = datetime(2026, 12, 6, 0, 10, tzinfo=UTC)
DRILL, RPO, BACKUP, HOSTILE = ("restore drill of devonn-postgres", "RPO verification", "backup of bucket data",
                               '<script>alert("x")</script>')
HEARTBEAT, BASE_BACKUP = "devonn-postgres primary newest heartbeat", "devonn-postgres base backup"


def drill(rto: timedelta, status: Status = Status.passed) -> Part:
    return Part(name=DRILL, status=status, summary=f"RTO {rto}", details="# Restore drill: devonn-postgres",
                measures=[Measure(kind="RTO", subject="devonn-postgres", category="critical", measured=rto,
                                  objective=timedelta(hours=1)),
                          Measure(kind="RPO", subject="devonn-postgres", category="database",
                                  measured=timedelta(seconds=30), objective=timedelta(minutes=5))])


def rpo(age: timedelta) -> Part:
    return Part(name=RPO, status=Status.passed, summary="2 met, 0 breached, 0 errors",
                measures=[Measure(kind="RPO", subject=HEARTBEAT, category="database", measured=age,
                                  objective=timedelta(minutes=5)),
                          Measure(kind="RPO", subject="config backup age", category="configuration",
                                  measured=timedelta(minutes=10), objective=timedelta(hours=1)),
                          Measure(kind="RPO", subject=BASE_BACKUP, category="database",
                                  measured=timedelta(hours=20), objective=timedelta(hours=25))])


BACKUP_PART = Part(name=BACKUP, status=Status.passed, summary="verified: 2 objects")


@pytest.fixture
def chain(tmp_path) -> tuple[DrTestReport, DirStore]:
    """Three records: one written before parts had measured values, the previous test, and this report."""
    store = DirStore(tmp_path / "evidence")
    old = {"plan": "devonn", "started_at": (STARTED - 2 * QUARTER).isoformat(), "status": "passed",
           "parts": [{"name": DRILL, "status": "passed", "summary": "RTO 40m", "details": ""}]}
    append(store, old, at=STARTED - 2 * QUARTER)
    previous = DrTestReport(plan="devonn", started_at=STARTED - QUARTER,
                            parts=[rpo(timedelta(minutes=3)), BACKUP_PART, drill(timedelta(minutes=50))])
    append(store, previous.model_dump(mode="json"), at=STARTED - QUARTER)
    report = DrTestReport(plan="devonn", started_at=STARTED, finished_at=STARTED + timedelta(minutes=20),
                          parts=[rpo(timedelta(seconds=4)), BACKUP_PART, drill(timedelta(minutes=70), Status.failed),
                                 Part(name=HOSTILE, status=Status.error, summary="<b>boom</b> & more",
                                      details="<img src=x onerror=alert(1)>")])
    record = append(store, report.model_dump(mode="json"), at=STARTED + timedelta(minutes=20))
    report.record, report.record_sha256 = store.where(record_name(3)), record.sha256
    return report, store


class Page(HTMLParser):
    """The rendered page as the browser reads it: its text, table rows (cell texts), list items, a count of each
    (tag, class) and the attribute names used."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self.items: list[str] = []
        self.tags: Counter = Counter()
        self.attributes: set[str] = set()
        self.text = ""
        self._row: list[str] = []
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags[tag, dict(attrs).get("class")] += 1
        self.attributes |= {name for name, _ in attrs}
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th", "li"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th", "li"):
            (self._row if tag != "li" else self.items).append("".join(self._cell))
            self._cell = None
        elif tag == "tr":
            self.rows.append(self._row)

    def handle_data(self, data):
        self.text += data
        if self._cell is not None:
            self._cell.append(data)

    def row(self, first: str) -> list[str]:
        (found,) = [r for r in self.rows if r[0] == first]
        return found

    def rows_of(self, first: str) -> list[list[str]]:
        return [r for r in self.rows if r[0] == first]


def test_each_part_shows_its_verdict_and_its_trend_against_the_previous_test(chain):
    report, store = chain
    html = render(report, history(store), Objectives())
    page = Page(html)
    assert page.row("part")[2] == f"trend against {STARTED - QUARTER:%Y-%m-%d}"
    assert page.row(RPO)[1:3] == ["passed", "better: RPO of devonn-postgres primary newest heartbeat 4.0s, was 3m00s"]
    assert page.row(BACKUP)[1:3] == ["passed", "same: passed, as before"]
    assert page.row(DRILL)[1:3] == ["failed", "worse: failed, was passed"]
    assert page.row(HOSTILE)[1:] == ["error", "new: not in the previous test", "<b>boom</b> & more"]
    assert "DR test of plan devonn: error" in page.text and "2 passed, 1 failed, 1 error" in page.text
    assert f"Next DR test due by {STARTED + QUARTER:%Y-%m-%d} (a quarter after this test)." in page.text
    assert "2 earlier tests in the evidence history" in page.text and report.record_sha256 in page.text


def test_rto_per_tier_and_rpo_per_data_class_against_the_plans_objectives(chain):
    report, store = chain
    page = Page(render(report, history(store), Objectives(rto={"secondary": "2h"})))
    assert page.row("critical") == ["critical", "1h00m", "devonn-postgres", "1h10m", "NOT met"]
    assert page.row("secondary") == ["secondary", "2h00m", "not measured in this test", "-", "-"]
    assert page.row("tertiary")[:2] == ["tertiary", "24h00m"]
    assert page.rows_of("database") == [["database", "5m00s", HEARTBEAT, "4.0s", "met"],
                                        ["database", "25h00m", BASE_BACKUP, "20h00m", "met"],  # its own objective
                                        ["database", "5m00s", "devonn-postgres", "30.0s", "met"]]
    assert page.row("file_storage")[:3] == ["file_storage", "15m00s", "not measured in this test"]
    assert page.row("configuration") == ["configuration", "1h00m", "config backup age", "10m00s", "met"]


def test_findings_name_failed_parts_missed_objectives_and_the_slowest(chain):
    report, store = chain
    items = Page(render(report, history(store), Objectives())).items
    assert f"{DRILL}: failed: RTO 1:10:00" in items and f"{HOSTILE}: error: <b>boom</b> & more" in items
    assert f"RTO of devonn-postgres (critical, {DRILL}): 1h10m (objective 1h00m, NOT met)" in items
    assert items[items.index("RTO of devonn-postgres: 1h10m, 117% of its critical objective 1h00m") + 1] == (
        f"RPO of {BASE_BACKUP}: 20h00m, 80% of its database objective 25h00m")
    assert f"{DRILL}: failed, was passed" in items


def test_one_chart_per_measured_value_across_the_history_with_its_objective(chain):
    report, store = chain
    html = render(report, history(store), Objectives())
    page = Page(html)
    measures = sum(len(p.measures) for p in report.parts)
    assert page.tags["svg", None] == measures == 5
    assert page.tags["line", "objective"] == measures and page.tags["text", "objective"] == measures
    # record 1 has no measured values (a hollow dot), records 2 and 3 do; the drill's RTO missed its objective
    assert page.tags["circle", "missing"] == measures
    assert page.tags["circle", "passed"] + page.tags["circle", "failed"] == 2 * measures
    assert page.tags["circle", "failed"] == 1 and page.tags["polyline", "measured"] == measures
    assert f"{DRILL}: RTO of devonn-postgres (critical)" in html and 'class="objective">1h00m</text>' in html


def test_report_text_is_escaped_and_the_page_fetches_nothing(chain):
    report, store = chain
    html = render(report, history(store), Objectives())
    page = Page(html)
    assert page.tags["script", None] == page.tags["img", None] == page.tags["b", None] == 0
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html and HOSTILE in page.text
    assert "&lt;img src=x onerror=alert(1)&gt;" in html and "<img src=x onerror=alert(1)>" in page.text
    assert not page.attributes & {"src", "href", "srcset", "action", "onerror", "onload"}
    assert page.tags["link", None] == 0 and "url(" not in html and "@import" not in html
    assert "default-src 'none'" in html


def test_a_damaged_record_is_named_and_the_others_still_charted(chain):
    report, store = chain
    (store.path / record_name(2)).write_text("{}")
    page = Page(render(report, [*history(store), "s3://evidence/: AccessDenied"], Objectives()))
    assert any(i.startswith("record 2 (") and "is altered" in i for i in page.items)
    assert "s3://evidence/: AccessDenied" in page.items
    assert page.row("part")[2] == f"trend against {STARTED - 2 * QUARTER:%Y-%m-%d}"
    assert page.row(DRILL)[2] == "worse: failed, was passed" and page.row(RPO)[2] == "new: not in the previous test"


def test_a_report_outside_any_chain_is_the_newest_point():
    report = DrTestReport(plan="devonn", started_at=STARTED, parts=[drill(timedelta(minutes=20))])
    page = Page(render(report, [], Objectives()))
    assert page.row("part")[2] == "trend (no earlier test)" and page.row(DRILL)[2].startswith("new")
    assert page.tags["circle", "passed"] == 2 and page.tags["polyline", "measured"] == 0


def test_a_change_within_a_tenth_of_the_objective_is_the_same():
    assert trend(drill(timedelta(minutes=33)), drill(timedelta(minutes=30)))[0] == "same"
    assert trend(drill(timedelta(minutes=40)), drill(timedelta(minutes=30))) == (
        "worse", "RTO of devonn-postgres 40m00s, was 30m00s")
    assert trend(drill(timedelta(minutes=20)), drill(timedelta(minutes=30)))[0] == "better"


# Headless Chromium: the page as management sees it.

def chromium(page: Path, *args: str, profile: Path) -> subprocess.CompletedProcess:
    """Run headless Chromium on `page` (its whole process group killed if it hangs)."""
    command = [chromium_binary(), "--headless", "--disable-gpu", "--no-sandbox", "--window-size=1200,1600",
               f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args, page.as_uri()]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def console_messages(stderr: str) -> list[str]:
    """What the page wrote to the console, errors included (Chromium logs each as a CONSOLE line)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]


def png_rows(path: Path) -> tuple[int, int, set[bytes]]:
    """Width, height and the distinct scanlines (as filtered) of a PNG: a blank page has a handful at most."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = {}, 8
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        chunks.setdefault(kind, []).append(data[offset + 8:offset + 8 + length])
        offset += 12 + length
    width, height, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][0][:10])
    pixels = zlib.decompress(b"".join(chunks[b"IDAT"]))
    stride = 1 + width * {2: 3, 6: 4}[colour] * depth // 8
    return width, height, {pixels[i:i + stride] for i in range(0, len(pixels), stride)}


@pytest.fixture
def browser() -> None:
    chromium_binary()  # skips, or fails under CI=true, without it


@pytest.mark.usefixtures("browser")
def test_the_page_renders_in_headless_chromium_without_console_messages(chain, tmp_path):
    report, store = chain
    page = tmp_path / "dr-test.html"
    page.write_text(render(report, history(store), Objectives()), encoding="utf-8")
    shot = tmp_path / "dr-test.png"
    run = chromium(page, f"--screenshot={shot}", profile=tmp_path / "profile")
    assert run.returncode == 0, run.stderr
    assert console_messages(run.stderr) == []
    width, height, rows = png_rows(shot)
    assert (width, height) == (1200, 1600) and len(rows) > 100, f"{len(rows)} distinct rows: a blank screenshot"
    dom = chromium(page, "--dump-dom", profile=tmp_path / "profile")
    assert dom.stdout.count("<svg") == 5 and "<script" not in dom.stdout and "<img" not in dom.stdout

    broken = tmp_path / "broken.html"  # the two checks above can fail: a blank page with a script error
    broken.write_text("<!DOCTYPE html><html><body><script>missing()</script></body></html>")
    run = chromium(broken, f"--screenshot={tmp_path / 'broken.png'}", profile=tmp_path / "profile")
    assert "Uncaught ReferenceError: missing is not defined" in "".join(console_messages(run.stderr))
    assert len(png_rows(tmp_path / "broken.png")[2]) < 10
