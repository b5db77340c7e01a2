"""The HTML report of a run folder.

A run folder (written by ``latentsel identify``, ``latentsel demo`` and others) holds one or
more *sections*. A section is a folder with a ``section.json`` manifest::

    {"title": "Identifiability: recovery against N", "order": 20,
     "text": ["paragraph one (plain text)", "paragraph two"],
     "figures": [{"file": "figures/curves.png", "caption": "..."}],
     "tables": [{"caption": "...", "columns": ["regime", "N", "accuracy"],
                 "rows": [["sft", 100, 0.8312], ["rl", 100, null]]}]}

Only ``title`` is required. ``order`` (a number, default 100) sorts the sections, ties broken
by the folder's path relative to the run folder. Figure files are PNG, SVG or JPEG (told
apart by extension), relative to the section's folder and inside it: regular files reached
without a symbolic link below the section folder, whose first bytes match their type (an SVG
file opens an ``<svg>`` element after at most an XML declaration, comments and a DOCTYPE).
Every figure is checked when its section is written, when the report reads the section, and
on the very bytes the report embeds. Table cells are strings, numbers, booleans or null; a
non-finite float is stored as the ``NaN``/``Infinity`` that Python's ``json`` reads back.

``write_report`` gathers every section under a run folder into one ``report.html`` that is
self-contained: figures are embedded as base64 data URIs and the style sheet is inline, so the
page loads nothing from the network and the file can be moved or mailed on its own.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import html
import json
import math
import os
import re
import stat
from pathlib import Path

import numpy as np

import latentsel
from latentsel._io import atomic_open

SECTION_FILE = "section.json"
DEFAULT_ORDER = 100
_KEYS = {"title", "order", "text", "figures", "tables", "files"}
_SHA256 = re.compile(r"[0-9a-f]{64}")
# suffix -> (MIME type, leading bytes the file must start with; None: not checked)
_IMAGE_TYPES = {
    ".png": ("image/png", b"\x89PNG\r\n\x1a\n"),
    ".jpg": ("image/jpeg", b"\xff\xd8\xff"),
    ".jpeg": ("image/jpeg", b"\xff\xd8\xff"),
    ".svg": ("image/svg+xml", None),
}
# an SVG file's prolog: optional BOM, XML declaration (first, as XML wants it), comments and a
# DOCTYPE without an internal subset (whose entities a renderer would expand), then <svg>
_SVG_START = re.compile(rb"""\A(?:\xef\xbb\xbf)?
    (?:<\?xml\s.*?\?>)?
    (?:\s*<!--.*?-->|\s*<!DOCTYPE\s+svg\b[^\[>]*>)*
    \s*<svg[\s/>]""", re.DOTALL | re.VERBOSE)
_SVG_PROLOG_BYTES = 4096
_LONG_CELL = 24  # characters: a longer string cell may break anywhere
# Tables fit the body: caption and cell text may break anywhere (which, unlike break-word, lets
# the automatic table layout narrow the table below its longest word), numbers never (a number
# split across lines is misread). A table too wide even so scrolls inside its own box rather
# than widening the page, its caption held to the box's width (100cqi) and to its left edge.
_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; line-height: 1.5;
       max-width: 62rem; margin: 2rem auto; padding: 0 1rem; color: #1b1b1b;
       overflow-wrap: break-word; }
h1 { margin-bottom: 0.2rem; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; margin-top: 2.5rem; }
.meta, .source { color: #666; font-size: 0.9rem; }
nav ol { padding-left: 1.5rem; }
figure { margin: 1.5rem 0; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption, caption { color: #444; font-size: 0.9rem; margin: 0.4rem 0; text-align: left; }
.table-scroll { max-width: 100%; overflow-x: auto; margin: 1.5rem 0; container-type: inline-size; }
caption { position: sticky; left: 0; max-width: 100cqi; }
table { border-collapse: collapse; font-size: 0.85rem; line-height: 1.35; }
caption, td.long { overflow-wrap: anywhere; }
td.long { min-width: 6rem; }
th, td { border-bottom: 1px solid #e3e3e3; padding: 0.2rem 0.45rem; text-align: left; vertical-align: top; }
th { border-bottom: 2px solid #bbb; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap;
         overflow-wrap: normal; }
"""


def write_section(folder, title, *, order=DEFAULT_ORDER, text=(), figures=(), tables=(), files=()) -> Path:
    """Write ``folder/section.json`` atomically and return its path.

    ``text``: paragraphs (str); ``figures``: dicts ``{"file", "caption"}`` with ``file``
    relative to ``folder`` (it must exist); ``tables``: dicts ``{"caption", "columns",
    "rows"}``, ``columns`` [n_cols] names and ``rows`` [n_rows][n_cols] cells (str, int,
    float, bool, None; NumPy scalars and arrays are converted); ``files``: the other outputs of
    the run in ``folder`` (relative paths). Bad input raises ValueError naming the section file
    and the figure, table or row at fault.

    The section is written last and records the SHA-256 of every figure and file, so it marks
    a finished run's outputs as one set: :func:`write_report` refuses a section whose files
    changed after it was written (a later run stopped half-way). :func:`retract_sections`
    removes a folder's sections before a run rewrites it.
    """
    folder = Path(folder)
    path = folder / SECTION_FILE
    # a lone string is one paragraph, not a list of one-character paragraphs
    paragraphs = [text] if isinstance(text, str) else list(text)
    manifest = {"title": title, "order": _plain(order), "text": paragraphs,
                "figures": [dict(f) if isinstance(f, dict) else f for f in figures],
                "tables": [_plain_table(t) for t in tables]}
    try:
        _check(manifest, folder)
        for figure in manifest["figures"]:
            figure["sha256"] = hashlib.sha256(_figure_bytes(folder, figure["file"])).hexdigest()
        if files:
            manifest["files"] = {str(name): hashlib.sha256(_file_bytes(folder, str(name), "file")).hexdigest()
                                 for name in files}
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    with atomic_open(path) as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return path


def retract_sections(folder, *, recursive: bool = True) -> int:
    """Remove the ``section.json`` of ``folder`` (with ``recursive``, every one under it, its
    hidden folders aside) before a run rewrites it, so that a run stopped half-way leaves no
    section vouching for a mix of old and new files; returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    removed = 0
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")] if recursive else []
        if SECTION_FILE in names:
            os.remove(os.path.join(root, SECTION_FILE))
            removed += 1
    return removed


def write_report(run_dir, *, title="latentsel report", out=None) -> Path:
    """Gather every ``section.json`` under ``run_dir`` (recursively) into one standalone HTML
    page, written atomically to ``out`` (default ``run_dir/report.html``); return its path.

    Sections are ordered by (order, folder relative to ``run_dir``). A malformed section
    raises ValueError "PATH: reason"; a missing ``run_dir`` or one without sections raises
    ValueError naming it.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"run_dir {run_dir} does not exist or is not a folder")
    paths = [Path(root) / SECTION_FILE for root, _, files in os.walk(run_dir) if SECTION_FILE in files]
    if not paths:
        raise ValueError(f"run_dir {run_dir} holds no {SECTION_FILE}")
    sections = []
    for path in paths:
        rel = path.parent.relative_to(run_dir).as_posix()
        sections.append((_read_section(path), path.parent, rel))
    sections.sort(key=lambda s: (s[0].get("order", DEFAULT_ORDER), s[2]))
    page = _render_page(str(title), run_dir, sections)
    out = run_dir / "report.html" if out is None else Path(out)
    with atomic_open(out) as f:
        f.write(page)
    return out


def _read_section(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: invalid JSON: {err}") from None
    try:
        _check(manifest, path.parent)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return manifest


def _check(manifest, folder: Path) -> None:
    """Raise ValueError(reason) unless ``manifest`` is a valid section of ``folder``."""
    if not isinstance(manifest, dict):
        raise ValueError(f"a section is a JSON object, got {type(manifest).__name__}")
    unknown = sorted(set(manifest) - _KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown}; a section has {sorted(_KEYS)}")
    title = manifest.get("title")
    if not isinstance(title, str) or not title.strip():
        raise ValueError("'title' must be a non-empty string")
    order = manifest.get("order", DEFAULT_ORDER)
    if isinstance(order, bool) or not isinstance(order, (int, float)) or not math.isfinite(order):
        raise ValueError(f"'order' must be a finite number, got {order!r}")
    text = manifest.get("text", [])
    if not isinstance(text, list) or not all(isinstance(p, str) for p in text):
        raise ValueError("'text' must be a list of strings")
    figures = manifest.get("figures", [])
    if not isinstance(figures, list):
        raise ValueError("'figures' must be a list")
    for i, figure in enumerate(figures):
        _check_figure(figure, i, folder)
    tables = manifest.get("tables", [])
    if not isinstance(tables, list):
        raise ValueError("'tables' must be a list")
    for i, table in enumerate(tables):
        _check_table(table, i)
    files = manifest.get("files", {})
    if not isinstance(files, dict):
        raise ValueError("'files' must be an object of file: sha256")
    for name, recorded in files.items():
        _same(recorded, _file_bytes(folder, name, "file"), f"file {name}", folder)


def _check_figure(figure, i: int, folder: Path) -> None:
    if not isinstance(figure, dict) or not isinstance(figure.get("file"), str) or not figure["file"]:
        raise ValueError(f"figure {i} must be an object with a 'file' string")
    if set(figure) - {"file", "caption", "sha256"} or not isinstance(figure.get("caption", ""), str):
        raise ValueError(f"figure {i} ({figure['file']}) takes 'file', a 'caption' string and its 'sha256' only")
    name = figure["file"]
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"figure file {name} must be a path inside the section folder")
    if Path(name).suffix.lower() not in _IMAGE_TYPES:
        raise ValueError(f"figure file {name}: unsupported type, use one of {sorted(_IMAGE_TYPES)}")
    data = _figure_bytes(folder, name)
    _same(figure.get("sha256"), data, f"figure file {name}", folder)


def _same(recorded, data: bytes, what: str, folder: Path) -> None:
    """ValueError unless ``data`` has the SHA-256 the section recorded (when it recorded one)."""
    if recorded is None:
        return
    if not isinstance(recorded, str) or not _SHA256.fullmatch(recorded):
        raise ValueError(f"{what}: 'sha256' must be 64 hex digits")
    if hashlib.sha256(data).hexdigest() != recorded:
        raise ValueError(f"{what} changed after its section was written (a later run into {folder} stopped "
                         "half-way, or something else wrote it); rerun the command that writes this folder")


def _file_bytes(folder: Path, name: str, what: str) -> bytes:
    """The bytes of ``folder / name``; ValueError(reason) unless it is a regular file inside
    ``folder``, named by a relative path without ``..``, with no symbolic link from ``folder``
    down to it."""
    if Path(name).is_absolute() or ".." in Path(name).parts or not Path(name).parts:
        raise ValueError(f"{what} {name} must be a path inside the section folder")
    parts = Path(name).parts
    for j in range(1, len(parts) + 1):
        if folder.joinpath(*parts[:j]).is_symlink():
            link = "it" if j == len(parts) else f"its folder {Path(*parts[:j])}"
            raise ValueError(f"{what} {name}: {link} is a symbolic link; a {what.split()[0]} must be a regular "
                             "file inside the section folder")
    path = folder / name
    if not path.exists():
        raise ValueError(f"{what} {name} does not exist in {folder}")
    if not Path(os.path.realpath(path)).is_relative_to(os.path.realpath(folder)):
        raise ValueError(f"{what} {name} lies outside the section folder {folder}")
    if not stat.S_ISREG(os.lstat(path).st_mode):
        raise ValueError(f"{what} {name} is not a regular file")
    return _read_below(folder, parts, name, what)


def _figure_bytes(folder: Path, name: str) -> bytes:
    """The bytes of figure ``name`` (a relative path whose suffix is in ``_IMAGE_TYPES``), read
    once and checked (:func:`_file_bytes`) to hold its type's data."""
    path = folder / name
    data = _file_bytes(folder, name, "figure file")
    mime, magic = _IMAGE_TYPES[path.suffix.lower()]
    ok = _SVG_START.match(data[:_SVG_PROLOG_BYTES]) if magic is None else data.startswith(magic)
    if not ok:
        what = "it does not open an <svg> element" if magic is None else "its first bytes do not match"
        raise ValueError(f"figure file {name} does not hold {mime} data ({what})")
    return data


def _read_below(folder: Path, parts: tuple, name: str, what: str = "figure file") -> bytes:
    """The bytes of the regular file ``folder/parts...``, opened one component at a time
    relative to its parent without following a link, so that a file or folder swapped for a
    link (or a FIFO) after :func:`_figure_bytes` looked at it is refused, not followed (or
    waited on)."""
    no_follow = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        parent = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for part in parts[:-1]:
                child = os.open(part, no_follow | os.O_DIRECTORY, dir_fd=parent)
                os.close(parent)
                parent = child
            fd = os.open(parts[-1], no_follow | os.O_NONBLOCK, dir_fd=parent)
        finally:
            os.close(parent)
    except OSError as err:
        raise ValueError(f"{what} {name} cannot be opened as a regular file inside the section "
                         f"folder ({err.strerror})") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise ValueError(f"{what} {name} is not a regular file")
        return f.read()


def _check_table(table, i: int) -> None:
    if not isinstance(table, dict) or set(table) - {"caption", "columns", "rows"}:
        raise ValueError(f"table {i} must be an object with 'caption', 'columns' and 'rows'")
    caption = table.get("caption", "")
    if not isinstance(caption, str):
        raise ValueError(f"table {i}: 'caption' must be a string")
    name = f"table {i} ({caption!r})" if caption else f"table {i}"
    columns = table.get("columns")
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise ValueError(f"{name}: 'columns' must be a non-empty list of strings")
    rows = table.get("rows", [])
    if not isinstance(rows, list):
        raise ValueError(f"{name}: 'rows' must be a list")
    for j, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(columns):
            got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
            raise ValueError(f"{name} row {j}: {got} for {len(columns)} columns")
        for cell in row:
            if cell is not None and not isinstance(cell, (str, int, float)):
                raise ValueError(f"{name} row {j}: cell {cell!r} is not a str, number, bool or null")


def _plain(value):
    """A NumPy scalar as the Python scalar it holds; anything else unchanged."""
    return value.item() if isinstance(value, np.generic) else value


def _plain_table(table):
    if not isinstance(table, dict):
        return table
    table = dict(table)
    if "columns" in table:
        table["columns"] = [_plain(c) for c in table["columns"]]
    if "rows" in table:
        table["rows"] = [[_plain(c) for c in row] if _is_row(row) else row for row in table["rows"]]
    return table


def _is_row(row) -> bool:
    return isinstance(row, (list, tuple, np.ndarray))


def _render_page(title: str, run_dir: Path, sections: list) -> str:
    """The whole page as one string; ``sections``: (manifest, folder, relative folder)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    esc = html.escape
    toc = "".join(f'<li><a href="#section-{n}">{esc(m["title"])}</a></li>\n'
                  for n, (m, _, _) in enumerate(sections, 1))
    body = "".join(_render_section(n, *s) for n, s in enumerate(sections, 1))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header>\n<h1>{esc(title)}</h1>\n"
        f"<p class=\"meta\">Run folder {esc(run_dir.resolve().name)} &middot; generated "
        f"<time>{stamp}</time> &middot; latentsel {esc(latentsel.__version__)}</p>\n</header>\n"
        f"<nav>\n<h2>Contents</h2>\n<ol>\n{toc}</ol>\n</nav>\n<main>\n{body}</main>\n"
        "</body>\n</html>\n"
    )


def _render_section(n: int, manifest: dict, folder: Path, rel: str) -> str:
    esc = html.escape
    parts = [f'<section id="section-{n}">\n<h2>{esc(manifest["title"])}</h2>\n',
             f'<p class="source">{esc(rel)}/{SECTION_FILE}</p>\n']
    parts += [f"<p>{esc(p)}</p>\n" for p in manifest.get("text", [])]
    try:
        parts += [_render_figure(f, folder) for f in manifest.get("figures", [])]
    except ValueError as err:
        raise ValueError(f"{folder / SECTION_FILE}: {err}") from None
    parts += [_render_table(t) for t in manifest.get("tables", [])]
    parts.append("</section>\n")
    return "".join(parts)


def _render_figure(figure: dict, folder: Path) -> str:
    # checked again on the bytes embedded: the file may have changed since the section was read
    data = _figure_bytes(folder, figure["file"])
    _same(figure.get("sha256"), data, f"figure file {figure['file']}", folder)
    mime, _ = _IMAGE_TYPES[Path(figure["file"]).suffix.lower()]
    caption = figure.get("caption", "")
    alt = html.escape(caption or figure["file"])
    uri = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    figcaption = f"<figcaption>{html.escape(caption)}</figcaption>\n" if caption else ""
    return f'<figure>\n<img src="{uri}" alt="{alt}">\n{figcaption}</figure>\n'


def _render_table(table: dict) -> str:
    esc = html.escape
    caption = table.get("caption", "")
    head = "".join(f"<th>{esc(c)}</th>" for c in table["columns"])
    rows = "".join("<tr>" + "".join(_render_cell(c) for c in row) + "</tr>\n"
                   for row in table.get("rows", []))
    cap = f"<caption>{esc(caption)}</caption>\n" if caption else ""
    return (f'<div class="table-scroll">\n<table>\n{cap}<thead><tr>{head}</tr></thead>\n'
            f"<tbody>\n{rows}</tbody>\n</table>\n</div>\n")


def _render_cell(cell) -> str:
    if cell is None:
        return "<td>&mdash;</td>"
    if isinstance(cell, bool) or isinstance(cell, str):
        # a long string may break anywhere; a short one (a name, a label) only between words
        cls = ' class="long"' if isinstance(cell, str) and len(cell) > _LONG_CELL else ""
        return f"<td{cls}>{html.escape(str(cell))}</td>"
    text = str(cell) if isinstance(cell, int) else f"{cell:.4g}"
    return f'<td class="num">{text}</td>'
