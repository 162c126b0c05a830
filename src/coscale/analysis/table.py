"""A result table that prints as plain text, Markdown or JSON (no dependencies).

Rows hold raw values (numbers stay numbers for ``--json``); ``formats`` gives one Python format spec per
column for the text and Markdown renderings (``""`` means ``str``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    formats: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def _cells(self) -> list[list[str]]:
        formats = self.formats or [""] * len(self.columns)
        return [[_fmt(v, f) for v, f in zip(row, formats)] for row in self.rows]

    def to_text(self) -> str:
        cells = self._cells()
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]

        def line(values: list[str]) -> str:
            first = values[0].ljust(widths[0])
            return "  ".join([first] + [v.rjust(w) for v, w in zip(values[1:], widths[1:])]).rstrip()

        out = [self.title, "=" * len(self.title), line(self.columns),
               "  ".join("-" * w for w in widths)]
        out += [line(r) for r in cells]
        out += [f"* {n}" for n in self.notes]
        return "\n".join(out)

    def to_markdown(self) -> str:
        cells = self._cells()
        out = [f"### {self.title}", "", "| " + " | ".join(self.columns) + " |",
               "|" + "|".join(["---"] + ["---:"] * (len(self.columns) - 1)) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in cells]
        if self.notes:
            out += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(out)

    def to_html(self) -> str:
        from html import escape

        head = "".join(f"<th>{escape(c)}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in r) + "</tr>" for r in self._cells())
        notes = "".join(f"<li>{escape(n)}</li>" for n in self.notes)
        return (f"<h3>{escape(self.title)}</h3>\n<table><thead><tr>{head}</tr></thead><tbody>{body}"
                f"</tbody></table>\n" + (f"<ul>{notes}</ul>\n" if notes else ""))

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "columns": self.columns,
                "rows": [dict(zip(self.columns, r)) for r in self.rows], "notes": self.notes}


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if spec and isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def render(tables: list[Table], fmt: str = "text") -> str:
    """All tables in one format: ``"text"``, ``"markdown"`` or ``"json"``."""
    if fmt == "json":
        import json

        return json.dumps({"tables": [t.to_dict() for t in tables]}, indent=2, default=_json_default)
    joiner = "\n\n"
    if fmt == "markdown":
        return joiner.join(t.to_markdown() for t in tables)
    return joiner.join(t.to_text() for t in tables)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)
