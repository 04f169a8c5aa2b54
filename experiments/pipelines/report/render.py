"""How every report table is written: a pandas DataFrame of display strings to Markdown,
LaTeX or CSV, and how a number reads in it. The results tables, the smoke table of the README
and the mechanism study's tables all render here."""

from __future__ import annotations

import pandas as pd
from tabulate import DataRow, TableFormat

# GitHub Markdown as the generated files have always been written: no column padding, one
# "---" per column under the header (so that a table's text does not change with its widths).
MARKDOWN = TableFormat(
    lineabove=None,
    linebelowheader=lambda widths, _aligns: "|" + "|".join("---" for _ in widths) + "|",
    linebetweenrows=None,
    linebelow=None,
    headerrow=DataRow("|", "|", "|"),
    datarow=DataRow("|", "|", "|"),
    padding=1,
    with_header_hide=None,
)

# Unicode that LaTeX (without extra packages) does not take, and the characters it reserves.
_TEX = (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"), ("#", r"\#"),
        ("±", r"$\pm$"), ("Δ", r"$\Delta$"), ("→", r"$\to$"), ("—", "--"))  # fmt: skip


def fmt_value(value: float | None, signed: bool = False, scale: float | None = None) -> str:
    """Two decimals for values of 10 and above, three below, "n/a" for None; ``scale`` (the
    row's mean) sets the precision so that a row's numbers line up."""
    if value is None or pd.isna(value):
        return "n/a"
    digits = 2 if abs(value if scale is None else scale) >= 10 else 3
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def to_markdown(frame: pd.DataFrame) -> str:
    """The frame (display strings) as a Markdown table, without a trailing newline."""
    return frame.to_markdown(
        index=False, tablefmt=MARKDOWN, stralign=None, numalign=None, disable_numparse=True
    )


def tex_escape(text: str) -> str:
    """``text`` as LaTeX source."""
    for a, b in _TEX:
        text = text.replace(a, b)
    return text


def to_latex(frame: pd.DataFrame, caption: str, text_columns: int) -> str:
    """The frame (display strings) as a booktabs ``table`` float: the first
    ``text_columns`` columns left-aligned, the rest right-aligned."""
    escaped = frame.map(tex_escape).rename(columns=tex_escape)
    return escaped.style.hide(axis="index").to_latex(
        position="t",
        position_float="centering",
        caption=tex_escape(caption),
        hrules=True,
        column_format="l" * text_columns + "r" * (len(frame.columns) - text_columns),
    )
