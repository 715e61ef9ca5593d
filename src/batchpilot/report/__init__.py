"""Rendering: plots (matplotlib) and self-contained HTML pages. Results stay plain data."""

from batchpilot.report.html import Section, figure_to_data_uri, write_html

__all__ = ["Section", "figure_to_data_uri", "write_html"]
