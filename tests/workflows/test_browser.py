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

from host_boot import embedded_host
from tools import workflow_builder as wb
from tools.dev_requirements import import_required

pytestmark = pytest.mark.slow  # drives Chromium through every workflow

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


# ------------------------------------------------------------------------------------------------- watching a run

WATCH_NAME = "watched"
WATCH_STEPS = 4
WATCH_SNAPSHOTS = 2  # snapshots at steps 2 and 4; one sampling point (step 4): renders are what costs most here
WATCH_SCREENSHOT = "training_watch"

SET_WIDGETS = """([id, values]) => {
    const node = window.app.graph.getNodeById(id);
    for (const [name, value] of Object.entries(values)) {
        const widget = node.widgets.find(w => w.name === name);
        if (!widget) throw new Error(`node ${id} (${node.type}) has no widget ${name}`);
        widget.value = value;
    }
    window.app.graph.setDirtyCanvas(true, true);
}"""

# Records, in the page, what the UI itself receives for node `id`: its progress messages (value/max) and every
# preview picture the frontend stores for it (app.nodePreviewImages, what both frontends draw on a running node),
# each fetched at once (blob URLs are revoked later) for its size and a hash of its bytes.
WATCH_NODE = """async (id) => {
    const api = window.comfyAPI?.api?.api ?? (await import('/scripts/api.js')).api;
    const seen = window.__sefiWatch = {progress: [], previews: []};
    api.addEventListener('progress', ({detail}) => {
        if (String(detail.node) === String(id)) seen.progress.push([detail.value, detail.max]);
    });
    const poll = async () => {
        const url = (window.app.nodePreviewImages?.[String(id)] || [])[0];
        if (!url || seen.previews.some(p => p.url === url)) return;
        const entry = {url, at: seen.progress.length ? seen.progress[seen.progress.length - 1][0] : 0};
        seen.previews.push(entry);
        try {
            const bytes = new Uint8Array(await (await fetch(url)).arrayBuffer());
            let hash = 0;
            for (let i = 0; i < bytes.length; i++) hash = (hash * 31 + bytes[i]) | 0;
            const bitmap = await createImageBitmap(new Blob([bytes]));
            Object.assign(entry, {bytes: bytes.length, hash, width: bitmap.width, height: bitmap.height});
        } catch (err) { entry.error = String(err); }
    };
    window.__sefiWatchTimer = setInterval(poll, 40);
}"""

OUTPUT_IMAGES = """(ids) => ids.map(id => (window.app.nodeOutputs?.[String(id)]?.images || []).map(i => i.filename))"""

ADD_LOADER = """() => {
    const node = window.LiteGraph.createNode('SeFiLoadIdentity');
    node.pos = [40, 40];
    window.app.graph.add(node);
    return node.id;
}"""
IDENTITY_CHOICES = """(id) => window.app.graph.getNodeById(id).widgets
    .find(w => w.name === 'identity_name').options.values"""


def _node_id(workflow: dict, node_type: str, title: str | None = None) -> int:
    (node,) = [n for n in workflow["nodes"] if n["type"] == node_type and (title is None or n.get("title") == title)]
    return node["id"]


def _press_queue(ui, vue: bool) -> None:
    """The Run/Queue button a person presses: upstream's action bar, or the legacy floating menu's."""
    if vue:
        ui.page.locator("[data-testid='queue-button'] button").first.click()
    else:
        ui.page.add_style_tag(content=".comfy-menu { display: flex !important; }")
        ui.page.locator("#queue-button").click()


def _press_refresh(ui, vue: bool) -> None:
    """Refresh the node definitions (model lists) as a person does: 'r' over the canvas upstream, the legacy menu's
    Refresh button."""
    if vue:
        ui.page.locator("#graph-canvas").click(position={"x": 5, "y": 300})
        ui.page.keyboard.press("r")
    else:
        ui.page.locator("#comfy-refresh-button").click()
        ui.page.add_style_tag(content=".comfy-menu { display: none !important; }")


def test_a_person_watches_training_in_the_web_ui(ui, server, faces_dir, tiny_sd15, screenshot_dir, tmp_path):
    """Workflow 01 opened and queued in the browser: the trainer node's progress advances, its live preview
    appears and changes (loss curve, then samples beside it), the loss curve and the attention-map picture reach
    their preview nodes, and after a refresh SeFi Load Identity lists the step snapshots. Screenshots of the running
    node and the finished graph go to the screenshot folder."""
    import_required("dlib", reason="SeFiFaceMask's offline backend needs dlib-bin")
    from PIL import Image
    inputs = server.base_dir / "input"
    inputs.mkdir(parents=True, exist_ok=True)
    with Image.open(faces_dir / "obama_1.jpg") as im:
        im = im.convert("RGB")
        im.thumbnail((320, 320))
        im.save(inputs / wb.PHOTO)

    workflow = wb.load_ui("01_train_identity")
    ui.load(workflow, "01_train_identity", expect_missing=False)
    vue = ui.page.evaluate(BOUNDS)["vue"]
    trainer = _node_id(workflow, "SeFiTrainIdentity")
    curve = _node_id(workflow, "PreviewImage", "Loss curve")
    maps = _node_id(workflow, "PreviewImage", "Attention maps")
    ui.page.evaluate(SET_WIDGETS, [_node_id(workflow, "CheckpointLoaderSimple"), {"ckpt_name": tiny_sd15.name}])
    ui.page.evaluate(SET_WIDGETS, [_node_id(workflow, "SeFiFaceMask"), {"crop_size": 128}])
    ui.page.evaluate(SET_WIDGETS, [_node_id(workflow, "SeFiTrainingOptions"),
                                   {"stages": 2, "checkpoint_every": 0, "overwrite": True}])
    ui.page.evaluate(SET_WIDGETS, [trainer, {"name": WATCH_NAME, "steps": WATCH_STEPS, "resolution": 64,
                                             "preview_every": 1, "sample_every": WATCH_STEPS,
                                             "sample_prompt": "a photo of sks person, smiling",
                                             "save_every": WATCH_SNAPSHOTS}])
    ui.page.evaluate(WATCH_NODE, trainer)
    _press_queue(ui, vue)

    # running: wait for a preview with samples beside the curve, then photograph the running node
    ui.page.wait_for_function("() => (window.__sefiWatch.previews || []).some(p => p.width > 600)",
                              timeout=1_200_000, polling=200)
    running = tmp_path / f"{WATCH_SCREENSHOT}_running.png"
    ui.screenshot(running)
    ui.page.wait_for_function(f"() => {OUTPUT_IMAGES}([{curve}, {maps}]).every(list => list.length > 0)",
                              timeout=900_000, polling=200)
    seen = ui.page.evaluate("() => window.__sefiWatch")
    values = [v for v, _ in seen["progress"]]
    assert values == sorted(values) and values[-1] == WATCH_STEPS and set(values) == set(range(1, WATCH_STEPS + 1)), \
        values
    previews = [p for p in seen["previews"] if "error" not in p]
    assert len(previews) >= 3, seen["previews"]
    assert len({p["hash"] for p in previews}) == len(previews), "the preview did not change"
    assert previews[0]["width"] == 512 and previews[0]["height"] == 256, previews[0]
    assert max(p["width"] for p in previews) == 512 + 256, previews  # the sample prompt's render beside the curve
    assert not ui.errors, ui.errors

    # a SeFi Load Identity placed now lists what the page loaded at start; the snapshots appear after a refresh
    snapshots = {f"{WATCH_NAME}@{WATCH_SNAPSHOTS}.safetensors", f"{WATCH_NAME}@{WATCH_STEPS}.safetensors"}
    loader = ui.page.evaluate(ADD_LOADER)
    assert not snapshots & set(ui.page.evaluate(IDENTITY_CHOICES, loader))
    _press_refresh(ui, vue)
    ui.page.wait_for_function(f"(id) => {json.dumps(sorted(snapshots))}.every(s => ({IDENTITY_CHOICES})(id)"
                              ".includes(s))", arg=loader, timeout=60_000, polling=500)
    assert {p.name for p in (server.models_dir / "sefi_identities").glob(f"{WATCH_NAME}@*")} == snapshots
    finished = tmp_path / f"{WATCH_SCREENSHOT}_finished.png"
    ui.screenshot(finished)
    for shot in (running, finished):
        assert shot.stat().st_size > 10_000
        _keep_if_unchanged(shot, screenshot_dir / shot.name)
