"""bench/report.py: a rerun of some scenarios rewrites their rows and keeps the rest."""

from __future__ import annotations

from bench import report

HEAD = ["| scenario | tool | result |", "|---|---|---|"]
EVERY = {"latency", "burst"}


def first() -> str:
    rows = ["| Latency | sw | 1 |", "| Latency | peer | 2 |", "| Burst | sw | 3 |"]
    run = "- run: day 1: `python -m bench`"
    return report.update(None, "peers", "## Peers", run, ["About."], HEAD + rows, EVERY, EVERY)


def test_a_full_run_writes_a_section_that_parses_back() -> None:
    text = first()
    pre, sections = report.parse(text)
    assert pre == [report.TITLE]
    sec = sections["peers"]
    assert sec.runs == ["- run: day 1: `python -m bench`"]
    assert "| Burst | sw | 3 |" in sec.body
    # Parsing and writing again changes nothing.
    assert "\n\n".join(["\n".join(pre), sec.text()]) + "\n" == text


def test_a_rerun_of_one_tool_replaces_only_its_rows_and_keeps_every_run_line() -> None:
    run2 = "- run: day 2: `python -m bench --only latency --tools sw`"
    text = report.update(
        first(), "peers", "## Peers", run2, [], [*HEAD, "| Latency | sw | 9 |"], set(), EVERY
    )
    sec = report.parse(text)[1]["peers"]
    assert sec.runs == [run2, "- run: day 1: `python -m bench`"]
    table = [ln for ln in sec.body if ln.startswith("| ") and not ln.startswith("| scenario")]
    assert table == ["| Latency | sw | 9 |", "| Latency | peer | 2 |", "| Burst | sw | 3 |"]
    assert "About." in sec.body


def test_a_rerun_drops_only_the_run_lines_it_supersedes() -> None:
    run2 = "- run: day 2: `python -m bench --only burst`"
    text = report.update(
        first(), "peers", "## Peers", run2, [], [*HEAD, "| Burst | sw | 4 |"], {"burst"}, EVERY
    )
    run3 = "- run: day 3: `python -m bench --only burst`"
    text = report.update(
        text, "peers", "## Peers", run3, [], [*HEAD, "| Burst | sw | 5 |"], {"burst"}, EVERY
    )
    sec = report.parse(text)[1]["peers"]
    # Day 2's line covered only burst, which day 3 measured again; day 1's covers latency.
    assert sec.runs == [run3, "- run: day 1: `python -m bench`"]
    assert "| Burst | sw | 5 |" in sec.body
    assert "| Burst | sw | 4 |" not in sec.body


def test_other_sections_are_kept_verbatim_and_a_whole_rerun_replaces_its_own() -> None:
    text = first()
    noisy = ["| store | abuse |", "|---|---|", "| tmpfs | churn |"]
    run = "- run: day 2: `python -m bench --only noisy`"
    text = report.update(text, "noisy", "## Noisy", run, ["N."], noisy, {"noisy"}, {"noisy"})
    assert report.parse(text)[1]["peers"].text() in text
    run3 = "- run: day 3: `python -m bench`"
    again = [*HEAD, "| Latency | sw | 7 |"]
    text = report.update(text, "peers", "## Peers", run3, ["About 2."], again, EVERY, EVERY)
    sections = report.parse(text)[1]
    assert sections["peers"].runs == [run3]
    assert "| Burst | sw | 3 |" not in sections["peers"].body
    assert "| tmpfs | churn |" in sections["noisy"].body
    assert list(sections) == ["peers", "noisy"]
