"""The HTML report: section manifests, the standalone page, and its rendering in Chromium."""
import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

import latentsel
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
