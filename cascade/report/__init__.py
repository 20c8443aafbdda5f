"""Tables (``table.md``, ``table_full.md``, ``table.csv``) and figures of a run: views of one operating-point table.

:mod:`~cascade.report.tables` renders ``table.md`` and the long-form table, :mod:`~cascade.report.full`
``table_full.md``, :mod:`~cascade.report.format` what they share;
:mod:`~cascade.report.figures` draws the PNGs (matplotlib, imported only when drawing).
"""

from cascade.report.figures import write_figures
from cascade.report.full import render_full
from cascade.report.tables import (
    MISSED,
    pct,
    render_markdown,
    sig,
    table_rows,
    value,
    write_tables,
)

__all__ = ["MISSED", "pct", "render_full", "render_markdown", "sig", "table_rows", "value", "write_figures", "write_tables"]
