"""The HTML report: section manifests, the standalone page, and its rendering in Chromium."""
import base64
import json
import os
import re
import shutil
import signal
import stat
import subprocess
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

import latentsel
from latentsel.plots import report
from latentsel.plots.report import write_report, write_section

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver"


def _figure(path: Path) -> Path:
    """A tiny plot saved as ``path`` (its suffix picks the format)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = Figure(figsize=(2.0, 1.5), dpi=50)
    fig.add_subplot().plot([0, 1, 2], [1, 0, 2])
    fig.savefig(path)
    return path


def _run(tmp_path: Path) -> Path:
    """A run folder with two sections, two PNG figures and one table."""
    run = tmp_path / "run"
    _figure(run / "identify" / "figures" / "curves.png")
    _figure(run / "demo" / "heat.png")
    write_section(run / "identify", "Identifiability: recovery against N", order=20,
                  text=["Recovery per regime.", "Rows outside the support stay at the prior."],
                  figures=[{"file": "figures/curves.png", "caption": "MAP accuracy against N"}],
                  tables=[{"caption": "Recovery", "columns": ["regime", "N", "accuracy", "converged"],
                           "rows": [["sft", np.int64(100), np.float64(0.831249), np.bool_(True)],
                                    ["rl", 100, None, False],
                                    ["atomic", 2000, 123456.0, True]]}])
    write_section(run / "demo", "Demo", order=10, figures=[{"file": "heat.png", "caption": "Selections"}])
    return run


# an SVG drawn by hand: BOM, XML declaration, comment, then the root element
SVG = ('\ufeff<?xml version="1.0" encoding="UTF-8"?>\n<!-- drawn by hand -->\n'
       '<svg xmlns="http://www.w3.org/2000/svg" width="120" height="40" viewBox="0 0 120 40">'
       '<rect width="120" height="40" fill="#4a90d9"/></svg>\n').encode()


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_round_trip(tmp_path):
    run = _run(tmp_path)
    manifest = json.loads((run / "identify" / "section.json").read_text())
    assert manifest["tables"][0]["rows"][0] == ["sft", 100, 0.831249, True]
    assert type(manifest["tables"][0]["rows"][0][1]) is int

    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert "<title>latentsel report</title>" in page
    assert f"latentsel {latentsel.__version__}" in page
    assert re.search(r"<time>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC</time>", page)
    uris = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)" alt="([^"]*)">', page)
    assert [alt for _, alt in uris] == ["Selections", "MAP accuracy against N"]
    assert base64.b64decode(uris[1][0]) == (run / "identify" / "figures" / "curves.png").read_bytes()
    assert '<td class="num">0.8312</td>' in page
    assert '<td class="num">1.235e+05</td>' in page
    assert '<td class="num">100</td>' in page
    assert "<td>&mdash;</td>" in page and "<td>True</td>" in page
    assert "<p>Rows outside the support stay at the prior.</p>" in page
    assert page.count("<table>") == 1
    # nothing is fetched: every src/href is a data URI or an in-page anchor
    assert all(ref.startswith(("data:", "#")) for ref in re.findall(r'(?:src|href)="([^"]*)"', page))
    assert _no_temp_files(run)


def test_other_image_types_and_out(tmp_path):
    run = tmp_path / "run"
    _figure(run / "a.svg")
    _figure(run / "b.JPG")
    write_section(run, "Formats", figures=[{"file": "a.svg", "caption": "vector"}, {"file": "b.JPG"}])
    out = write_report(run, title="Formats", out=tmp_path / "elsewhere" / "r.html")
    page = out.read_text()
    assert 'src="data:image/svg+xml;base64,' in page and 'src="data:image/jpeg;base64,' in page
    assert 'alt="b.JPG"' in page
    assert not (run / "report.html").exists()


def test_sections_ordered_by_order_then_folder(tmp_path):
    for folder, order in [("c", 5), ("b", 30), ("a", 30), ("d", 100)]:
        write_section(tmp_path / folder, f"title-{folder}", order=order)
    write_section(tmp_path / "e", "title-e")  # default order 100, after d by folder
    page = write_report(tmp_path).read_text()
    titles = re.findall(r"<h2>(title-\w)</h2>", page)
    assert titles == ["title-c", "title-a", "title-b", "title-d", "title-e"]
    toc = re.findall(r'<li><a href="#(section-\d+)">(title-\w)</a></li>', page)
    assert [t for _, t in toc] == titles
    assert all(f'<section id="{anchor}">' in page for anchor, _ in toc)


def test_text_is_escaped(tmp_path):
    _figure(tmp_path / "f.png")
    write_section(tmp_path, "<script>alert(1)</script>", text=['a < b & "c"'],
                  figures=[{"file": "f.png", "caption": '"><script>x</script>'}],
                  tables=[{"caption": "<i>t</i>", "columns": ["<b>col</b>"], "rows": [["<td>"]]}])
    page = write_report(tmp_path, title="R&D <report>").read_text()
    assert "<script>" not in page and "<b>" not in page and "<i>" not in page
    assert "<title>R&amp;D &lt;report&gt;</title>" in page
    assert "<h2>&lt;script&gt;alert(1)&lt;/script&gt;</h2>" in page
    assert "<p>a &lt; b &amp; &quot;c&quot;</p>" in page
    assert 'alt="&quot;&gt;&lt;script&gt;x&lt;/script&gt;"' in page
    assert "<td>&lt;td&gt;</td>" in page


def test_write_section_rejects_a_missing_figure(tmp_path):
    with pytest.raises(ValueError, match=r"section\.json: figure file figs/missing\.png does not exist"):
        write_section(tmp_path, "T", figures=[{"file": "figs/missing.png", "caption": "c"}])
    assert not (tmp_path / "section.json").exists()


def test_write_section_rejects_a_ragged_row(tmp_path):
    table = {"caption": "Recovery", "columns": ["regime", "N"], "rows": [["sft", 1], ["rl"]]}
    with pytest.raises(ValueError, match=r"table 0 \('Recovery'\) row 1: 1 values for 2 columns"):
        write_section(tmp_path, "T", tables=[table])


@pytest.mark.parametrize("figure, reason", [
    ({"file": "/abs/f.png"}, "must be a path inside the section folder"),
    ({"file": "../f.png"}, "must be a path inside the section folder"),
    ({"file": "f.gif"}, "unsupported type"),
    ({"file": "fake.png"}, "does not hold image/png data"),
    ("f.png", "figure 0 must be an object"),
])
def test_write_section_rejects_bad_figures(tmp_path, figure, reason):
    (tmp_path / "fake.png").write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match=re.escape(reason)):
        write_section(tmp_path, "T", figures=[figure])


def test_write_section_rejects_bad_cells_and_titles(tmp_path):
    with pytest.raises(ValueError, match=r"row 0: cell \[1\] is not a str, number, bool or null"):
        write_section(tmp_path, "T", tables=[{"columns": ["a"], "rows": [[[1]]]}])
    with pytest.raises(ValueError, match="'title' must be a non-empty string"):
        write_section(tmp_path, "  ")
    with pytest.raises(ValueError, match="'order' must be a finite number"):
        write_section(tmp_path, "T", order=float("nan"))


@contextmanager
def _no_hang(seconds: int = 5):
    """Fail, rather than wait for ever, if the block blocks (opening a FIFO does)."""
    def alarm(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")
    before = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)


def _section_error(folder: Path, **kw) -> str:
    """The message of the ValueError that ``write_section(folder, "T", **kw)`` raises."""
    with _no_hang(), pytest.raises(ValueError) as info:
        write_section(folder, "T", **kw)
    message = str(info.value)
    assert message.startswith(f"{folder / 'section.json'}: ") and "\n" not in message
    assert not (folder / "section.json").exists()
    return message


def test_write_section_refuses_a_symlinked_figure(tmp_path):
    section = tmp_path / "run" / "s"
    section.mkdir(parents=True)
    (section / "x.svg").symlink_to("/etc/passwd")
    _figure(section / "real.png")
    (section / "alias.png").symlink_to("real.png")  # a link inside the folder is refused too
    (section / "dangling.png").symlink_to(tmp_path / "gone.png")
    for name in ("x.svg", "alias.png", "dangling.png"):
        message = _section_error(section, figures=[{"file": name}])
        assert f"figure file {name}: it is a symbolic link" in message


def test_write_section_refuses_a_figure_under_a_symlinked_folder(tmp_path):
    outside = tmp_path / "outside"
    _figure(outside / "f.png")
    section = tmp_path / "run" / "s"
    (section / "figures").mkdir(parents=True)
    (section / "figures" / "deeper").symlink_to(outside, target_is_directory=True)
    (section / "linked").symlink_to(outside, target_is_directory=True)
    message = _section_error(section, figures=[{"file": "linked/f.png"}])
    assert "figure file linked/f.png: its folder linked is a symbolic link" in message
    message = _section_error(section, figures=[{"file": "figures/deeper/f.png"}])
    assert "figure file figures/deeper/f.png: its folder figures/deeper is a symbolic link" in message


def test_write_section_refuses_a_fifo_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "f.png")
    message = _section_error(tmp_path, figures=[{"file": "f.png"}])
    assert "figure file f.png is not a regular file" in message


def test_write_section_refuses_a_device(tmp_path):
    try:
        os.mknod(tmp_path / "f.png", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    except (PermissionError, OSError) as err:
        pytest.skip(f"cannot create a device node here: {err}")
    message = _section_error(tmp_path, figures=[{"file": "f.png"}])
    assert "figure file f.png is not a regular file" in message


@pytest.mark.parametrize("content", [
    b"root:x:0:0:root:/root:/bin/bash\n",
    b"\x89PNG\r\n\x1a\n",
    b"<html><body><svg></svg></body></html>",
    b'<?xml version="1.0"?>\n<html xmlns="http://www.w3.org/1999/xhtml"/>',
    b"<svgfake/>",
    b'<!DOCTYPE svg [<!ENTITY a "aaaa">]>\n<svg xmlns="http://www.w3.org/2000/svg">&a;</svg>',
    b"<!-- unterminated comment <svg>",
    b"\n" * 5000 + b"<svg/>",  # the element must open within the first 4 KB
    b' <?xml version="1.0"?><svg/>',  # nothing may precede the XML declaration
    b"",
], ids=["text", "png", "html", "xhtml", "svgfake", "entities", "comment", "late", "declaration-late", "empty"])
def test_write_section_refuses_an_svg_that_is_not_svg(tmp_path, content):
    (tmp_path / "f.svg").write_bytes(content)
    message = _section_error(tmp_path, figures=[{"file": "f.svg"}])
    assert "figure file f.svg does not hold image/svg+xml data (it does not open an <svg> element)" in message


@pytest.mark.parametrize("content", [
    SVG,
    b'<svg xmlns="http://www.w3.org/2000/svg"/>',
    b'<?xml version="1.0"?><!--a--><!-- b -->\n<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN"\n'
    b'  "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd">\n<svg\nwidth="1"/>',
    b'\n  <!-- no declaration: blank lines may come first -->\n<svg>',
], ids=["declaration", "bare", "doctype", "blank"])
def test_write_section_accepts_an_svg_after_its_prolog(tmp_path, content):
    (tmp_path / "f.svg").write_bytes(content)
    write_section(tmp_path, "T", figures=[{"file": "f.svg", "caption": "c"}])
    page = write_report(tmp_path).read_text()
    uri = re.search(r'src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', page)
    assert base64.b64decode(uri.group(1)) == content


def _swap_for_link(path: Path, target: Path) -> None:
    path.unlink()
    path.symlink_to(target)


def test_write_report_refuses_a_figure_swapped_for_a_link_after_write_section(tmp_path):
    run = _run(tmp_path)
    figure = run / "identify" / "figures" / "curves.png"
    _swap_for_link(figure, _figure(tmp_path / "outside.png"))
    with pytest.raises(ValueError) as info:
        write_report(run)
    message = str(info.value)
    assert message.startswith(f"{run / 'identify' / 'section.json'}: figure file figures/curves.png: ")
    assert "symbolic link" in message and "\n" not in message
    assert not (run / "report.html").exists() and _no_temp_files(run)


def test_write_report_refuses_a_folder_swapped_for_a_link_after_write_section(tmp_path):
    run = _run(tmp_path)
    outside = tmp_path / "outside"
    shutil.move(run / "identify" / "figures", outside)
    (run / "identify" / "figures").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match=r"identify/section\.json: figure file figures/curves\.png: its folder "
                                         r"figures is a symbolic link"):
        write_report(run)


@pytest.mark.parametrize("swap", ["link", "fifo", "not png"])
def test_the_bytes_embedded_are_checked_after_the_section_is_read(tmp_path, monkeypatch, swap):
    """A figure that changes between reading its section and embedding it is checked again."""
    run = _run(tmp_path)
    figure = run / "demo" / "heat.png"
    read_section = report._read_section

    def read_then_swap(path):
        manifest = read_section(path)
        if path.parent.name == "demo":
            figure.unlink()
            if swap == "link":
                figure.symlink_to(_figure(tmp_path / "outside.png"))
            elif swap == "fifo":
                os.mkfifo(figure)
            else:
                figure.write_bytes(b"GIF89a")
        return manifest

    monkeypatch.setattr(report, "_read_section", read_then_swap)
    with _no_hang(), pytest.raises(ValueError) as info:
        write_report(run)
    message = str(info.value)
    assert message.startswith(f"{run / 'demo' / 'section.json'}: figure file heat.png") and "\n" not in message
    assert not (run / "report.html").exists()


def test_opening_refuses_a_link_that_appears_after_the_check(tmp_path):
    """The read itself follows no link, should one appear between the checks and the open."""
    _figure(tmp_path / "figures" / "f.png")
    _figure(tmp_path / "outside" / "f.png")
    shutil.rmtree(tmp_path / "figures")
    (tmp_path / "figures").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(ValueError, match="figure file figures/f.png cannot be opened as a regular file"):
        report._read_below(tmp_path, ("figures", "f.png"), "figures/f.png")
    (tmp_path / "g.png").symlink_to(tmp_path / "outside" / "f.png")
    with pytest.raises(ValueError, match="figure file g.png cannot be opened as a regular file"):
        report._read_below(tmp_path, ("g.png",), "g.png")
    os.mkfifo(tmp_path / "h.png")
    with _no_hang(), pytest.raises(ValueError, match="figure file h.png is not a regular file"):
        report._read_below(tmp_path, ("h.png",), "h.png")


@pytest.mark.parametrize("text, reason", [
    ('{"title": "T",', "invalid JSON"),
    ('{"order": 3}', "'title' must be a non-empty string"),
    ('{"title": "T", "tables": [{"caption": "Fit", "columns": ["a", "b"], "rows": [[1, 2], [3]]}]}',
     "table 0 ('Fit') row 1: 1 values for 2 columns"),
    ('{"title": "T", "figures": [{"file": "gone.png"}]}', "figure file gone.png does not exist"),
    ('{"title": "T", "figure": []}', "unknown keys ['figure']"),
    ('["T"]', "a section is a JSON object"),
])
def test_write_report_names_a_malformed_section(tmp_path, text, reason):
    write_section(tmp_path / "good", "Good")
    bad = tmp_path / "bad" / "section.json"
    bad.parent.mkdir()
    bad.write_text(text)
    with pytest.raises(ValueError) as info:
        write_report(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{bad}: ") and reason in message and "\n" not in message
    assert not (tmp_path / "report.html").exists() and _no_temp_files(tmp_path)


def test_write_report_rejects_missing_and_empty_run_dirs(tmp_path):
    with pytest.raises(ValueError, match=f"run_dir {re.escape(str(tmp_path / 'nope'))} does not exist"):
        write_report(tmp_path / "nope")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match=f"run_dir {re.escape(str(tmp_path / 'empty'))} holds no section.json"):
        write_report(tmp_path / "empty")


def test_report_is_replaced_atomically(tmp_path):
    run = _run(tmp_path)
    (run / "report.html").write_text("stale")
    write_report(run)
    write_report(run)
    assert (run / "report.html").read_text().rstrip().endswith("</html>")
    assert _no_temp_files(run)


def _install_chromium() -> None:
    """Install the Debian packages when running as root with apt-get; skip otherwise."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER}: install them with `sudo {INSTALL}`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in ("apt-get update", INSTALL):
        try:
            done = subprocess.run(command.split(), env=env, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`{command}` did not finish in 30 minutes")
        if done.returncode != 0:
            tail = "\n".join((done.stdout + done.stderr).splitlines()[-20:])
            pytest.fail(f"`{command}` failed with exit status {done.returncode}:\n{tail}")


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install -e .[test] installs selenium")
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        _install_chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--no-first-run", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(arg)
    # an explicit driver path keeps Selenium Manager from looking for (or downloading) one
    service = webdriver.ChromeService(executable_path=str(CHROMEDRIVER))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        yield driver
    finally:
        driver.quit()


def test_report_renders_in_chromium(tmp_path, browser):
    run = _run(tmp_path)
    _figure(run / "formats" / "plot.svg")
    _figure(run / "formats" / "plot.jpeg")
    write_section(run / "formats", "Formats", order=30,
                  figures=[{"file": "plot.svg", "caption": "svg"}, {"file": "plot.jpeg", "caption": "jpeg"}],
                  tables=[{"columns": ["x"], "rows": [[1.5]]}])
    out = write_report(run, title="Browser check")

    browser.get(out.as_uri())
    assert browser.title == "Browser check"
    loaded = browser.execute_script(
        "return Array.from(document.images).map(i => i.complete && i.naturalWidth > 0);")
    assert loaded == [True] * 4
    assert browser.execute_script("return document.querySelectorAll('table').length;") == 2
    cells = browser.execute_script(
        "return Array.from(document.querySelectorAll('td')).map(td => td.textContent);")
    assert cells[:4] == ["sft", "100", "0.8312", "True"] and "\u2014" in cells
    assert browser.execute_script(
        "return getComputedStyle(document.querySelector('td.num')).textAlign;") == "right"
    assert browser.execute_script("return performance.getEntriesByType('resource').length;") == 0


# the page's layout as the tests below read it: how wide the document is against the window,
# where the body's content box, each table and each caption ([left, right]) end, by how much
# each table box scrolls,
# whether any number wraps onto a second line, and whether every image loaded
LAYOUT = """
const px = (el, prop) => parseFloat(getComputedStyle(el)[prop]);
const body = document.body.getBoundingClientRect();
const lines = el => { const r = document.createRange(); r.selectNodeContents(el); return r.getClientRects().length; };
return {
  scrollWidth: document.documentElement.scrollWidth, innerWidth: window.innerWidth,
  bodyLeft: body.left + px(document.body, 'paddingLeft'), bodyRight: body.right - px(document.body, 'paddingRight'),
  tables: Array.from(document.querySelectorAll('table'), t => t.getBoundingClientRect().right),
  captions: Array.from(document.querySelectorAll('caption, figcaption'), c => [c.getBoundingClientRect().left,
                                                                            c.getBoundingClientRect().right]),
  overflow: Array.from(document.querySelectorAll('.table-scroll'), d => d.scrollWidth - d.clientWidth),
  wrappedNumbers: Array.from(document.querySelectorAll('td.num')).filter(td => lines(td) > 1).length,
  images: Array.from(document.images, i => i.complete && i.naturalWidth > 0),
  imageRight: Math.max(...Array.from(document.images, i => i.getBoundingClientRect().right)),
};
"""


# the numeric columns of a wide table, as a fit summary would have them: ints up to 8 digits,
# floats from 1e-15 to 1e+05 (printed in up to 10 characters), NaN, infinity and missing cells
STATISTICS = {
    "N": lambda i: 10 ** (i + 2),
    "accuracy": lambda i: 0.8312 - 0.07 * i,
    "elpd_loo": lambda i: -12345.678 * (i + 1),
    "se": lambda i: 12.3456 / (i + 1),
    "p_loo": lambda i: 3.5 * i,
    "weight": lambda i: 10.0 ** (-3 * i),
    "r_hat": lambda i: 1.0 + 0.01 * i,
    "ess_bulk": lambda i: 1234.5 * (i + 1),
    "divergences": lambda i: 3 * i,
    "bias": lambda i: [float("nan"), None, float("inf"), -0.000123456, 0.0, 1.5][i],
}


def _wide_run(tmp_path: Path, n_cols: int = 12) -> Path:
    """A run folder whose table has ``n_cols`` columns (a trace id, its steps as one unbroken
    200-character token, then the :data:`STATISTICS` in turn) over 6 rows, and PNG, SVG and
    JPEG figures, one of them 2000 pixels wide."""
    run = tmp_path / "wide"
    token = "".join(f"r{i % 10}s{i * 7 % 10}" for i in range(50))
    stats = [list(STATISTICS)[j % len(STATISTICS)] for j in range(n_cols - 2)]
    columns = ["trace", "steps"] + [f"{name} {j}" for j, name in enumerate(stats)]
    rows = [[f"trace-{i}-" + "x" * 40, token] + [STATISTICS[name](i) for name in stats] for i in range(6)]
    figures = run / "figures"
    for name, size in [("wide.png", (20.0, 2.0)), ("plot.svg", (6.0, 3.0)), ("plot.jpeg", (4.0, 3.0))]:
        fig = Figure(figsize=size, dpi=100)
        fig.add_subplot().plot(range(10))
        figures.mkdir(parents=True, exist_ok=True)
        fig.savefig(figures / name)
    (figures / "hand.svg").write_bytes(SVG)
    write_section(run, "A wide table", text=["A long token in the text: " + token],
                  figures=[{"file": f"figures/{name}", "caption": f"{name}: {token}"}
                           for name in ("wide.png", "plot.svg", "hand.svg", "plot.jpeg")],
                  tables=[{"caption": f"{n_cols} columns, the steps in one token: {token}", "columns": columns,
                           "rows": rows}])
    return run


def test_a_wide_report_fits_the_window_in_chromium(tmp_path, browser):
    """At 1280x900 a 12-column table of long tokens and numbers fits the body without scrolling,
    no number wraps, nothing widens the page, and every figure loads within the body."""
    browser.set_window_size(1280, 900)
    browser.get(write_report(_wide_run(tmp_path)).as_uri())
    layout = browser.execute_script(LAYOUT)
    assert layout["innerWidth"] >= 1200, layout
    assert layout["scrollWidth"] <= layout["innerWidth"], layout
    assert layout["tables"] and all(right <= layout["bodyRight"] + 0.5 for right in layout["tables"]), layout
    assert layout["overflow"] == [0], layout
    assert layout["wrappedNumbers"] == 0, layout
    assert _captions_within_body(layout), layout
    assert layout["images"] == [True] * 4, layout
    assert layout["imageRight"] <= layout["bodyRight"] + 0.5, layout


def test_a_table_too_wide_to_fit_scrolls_in_its_own_box(tmp_path, browser):
    """40 columns of numbers cannot fit: the table scrolls inside its box, the page does not,
    and its caption stays in view, wrapped to the box, wherever the box is scrolled."""
    browser.set_window_size(1280, 900)
    browser.get(write_report(_wide_run(tmp_path, n_cols=40)).as_uri())
    layout = browser.execute_script(LAYOUT)
    assert layout["scrollWidth"] <= layout["innerWidth"], layout
    assert layout["overflow"][0] > 0 and layout["wrappedNumbers"] == 0, layout
    assert _captions_within_body(layout), layout
    browser.execute_script("document.querySelector('.table-scroll').scrollLeft = 1e6;")
    layout = browser.execute_script(LAYOUT)
    assert layout["tables"][0] <= layout["bodyRight"] + 0.5, layout  # scrolled to its right end
    assert _captions_within_body(layout), layout


def _captions_within_body(layout: dict) -> bool:
    return all(left >= layout["bodyLeft"] - 0.5 and right <= layout["bodyRight"] + 0.5
               for left, right in layout["captions"])


def test_a_section_vouches_for_its_files_as_one_set(tmp_path):
    """A section records the SHA-256 of its figures and files, written last: a file changed after
    it (a later run stopped half-way) makes the report refuse the folder, naming the file."""
    run = _run(tmp_path)
    (run / "identify" / "identify.json").write_text('{"records": []}')
    write_section(run / "identify", "Identify", figures=[{"file": "figures/curves.png"}], files=["identify.json"])
    doc = json.loads((run / "identify" / "section.json").read_text())
    assert len(doc["figures"][0]["sha256"]) == 64 and set(doc["files"]) == {"identify.json"}
    write_report(run)
    (run / "identify" / "identify.json").write_text('{"records": [1]}')  # a newer run's file
    with pytest.raises(ValueError, match=r"identify/section.json: file identify.json changed after its section "
                                         r"was written \(a later run into .* stopped half-way"):
        write_report(run)
    (run / "identify" / "identify.json").write_text('{"records": []}')
    write_report(run)
    curves = run / "identify" / "figures" / "curves.png"
    curves.write_bytes(curves.read_bytes() + b"\0")  # another figure in its place
    with pytest.raises(ValueError, match="figure file figures/curves.png changed after its section was written"):
        write_report(run)
    with pytest.raises(ValueError, match="file ../x must be a path inside the section folder"):
        write_section(run / "demo", "Demo", files=["../x"])
    doc["figures"][0]["sha256"] = "abc"
    (run / "identify" / "section.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="'sha256' must be 64 hex digits"):
        write_report(run)


def test_a_run_retracts_its_sections_before_rewriting(tmp_path):
    run = _run(tmp_path)
    (run / ".tasks").mkdir()
    (run / ".tasks" / "section.json").write_text("{}")  # hidden folders are not the run's outputs
    _figure(run / "demo" / "sub" / "x.png")
    write_section(run / "demo" / "sub", "Sub", figures=[{"file": "x.png"}])
    assert report.retract_sections(run / "demo", recursive=False) == 1 and (run / "demo" / "sub" / "section.json").exists()
    assert report.retract_sections(run) == 2 and report.retract_sections(tmp_path / "none") == 0
    assert not list(run.rglob("*/section.json"))[1:] and (run / ".tasks" / "section.json").exists()
    with pytest.raises(ValueError, match="holds no section.json"):
        write_report(run / "identify")
