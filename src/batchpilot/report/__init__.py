"""Rendering: plots (matplotlib) and self-contained HTML pages. Results stay plain data.

Attributes load lazily, so ``batchpilot.report.command`` (used by the CLI at start-up) does not import matplotlib.
"""

from __future__ import annotations

__all__ = ["Section", "figure_to_data_uri", "write_html"]


def __getattr__(name: str):
    if name in __all__:
        from batchpilot.report import html

        return getattr(html, name)
    raise AttributeError(f"module 'batchpilot.report' has no attribute {name!r}")
