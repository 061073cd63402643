"""Stage 3 in a real browser: notebook 03 over a tiny run directory, served on loopback by voila and
opened inside JupyterLab itself (run all cells), driven with headless Chromium (Debian's
/usr/bin/chromium; never a downloaded browser).

Click a concept → its drilldown shows; toggle → plan/plan.json changes; the XSS pairs render as text
and nothing runs; the canvas map draws and lassos 50,000 points. On failure a screenshot goes to
test-artifacts/browser/ (gitignored)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyrun import XSS, make_run

CHROMIUM = "/usr/bin/chromium"
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts" / "browser"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="needs Debian's chromium at /usr/bin/chromium (apt-get install -y chromium); .ci/run installs it",
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def notebook_03(tmp_path_factory, tiny_lm, tiny_sae_):
    """A tiny run directory and notebook 03 with its parameters filled in, in a folder to serve."""
    import papermill as pm

    root = tmp_path_factory.mktemp("browser")
    run = make_run(root, tiny_lm, tiny_sae_)
    nb = root / "serve" / "03_plan.ipynb"
    nb.parent.mkdir()
    pm.execute_notebook(
        str(REPO / "notebooks" / "03_plan.ipynb"),
        str(nb),
        parameters={"run_dir": str(run), "config": {"maps": {"method": "svd"}}},
        prepare_only=True,
        progress_bar=False,
    )
    return root, nb, run


def _serve(args: list[str], cwd: Path, log_path: Path, port: int, env: dict | None = None):
    """Start a server on loopback and wait until it listens; returns the process."""
    log = open(log_path, "w")
    proc = subprocess.Popen(args, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    deadline = time.time() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return proc
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"{args[2]} did not start: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def served(notebook_03):
    root, nb, run = notebook_03
    port = _free_port()
    proc = _serve(
        [
            sys.executable,
            "-m",
            "voila",
            nb.name,
            "--no-browser",
            f"--port={port}",
            "--Voila.ip=127.0.0.1",
            "--show_tracebacks=True",
        ],
        nb.parent,
        root / "voila.log",
        port,
    )
    yield f"http://127.0.0.1:{port}/", run
    _stop(proc)


@pytest.fixture(scope="module")
def lab(notebook_03):
    """JupyterLab on loopback, no token, nothing fetched from a network, its own config folders."""
    root, nb, run = notebook_03
    port = _free_port()
    home = root / "jupyter-home"
    env = {
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
    }
    args = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        f"--port={port}",
        "--ServerApp.ip=127.0.0.1",
        "--IdentityProvider.token=",
        "--ServerApp.password=",
        "--ServerApp.disable_check_xsrf=True",
        "--ServerApp.allow_root=True",
        f"--ServerApp.root_dir={nb.parent}",
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
    ]
    proc = _serve(args, nb.parent, root / "jupyterlab.log", port, env)
    yield f"http://127.0.0.1:{port}/lab/tree/{nb.name}", run
    _stop(proc)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, request):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.dialogs = []
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.dismiss()))
    yield pg
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    ctx.close()


def _plan(run: Path) -> dict:
    return {c["concept"]: c for c in json.loads((run / "plan" / "plan.json").read_text())["concepts"]}


def _wait(cond, timeout=30.0, what="condition"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _concept_with_an_xss_example(run):
    from anatomy_nb.config import MapConfig
    from anatomy_nb.ui.viewer import ViewerData

    data = ViewerData(run, maps=MapConfig(method="svd"))
    xss_ids = {x["id"] for x in XSS}
    # a concept whose example pairs include an XSS pair: its drilldown must show that text inert
    concept = next(
        (
            int(c)
            for c in data.space.concepts["concept"]
            if any(e["id"] in xss_ids for e in data.drilldown(int(c))["examples"])
        ),
        None,
    )
    assert concept is not None, "no concept's examples include an XSS pair; the fixture must plant them"
    return data, concept


def _drive_the_viewer_and_toggles(page, run, data, concept):
    """What a user does on notebook 03's widgets, and what must (not) happen."""
    page.wait_for_selector(".anb-signals tbody tr", timeout=180_000)
    page.wait_for_selector(".anb-toggle-table tbody tr", timeout=60_000)
    assert page.eval_on_selector(".anb-scatter", "e => Number(e.dataset.points)") == data.space.n_pairs

    # click a concept → the drilldown shows it
    page.click(f".anb-signals tbody tr[data-concept='{concept}']")
    page.wait_for_function(
        "document.querySelector('.anb-drill-title') && "
        f"document.querySelector('.anb-drill-title').textContent.startsWith('concept {concept} ')",
        timeout=30_000,
    )
    drill = page.inner_text(".anb-drill")
    assert "top-activating contexts" in drill and "split-half" in drill and "at equal length" in drill
    # every token's strength
    assert page.evaluate("document.querySelectorAll('.anb-drill .anb-tok[title^=\"activation \"]').length") > 0

    # the XSS pairs are shown as text, and none of them ran
    assert "<script>window.__pwned=1</script>" in drill
    assert "<img src=x onerror=" in drill or "javascript:window.__pwned=3" in drill
    assert page.evaluate("window.__pwned") is None and page.dialogs == []
    assert page.evaluate("document.querySelectorAll('.anb-root img, .anb-root script, .anb-root a').length") == 0
    # the one frame is the summary (ui.summary), sandboxed: nothing in it can run
    frames = page.evaluate(
        "[...document.querySelectorAll('.anb-root iframe')].map(f => [f.className, f.getAttribute('sandbox')])"
    )
    assert frames == [["anb-summary-frame", ""]]
    assert page.frame_locator(".anb-summary-frame").locator("h2").inner_text() == "What DPO on this data will teach"
    # only our own markup
    assert page.evaluate("[...document.querySelectorAll('.anb-root b')].every(b => b.textContent === 'Scope: ')")

    # z and the split-half check on every row; stage 2's other views (opening here) one select away
    header = page.inner_text(".anb-signals thead")
    assert "z" in header.split() and "split-half" in header
    assert page.inner_text(f".anb-signals tbody tr[data-concept='{concept}'] .anb-col-split_half")[0] in "✓✗–"
    page.select_option("select.anb-view-select", "opening")
    page.wait_for_selector(".anb-view-opening tbody tr", timeout=30_000)
    assert page.inner_text(".anb-view-opening tbody tr .anb-col-where") == "opening"
    page.select_option("select.anb-view-select", "overall")
    page.wait_for_selector(".anb-view-overall tbody tr", timeout=30_000)

    # toggle → plan.json changes (suppress with the default method, then switch the method)
    name = f"sae:{concept}"
    assert _plan(run)[name]["action"] == "allow"
    row = f".anb-toggle-table tbody tr[data-concept='{name}']"
    page.click(f"{row} .anb-act-suppress")
    _wait(lambda: _plan(run)[name]["action"] == "suppress", what="plan.json to record suppress")
    assert _plan(run)[name]["method"] == "reward_shaping"
    page.select_option(f"{row} select.anb-method", "filter")
    _wait(lambda: _plan(run)[name]["method"] == "filter", what="plan.json to record the filter")
    assert _plan(run)[name]["strength"] == 0.5
    page.wait_for_function(
        "document.querySelector('.anb-status').textContent.includes('1 concept changed')", timeout=30_000
    )
    assert "predicted spill-over" in page.inner_text(".anb-spill").lower()
    # an invalid strength is refused with the reason, and the file keeps the last valid plan
    page.fill(f"{row} input.anb-strength", "5")
    page.press(f"{row} input.anb-strength", "Enter")
    page.wait_for_function("document.querySelector('.anb-error').textContent.includes('strength')", timeout=30_000)
    assert _plan(run)[name]["strength"] == 0.5
    assert page.evaluate("window.__pwned") is None and page.dialogs == []


def test_notebook_03_in_voila_drilldown_toggles_and_xss(served, page):
    url, run = served
    data, concept = _concept_with_an_xss_example(run)
    page.goto(url, timeout=120_000)
    _drive_the_viewer_and_toggles(page, run, data, concept)


def test_notebook_03_inside_jupyterlab(lab, page):
    """The product is "explore in JupyterLab": the notebook opened in JupyterLab, Run All Cells, then
    the same clicks as under voila (the plan file is reset first: both tests write it)."""
    url, run = lab
    (run / "plan" / "plan.json").unlink(missing_ok=True)
    data, concept = _concept_with_an_xss_example(run)
    page.goto(url, timeout=120_000)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=180_000)
    page.wait_for_function("!document.querySelector('.jp-Dialog')", timeout=60_000)  # no kernel-choice dialog
    try:
        _run_all_cells_in_lab(page)
        _drive_the_viewer_and_toggles(page, run, data, concept)
    except Exception as err:  # say what the notebook showed and what the server logged, not only "timeout"
        outputs = page.evaluate(
            "[...document.querySelectorAll('.jp-OutputArea-output')].map(e => e.innerText).join('\\n---\\n')"
        )
        log = (run.parent / "jupyterlab.log").read_text(errors="replace")[-3000:]
        raise AssertionError(f"{err}\n\nnotebook outputs:\n{outputs[-4000:]}\n\njupyterlab.log:\n{log}") from err


def _run_all_cells_in_lab(page, attempts: int = 3) -> None:
    """Run All Cells once the kernel is idle, and check that execution really started: on a loaded
    machine a menu click made while the kernel is still starting can be lost, so it is retried."""
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=180_000)
    started = (
        "[...document.querySelectorAll('.jp-Notebook .jp-InputPrompt')].some(e => "
        "/\\[(\\*|\\d+)\\]/.test(e.textContent))"
    )
    for _ in range(attempts):
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        try:
            page.wait_for_function(started, timeout=60_000)
            return
        except Exception:
            page.keyboard.press("Escape")  # close a menu left open, then try again
    raise AssertionError(f"Run All Cells did not start the notebook after {attempts} tries")


def test_canvas_map_draws_and_lassos_50k_points(page):
    """The map component of the viewer, alone, at 50,000 points: draw time and a lasso."""
    page.set_content("<div id='host' style='width:900px'></div>")
    page.add_script_tag(content=(REPO / "widgets" / "common.js").read_text() + "\nwindow.Scatter = Scatter;")
    res = page.evaluate("""() => {
        const n = 50000, x = new Array(n), y = new Array(n), colors = new Array(n);
        let s = 1; const rnd = () => (s = (s * 16807) % 2147483647) / 2147483647;
        for (let i = 0; i < n; i++) { x[i] = rnd(); y[i] = rnd(); colors[i] = i % 3 ? "#1971c2" : "#c92a2a"; }
        const sc = new Scatter(document.getElementById('host'), {height: 500});
        const t0 = performance.now(); sc.setData(x, y, colors); const first = performance.now() - t0;
        const times = []; for (let k = 0; k < 5; k++) times.push(sc.draw());
        const t1 = performance.now();
        const w = sc._w, h = sc._h; const poly = [[8, 8], [w / 2, 8], [w / 2, h - 8], [8, h - 8]];
        const sel = sc.lassoSelect(poly); const lasso = performance.now() - t1;
        const t2 = performance.now(); const hit = sc.nearest(w / 3, h / 3, 8); const hover = performance.now() - t2;
        return {first, draw: times.sort((a, b) => a - b)[2], lasso, selected: sel.length, hover, hit};
    }""")
    print(
        f"\n50k points: first draw {res['first']:.0f} ms, redraw median {res['draw']:.0f} ms, lasso "
        f"{res['lasso']:.0f} ms, hover {res['hover']:.1f} ms"
    )
    assert res["draw"] < 1000 and res["lasso"] < 1000  # generous: CI machines are slow and shared
    assert 0.4 * 50000 < res["selected"] < 0.6 * 50000  # the left half
    assert res["hit"] >= 0


def test_the_report_opens_on_the_summary_and_its_dataset_text_stays_inert(browser, tmp_path, tiny_lm, tiny_sae_):
    """The shareable report (``anb.report``) at 1280×800: the summary of what DPO will teach and its
    plot lie in the first screen; pairs whose chosen responses open with markup (script, img with
    onerror) are shown as text, and no element or script of theirs exists in the page."""
    from anatomy_nb.config import ConceptConfig, ExtractConfig, HypothesizeConfig
    from anatomy_nb.stages.extract import extract
    from anatomy_nb.stages.hypothesize import hypothesize
    from anatomy_nb.ui.report import report

    from helpers import synthetic_pairs

    payload = '<img src=x onerror="window.__pwned=2"><script>window.__pwned=1</script> '
    pairs = [
        p.__class__(id=p.id, prompt=p.prompt, chosen=payload + p.chosen, rejected=p.rejected) for p in synthetic_pairs()
    ]
    run = tmp_path / "run"
    extract(pairs, tiny_lm, tiny_sae_, run, ExtractConfig(shard_size=24, progress=False))
    hypothesize(
        run, HypothesizeConfig(concepts=ConceptConfig(min_support=3), promoted_tokens=0), model=tiny_lm, sae=tiny_sae_
    )
    index = report(run, render=False)
    html = index.read_text()
    assert "<script>window.__pwned" not in html and "<img src=x" not in html and "onerror=&quot;" in html
    ctx = browser.new_context(viewport={"width": 1280, "height": 800})
    page = ctx.new_page()
    dialogs = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    try:
        page.goto(index.as_uri())
        section = page.locator("#what-it-teaches").bounding_box()
        plot = page.locator("#what-it-teaches svg.anb-effects").bounding_box()
        assert section is not None and plot is not None
        assert 0 <= section["y"] < 800 and plot["y"] >= 0 and plot["y"] + plot["height"] <= 800, (section, plot)
        assert "onerror=" in page.text_content("body")  # the payload is in the page, as text
        assert page.evaluate("window.__pwned") is None and dialogs == []
        assert page.evaluate("document.querySelectorAll('script, img, iframe, object, embed').length") == 0
    finally:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report-first-screen.png"))
        ctx.close()
