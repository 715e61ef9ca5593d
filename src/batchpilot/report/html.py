"""Self-contained HTML reports: no network, every plot embedded as a base64 PNG.

Every report (plan, sweep, memory) is a list of :class:`Section` rendered by
:func:`write_html`, so they share one look.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: never needs a display

from batchpilot.files import atomic_write_text  # noqa: E402

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0} td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f5f5f5} td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #eee} .meta{color:#777;font-size:.9em;margin:.1em 0} .caveat{color:#8a4b00}
.meta code{color:#444;background:#f5f5f5;padding:0 .3em;word-break:break-all}
.table-wrap{max-width:100%;overflow-x:auto} .table-wrap table{font-size:.85em} .table-wrap th{white-space:normal}
.note{color:#555}
"""


def figure_to_data_uri(fig) -> str:
    """Render a matplotlib figure to a ``data:image/png;base64,...`` URI and close it."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass(frozen=True)
class Section:
    """One titled part of a report.

    Attributes:
        title: heading.
        paragraphs: plain-text paragraphs (escaped).
        table: optional rows; the first row is the header.
        figures: matplotlib figures to embed (closed after rendering).
        caveats: highlighted lines.
    """

    title: str
    paragraphs: Sequence[str] = ()
    table: Sequence[Sequence[object]] | None = None
    figures: Sequence[object] = field(default_factory=tuple)
    caveats: Sequence[str] = ()


def _cell(v: object) -> str:
    if isinstance(v, float):
        return html.escape(f"{v:.4g}")
    return html.escape(str(v))


def meta_lines(subtitle: str = "", command: str | None = None, now: datetime | None = None) -> list[str]:
    """The page's provenance as HTML lines: what it is about, the batchpilot version and date, the command."""
    from batchpilot import __version__
    from batchpilot.report.command import current_command

    stamp = (now or datetime.now(timezone.utc)).strftime("%Y-%m-%d %H:%M UTC")
    first = f"{html.escape(subtitle)} · " if subtitle.strip() else ""
    lines = [f"<p class='meta'>{first}generated {stamp} by batchpilot {html.escape(__version__)}</p>"]
    cmd = command if command is not None else current_command()
    if cmd:
        lines.append(f"<p class='meta'>command: <code>{html.escape(cmd)}</code></p>")
    return lines


def render_html(title: str, sections: Sequence[Section], subtitle: str = "", command: str | None = None) -> str:
    """The page as a string. ``command`` defaults to the command line of this process (see :mod:`.command`)."""
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
           f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
           *meta_lines(subtitle, command)]
    for s in sections:
        out.append(f"<h2>{html.escape(s.title)}</h2>")
        out.extend(f"<p>{html.escape(p)}</p>" for p in s.paragraphs)
        out.extend(f"<p class='caveat'>⚠ {html.escape(c)}</p>" for c in s.caveats)
        if s.table:
            head, *rows = s.table
            out.append("<div class='table-wrap'><table><tr>" + "".join(f"<th>{_cell(h)}</th>" for h in head) + "</tr>")
            out.extend("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in r) + "</tr>" for r in rows)
            out.append("</table></div>")
        out.extend(f"<p><img alt='{html.escape(s.title)}' src='{figure_to_data_uri(f)}'></p>" for f in s.figures)
    out.append("</body></html>")
    return "\n".join(out)


def write_html(path: str | Path, title: str, sections: Sequence[Section], subtitle: str = "",
               command: str | None = None) -> Path:
    """Write a self-contained report to ``path`` (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, render_html(title, sections, subtitle, command))
    return path
