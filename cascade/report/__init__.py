"""Tables (``table.md``, ``table.csv``) and figures of a run: views of one operating-point table.

:mod:`~cascade.report.tables` renders the markdown and long-form tables;
:mod:`~cascade.report.figures` draws the PNGs (matplotlib, imported only when drawing).
"""

from cascade.report.figures import write_figures
from cascade.report.tables import (
    MISSED,
    pct,
    render_markdown,
    sig,
    table_rows,
    value,
    write_tables,
)

__all__ = ["MISSED", "pct", "render_markdown", "sig", "table_rows", "value", "write_figures", "write_tables"]
