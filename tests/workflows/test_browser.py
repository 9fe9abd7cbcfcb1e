"""The example workflows in a real browser: the host's own web UI, served by the `server` fixture on 127.0.0.1,
opened in headless Debian chromium driven by Playwright.

Each UI workflow is loaded with the frontend's `app.loadGraphData` (what opening the file does). Checked: no
error or other dialog, and no missing-node dialog — except for 06, whose LivePortraitKJ nodes are listed as
missing, exactly those; the frontend's own UI→API conversion (`app.graphToPrompt`, what "Queue" sends) equals the
committed API twin; a screenshot of the graph is saved.

Screenshots: upstream ComfyUI's frontend (comfyui-frontend-package) is what users see, so on that host they go to
docs/screenshots/<workflow>.png (rewritten only when the picture changed); on the PyPI host's legacy frontend they
go to the test's temporary folder. SEFI_SCREENSHOTS=<dir> sends them to <dir> on either host.

Needs: `apt-get install -y chromium` (/usr/bin/chromium, or SEFI_CHROMIUM=<path>) and `pip install playwright`
(requirements-dev.txt). Never `playwright install`: the test drives the system chromium and reaches nothing
but the local server (every other request is aborted).
"""
from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tools import embedded_host
from tools import workflow_builder as wb
from tools.dev_requirements import import_required

CHROMIUM = Path(os.environ.get("SEFI_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NAMES = tuple(wb.names())
DOCS_SCREENSHOTS = embedded_host.REPO_ROOT / "docs" / "screenshots"
# Upstream frontend settings for a clean, deterministic canvas: no first-run template browser, no minimap, no
# FPS/info overlay, full-detail nodes at the zoom levels used.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
               "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.2,
               "Comfy.Workflow.WorkflowTabsPosition": "Sidebar"}

sync_api = import_required("playwright.sync_api", reason="Playwright for Python is not installed: "
                               "pip install playwright (requirements-dev.txt); never run `playwright install`")
if not CHROMIUM.is_file():
    pytest.skip(f"chromium not found at {CHROMIUM}: apt-get install -y chromium (or set SEFI_CHROMIUM)",
                allow_module_level=True)

APP_READY = """() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph
    && Object.keys(window.LiteGraph.registered_node_types).some(t => t.startsWith('SeFi')))"""

# Visible dialogs of either frontend: the legacy .comfy-modal, PrimeVue's .p-dialog; error toasts too.
VISIBLE_DIALOGS = """() => [...document.querySelectorAll('.comfy-modal, .p-dialog, .p-toast-message-error')]
    .filter(e => e.getClientRects().length > 0 && getComputedStyle(e).display !== 'none'
                 && getComputedStyle(e).visibility !== 'hidden')
    .map(e => ({missingNodes: !!e.querySelector('.comfy-missing-nodes'), text: e.innerText.trim().slice(0, 500)}))"""

# Both frontends list the missing types in .comfy-missing-nodes, one <li> each, the type in its first <span>.
# Only those shown: the legacy frontend hides a closed dialog but keeps its list in the page (06's, when 07 loads).
MISSING_TYPES = """() => [...document.querySelectorAll('.comfy-missing-nodes li')]
    .filter(li => li.getClientRects().length > 0)
    .map(li => (li.querySelector('span') || li).textContent.trim()).filter(Boolean)"""

CLOSE_DIALOGS = """() => {
    window.app.ui?.dialog?.close?.();
    document.querySelectorAll('.p-dialog-close-button, .p-toast-close-button').forEach(b => b.click());
}"""

GRAPH_STATE = """() => {
    const data = window.app.graph.serialize();
    const nodes = window.app.graph._nodes || window.app.graph.nodes;
    return {nodes: data.nodes.length, links: data.links.length,
            broken: nodes.filter(n => n.has_errors).map(n => n.type)};
}"""

BOUNDS = """() => {
    const nodes = window.app.graph._nodes || window.app.graph.nodes, title = window.LiteGraph.NODE_TITLE_HEIGHT;
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const n of nodes) {
        x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - title);
        x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
    }
    return {x0, y0, x1, y1, vue: !!document.querySelector('[data-v-app]')};
}"""

# Zoom and pan so the whole graph sits in the canvas area left free by the UI around it.
FIT = """([b, inset]) => {
    const canvas = window.app.canvas, el = canvas.canvas;
    const w = el.clientWidth - inset.left - inset.right, h = el.clientHeight - inset.top - inset.bottom;
    const scale = Math.min(1, w / (b.x1 - b.x0), h / (b.y1 - b.y0));
    canvas.show_info = false;
    canvas.ds.scale = scale;
    canvas.ds.offset[0] = (inset.left + (w - scale * (b.x1 - b.x0)) / 2) / scale - b.x0;
    canvas.ds.offset[1] = (inset.top + (h - scale * (b.y1 - b.y0)) / 2) / scale - b.y0;
    canvas.setDirty(true, true);
    return scale;
}"""
# Canvas margins left for the UI: upstream's top bar, tool bar, zoom controls; the legacy menu is hidden.
INSETS = {True: {"left": 80, "top": 100, "right": 30, "bottom": 90},
          False: {"left": 30, "top": 30, "right": 30, "bottom": 30}}
ZOOM = 0.8  # screenshot scale to aim for: node text stays legible, the picture stays a few hundred KB


def _post_settings(base_url: str) -> None:
    """Upstream keeps UI settings per user on the server; the legacy PyPI frontend has no such route."""
    request = urllib.request.Request(base_url + "/settings", data=json.dumps(UI_SETTINGS).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        urllib.request.urlopen(request, timeout=10).close()
    except urllib.error.HTTPError as err:
        if err.code != 404:
            raise


class UI:
    """The web UI in one browser page, with the page errors it raised."""

    def __init__(self, page, base_url: str):
        self.page, self.base_url, self.errors = page, base_url, []
        page.on("pageerror", lambda exc: self.errors.append(f"{exc}"))

    def load(self, workflow: dict, name: str, expect_missing: bool) -> None:
        self.page.evaluate(CLOSE_DIALOGS)
        self.errors.clear()  # from here on, every page error is the workflow's
        # (graph, clean, restore_view, workflow name): upstream opens it under that name, legacy ignores it.
        self.page.evaluate("async ([graph, name]) => { await window.app.loadGraphData(graph, true, true, name); }",
                           [workflow, f"{name}.json"])
        if expect_missing:  # the upstream frontend opens its dialogs asynchronously
            self.page.wait_for_function(f"() => ({MISSING_TYPES})().length > 0", timeout=30_000)
        self.page.wait_for_timeout(700)

    def dialogs(self) -> list[dict]:
        return self.page.evaluate(VISIBLE_DIALOGS)

    def screenshot(self, path: Path) -> None:
        bounds = self.page.evaluate(BOUNDS)
        inset = INSETS[bounds["vue"]]
        width = int((bounds["x1"] - bounds["x0"]) * ZOOM) + inset["left"] + inset["right"]
        height = int((bounds["y1"] - bounds["y0"]) * ZOOM) + inset["top"] + inset["bottom"]
        self.page.set_viewport_size({"width": max(1280, min(2560, width)), "height": max(720, min(1440, height))})
        self.page.wait_for_timeout(300)  # the canvas follows the window size on the next frame
        self.page.evaluate(CLOSE_DIALOGS)
        self.page.evaluate(FIT, [bounds, inset])
        self.page.wait_for_timeout(300)
        self.page.screenshot(path=str(path))


@pytest.fixture(scope="module")
def ui(server):
    _post_settings(server.client.base_url)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            base = server.client.base_url
            # Hermetic: the page reaches the local server and nothing else (upstream's frontend asks
            # api.comfy.org about unknown node types, for instance).
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith((base, "data:", "blob:"))
                       else route.abort())
            handle = UI(page, base)
            page.goto(base + "/", wait_until="load")
            page.wait_for_function(APP_READY, timeout=90_000)
            # The legacy floating menu covers the graph; upstream's open-workflows badge counts the earlier tests.
            page.add_style_tag(content=".comfy-menu, .side-tool-bar-container .p-badge { display: none !important; }")
            page.wait_for_timeout(500)
            page.evaluate(CLOSE_DIALOGS)
            yield handle
        finally:
            browser.close()


@pytest.fixture(scope="module")
def screenshot_dir(tmp_path_factory) -> Path:
    chosen = os.environ.get("SEFI_SCREENSHOTS")
    if chosen:
        path = Path(chosen)
    elif embedded_host.comfyui_path() is not None:
        path = DOCS_SCREENSHOTS
    else:
        path = tmp_path_factory.mktemp("screenshots-legacy-frontend")
    path.mkdir(parents=True, exist_ok=True)
    return path


def _keep_if_unchanged(new: Path, target: Path) -> None:
    """Move the new screenshot over `target` unless both show the same picture: same size and at most a few
    pixels (anti-aliasing noise) visibly different; one changed character in a widget is well above that."""
    import numpy as np
    from PIL import Image
    if target.exists():
        with Image.open(new) as a, Image.open(target) as b:
            same = a.size == b.size and int((np.abs(np.asarray(a.convert("RGB"), dtype=np.int16)
                                                    - np.asarray(b.convert("RGB"), dtype=np.int16)).max(axis=2)
                                             > 16).sum()) <= 20
        if same:
            new.unlink()
            return
    shutil.move(str(new), str(target))


def _declared_inputs(spec: dict) -> set[str]:
    inputs = spec.get("input", {})
    return {name for section in ("required", "optional") for name in inputs.get(section, {})}


@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_in_the_web_ui(ui, name, object_info, third_party_allowed, screenshot_dir, tmp_path):
    workflow = wb.load_ui(name)
    expected_missing = set(third_party_allowed.get(name, ())) - set(object_info)
    ui.load(workflow, name, expect_missing=bool(expected_missing))

    missing = ui.page.evaluate(MISSING_TYPES)
    assert sorted(set(missing)) == sorted(expected_missing), f"{name}: missing node types {missing}"
    dialogs = ui.dialogs()
    others = [d["text"] for d in dialogs if not d["missingNodes"]]
    assert not others, f"{name}: the UI showed {others}"
    assert bool(dialogs) == bool(expected_missing), f"{name}: dialogs {dialogs}"
    assert not ui.errors, f"{name}: page errors while loading: {ui.errors}"

    state = ui.page.evaluate(GRAPH_STATE)
    assert state["nodes"] == len(workflow["nodes"]) and state["links"] == len(workflow["links"]), state
    assert set(state["broken"]) <= expected_missing, state

    if not expected_missing:
        # The frontend's own conversion (what "Queue" sends) equals the committed API twin. Inputs a node does
        # not declare are dropped first: the legacy frontend also sends LoadImage's upload button ("upload").
        output = ui.page.evaluate("async () => (await window.app.graphToPrompt()).output")
        api = wb.load_api(name)
        assert set(output) == set(api), f"{name}: node ids {sorted(output)} vs {sorted(api)}"
        for node_id, node in api.items():
            declared = _declared_inputs(object_info[node["class_type"]])
            sent = {k: v for k, v in output[node_id]["inputs"].items() if k in declared}
            assert output[node_id]["class_type"] == node["class_type"]
            assert sent == node["inputs"], f"{name} #{node_id} {node['class_type']}"
    assert not ui.errors, f"{name}: page errors: {ui.errors}"
    assert ui.dialogs() == dialogs, f"{name}: a dialog came or went late: {ui.dialogs()}"

    shot = tmp_path / f"{name}.png"
    ui.screenshot(shot)
    assert shot.stat().st_size > 10_000
    _keep_if_unchanged(shot, screenshot_dir / f"{name}.png")
