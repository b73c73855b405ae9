"""Table cells shared by every table module (tables.py, uncertainty.py, modes.py): mean ± std of a group's values,
the grouping of run records by (dataset, depth, method), and the LaTeX and HTML renderings of a display table.

The convention, the same in every table:

* a cell aggregates the n values of its group (the training seeds of a run group, unless the caption says otherwise);
* n >= 2: ``"mean ± std"``, std the SAMPLE standard deviation (``ddof = 1``, :data:`DDOF`);
* n = 1: the value alone, std None (an empty CSV cell) -- never "± 0", which would claim a measured spread;
* n = 0 (no value): ``"—"``.

The display tables carry a column ``n`` (values per row) and, when one cell has fewer values than its row (missing
entries), that cell says ``(n = k)``.
"""
from __future__ import annotations

import html
import math
import unicodedata
from typing import Any, Iterable, Mapping, NamedTuple

import numpy as np

DDOF = 1
GROUP_KEYS = ("dataset", "depth", "method")
MISSING = "—"


class Stat(NamedTuple):
    """Mean, sample std (None unless n >= 2) and number of the finite values of a group."""
    mean: float | None
    std: float | None
    n: int


def mean_std(values: Iterable[Any]) -> Stat:
    """:class:`Stat` of ``values``, skipping None and NaN; std with ``ddof = 1``, None for fewer than 2 values."""
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return Stat(None, None, 0)
    return Stat(float(np.mean(v)), float(np.std(v, ddof=DDOF)) if len(v) > 1 else None, len(v))


def fmt(mean: float | None, std: float | None, digits: int) -> str:
    """``"m ± s"``; ``"m"`` when ``std`` is None (a single value); ``"—"`` when ``mean`` is None."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return MISSING
    if std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def fmt_stat(stat: Stat, digits: int, n_row: int | None = None) -> str:
    """:func:`fmt` of a :class:`Stat`, followed by ``(n = k)`` when its k values are not the row's ``n_row``."""
    text = fmt(stat.mean, stat.std, digits)
    if n_row is not None and stat.n not in (0, n_row):
        text += f" (n = {stat.n})"
    return text


def add_stat(row: dict, disp: dict, key: str, title: str, values: Iterable[Any], digits: int) -> Stat:
    """Aggregate ``values`` into ``row[key_mean]``, ``row[key_std]`` (the CSV) and ``disp[title]`` (the display);
    the display cell names its own n when it differs from ``disp['n']`` (set by the caller)."""
    s = mean_std(values)
    row[f"{key}_mean"], row[f"{key}_std"] = s.mean, s.std
    disp[title] = fmt_stat(s, digits, disp.get("n"))
    return s


def spread_note(over: str = "training seeds", of: str = "row") -> str:
    """The caption sentence that says what a table's ± is (``of``: "row", or "column" for transposed layouts)."""
    return (f"Cells: mean ± std over the n {over} of each {of} (sample std, ddof = 1); where n = 1 the single value "
            "is shown without ±")


def group_key(rec: Mapping[str, Any]) -> tuple:
    return tuple(rec.get(k) for k in GROUP_KEYS)


def grouped(records: Iterable[Mapping[str, Any]]) -> dict[tuple, list[Mapping[str, Any]]]:
    """Records by their (dataset, depth, method), in first-seen order."""
    out: dict[tuple, list] = {}
    for r in records:
        out.setdefault(group_key(r), []).append(r)
    return out


def key_cols(key: tuple) -> dict:
    """The non-None (dataset, depth, method) of a group key, as columns."""
    return {k: v for k, v in zip(GROUP_KEYS, key) if v is not None}


# ------------------------------------------------------------------------------------------ LaTeX
LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
                 "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "<": r"\textless{}",
                 ">": r"\textgreater{}", "|": r"\textbar{}", "\n": " ", "\t": " "}
LATEX_MATH = {"±": r"\pm", "≥": r"\geq", "≤": r"\leq", "≠": r"\neq", "≈": r"\approx", "×": r"\times", "·": r"\cdot",
              "−": "-", "∞": r"\infty", "↑": r"\uparrow", "↓": r"\downarrow", "→": r"\rightarrow",
              "←": r"\leftarrow", "▲": r"\triangle", "▼": r"\nabla", "∇": r"\nabla", "‖": r"\|", "√": r"\surd",
              "∈": r"\in", "∑": r"\sum", "²": "^{2}", "³": "^{3}", "¹": "^{1}", "°": r"^{\circ}", "′": "'",
              "∗": "*", "⋅": r"\cdot"}
LATEX_TEXT = {"—": "---", "–": "--", "‘": "`", "’": "'", "“": "``", "”": "''", "…": r"\ldots{}", "\u00a0": "~",
              "•": r"\textbullet{}", "§": r"\S{}", "¶": r"\P{}", "©": r"\copyright{}", "£": r"\pounds{}",
              "ß": r"\ss{}", "æ": r"\ae{}", "Æ": r"\AE{}", "ø": r"\o{}", "Ø": r"\O{}", "œ": r"\oe{}", "Œ": r"\OE{}",
              "å": r"\aa{}", "Å": r"\AA{}", "ł": r"\l{}", "Ł": r"\L{}", "ı": r"\i{}"}
LATEX_ACCENTS = {"\u0300": "`", "\u0301": "'", "\u0302": "^", "\u0303": "~", "\u0304": "=", "\u0306": "u",
                 "\u0307": ".", "\u0308": '"', "\u030a": "r", "\u030b": "H", "\u030c": "v", "\u0327": "c"}
# Greek capitals that LaTeX spells with a Latin letter (no \Alpha); the others are \Gamma, \Delta, ...
GREEK_LATIN_CAPITALS = {"ALPHA": "A", "BETA": "B", "EPSILON": "E", "ZETA": "Z", "ETA": "H", "IOTA": "I",
                        "KAPPA": "K", "MU": "M", "NU": "N", "OMICRON": "O", "RHO": "P", "TAU": "T", "CHI": "X"}


def _greek(c: str) -> tuple[str, str] | None:
    r"""("math", r"\sigma") / ("text", "A") for a Greek letter, None for anything else."""
    name = unicodedata.name(c, "")
    for case in ("SMALL", "CAPITAL"):
        head = f"GREEK {case} LETTER "
        letter = name[len(head):].replace("FINAL SIGMA", "FINAL").replace("LAMDA", "LAMBDA")
        if name.startswith(head) and " " not in letter:
            if case == "SMALL":
                return ("text", "o") if letter == "OMICRON" else (
                    "math", r"\varsigma" if letter == "FINAL" else "\\" + letter.lower())
            if letter in GREEK_LATIN_CAPITALS:
                return "text", GREEK_LATIN_CAPITALS[letter]
            return "math", "\\" + letter.capitalize()
    return None


def _latex_piece(c: str) -> tuple[str, str]:
    """(mode, LaTeX) of one character: mode "math" (to go between $ $) or "text"."""
    if c in LATEX_SPECIAL:
        return "text", LATEX_SPECIAL[c]
    if ord(c) < 128:
        return "text", c if c.isprintable() else " "
    if c in LATEX_MATH:
        return "math", LATEX_MATH[c]
    if c in LATEX_TEXT:
        return "text", LATEX_TEXT[c]
    if (g := _greek(c)) is not None:
        return g
    base, *marks = unicodedata.normalize("NFKD", c)
    if base != c and all(unicodedata.combining(m) for m in marks):  # an accented letter: \'{e}
        mode, text = _latex_piece(base)
        if mode == "math":  # an accented Greek letter: the letter
            return mode, text
        for m in marks:
            text = f"\\{LATEX_ACCENTS[m]}{{{text}}}" if m in LATEX_ACCENTS else text
        return "text", text
    if base != c:  # a compatibility form: ligatures, full-width letters
        return "text", latex_escape("".join((base, *marks)))
    return "text", f"[U+{ord(c):04X}]"  # no pdflatex rendering: named, never passed through


def latex_escape(text: Any) -> str:
    r"""``text`` as LaTeX that pdflatex compiles with no package beyond the kernel: the special characters
    ``\ & % $ # _ { } ~ ^ < > |`` escaped, math symbols and Greek letters in ``$ $`` (Δ → ``$\Delta$``,
    ≥ → ``$\geq$``, ± → ``$\pm$``, ▲ / ▼ → ``$\triangle$`` / ``$\nabla$``), dashes and quotes as TeX ligatures,
    accented letters as accent commands; any other non-ASCII character is written as ``[U+XXXX]``."""
    out: list[str] = []
    math_run: list[str] = []
    for c in str(text):
        mode, tex = _latex_piece(c)
        if mode == "math":
            math_run.append(tex)
            continue
        if math_run:
            out.append("$" + " ".join(math_run) + "$")
            math_run = []
        out.append(tex)
    if math_run:
        out.append("$" + " ".join(math_run) + "$")
    return "".join(out)


def _cell(v: Any) -> str:
    return MISSING if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def latex_table(table, caption: str, label: str) -> str:
    r"""A ``table`` float with a booktabs ``tabular`` of a display DataFrame (every cell escaped by
    :func:`latex_escape`); compiles with pdflatex and ``\usepackage{booktabs}``. A tabular wider than the line is
    scaled to the line width where the document loads graphicx (``\resizebox``), else set at its natural width."""
    head = " & ".join(latex_escape(c) for c in table.columns) + r" \\"
    body = [" & ".join(latex_escape(_cell(v)) for v in row) + r" \\" for row in table.itertuples(index=False)]
    fit = (r"\ifdim\wd0>\linewidth\ifdefined\resizebox\resizebox{\linewidth}{!}{\usebox0}\else\usebox0\fi"
           r"\else\usebox0\fi")
    return "\n".join([r"\begin{table}", r"\centering", rf"\caption{{{latex_escape(caption)}}}",
                      rf"\label{{{label}}}", rf"\sbox0{{\begin{{tabular}}{{{'l' * len(table.columns)}}}",
                      r"\toprule", head, r"\midrule", *body, r"\bottomrule", r"\end{tabular}}%", fit,
                      r"\end{table}", ""])


# ------------------------------------------------------------------------------------------ HTML
HTML_STYLE = ("body{font-family:sans-serif;font-size:13px;margin:8px}"
              "table{border-collapse:collapse}caption{caption-side:top;text-align:left;max-width:60em;"
              "padding-bottom:6px}th,td{padding:3px 8px;text-align:left;white-space:nowrap}"
              "thead th{border-top:2px solid #333;border-bottom:1px solid #333}"
              "tbody tr:last-child td{border-bottom:2px solid #333}tbody tr:nth-child(even){background:#f4f4f4}")


def html_table(table, caption: str, title: str) -> str:
    """A self-contained HTML page (inline style, no scripts) with one ``<table>`` of a display DataFrame and its
    caption: what the Snakemake report shows for a table."""
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in table.columns)
    rows = "\n".join("<tr>" + "".join(f"<td>{esc(_cell(v))}</td>" for v in row) + "</tr>"
                     for row in table.itertuples(index=False))
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{esc(title)}</title>\n'
            f"<style>{HTML_STYLE}</style>\n</head>\n<body>\n<table>\n<caption>{esc(caption)}</caption>\n"
            f"<thead><tr>{head}</tr></thead>\n<tbody>\n{rows}\n</tbody>\n</table>\n</body>\n</html>\n")


__all__ = ["DDOF", "GROUP_KEYS", "MISSING", "Stat", "mean_std", "fmt", "fmt_stat", "add_stat", "spread_note",
           "group_key", "grouped", "key_cols", "latex_escape", "latex_table", "html_table"]
