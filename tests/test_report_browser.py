"""The HTML report opened in a real headless Chromium.

test_report.py checks the report's HTML as text: that every ``<img>`` carries a base64 PNG that decodes. That does
not prove a browser shows it: a data URI the browser rejects (a bad escape, a stray character, a too-long URI, a
markup slip that swallows a tag) still passes a regex. Here Chromium loads the file and says, per image, whether it
decoded (``complete && naturalWidth > 0``), and we look for console messages from the page (it has no scripts of its
own, so any is a problem). A screenshot of the original file is kept as a test artifact for a human to look at.

Only the standard library drives the browser (``--dump-dom``, ``--screenshot``, Chromium's stderr log); the check
script is appended to a copy of the report, never to the report itself. Without a Chromium the tests skip, except
under ``CI=true``, where .ci/run installs one and a missing browser means a broken setup.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from builders import tiny_imagenet_files, write_folder
from test_report import N_VAL_PER_CLASS, make_run, make_study, study_dirs
from transferlab.ensembles import EnsembleConfig, run_ensemble
from transferlab.reports.render import ReportConfig, build_report

REPO = Path(__file__).resolve().parents[1]
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_S = 60
COMMON_FLAGS = (
    "--no-sandbox",  # CI containers run as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--disable-dev-shm-usage",  # small /dev/shm in containers
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--disable-crash-reporter",
    "--no-first-run",
    "--no-default-browser-check",
    "--no-pings",
    "--mute-audio",
    "--hide-scrollbars",
    "--password-store=basic",
)
# Appended to a copy of the report. On load, every <img> must be decoded; the verdict goes into the DOM (read back
# from --dump-dom) and, on failure, to the console as well.
CHECK_ID = "transferlab-imgcheck"
CHECK_SCRIPT = f"""
<script>
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (im) {{ return !(im.complete && im.naturalWidth > 0); }})
    .map(function (im) {{ return im.alt || im.src.slice(0, 80); }});
  var pre = document.createElement("pre");
  pre.id = "{CHECK_ID}";
  pre.textContent = JSON.stringify({{total: imgs.length, broken: broken}});
  document.body.appendChild(pre);
  if (broken.length) {{ console.error("{CHECK_ID}: " + broken.length + " broken image(s): " + broken.join(" | ")); }}
}});
</script>
"""
# Chromium's stderr log line for a console message, old `CONSOLE(12)]` and new `CONSOLE:12]` forms alike. The log
# level is always INFO whatever console method was called, so the level cannot tell errors apart.
CONSOLE_RE = re.compile(r':CONSOLE[:(]\d*\)?\]\s*"(?P<msg>.*)", source: (?P<source>\S*)')
INTERNAL_SOURCES = ("chrome://", "chrome-extension://", "chrome-untrusted://", "devtools://")


# Appended to a copy of the report like CHECK_SCRIPT: where things landed in a window of a given width, as a reader
# sees it. The summary table is the first table after the Summary heading; "fits" means its right edge is inside
# the viewport and its scroll container hides nothing (a table in an overflow box can be cut with its edge "inside").
LAYOUT_ID = "transferlab-layout"
LAYOUT_SCRIPT = f"""
<script>
window.addEventListener("load", function () {{
  function box(el) {{
    if (!el) return null;
    var r = el.getBoundingClientRect();
    return {{left: r.left, right: r.right, top: r.top + window.scrollY, bottom: r.bottom + window.scrollY}};
  }}
  var table = document.querySelector("#summary ~ .tw > table");
  var wrap = table ? table.parentElement : null;
  var heads = table ? Array.prototype.map.call(table.querySelectorAll("th"), function (th) {{
    return {{text: th.textContent, right: th.getBoundingClientRect().right}};
  }}) : [];
  var sections = Array.prototype.map.call(document.querySelectorAll("main h2"), function (h) {{ return h.id; }});
  var main = document.querySelector("main");
  var first = main.querySelector("h1 ~ nav").nextElementSibling;
  var images = Array.prototype.map.call(document.images, function (im) {{
    var b = box(im);
    return {{alt: im.alt, ok: im.complete && im.naturalWidth > 0, right: b.right, top: b.top}};
  }});
  var cards = Array.prototype.map.call(document.querySelectorAll("#answer ~ .cards .card"), function (c) {{
    var b = box(c);
    var k = c.querySelector(".k");
    return {{label: k ? k.textContent : "", text: c.textContent, top: b.top, bottom: b.bottom, right: b.right}};
  }});
  var pre = document.createElement("pre");
  pre.id = "{LAYOUT_ID}";
  pre.textContent = JSON.stringify({{
    viewport: document.documentElement.clientWidth,
    table: table ? box(table) : null,
    wrap: wrap ? {{scroll: wrap.scrollWidth, client: wrap.clientWidth}} : null,
    heads: heads,
    sections: sections,
    first: first ? (first.id || first.tagName) : null,
    tops: sections.reduce(function (o, id) {{ o[id] = box(document.getElementById(id)).top; return o; }}, {{}}),
    images: images,
    cards: cards
  }});
  document.body.appendChild(pre);
}});
</script>
"""


@dataclass(frozen=True)
class PageLoad:
    total: int
    broken: list[str]
    console: list[str]  # console messages attributable to the page
    log: str  # Chromium's whole stderr, for failure messages


def find_browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    reason = f"no Chromium found on PATH (looked for {', '.join(BROWSERS)})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI=true and .ci/run installs chromium, so the CI setup is broken")
    pytest.skip(f"{reason}; install it (e.g. apt-get install chromium) to run the browser tests")


def run_browser(browser: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Chromium with the common flags, its own process group, killed whole if it overruns TIMEOUT_S."""
    env = {**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"}  # fewer D-Bus complaints in the log
    cmd = [browser, *COMMON_FLAGS, f"--user-data-dir={cwd / 'profile'}", *args]
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the renderer and GPU processes too, not only the launcher
        out, err = proc.communicate()
        pytest.fail(f"chromium did not finish within {TIMEOUT_S} s: {' '.join(cmd)}\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def headless_run(browser: str, args: list[str], cwd: Path, done: str | Path) -> subprocess.CompletedProcess[str]:
    """Run with --headless=new; where that mode is unknown (old Chromium), again with plain --headless. `done` is
    a string that stdout must contain, or a file that must exist, for the run to count."""
    proc = None
    for mode in ("--headless=new", "--headless"):
        proc = run_browser(browser, [mode, *args], cwd)
        ok = done.is_file() if isinstance(done, Path) else done in proc.stdout
        if proc.returncode == 0 and ok:
            return proc
    assert proc is not None
    pytest.fail(f"chromium failed (rc {proc.returncode}): {' '.join(proc.args)}\n{proc.stderr[-3000:]}")


def page_console(log: str) -> list[str]:
    """Console messages in Chromium's log that come from the page, not the browser's own pages."""
    found = []
    for line in log.splitlines():
        m = CONSOLE_RE.search(line)
        if m and not m["source"].startswith(INTERNAL_SOURCES):
            found.append(f"{m['msg']} ({m['source']})")
        elif "Uncaught" in line:
            found.append(line.strip())
    return found


def load_in_browser(browser: str, page: str, work: Path) -> PageLoad:
    """Open a copy of `page` with the check script appended; the check's verdict and the page's console output."""
    work.mkdir(parents=True, exist_ok=True)
    copy = work / "report-check.html"
    copy.write_text(page + CHECK_SCRIPT, encoding="utf-8")  # after </html>: parsers move it into <body>
    proc = headless_run(
        browser,
        [
            "--window-size=1280,4000",
            "--virtual-time-budget=5000",  # the load handler runs before the DOM is dumped
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
            copy.as_uri(),
        ],
        work,
        done="</html>",
    )
    m = re.search(rf'<pre id="{CHECK_ID}">(.*?)</pre>', proc.stdout, re.S)
    assert m is not None, f"the check script left no verdict in the DOM\n{proc.stderr[-3000:]}"
    verdict = json.loads(html.unescape(m.group(1)))
    return PageLoad(verdict["total"], verdict["broken"], page_console(proc.stderr), proc.stderr)


def layout_in_browser(browser: str, page: str, work: Path, width: int = 1400, height: int = 900) -> dict:
    """Open a copy of `page` in a `width` x `height` window; LAYOUT_SCRIPT's measurements (CSS pixels, tops from
    the start of the page)."""
    work.mkdir(parents=True, exist_ok=True)
    copy = work / "report-layout.html"
    copy.write_text(page + LAYOUT_SCRIPT, encoding="utf-8")
    proc = headless_run(
        browser,
        [f"--window-size={width},{height}", "--virtual-time-budget=5000", "--dump-dom", copy.as_uri()],
        work,
        done="</html>",
    )
    m = re.search(rf'<pre id="{LAYOUT_ID}">(.*?)</pre>', proc.stdout, re.S)
    assert m is not None, f"the layout script left no measurements in the DOM\n{proc.stderr[-3000:]}"
    return json.loads(html.unescape(m.group(1)))


def artifact_dir() -> Path:
    d = Path(os.environ.get("TRANSFERLAB_TEST_ARTIFACTS") or REPO / "test-artifacts")
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def browser() -> str:
    return find_browser()


@pytest.fixture(scope="module")
def report_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """report.html for two runs and their ensemble, with --data so the misclassified-image grid is drawn."""
    root = tmp_path_factory.mktemp("browser-runs")
    a = make_run(root, "run-a", acc=0.85, seed=1, img_size=64)
    b = make_run(root, "run-b", acc=0.55, seed=2, img_size=32)
    run_ensemble(EnsembleConfig(members=(str(a), str(b)), out=root / "ens", n_boot=100))
    data = tmp_path_factory.mktemp("browser-ds") / "tiny-imagenet-200"
    write_folder(data, tiny_imagenet_files(n_train=1, n_val_per_class=N_VAL_PER_CLASS, n_test=1))
    out = tmp_path_factory.mktemp("browser-report")
    res = build_report(ReportConfig((str(a), str(b), str(root / "ens")), out, data=str(data)))
    assert any(p.name.startswith("misclassified-") for p in res.figures)
    return res.html


def test_every_image_renders_and_console_is_clean(browser: str, report_html: Path, tmp_path: Path) -> None:
    page = report_html.read_text(encoding="utf-8")
    n_img = len(re.findall(r"<img\b", page))
    load = load_in_browser(browser, page, tmp_path / "check")
    assert load.total == n_img > 0, f"browser saw {load.total} images, the file has {n_img}"
    assert load.broken == [], f"images the browser could not decode: {load.broken}"
    assert load.console == [], "console messages from the page:\n" + "\n".join(load.console)


def test_screenshot_is_kept_and_not_blank(
    browser: str, report_html: Path, tmp_path: Path, record_property: pytest.RecordProperty
) -> None:
    shot = tmp_path / "report.png"
    headless_run(browser, ["--window-size=1280,2400", f"--screenshot={shot}", report_html.as_uri()], tmp_path, shot)
    kept = artifact_dir() / "report-screenshot.png"
    shutil.copyfile(shot, kept)
    record_property("screenshot", str(kept))
    print(f"report screenshot: {kept}")
    assert shot.stat().st_size > 20_000, f"screenshot is only {shot.stat().st_size} bytes"
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        colours = im.convert("RGB").resize((320, 600)).getcolors(maxcolors=320 * 600)
    assert colours is not None and len(colours) > 16, f"screenshot looks blank: {colours and len(colours)} colours"


def test_check_catches_a_corrupt_image(browser: str, report_html: Path, tmp_path: Path) -> None:
    """The check can fail: one data URI replaced by bytes that are valid base64 but no PNG gives exactly one broken
    image, and the check's console.error is picked up from Chromium's log."""
    page = report_html.read_text(encoding="utf-8")
    m = re.search(r'<img\b[^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"[^>]*>', page)
    assert m is not None
    alt = re.search(r'alt="([^"]*)"', m.group(0))
    assert alt is not None
    bad = page[: m.start(1)] + "AAAA" * 64 + page[m.end(1) :]
    load = load_in_browser(browser, bad, tmp_path / "check")
    assert load.total == len(re.findall(r"<img\b", page))
    assert load.broken == [html.unescape(alt.group(1))]
    assert len(load.console) == 1 and f"{CHECK_ID}: 1 broken image" in load.console[0], load.console


@pytest.fixture(scope="module")
def study_html(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """report.html of a study folder as `transferlab study` lays it out (five members named and trained like the
    quick study's, four ensembles), with the planner's plan.json and labels.json beside members/ and ensembles/."""
    root = make_study(tmp_path_factory.mktemp("browser-study"))
    return build_report(ReportConfig(study_dirs(root), root / "report", title="Study quick")).html


@pytest.fixture(scope="module")
def study_layout(browser: str, study_html: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    return layout_in_browser(browser, study_html.read_text(encoding="utf-8"), tmp_path_factory.mktemp("layout"))


def test_summary_table_fits_a_1400px_window(study_layout: dict) -> None:
    """Every column of the summary table is on screen at 1400 px: nothing past the right edge of the window, and
    nothing hidden in its scroll box."""
    vw, table, wrap = study_layout["viewport"], study_layout["table"], study_layout["wrap"]
    assert vw == 1400, f"window is {vw} px wide, not 1400"
    assert table is not None, "no summary table after the Summary heading"
    assert table["right"] <= vw, f"summary table ends at {table['right']:.0f} px, past the {vw} px window"
    assert wrap["scroll"] <= wrap["client"], f"summary table is {wrap['scroll']} px in a {wrap['client']} px box"
    cut = [h["text"] for h in study_layout["heads"] if h["right"] > vw]
    assert not cut, f"columns past the right edge: {cut}"


def test_one_chart_compares_every_ensemble_with_the_members(study_layout: dict, study_html: Path) -> None:
    alts = [im["alt"] for im in study_layout["images"]]
    charts = [im for im in study_layout["images"] if "ensemble(s) and their members" in im["alt"]]
    assert len(charts) == 1, f"expected one ensembles-vs-members chart, found {len(charts)}: {alts}"
    assert charts[0]["ok"] and charts[0]["right"] <= study_layout["viewport"]
    assert not [a for a in alts if re.fullmatch(r"top-1 of \S+ and its members.*", a)], "per-ensemble charts remain"
    # The chart sits in its section, before the planner's sections and the details.
    tops = study_layout["tops"]
    assert tops["ensembles-vs-members"] < charts[0]["top"] < tops["calibration"]


def test_the_answer_comes_first(study_layout: dict) -> None:
    """The first thing after the title and the section links is the answer, and its cards (best model, top-1, how
    sure, cost) are on screen without scrolling."""
    assert study_layout["first"] == "answer", f"the page starts with {study_layout['first']}, not the answer"
    assert study_layout["sections"][:3] == ["answer", "summary", "ensembles-vs-members"], study_layout["sections"]
    cards = study_layout["cards"]
    labels = [c["label"] for c in cards]
    # an ensemble is the answer only where it is shown to beat its best member; otherwise the best single run is,
    # compared with the runner-up
    assert labels in (
        ["Best model", "Top-1 on the report half of val", "vs best single member", "Cost"],
        ["Best model", "Top-1 on val", "vs runner-up", "Cost"],
    ), labels
    assert max(c["bottom"] for c in cards) <= 900, "the answer's cards are below the first screen"
    assert max(c["right"] for c in cards) <= study_layout["viewport"]


def test_plan_and_labels_sections_when_their_files_exist(
    study_layout: dict, browser: str, report_html: Path, tmp_path: Path
) -> None:
    sections = study_layout["sections"]
    assert "plan" in sections and "would-more-labels-help" in sections, sections
    assert sections.index("would-more-labels-help") < sections.index("calibration")
    curve = [im for im in study_layout["images"] if im["alt"].startswith("top-1 against the number of labels")]
    assert len(curve) == 1 and curve[0]["ok"]
    # The two-run report has neither file: neither section.
    other = layout_in_browser(browser, report_html.read_text(encoding="utf-8"), tmp_path / "plain")
    assert "plan" not in other["sections"] and "would-more-labels-help" not in other["sections"]
    assert other["first"] == "answer"


def test_study_screenshot_is_kept(browser: str, study_html: Path, tmp_path: Path) -> None:
    """A 1400 px screenshot of the study report's first screens, for a human to look at."""
    shot = tmp_path / "study.png"
    headless_run(browser, ["--window-size=1400,2600", f"--screenshot={shot}", study_html.as_uri()], tmp_path, shot)
    shutil.copyfile(shot, artifact_dir() / "report-study-1400.png")
    with Image.open(shot) as im:
        assert im.size == (1400, 2600)
