"""Every notebook opened in JupyterLab in headless Chromium: the quick ones with all cells run,
no error output; the long ones (more than RUN_BUDGET_S of cells when last executed, and no
widget: nbval executes those already) with their committed outputs rendered, every image
decoded, no error output.  The dashboard rendered, its take-snapshot button clicked, its event
log and plot updated.
Screenshots go to out/ui/: one per notebook after its run, and the dashboard before and after
the click and after a bad RAM size."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest

from tests.ui.conftest import OUT, ROOT, Lab

Keys = pytest.importorskip("selenium.webdriver.common.keys").Keys
WAIT_S = 300  # generous: a notebook's cells, or a snapshot job, on a busy 2-core host


def _order() -> list[str]:
    spec = importlib.util.spec_from_file_location("notebooks_make", ROOT / "notebooks" / "make.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return list(mod.ORDER)


ORDER = _order()
RUN_BUDGET_S = 15.0  # 02 (real QEMU beside snaplab, ~18 s) renders: nbval runs it already


def _executed_s(stem: str) -> float:
    """Seconds the notebook's cells took when it was last executed (make.py), from the cells'
    execution timestamps; infinite without them."""
    cells = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())["cells"]
    stamps = [c.get("metadata", {}).get("execution", {}) for c in cells if c["cell_type"] == "code"]
    try:
        t0 = datetime.fromisoformat(stamps[0]["iopub.execute_input"].replace("Z", "+00:00"))
        t1 = datetime.fromisoformat(stamps[-1]["iopub.status.idle"].replace("Z", "+00:00"))
    except (IndexError, KeyError):
        return float("inf")
    return (t1 - t0).total_seconds()


def _has_widgets(stem: str) -> bool:
    return "application/vnd.jupyter.widget-view+json" in (ROOT / "notebooks" / f"{stem}.ipynb").read_text()
DASHBOARD = next((s for s in ORDER if s.endswith("-dashboard")), "dashboard notebook missing from ORDER")

# JupyterLab is loaded once; each notebook is opened in it (docmanager:open) as window.__nb.
APP_JS = """
const a = window.jupyterapp;
if (!a) return false;
if (!a.__snaplab_restored) a.restored.then(() => { a.__snaplab_restored = true; });
return !!a.__snaplab_restored && a.commands.hasCommand('docmanager:open');
"""

OPEN_JS = """
const path = arguments[0], done = arguments[arguments.length - 1];
const app = window.jupyterapp;
app.commands.execute('docmanager:open', {path: path, factory: 'Notebook'})
  .then(w => { window.__nb = w; app.shell.activateById(w.id); return w.context.ready; })
  .then(() => done('ok'), e => done('failed: ' + e));
"""

# Its kernel connected and idle.
READY_JS = """
const w = window.__nb;
if (!w || !w.context.isReady || !w.sessionContext) return false;
const k = w.sessionContext.session && w.sessionContext.session.kernel;
return !!k && k.connectionStatus === 'connected' && k.status === 'idle';
"""

RUN_ALL_JS = """
const done = arguments[arguments.length - 1];
window.jupyterapp.shell.activateById(window.__nb.id);
window.jupyterapp.commands.execute('notebook:run-all-cells').then(() => done('ok'), e => done('failed: ' + e));
"""

# Every code cell executed, the kernel idle: [cells run, code cells, errors as "cell N: ename: evalue"].
STATE_JS = """
const w = window.__nb;
let ran = 0, code = 0; const errors = [];
const cells = w.content.model.cells;
for (let i = 0; i < cells.length; i++) {
  const c = cells.get(i);
  if (c.type !== 'code') continue;
  code += 1;
  if (c.executionCount) ran += 1;
  for (let j = 0; j < c.outputs.length; j++) {
    const o = c.outputs.get(j).toJSON();
    if (o.output_type === 'error') errors.push('cell ' + i + ': ' + o.ename + ': ' + o.evalue);
  }
}
return [ran, code, errors, w.sessionContext.session.kernel.status];
"""

SAVE_SHUTDOWN_CLOSE_JS = """
const done = arguments[arguments.length - 1];
const w = window.__nb;
w.context.save().then(() => w.sessionContext.shutdown()).then(() => { w.dispose(); done('ok'); }, e => done('failed: ' + e));
"""


def wait_for(what: str, cond: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    end = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > end:
            raise AssertionError(f"waited {timeout} s for {what}")
        time.sleep(0.2)


def open_and_run(driver: Any, lab: Lab, stem: str) -> None:
    if not driver.execute_script(APP_JS):  # the first notebook of the session (or after a failure)
        driver.get(f"{lab.url}/lab?reset&token={lab.token}")
        wait_for("JupyterLab started", lambda: driver.execute_script(APP_JS))
    assert driver.execute_async_script(OPEN_JS, f"{stem}.ipynb") == "ok"
    wait_for(f"{stem} open with an idle kernel", lambda: driver.execute_script(READY_JS))
    # the lab's settings (conftest): widget comms on the main shell, no subshell to race the shutdown
    assert driver.execute_script("return window.__nb.sessionContext.session.kernel.commsOverSubshells") == "disabled"
    assert driver.execute_async_script(RUN_ALL_JS) == "ok"

    seen: list[str] = []  # each change of (cells run, kernel status), timed: a failure report
    prev: list[Any] = [None]
    t0 = time.monotonic()

    def finished() -> Any:
        ran, code, errors, status = driver.execute_script(STATE_JS)
        if prev[0] != (ran, status):
            prev[0] = (ran, status)
            seen.append(f"{ran}/{code} {status} at {time.monotonic() - t0:.0f} s")
        # run-all stops at a cell that raised: the cells after it never run, so an error ends the wait
        return (ran, code, errors) if (ran == code or errors) and status == "idle" else None

    try:
        ran, code, errors = wait_for(f"every cell of {stem} run", finished)
    except AssertionError as err:  # where it stopped, a hang or a slow host (with a screenshot)
        with contextlib.suppress(Exception):
            shot(driver, f"FAILED-{stem}")
        raise AssertionError(f"{err}; cells run, kernel: {', '.join(seen[-15:])}") from None
    assert code > 0 and not errors, "\n".join(errors)


def shot(driver: Any, name: str) -> None:
    """A screenshot of the browser's window into out/ui/ (look at them)."""
    path = OUT / f"{name}.png"
    assert driver.save_screenshot(str(path)) and path.read_bytes().startswith(b"\x89PNG"), path


def close(driver: Any) -> None:
    assert driver.execute_async_script(SAVE_SHUTDOWN_CLOSE_JS) == "ok"


# The committed outputs as the browser shows them: [image outputs in the model, <img> elements
# decoded with a size, errors as "cell N: ename: evalue", output areas in the page].
RENDERED_JS = """
const w = window.__nb;
const cells = w.content.model.cells;
let images = 0; const errors = [];
for (let i = 0; i < cells.length; i++) {
  const c = cells.get(i);
  if (c.type !== 'code') continue;
  for (let j = 0; j < c.outputs.length; j++) {
    const o = c.outputs.get(j).toJSON();
    if (o.output_type === 'error') errors.push('cell ' + i + ': ' + o.ename + ': ' + o.evalue);
    if (o.data && o.data['image/png']) images += 1;
  }
}
const shown = Array.from(w.node.querySelectorAll('.jp-RenderedImage img')).filter(i => i.complete && i.naturalWidth > 0);
return [images, shown.length, errors, w.node.querySelectorAll('.jp-OutputArea-output').length];
"""

RUN = [s for s in ORDER if s != DASHBOARD and (_executed_s(s) <= RUN_BUDGET_S or _has_widgets(s))]
RENDER = [s for s in ORDER if s != DASHBOARD and s not in RUN]


@pytest.mark.parametrize("stem", RUN)
def test_notebook_runs_in_the_browser_without_errors(jupyterlab: Lab, browser: Any, stem: str) -> None:
    try:
        open_and_run(browser, jupyterlab, stem)
        shot(browser, stem)
    finally:  # a failed notebook's kernel is shut down too, so the next notebook starts clean
        close(browser)


@pytest.mark.parametrize("stem", RENDER)
def test_long_notebook_renders_its_outputs_in_the_browser(jupyterlab: Lab, browser: Any, stem: str) -> None:
    driver = browser
    if not driver.execute_script(APP_JS):
        driver.get(f"{jupyterlab.url}/lab?reset&token={jupyterlab.token}")
        wait_for("JupyterLab started", lambda: driver.execute_script(APP_JS))
    assert driver.execute_async_script(OPEN_JS, f"{stem}.ipynb") == "ok"
    # JupyterLab renders cells as they scroll into view: walk to the end, then count.
    driver.execute_script("const w = window.__nb; w.content.scrollToItem(w.content.widgets.length - 1, 'end');")
    images, shown, errors, areas = wait_for(f"{stem}'s outputs shown, its images decoded", lambda: (
        (v := driver.execute_script(RENDERED_JS))[3] > 0 and v[1] >= v[0] and v), timeout=60)
    assert not errors, "\n".join(errors)
    assert shown >= images and areas > 0
    shot(driver, stem)
    close(driver)


def test_the_split_leaves_no_notebook_out() -> None:
    assert sorted(RUN + RENDER + [DASHBOARD]) == sorted(ORDER)
    # the split reads each notebook's execution stamps (make.py writes them): every one has them
    for stem in ORDER:
        cells = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text())["cells"]
        assert any("iopub.execute_input" in c.get("metadata", {}).get("execution", {}) for c in cells), stem


def _dashboard_view(driver: Any) -> dict[str, Any]:
    """What the browser shows of the dashboard: the log's text, the plot's source and size."""
    return driver.execute_script("""
const img = document.querySelector('img.snaplab-plot');
const log = document.querySelector('.snaplab-log textarea');
const btn = document.querySelector('button.snaplab-take-snapshot');
return {log: log ? log.value : null, src: img ? img.src : null, width: img ? img.naturalWidth : 0,
        complete: img ? img.complete : false, button: !!btn && btn.offsetParent !== null,
        widgets: document.querySelectorAll('.jp-OutputArea-output .jupyter-widgets').length};
""")


def test_dashboard_take_snapshot_updates_log_and_plot(jupyterlab: Lab, browser: Any) -> None:
    assert DASHBOARD in ORDER
    open_and_run(browser, jupyterlab, DASHBOARD)
    browser.execute_script("""
const w = window.__nb;
w.content.activeCellIndex = 1;
w.content.scrollToItem(1, 'start');""")
    view = wait_for("the dashboard's widgets rendered",
                    lambda: (v := _dashboard_view(browser))["button"] and v["width"] > 0 and v["log"] and v)
    assert view["widgets"] > 5
    view = wait_for("the plot redrawn in the browser with no click (live plot)", lambda: (
        (v := _dashboard_view(browser))["src"] != view["src"] and v["complete"] and v["width"] > 0 and v))
    assert view["log"].count("snapshot-save snap1: done") == 1  # the notebook's own save
    tag = browser.find_element("css selector", ".snaplab-tag input")
    tag.send_keys(Keys.CONTROL, "a")
    tag.send_keys("ui-snap", Keys.TAB)  # a tag the notebook did not use: snapshot-save refuses an existing one
    wait_for("the tag synced to the kernel", lambda: browser.execute_script(
        "return document.querySelector('.snaplab-tag input').value") == "ui-snap")
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})",
                           browser.find_element("css selector", ".snaplab-ram"))  # controls, plot and log in view
    shot(browser, "dashboard-before")
    browser.find_element("css selector", ".snaplab-take-snapshot").click()
    after = wait_for("the log and the plot updated after the click", lambda: (
        "snapshot-save ui-snap: done" in (v := _dashboard_view(browser))["log"]
        and v["src"] != view["src"] and v["complete"] and v["width"] > 0 and v))
    new = "\n".join(after["log"].split("\n")[:after["log"].count("\n") - view["log"].count("\n")])  # newest first
    assert "STOP" in new and "RESUME" in new and "error" not in new, new
    shot(browser, "dashboard-after")

    # bad input: a RAM size the machine cannot give, typed in and booted, ends in the log
    ram = browser.find_element("css selector", ".snaplab-ram input")
    ram.send_keys(Keys.CONTROL, "a")
    ram.send_keys("8", Keys.TAB)  # an IntText sends its value when it loses the focus
    assert ram.get_attribute("value") == "8"
    refused = "boot: error: RAM 8 MiB: expected 16 to 65536 MiB"
    assert _dashboard_view(browser)["log"].count(refused) == 1  # the notebook's own try
    browser.find_element("css selector", ".snaplab-boot").click()
    wait_for("the machine's error in the log", lambda: _dashboard_view(browser)["log"].count(refused) == 2)
    assert "snapshot-save ui-snap: done" in _dashboard_view(browser)["log"]  # the running machine stays
    ran, code, errors, _ = browser.execute_script(STATE_JS)
    assert not errors, errors
    shot(browser, "dashboard-bad-input")
    close(browser)
