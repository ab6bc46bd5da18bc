"""The DR test as one HTML page for management: pass/fail per part, RTO and RPO against the plan's objectives,
charts of each measured value across the evidence history, the trend against the previous test, findings, the
next due date, then each part's own report.

`render` is pure (a report and the evidence history in, a page out). The page is self-contained so that it opens
offline and as a mail attachment: inline CSS and SVG, no script, font, image or link to fetch (its
Content-Security-Policy forbids them all). Every text taken from a report is escaped.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import escape
from typing import Protocol, get_args

from pydantic import ValidationError

from drplan.dr_test_part import Measure, Part
from drplan.evidence import QUARTER, Record
from drplan.plan import Objectives, Tier
from drplan.results import Status
from drplan.rpo import DataClass
from drplan.timeutil import format_duration

TREND_TOLERANCE = 0.1
"""A part whose measured values (summed as shares of their objectives) moved by at most this fraction trends `same`:
timing noise, not a change."""
_RANK = {Status.passed: 0, Status.skipped: 1, Status.no_data: 1, Status.failed: 2, Status.error: 3}
_WIDTH, _HEIGHT, _LEFT, _RIGHT, _TOP, _BOTTOM = 340, 170, 58, 34, 14, 26
_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;color:#1f2328;background:#fff;
 margin:0 auto;max-width:1120px;padding:24px;line-height:1.45}
h1{font-size:1.6em;margin:0 0 4px}h2{font-size:1.25em;border-bottom:1px solid #d0d7de;padding-bottom:4px;
 margin-top:32px}h3{font-size:1.05em;margin:18px 0 6px}
table{border-collapse:collapse;width:100%;margin:8px 0}th,td{border:1px solid #d0d7de;padding:5px 8px;
 text-align:left;vertical-align:top}th{background:#f6f8fa}
.badge{display:inline-block;border-radius:10px;padding:0 9px;color:#fff;font-weight:600;font-size:.9em}
.badge.passed,.met{background:#1a7f37}.badge.failed,.missed{background:#cf222e}.badge.error{background:#9a6700}.badge.skipped{background:#8c959f}
.badge.no-data,.badge.new{background:#6e7781}.met,.missed{color:#fff}
.trend-better{color:#1a7f37;font-weight:600}.trend-worse{color:#cf222e;font-weight:600}
.due{font-size:1.1em;background:#ddf4ff;border:1px solid #54aeff;border-radius:6px;padding:8px 12px}
.muted{color:#656d76}.charts{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;border:1px solid #d0d7de;border-radius:6px;padding:6px}figcaption{font-size:.85em;max-width:340px}
svg text{font-size:10px;fill:#656d76}svg .axis{stroke:#8c959f}svg .objective{stroke:#cf222e;stroke-dasharray:6 4}
svg text.objective{fill:#cf222e;stroke:none}svg .measured{fill:none;stroke:#0969da;stroke-width:2}
svg circle.passed{fill:#1a7f37}svg circle.failed{fill:#cf222e}svg circle.missing{fill:#fff;stroke:#8c959f}
pre{background:#f6f8fa;border:1px solid #d0d7de;border-radius:6px;padding:10px;overflow-x:auto;font-size:.8em;
 white-space:pre-wrap}
@media print{.charts{display:block}figure{break-inside:avoid;display:inline-block}}
"""


class DrTest(Protocol):
    """What the page shows of a DR test report (flows.dr_test.DrTestReport)."""

    plan: str
    started_at: datetime
    finished_at: datetime | None
    parts: list[Part]
    record: str | None
    record_sha256: str | None

    @property
    def status(self) -> Status: ...


class Html(str):
    """Markup built here; any other str put into the page is escaped."""


def _text(value: object) -> Html:
    return value if isinstance(value, Html) else Html(escape(str(value), quote=True))


def _tag(name: str, content: object = "", **attributes: object) -> Html:
    attrs = "".join(f' {key.rstrip("_").replace("_", "-")}="{_text(value)}"' for key, value in attributes.items())
    return Html(f"<{name}{attrs}>{_text(content)}</{name}>")


def _join(fragments: Iterable[object]) -> Html:
    return Html("".join(_text(f) for f in fragments))


def _badge(word: str) -> Html:
    return _tag("span", word, class_=f"badge {word.replace(' ', '-')}")


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> Html:
    head = _tag("tr", _join(_tag("th", h) for h in header))
    return _tag("table", _join([head, *(_tag("tr", _join(_tag("td", c) for c in row)) for row in rows)]))


@dataclass(frozen=True)
class _Earlier:
    """An earlier DR test from the evidence history."""

    at: datetime
    parts: dict[str, Part]

    def measure(self, part: str, key: tuple[str, str]) -> Measure | None:
        return next((m for m in self.parts[part].measures if m.key == key), None) if part in self.parts else None


def _earlier(report: DrTest, history: Sequence[Record | str]) -> tuple[list[_Earlier], list[str]]:
    """The tests recorded before `report` (oldest first), and a line for each record that could not be read."""
    tests, problems, later = [], [], False
    for entry in history:
        if isinstance(entry, str):
            problems.append(entry)
            continue
        later = later or entry.sha256 == report.record_sha256
        if later:
            continue
        try:
            parts = [Part.model_validate(p) for p in entry.report["parts"]]
        except (KeyError, TypeError, ValidationError):
            problems.append(f"record {entry.sequence} is not a DR test report")
            continue
        tests.append(_Earlier(entry.recorded_at, {p.name: p for p in parts}))
    return tests, problems


def _load(measures: Iterable[Measure]) -> float:
    return sum(m.measured / m.objective for m in measures if m.measured is not None)


def trend(part: Part, before: Part | None) -> tuple[str, str]:
    """better, worse, same or new against the same part in the previous test, and why: its status first, then its
    measured values (as shares of their objectives) that both tests have."""
    if before is None:
        return "new", "not in the previous test"
    if _RANK[part.status] != _RANK[before.status]:
        word = "better" if _RANK[part.status] < _RANK[before.status] else "worse"
        return word, f"{part.status.value}, was {before.status.value}"
    then = {m.key: m for m in before.measures if m.measured is not None}
    pairs = [(m, then[m.key]) for m in part.measures if m.measured is not None and m.key in then]
    now_load, then_load = _load(m for m, _ in pairs), _load(b for _, b in pairs)
    if abs(now_load - then_load) <= TREND_TOLERANCE * max(now_load, then_load):
        return "same", f"{part.status.value}, as before"
    now, was = max(pairs, key=lambda pair: abs(_load([pair[0]]) - _load([pair[1]])))
    return ("better" if now_load < then_load else "worse",
            f"{now.kind} of {now.subject} {format_duration(now.measured)}, was {format_duration(was.measured)}")


def _header(report: DrTest, earlier: list[_Earlier]) -> Html:
    until = f" to {report.finished_at:%Y-%m-%d %H:%M:%SZ}" if report.finished_at else ""
    counts = ", ".join(f"{sum(p.status is s for p in report.parts)} {s.value}" for s in Status
                       if any(p.status is s for p in report.parts))
    record = f"; evidence record {report.record} (SHA-256 {report.record_sha256})" if report.record else ""
    due = report.started_at + QUARTER
    return _join([
        _tag("h1", _join([f"DR test of plan {report.plan}: ", _badge(report.status.value)])),
        _tag("p", f"{report.started_at:%Y-%m-%d %H:%M:%SZ}{until}; {len(report.parts)} parts: {counts}{record}; "
                  f"{len(earlier)} earlier tests in the evidence history", class_="muted"),
        _tag("p", _join(["Next DR test due by ", _tag("strong", f"{due:%Y-%m-%d}"),
                         " (a quarter after this test)."]), class_="due"),
    ])


def _parts(report: DrTest, trends: dict[str, tuple[str, str]], previous: _Earlier | None) -> Html:
    against = f"trend against {previous.at:%Y-%m-%d}" if previous else "trend (no earlier test)"
    rows = [[p.name, _badge(p.status.value),
             _join([_tag("span", trends[p.name][0], class_=f"trend-{trends[p.name][0]}"), f": {trends[p.name][1]}"]),
             p.summary] for p in report.parts]
    return _join([_tag("h2", "Parts"), _table(["part", "status", against, "summary"], rows)])


def _objective_rows(kind: str, objectives: Iterable[tuple[str, timedelta]], parts: list[Part]) -> list[list[object]]:
    """One row per measured value of each category, against its own objective (the plan's for the category, but a
    base backup's age is held to the database's `base_backup_max_age`); the plan's objective when none was measured."""
    rows: list[list[object]] = []
    for category, objective in objectives:
        measured = [m for p in parts for m in p.measures if m.kind == kind and m.category == category]
        rows += [[category, format_duration(m.objective), m.subject, format_duration(m.measured),
                  _tag("span", "met" if m.met else "NOT met", class_="badge " + ("met" if m.met else "missed"))]
                 for m in measured] or [[category, format_duration(objective), "not measured in this test", "-", "-"]]
    return rows


def _objectives(report: DrTest, objectives: Objectives) -> Html:
    rto = [(tier.value, objectives.rto_for(tier)) for tier in Tier]
    rpo = [(data_class, getattr(objectives.rpo, data_class)) for data_class in get_args(DataClass)]
    return _join([
        _tag("h2", "Objectives"),
        _tag("h3", "RTO per tier"), _table(["tier", "objective", "measured", "RTO", "verdict"],
                                           _objective_rows("RTO", rto, report.parts)),
        _tag("h3", "RPO per data class"), _table(["data class", "objective", "measured", "RPO", "verdict"],
                                                 _objective_rows("RPO", rpo, report.parts)),
    ])


def _chart(title: str, objective: timedelta, points: Sequence[tuple[datetime, Measure | None]]) -> Html:
    """A line chart of one measured value across tests (oldest first) with its objective as a dashed line."""
    values = [m.measured for _, m in points if m is not None and m.measured is not None]
    top = max([objective, *values]) * 1.25
    width, height = _WIDTH - _LEFT - _RIGHT, _HEIGHT - _TOP - _BOTTOM
    xs = [_LEFT + (width * i / (len(points) - 1) if len(points) > 1 else width / 2) for i in range(len(points))]

    def y(value: timedelta) -> float:
        return _TOP + height * (1 - value / top)

    def line(x1: float, y1: float, x2: float, y2: float, cls: str) -> Html:
        return _tag("line", x1=f"{x1:.1f}", y1=f"{y1:.1f}", x2=f"{x2:.1f}", y2=f"{y2:.1f}", class_=cls)

    def label(x: float, y_: float, text: str, anchor: str, cls: str = "") -> Html:
        return _tag("text", text, x=f"{x:.1f}", y=f"{y_:.1f}", text_anchor=anchor, class_=cls)

    base = _TOP + height
    frame = [line(_LEFT, _TOP, _LEFT, base, "axis"), line(_LEFT, base, _WIDTH - _RIGHT, base, "axis"),
             label(_LEFT - 4, base, "0", "end"), label(_LEFT - 4, _TOP + 8, format_duration(top), "end"),
             line(_LEFT, y(objective), _WIDTH - _RIGHT, y(objective), "objective"),
             label(_LEFT - 4, y(objective) + 3, format_duration(objective), "end", "objective")]
    runs: list[list[str]] = [[]]
    dots = []
    for x, (at, measure) in zip(xs, points, strict=True):
        if measure is None or measure.measured is None:
            runs.append([])
            dots.append(_tag("circle", _tag("title", f"{at:%Y-%m-%d}: not measured"), cx=f"{x:.1f}", cy=f"{base:.1f}",
                             r="3", class_="missing"))
            continue
        runs[-1].append(f"{x:.1f},{y(measure.measured):.1f}")
        dots.append(_tag("circle", _tag("title", f"{at:%Y-%m-%d}: {measure}"), cx=f"{x:.1f}",
                         cy=f"{y(measure.measured):.1f}", r="4", class_="passed" if measure.met else "failed"))
    lines = [_tag("polyline", points=" ".join(run), class_="measured") for run in runs if len(run) > 1]
    shown = range(len(points)) if len(points) <= 4 else sorted({0, len(points) // 2, len(points) - 1})
    dates = [label(xs[i], _HEIGHT - 8, f"{points[i][0]:%Y-%m-%d}", "middle") for i in shown]
    svg = _tag("svg", _join([*frame, *lines, *dots, *dates]), xmlns="http://www.w3.org/2000/svg", width=_WIDTH,
               height=_HEIGHT, viewBox=f"0 0 {_WIDTH} {_HEIGHT}", role="img", aria_label=title)
    return _tag("figure", _join([svg, _tag("figcaption", title)]))


def _charts(report: DrTest, earlier: list[_Earlier]) -> Html:
    figures = [_chart(f"{part.name}: {m.kind} of {m.subject} ({m.category})", m.objective,
                     [*((e.at, e.measure(part.name, m.key)) for e in earlier), (report.started_at, m)])
               for part in report.parts for m in part.measures]
    legend = ("One dot per DR test, oldest first: green met its objective, red missed it, hollow not measured; "
              "the dashed red line is the objective.")
    body = _tag("div", _join(figures), class_="charts") if figures else ""
    return _join([_tag("h2", "RTO and RPO across the evidence history"),
                  _tag("p", legend if figures else "Nothing measured.", class_="muted"), body])


def _findings(report: DrTest, trends: dict[str, tuple[str, str]], problems: list[str]) -> Html:
    measures = [(p, m) for p in report.parts for m in p.measures]
    slowest = sorted((m for _, m in measures if m.measured is not None), key=lambda m: m.measured / m.objective,
                     reverse=True)[:3]
    lists = [
        ("Failed checks", [f"{p.name}: {p.status.value}: {p.summary}" for p in report.parts
                           if p.status not in (Status.passed, Status.skipped)], "none: every part passed"),
        ("Missed objectives", [f"{m.kind} of {m.subject} ({m.category}, {p.name}): {m}" for p, m in measures
                               if not m.met], "none"),
        ("Slowest against their objectives",
         [f"{m.kind} of {m.subject}: {format_duration(m.measured)}, {m.measured / m.objective:.0%} of its "
          f"{m.category} objective {format_duration(m.objective)}" for m in slowest], "nothing measured"),
        ("Worse than the previous test", [f"{name}: {why}" for name, (word, why) in trends.items()
                                          if word == "worse"], "nothing"),
        *([("Evidence history not read", problems, "")] if problems else []),
    ]
    return _join([_tag("h2", "Findings and learnings"),
                  *(_join([_tag("h3", title), _tag("ul", _join(_tag("li", i) for i in items or [empty]))])
                    for title, items, empty in lists)])


def _details(report: DrTest) -> Html:
    details = [_join([_tag("h3", p.name), _tag("pre", p.details)]) for p in report.parts if p.details]
    return _join([_tag("h2", "Details"), *(details or [_tag("p", "No part has details.", class_="muted")])])


def render(report: DrTest, history: Sequence[Record | str], objectives: Objectives) -> str:
    """The page for `report`. `history` is the evidence chain as `drplan.evidence.history` reads it (the report's
    own record and any after it are left out; a line is a record that could not be read)."""
    earlier, problems = _earlier(report, history)
    previous = earlier[-1] if earlier else None
    trends = {p.name: trend(p, previous.parts.get(p.name) if previous else None) for p in report.parts}
    head = _join([
        Html('<meta charset="utf-8">'),
        Html("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'\">"),
        Html('<meta name="viewport" content="width=device-width, initial-scale=1">'),
        _tag("title", f"DR test {report.plan} {report.started_at:%Y-%m-%d}: {report.status.value}"),
        _tag("style", Html(_CSS)),
    ])
    body = _join([_header(report, earlier), _parts(report, trends, previous), _objectives(report, objectives),
                  _charts(report, earlier), _findings(report, trends, problems), _details(report)])
    return f'<!DOCTYPE html>\n<html lang="en">\n<head>{head}</head>\n<body>{body}</body>\n</html>\n'
