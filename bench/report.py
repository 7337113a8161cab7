"""bench/results.md as sections that can be rerun one at a time.

A full `make bench` takes over an hour on 2 cores; rerunning one scenario (`python -m bench
--only noisy`) must not throw away the others' figures, nor pass them off as its own. So
the report is a title and one section per group of scenarios, each between markers:

    <!-- bench:noisy -->
    ## Noisy neighbour (issue 14)
    - run: <date>, commit <sha>, <machine>, load <before> -> <after>, <min>: `<command>`
    <prose and table(s)>
    <!-- /bench:noisy -->

A run rewrites the sections of the scenarios it ran and keeps the rest verbatim. In a
section with one table of `Row`s (the first cell names the scenario), a partial rerun
replaces only the rows of the scenarios it ran and adds its own `- run:` line above the
older ones (a line whose scenarios were all rerun is dropped). Pure text in, text out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

TITLE = "# session-watcher benchmark"
_OPEN = re.compile(r"^<!-- bench:([a-z0-9-]+) -->$")


@dataclass
class Section:
    key: str
    heading: str  # "## ..." line
    runs: list[str] = field(default_factory=list)  # "- run: ..." lines, newest first
    body: list[str] = field(default_factory=list)  # the rest, tables included

    def text(self) -> str:
        lines = [f"<!-- bench:{self.key} -->", self.heading, "", *self.runs]
        body = _strip(self.body)
        if body:
            lines += ["", *body]
        lines.append(f"<!-- /bench:{self.key} -->")
        return "\n".join(lines)


def _strip(lines: list[str]) -> list[str]:
    a, b = 0, len(lines)
    while a < b and not lines[a].strip():
        a += 1
    while b > a and not lines[b - 1].strip():
        b -= 1
    return lines[a:b]


def parse(text: str) -> tuple[list[str], dict[str, Section]]:
    """The preamble (lines before the first section) and the sections, in file order."""
    pre: list[str] = []
    sections: dict[str, Section] = {}
    cur: Section | None = None
    for line in text.splitlines():
        m = _OPEN.match(line)
        if cur is None and m:
            cur = Section(m.group(1), "")
        elif cur is not None and line == f"<!-- /bench:{cur.key} -->":
            sections[cur.key] = cur
            cur = None
        elif cur is None:
            pre.append(line)
        elif not cur.heading and line.startswith("## "):
            cur.heading = line
        elif line.startswith("- run: ") and not _strip(cur.body):
            cur.runs.append(line)
        elif cur.heading and (cur.body or line.strip()):
            cur.body.append(line)
    return _strip(pre), sections


def _run_scenarios(run_line: str, every: set[str]) -> set[str]:
    """The scenario names a `- run:` line covers: the `--only` list of its command, or
    `every` scenario of its section for a run without one."""
    m = re.search(r"--only ([a-z0-9 -]+?)(?: --|`)", run_line)
    return set(m.group(1).split()) if m else every


def _row_key(line: str) -> tuple[str, ...] | None:
    """A row's scenario and tool (its first two cells)."""
    if not line.startswith("| ") or line.startswith("|---"):
        return None
    return tuple(c.strip() for c in line.split("|")[1:3])


def merge_rows(old_body: list[str], new_rows: list[str], header_rows: int = 2) -> list[str]:
    """Replace the old table rows with the scenario and tool of a new row; the new rows go
    where the first replaced row was (or after the table)."""
    keys = {_row_key(r) for r in new_rows}
    out: list[str] = []
    inserted = False
    in_table = False
    seen_header = 0
    for line in old_body:
        key = _row_key(line)
        if line.startswith("|"):
            if not in_table:
                in_table, seen_header = True, 0
            if seen_header < header_rows:
                seen_header += 1
                out.append(line)
                continue
            if key in keys:
                if not inserted:
                    out += new_rows
                    inserted = True
                continue
            out.append(line)
            continue
        if in_table and not inserted:
            out += new_rows
            inserted = True
        in_table = False
        out.append(line)
    if not inserted:
        out += new_rows
    return out


def update(
    old: str | None,
    key: str,
    heading: str,
    run_line: str,
    about: list[str],
    table: list[str],
    ran: set[str],
    every: set[str],
) -> str:
    """The report `old` (None: none yet) with section `key` rewritten by one run.

    `table` is a Markdown table (header, separator, rows). `ran`: the scenarios this run
    measured (empty when it ran only some tools), `every`: the section's. A run of them
    all replaces the body with `about` and `table`; otherwise the rows are merged into the
    old section's table (by scenario and tool), and the older `- run:` lines whose
    scenarios were all run again are dropped."""
    pre, sections = parse(old or "")
    if not pre:
        pre = [TITLE]
    sec = sections.get(key)
    if sec is None or ran >= every:
        sec = Section(key, heading, [run_line], [*about, "", *table])
    else:
        sec.heading = heading
        older = [r for r in sec.runs if not _run_scenarios(r, every) <= ran]
        sec.runs = [run_line, *older]
        sec.body = merge_rows(sec.body, table[2:])
    sections[key] = sec
    parts = ["\n".join(pre), *(s.text() for s in sections.values())]
    return "\n\n".join(parts) + "\n"


__all__ = ["Section", "merge_rows", "parse", "update"]
