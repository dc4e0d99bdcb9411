"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol: open a page of the MLflow UI, expand
nested runs, read the page's text and take a screenshot. Test helper (and how docs/mlflow_ui.png was made):

    python tests/browser.py 'http://127.0.0.1:5000/#/experiments/1/runs' docs/mlflow_ui.png
    python tests/browser.py 'http://127.0.0.1:5000/#/experiments/1/runs?compareRunsMode=CHART' charts.png loss

The MLflow 3 runs table collapses child runs under their parent (the expansion state lives in the browser's
localStorage, not in the URL), so the "+" buttons next to parent runs are clicked before the text is read.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-sync",
    "--disable-quic",
    "--disable-default-apps",
    "--disable-extensions",
    "--hide-scrollbars",
    "--window-size=1400,900",
    "--remote-debugging-port=0",
    "--remote-debugging-address=127.0.0.1",
    "about:blank",
]
# the "+" icon of a collapsed parent run in the runs table (MLflow 3.17's design system)
EXPAND = """(() => { let n = 0;
  document.querySelectorAll('button[data-component-id*="runnamecellrenderer"]').forEach(b => {
    if (b.querySelector('path[d^="M7.25 7.25"]')) { b.click(); n++; } }); return n; })()"""
CLOSE_ASSISTANT = """(() => {
  const c = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (c) { c.click(); return true } return false })()"""


def chromium() -> str:
    return shutil.which("chromium") or shutil.which("chromium-browser") or ""


# type into the chart view's search box (a React input: set the value through the prototype, then an input event)
FILTER = """((text) => { const i = document.querySelector('input[placeholder="Search metric charts"]');
  if (!i) return false;
  Object.getOwnPropertyDescriptor(HTMLInputElement.prototype, 'value').set.call(i, text);
  i.dispatchEvent(new Event('input', {bubbles: true})); return true })"""


def runs_page(url: str, screenshot: Path = None, timeout: float = 90.0, charts: str = "") -> str:
    """The text of an MLflow runs page with every parent run expanded; optionally a PNG of it. ``charts``: on the
    chart view (``?compareRunsMode=CHART``), show only the metric charts whose name holds this text."""
    from websockets.sync.client import connect

    profile = tempfile.mkdtemp(prefix="finetune-chromium-")
    proc = subprocess.Popen(
        [chromium(), f"--user-data-dir={profile}", *FLAGS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        ws_url = None
        for line in proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            m = re.search(r"DevTools listening on (ws://\S+)", line)
            if m:
                ws_url = m.group(1)
                break
        assert ws_url, "chromium did not start its DevTools endpoint"
        port = ws_url.split(":")[2].split("/")[0]
        page = next(
            t
            for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json", timeout=30))
            if t["type"] == "page"
        )
        with connect(page["webSocketDebuggerUrl"], max_size=50_000_000, open_timeout=30) as ws:
            counter = [0]

            def cdp(method, **params):
                counter[0] += 1
                ws.send(json.dumps({"id": counter[0], "method": method, "params": params}))
                while True:
                    msg = json.loads(ws.recv(timeout=60))
                    if msg.get("id") == counter[0]:
                        return msg.get("result", msg)

            def js(expr):
                out = cdp("Runtime.evaluate", expression=expr, returnByValue=True, awaitPromise=True)
                return out["result"].get("value")

            def wait_for(expr, seconds):
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    if js(expr):
                        return True
                    time.sleep(0.25)
                return False

            cdp("Page.enable")
            cdp("Runtime.enable")
            cdp("Page.navigate", url=url)
            assert wait_for("document.querySelector('.ag-row a[href*=\"/runs/\"]') !== null", timeout), (
                f"the runs table did not render: {js('document.body.innerText')[:500]!r}"
            )
            for _ in range(3):
                rows = js("document.querySelectorAll('.ag-row').length")
                if not js(EXPAND):
                    break
                wait_for(f"document.querySelectorAll('.ag-row').length > {rows}", 15)
            js(CLOSE_ASSISTANT)
            if charts:
                js(f"{FILTER}({json.dumps(charts)})")
                time.sleep(2.0)
            time.sleep(1.0)
            text = js("document.body.innerText")
            if screenshot:
                shot = cdp("Page.captureScreenshot", format="png")
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            return text
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(15)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    print(
        runs_page(
            sys.argv[1],
            Path(sys.argv[2]) if len(sys.argv) > 2 else None,
            charts=sys.argv[3] if len(sys.argv) > 3 else "",
        )
    )
