"""``report.html``: the whole report in one file to share, charts embedded as base64.

No scripts, stylesheets or images from elsewhere: the file renders the same offline,
in a mail attachment or a CI artefact. Every table carries ``data-table="<stem>"`` and
every chart ``data-chart="<name>"``, so a test (or a reader's tooling) can find them.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path

from node.report.rendering import _TEXT_COLUMNS, TextTable

_STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #1d2733; }
h1 { font-size: 1.7em; } h2 { border-bottom: 1px solid #d5dbe1; padding-bottom: .2em; }
table { border-collapse: collapse; margin: .5em 0 .3em; font-size: 12.5px; }
th, td { border: 1px solid #d5dbe1; padding: 3px 7px; white-space: nowrap; }
th { background: #eef2f6; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr:nth-child(even) td { background: #f8fafb; }
.legend { color: #52606d; font-size: 12px; max-width: 1100px; }
.note { background: #fff7e0; border-left: 4px solid #e0a800; padding: .3em .8em; }
.scroll { overflow-x: auto; }
.charts { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; flex: 1 1 560px; max-width: 680px; }
figure img { width: 100%; border: 1px solid #e3e8ec; }
code { background: #eef2f6; padding: 0 3px; border-radius: 3px; }
"""


def _inline(text: str) -> str:
    """Markdown's ``**bold**`` and ```code``` on escaped text."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", out)


def markdown_lines(lines: Sequence[str], shift: int = 1) -> str:
    """The small Markdown the recommendation uses: headings, bullets, paragraphs."""
    out, in_list = [], False
    for line in lines:
        bullet = line.startswith("- ")
        if in_list and not bullet:
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) + shift, 6)
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif bullet:
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{_inline(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    return "\n".join(out + (["</ul>"] if in_list else []))


def table_html(t: TextTable) -> str:
    """One table: labels and text columns left-aligned, figures right-aligned."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.text.columns)
    rows = []
    for row in t.text.itertuples(index=False, name=None):
        cells = []
        for i, (col, value) in enumerate(zip(t.text.columns, row, strict=True)):
            cls = "" if i < t.labels or col in _TEXT_COLUMNS else ' class="num"'
            cells.append(f"<td{cls}>{html.escape(str(value))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    legend = f'<p class="legend">{_inline(t.legend)}</p>' if t.legend else ""
    return (f'<section><h2>{html.escape(t.title)}</h2><div class="scroll">'
            f'<table data-table="{html.escape(t.stem)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>{legend}'
            f'<p class="legend">CSV: <a href="{html.escape(t.stem)}.csv">{t.stem}.csv</a>'
            "</p></section>")


def chart_html(path: Path) -> str:
    """One chart, its PNG inlined as a data URI."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.name)
    return (f'<figure><img data-chart="{name}" alt="{html.escape(path.stem)}" '
            f'src="data:image/png;base64,{data}"><figcaption class="legend">{name}'
            "</figcaption></figure>")


def write_html(path: Path, *, intro: Sequence[str], notes: Sequence[str],
               rec_lines: Sequence[str], charts: Sequence[Path],
               tables: Sequence[TextTable]) -> Path:
    """Write the self-contained ``report.html``; returns its path."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             "<title>formatlab report</title>", f"<style>{_STYLE}</style></head><body>",
             "<h1>formatlab report</h1>"]
    parts += [f"<p>{_inline(line)}</p>" for line in intro if line.strip()]
    parts += [f'<p class="note">note: {_inline(n)}</p>' for n in notes]
    parts.append(markdown_lines(rec_lines))
    if charts:
        parts.append('<h2>Charts</h2><div class="charts">')
        parts += [chart_html(p) for p in charts]
        parts.append("</div>")
    parts += [table_html(t) for t in tables]
    parts.append("</body></html>")
    path.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return path
