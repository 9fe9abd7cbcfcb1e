"""The example workflows in a real browser: the host's own web UI, served by a server of this module's own on
127.0.0.1, opened in headless Debian chromium driven by Playwright — once per frontend:
  host    the frontend the host serves by itself: the PyPI host's bundled (legacy) one, or on upstream ComfyUI the
          comfyui-frontend-package its requirements pin (0.3.64: 1.27.10);
  newest  the newest comfyui-frontend-package (tools.frontends.NEWEST, what ComfyUI users run today), served with
          --front-end-root. Upstream only: the PyPI host's server has none of the routes a frontend package calls
          (`/api/...`, `/settings`), so there it is skipped with that reason.

The page is read through what every frontend shares: the app's API on `window.app` (loadGraphData, graphToPrompt,
nodePreviewImages, nodeOutputs), the graph's state (node types, positions, sizes, error marks) and what the page
shows the user as a dialog, alert or status (ARIA roles; the legacy frontend's modal).

The server holds every file the workflows name (the tiny checkpoint under the workflows' checkpoint and ControlNet
names, face photos, the miniature world's photo and mask; the two identities only as names: opening a workflow lists
files, it reads none), as a user who has them sees the workflows. Each UI workflow is loaded with
`app.loadGraphData` (what opening the file does). Checked: no dialog, alert or error mark — except for 06, whose
LivePortraitKJ nodes are missing, exactly those, and the user is told; no two nodes overlap once the image previews
are drawn; the frontend's own UI→API conversion (`app.graphToPrompt`, what "Run" sends) equals the committed API
twin; a screenshot of the graph is saved. Then 01 runs in the browser: Run pressed, the live preview and samples
appear on the trainer node, Cancel pressed leaves a checkpoint, Run again resumes and finishes.

Screenshots go to a temporary folder. `python -m tools.screenshots` (make screenshots) runs this test on the newest
frontend with SEFI_SCREENSHOTS=docs/screenshots: only then are the README's pictures rewritten (a picture that did
not visibly change is left alone).

Needs: `apt-get install -y chromium` (/usr/bin/chromium, or SEFI_CHROMIUM=<path>) and `pip install playwright`
(requirements-dev.txt); under CI=true a missing one fails instead of skipping. Never `playwright install`: the test
drives the system chromium and reaches nothing but the local server (every other request is aborted). The newest
frontend is installed by tools.frontends on first use (pip; SEFI_FRONTENDS says where).
"""
from __future__ import annotations

import json
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from host_boot import embedded_host
from tools import frontends
from tools import workflow_builder as wb
from tools.dev_requirements import import_required, require

pytestmark = pytest.mark.slow  # drives Chromium through every workflow

CHROMIUM = Path(os.environ.get("SEFI_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NAMES = tuple(wb.names())
# Frontend settings for a clean, deterministic canvas: no first-run template browser, no minimap, no FPS/info
# overlay, full-detail nodes at the zoom levels used.
UI_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
               "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.2,
               "Comfy.Workflow.WorkflowTabsPosition": "Sidebar"}
# What the workflows expect in input/ (photos from tests/data/faces; the world's photo and mask are rendered).
PHOTOS = {wb.PHOTO: "obama_1.jpg", wb.DRIVING_PHOTO: "kit_harington_2.jpg"}

sync_api = import_required("playwright.sync_api", reason="Playwright for Python is not installed: "
                               "pip install playwright (requirements-dev.txt); never run `playwright install`")
require(CHROMIUM.is_file(), f"chromium not found at {CHROMIUM}: apt-get install -y chromium (make browser), or "
                            f"set SEFI_CHROMIUM")

APP_READY = """() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph
    && Object.keys(window.LiteGraph.registered_node_types).some(t => t.startsWith('SeFi')))"""

# What the page tells the user: dialogs, alerts (toasts) and status overlays by their ARIA role (the 1.5x Issues
# overlay is a status; 1.2x's dialogs are dialogs, its toasts alerts), and the legacy frontend's modal. Visible,
# with text (live regions stay in the page empty), outermost only.
NOTICES = """() => {
    const sel = '.comfy-modal, [role=dialog], [role=alertdialog], [role=alert], [role=status]';
    const shown = e => e.getClientRects().length > 0 && getComputedStyle(e).visibility !== 'hidden'
                       && e.innerText.trim();
    return [...document.querySelectorAll(sel)]
        .filter(e => shown(e) && !(e.parentElement && e.parentElement.closest(sel)))
        .map(e => e.innerText.trim().replace(/\\s+/g, ' ').slice(0, 500));
}"""

# Closes what NOTICES finds: the legacy dialog through its API, the others with their own close button.
CLOSE_NOTICES = """() => {
    window.app.ui?.dialog?.close?.();
    const sel = '[role=dialog], [role=alertdialog], [role=alert], [role=status]';
    for (const box of document.querySelectorAll(sel))
        box.querySelectorAll('button[aria-label=Close], .p-dialog-close-button, .p-toast-close-button')
            .forEach(b => b.click());
}"""

GRAPH_STATE = """() => {
    const data = window.app.graph.serialize();
    const nodes = window.app.graph._nodes || window.app.graph.nodes;
    return {nodes: data.nodes.length, links: data.links.length,
            unknown: nodes.filter(n => !(n.type in window.LiteGraph.registered_node_types)).map(n => n.type),
            marked: nodes.filter(n => n.has_errors).map(n => n.type),
            version: window.__COMFYUI_FRONTEND_VERSION__ ?? null};
}"""

# Image loaders draw their picture once it has loaded (1.5x grows the node for it): wait for every one.
PREVIEWS_LOADED = """() => (window.app.graph._nodes || window.app.graph.nodes)
    .filter(n => n.widgets?.some(w => w.name === 'upload'))
    .every(n => n.imgs?.length > 0 && n.imgs.every(i => i.complete && i.naturalWidth > 0))"""

# Pairs of nodes whose boxes (title bar included) intersect, as the frontend has placed and sized them.
OVERLAPS = """() => {
    const nodes = window.app.graph._nodes || window.app.graph.nodes, title = window.LiteGraph.NODE_TITLE_HEIGHT;
    const box = n => { const [x, y] = n.pos, [w, h] = n.size; return [x, y - title, x + w, y + h]; };
    const out = [];
    for (let i = 0; i < nodes.length; i++) for (let j = i + 1; j < nodes.length; j++) {
        const a = box(nodes[i]), b = box(nodes[j]);
        if (a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3])
            out.push(`${nodes[i].title} (#${nodes[i].id}) and ${nodes[j].title} (#${nodes[j].id})`);
    }
    return out;
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
# Canvas margins left for the UI: the frontend package's side bar, top bar, zoom controls; the legacy menu is hidden.
INSETS = {True: {"left": 80, "top": 100, "right": 30, "bottom": 90},
          False: {"left": 30, "top": 30, "right": 30, "bottom": 30}}
ZOOM = 0.8  # screenshot scale to aim for: node text stays legible, the picture stays a few hundred KB


@dataclass(frozen=True)
class Frontend:
    label: str
    version: str | None  # what the page reports (window.__COMFYUI_FRONTEND_VERSION__); None: the legacy frontend
    root: Path | None  # --front-end-root, None: the host's own
    newest: bool


def _frontend(which: str) -> Frontend:
    upstream = embedded_host.comfyui_path() is not None
    if which == "host":
        if not upstream:
            return Frontend("legacy (bundled with comfyui 0.0.1)", None, None, False)
        from importlib.metadata import version
        pinned = version("comfyui-frontend-package")  # installed from the checkout's requirements.txt
        return Frontend(pinned, pinned, None, pinned == frontends.NEWEST)
    if not upstream:
        pytest.skip(f"the PyPI host (comfyui 0.0.1) serves only its bundled frontend: its server has none of the "
                    f"routes comfyui-frontend-package {frontends.NEWEST} calls and no --front-end-root; run with "
                    f"COMFYUI_PATH=<upstream ComfyUI checkout>")
    try:
        root = frontends.ensure(frontends.NEWEST)
    except RuntimeError as err:
        require(False, f"{err} (python -m tools.frontends installs it)")
    return Frontend(frontends.NEWEST, frontends.NEWEST, root, True)


@pytest.fixture(scope="module", params=("host", "newest"))
def frontend(request) -> Frontend:
    return _frontend(request.param)


def _place_workflow_files(base: Path, checkpoint: Path, faces_dir: Path) -> None:
    """Every file the workflows name, where the server lists it."""
    from PIL import Image

    from world import demo
    models = base / "models"
    for folder, name in (("checkpoints", wb.CHECKPOINT), ("checkpoints", wb.WORLD_CHECKPOINT),
                         ("checkpoints", checkpoint.name), ("controlnet", wb.CONTROLNET)):
        (models / folder).mkdir(parents=True, exist_ok=True)
        (models / folder / name).symlink_to(checkpoint)
    (models / "sefi_identities").mkdir(parents=True)
    for name in (wb.IDENTITY, wb.IDENTITY_2):  # listed by name only; no test here loads them
        (models / "sefi_identities" / name).write_bytes(b"")
    inputs = base / "input"
    inputs.mkdir(parents=True)
    for name, source in PHOTOS.items():
        with Image.open(faces_dir / source) as im:
            im = im.convert("RGB")
            im.thumbnail((320, 320))  # also what the trainer gets in the watch test: small is quick
            im.save(inputs / name)
    assert demo.write_photo(inputs) == (wb.WORLD_PHOTO, wb.WORLD_MASK)


@pytest.fixture(scope="module")
def browser_server(frontend, start_server, tmp_path_factory, tiny_sd15, faces_dir):
    base = tmp_path_factory.mktemp("browser-server")
    _place_workflow_files(base, tiny_sd15, faces_dir)
    extra = ("--front-end-root", str(frontend.root)) if frontend.root else ()
    with start_server(base, extra) as handle:
        _post_settings(handle.client.base_url)
        yield handle


def _post_settings(base_url: str) -> None:
    """A frontend package keeps UI settings per user on the server; the legacy frontend has no such route."""
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

    def load(self, workflow: dict, name: str) -> None:
        self.page.evaluate(CLOSE_NOTICES)
        self.errors.clear()  # from here on, every page error is the workflow's
        # (graph, clean, restore_view, workflow name): the frontend package opens it under that name, legacy ignores it.
        self.page.evaluate("async ([graph, name]) => { await window.app.loadGraphData(graph, true, true, name); }",
                           [workflow, f"{name}.json"])
        self.page.wait_for_function(PREVIEWS_LOADED, timeout=30_000, polling=100)
        self.page.evaluate("() => window.app.graph.setDirtyCanvas(true, true)")
        self.page.wait_for_timeout(1000)  # sizes follow the pictures on the next frames; dialogs open asynchronously

    def notices(self) -> list[str]:
        return self.page.evaluate(NOTICES)

    def screenshot(self, path: Path) -> None:
        bounds = self.page.evaluate(BOUNDS)
        inset = INSETS[bounds["vue"]]
        width = int((bounds["x1"] - bounds["x0"]) * ZOOM) + inset["left"] + inset["right"]
        height = int((bounds["y1"] - bounds["y0"]) * ZOOM) + inset["top"] + inset["bottom"]
        self.page.set_viewport_size({"width": max(1280, min(2560, width)), "height": max(720, min(1440, height))})
        self.page.wait_for_timeout(300)  # the canvas follows the window size on the next frame
        self.page.evaluate(CLOSE_NOTICES)
        self.page.evaluate(FIT, [bounds, inset])
        # the pointer off every button and node (after a click it hovers there, with a tooltip or popover): the
        # middle of the bottom margin FIT leaves free of nodes
        size = self.page.viewport_size
        self.page.mouse.move(size["width"] // 2, size["height"] - inset["bottom"] // 2)
        self.page.wait_for_timeout(500)
        self.page.screenshot(path=str(path))


@pytest.fixture(scope="module")
def ui(browser_server, frontend):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 900})
            base = browser_server.client.base_url
            # Hermetic: the page reaches the local server and nothing else (the frontend package asks
            # api.comfy.org about unknown node types, for instance).
            page.route("**/*", lambda route: route.continue_() if route.request.url.startswith((base, "data:", "blob:"))
                       else route.abort())
            handle = UI(page, base)
            page.goto(base + "/", wait_until="load")
            page.wait_for_function(APP_READY, timeout=90_000)
            served = page.evaluate(GRAPH_STATE)["version"]
            assert served == frontend.version, f"the page runs frontend {served}, expected {frontend.label}"
            # The legacy floating menu covers the graph; the open-workflows badge counts the earlier tests.
            page.add_style_tag(content=".comfy-menu, .side-tool-bar-container .p-badge { display: none !important; }")
            page.wait_for_timeout(500)
            page.evaluate(CLOSE_NOTICES)
            yield handle
        finally:
            browser.close()


@pytest.fixture(scope="module")
def screenshot_dir(frontend, tmp_path_factory) -> Path:
    """SEFI_SCREENSHOTS (set by tools.screenshots) for the newest frontend's pictures; a temporary folder otherwise."""
    chosen = os.environ.get("SEFI_SCREENSHOTS")
    if chosen and frontend.newest:
        path = Path(chosen)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return tmp_path_factory.mktemp(f"screenshots-{frontend.label.split()[0]}")


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


@pytest.fixture(scope="module")
def object_info(browser_server) -> dict:
    return browser_server.client.object_info()


@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_in_the_web_ui(ui, name, object_info, third_party_allowed, screenshot_dir, tmp_path):
    workflow = wb.load_ui(name)
    expected_missing = set(third_party_allowed.get(name, ())) - set(object_info)
    ui.load(workflow, name)

    state = ui.page.evaluate(GRAPH_STATE)
    assert state["nodes"] == len(workflow["nodes"]) and state["links"] == len(workflow["links"]), state
    assert sorted(set(state["unknown"])) == sorted(expected_missing), f"{name}: missing node types {state}"
    # an error mark on any other node is a file the frontend did not find, or a value it rejects
    assert set(state["marked"]) <= expected_missing, f"{name}: nodes marked as broken: {state['marked']}"
    notices = ui.notices()
    if expected_missing:  # the user is told, in each frontend's own way
        assert notices and all(any(word in text.lower() for word in ("missing", "not found")) for text in notices), \
            f"{name}: told {notices}"
    else:
        assert not notices, f"{name}: the UI showed {notices}"
    assert not ui.errors, f"{name}: page errors while loading: {ui.errors}"
    assert not ui.page.evaluate(OVERLAPS), f"{name}: overlapping nodes: {ui.page.evaluate(OVERLAPS)}"

    if not expected_missing:
        # The frontend's own conversion (what "Run" sends) equals the committed API twin. Inputs a node does
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
    assert ui.notices() == notices, f"{name}: a notice came or went late: {ui.notices()}"

    shot = tmp_path / f"{name}.png"
    ui.screenshot(shot)
    assert shot.stat().st_size > 10_000
    _keep_if_unchanged(shot, screenshot_dir / f"{name}.png")


# ------------------------------------------------------------------------------------------------- watching a run

WATCH_NAME = "watched"
WATCH_STEPS = 4
# Samples and snapshots at steps 2 and 4. Cancel is pressed once step 2's samples are on the node: step 3, step 4
# and its samples are the margin for the click (renders are what costs most here).
WATCH_EVERY = 2
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

# Records, in the page, what the UI itself receives for node `id` from here on: its progress messages (value/max),
# how the run ended, and every preview picture the frontend stores for it (app.nodePreviewImages, what every
# frontend draws on a running node), each fetched at once (blob URLs are revoked later) for its size and a hash.
WATCH_NODE = """async (id) => {
    const api = window.comfyAPI?.api?.api ?? (await import('/scripts/api.js')).api;
    const seen = window.__sefiWatch = {progress: [], previews: [], ended: null};
    if (!window.__sefiWatchListening) {
        window.__sefiWatchListening = true;
        api.addEventListener('progress', ({detail}) => {
            if (String(detail.node) === String(id)) window.__sefiWatch.progress.push([detail.value, detail.max]);
        });
        for (const type of ['execution_interrupted', 'execution_error', 'execution_success'])
            api.addEventListener(type, () => { window.__sefiWatch.ended = type; });
        api.addEventListener('executing', ({detail}) => {
            if (detail === null && !window.__sefiWatch.ended) window.__sefiWatch.ended = 'finished';
        });
    }
    const poll = async () => {
        const url = (window.app.nodePreviewImages?.[String(id)] || [])[0];
        const seen = window.__sefiWatch;
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
    clearInterval(window.__sefiWatchTimer);
    window.__sefiWatchTimer = setInterval(poll, 40);
}"""

OUTPUT_IMAGES = """(ids) => ids.map(id => (window.app.nodeOutputs?.[String(id)]?.images || []).map(i => i.filename))"""

# placed right of the graph: over another node it would hide that one in the finished screenshot
ADD_LOADER = """() => {
    const nodes = window.app.graph._nodes || window.app.graph.nodes;
    const node = window.LiteGraph.createNode('SeFiLoadIdentity');
    node.pos = [Math.max(...nodes.map(n => n.pos[0] + n.size[0])) + 60, 60];
    window.app.graph.add(node);
    return node.id;
}"""
IDENTITY_CHOICES = """(id) => window.app.graph.getNodeById(id).widgets
    .find(w => w.name === 'identity_name').options.values"""


def _node_id(workflow: dict, node_type: str, title: str | None = None) -> int:
    (node,) = [n for n in workflow["nodes"] if n["type"] == node_type and (title is None or n.get("title") == title)]
    return node["id"]


def _press(ui, vue: bool, button: str) -> None:
    """Press what a person presses: the frontend package's action-bar button of that name ("Run", "Cancel current
    run"), or the legacy floating menu's Queue Prompt button; the legacy menu has no Cancel for a running prompt
    (its queue list does), so there Cancel is the app's own interrupt call that list makes."""
    if vue:
        ui.page.get_by_role("button", name=button, exact=True).first.click()
    elif button == "Run":
        ui.page.add_style_tag(content=".comfy-menu { display: flex !important; }")
        ui.page.locator("#queue-button").click()
        ui.page.add_style_tag(content=".comfy-menu { display: none !important; }")
    else:
        ui.page.evaluate("async () => (await import('/scripts/api.js')).api.interrupt()")


def _press_refresh(ui, vue: bool) -> None:
    """Refresh the node definitions (model lists) as a person does: 'r' over the canvas in the frontend package, the
    legacy menu's Refresh button."""
    if vue:  # the click gives the canvas the keyboard, on a spot no node and no side bar covers (see screenshot)
        size = ui.page.viewport_size
        ui.page.mouse.click(size["width"] // 2, size["height"] - INSETS[True]["bottom"] // 2)
        ui.page.keyboard.press("r")
    else:
        ui.page.add_style_tag(content=".comfy-menu { display: flex !important; }")
        ui.page.locator("#comfy-refresh-button").click()
        ui.page.add_style_tag(content=".comfy-menu { display: none !important; }")


def _watch(ui, node: int) -> None:
    ui.page.evaluate(WATCH_NODE, node)


def _seen(ui) -> dict:
    return ui.page.evaluate("() => window.__sefiWatch")


def test_a_person_watches_training_in_the_web_ui(ui, browser_server, screenshot_dir, tmp_path):
    """Workflow 01 opened and run in the browser: the trainer node's progress advances, its live preview appears
    and changes (loss curve, then samples beside it); Cancel pressed then leaves the run's checkpoint and its first
    snapshot, no identity; Run pressed again with resume_from finishes the run: the loss curve and the
    attention-map picture reach their preview nodes, and after a refresh SeFi Load Identity lists the step
    snapshots. Screenshots of the running node and the finished graph go to the screenshot folder."""
    import_required("dlib", reason="SeFiFaceMask's offline backend needs dlib-bin")
    workflow = wb.load_ui("01_train_identity")
    ui.load(workflow, "01_train_identity")
    vue = ui.page.evaluate(BOUNDS)["vue"]
    trainer = _node_id(workflow, "SeFiTrainIdentity")
    options = _node_id(workflow, "SeFiTrainingOptions")
    curve = _node_id(workflow, "PreviewImage", "Loss curve")
    maps = _node_id(workflow, "PreviewImage", "Attention maps")
    ui.page.evaluate(SET_WIDGETS, [_node_id(workflow, "SeFiFaceMask"), {"crop_size": 128}])
    ui.page.evaluate(SET_WIDGETS, [options, {"stages": 2, "checkpoint_every": 0, "overwrite": True}])
    ui.page.evaluate(SET_WIDGETS, [trainer, {"name": WATCH_NAME, "steps": WATCH_STEPS, "resolution": 64,
                                             "preview_every": 1, "sample_every": WATCH_EVERY,
                                             "sample_prompt": "a photo of sks person, smiling",
                                             "save_every": WATCH_EVERY}])
    identities = browser_server.models_dir / "sefi_identities"
    checkpoint = identities / "checkpoints" / f"{WATCH_NAME}.sefi-train"

    # Run; once the preview shows samples beside the curve, photograph the running node and press Cancel
    _watch(ui, trainer)
    _press(ui, vue, "Run")
    ui.page.wait_for_function("() => window.__sefiWatch.previews.some(p => p.width > 600) || window.__sefiWatch.ended",
                              timeout=1_200_000, polling=100)
    running = tmp_path / f"{WATCH_SCREENSHOT}_running.png"
    ui.screenshot(running)
    _press(ui, vue, "Cancel current run")
    ui.page.wait_for_function("() => window.__sefiWatch.ended", timeout=300_000, polling=200)
    seen = _seen(ui)
    assert seen["ended"] == "execution_interrupted", seen
    values = [v for v, _ in seen["progress"]]
    assert values == sorted(values) and WATCH_EVERY <= values[-1] < WATCH_STEPS, values
    previews = [p for p in seen["previews"] if "error" not in p]
    assert len({p["hash"] for p in previews}) == len(previews) >= 2, "the preview did not change"
    assert previews[0]["width"] == 512 and previews[0]["height"] == 256, previews[0]
    assert max(p["width"] for p in previews) == 512 + 256, previews  # the sample prompt's render beside the curve
    assert checkpoint.is_file(), f"Cancel left no checkpoint: {sorted(p.name for p in identities.rglob('*'))}"
    assert not (identities / f"{WATCH_NAME}.safetensors").exists()
    assert (identities / f"{WATCH_NAME}@{WATCH_EVERY}.safetensors").is_file()
    assert not ui.errors, ui.errors

    # Run again, resuming: the run finishes where it would have without the Cancel
    ui.page.evaluate(SET_WIDGETS, [options, {"resume_from": WATCH_NAME}])
    _watch(ui, trainer)
    _press(ui, vue, "Run")
    ui.page.wait_for_function(f"() => ({OUTPUT_IMAGES})([{curve}, {maps}]).every(list => list.length > 0)"
                              " || window.__sefiWatch.ended === 'execution_error'", timeout=900_000, polling=200)
    resumed = _seen(ui)
    assert resumed["ended"] != "execution_error", browser_server.log()[-3000:]
    values_after = [v for v, _ in resumed["progress"]]
    assert values_after == sorted(values_after) and values_after[0] > values[0] and values_after[-1] == WATCH_STEPS, \
        (values, values_after)
    assert (identities / f"{WATCH_NAME}.safetensors").is_file() and not checkpoint.exists()
    assert not ui.errors, ui.errors

    # a SeFi Load Identity placed now lists what the page loaded at start; the snapshots appear after a refresh
    snapshots = {f"{WATCH_NAME}@{step}.safetensors" for step in range(WATCH_EVERY, WATCH_STEPS + 1, WATCH_EVERY)}
    loader = ui.page.evaluate(ADD_LOADER)
    assert not snapshots & set(ui.page.evaluate(IDENTITY_CHOICES, loader))
    _press_refresh(ui, vue)
    ui.page.wait_for_function(f"(id) => {json.dumps(sorted(snapshots))}.every(s => ({IDENTITY_CHOICES})(id)"
                              ".includes(s))", arg=loader, timeout=60_000, polling=500)
    assert {p.name for p in identities.glob(f"{WATCH_NAME}@*")} == snapshots
    finished = tmp_path / f"{WATCH_SCREENSHOT}_finished.png"
    ui.screenshot(finished)
    for shot in (running, finished):
        assert shot.stat().st_size > 10_000
        _keep_if_unchanged(shot, screenshot_dir / shot.name)


# ------------------------------------------------------------------------------- a workflow of an earlier layout

OLD_01 = embedded_host.REPO_ROOT / "tests" / "data" / "workflows" / "01_train_identity.before_options.json"


def test_a_workflow_saved_with_an_earlier_layout_is_refused_when_queued(ui, browser_server):
    """The first workflows/01 (every setting on the trainer) loads its values shifted into today's trainer
    (resolution=5, sample_prompt='self-attention generator'): what Queue sends is refused, saying what to do
    (issue 33), instead of running on shifted values or failing on one widget's range."""
    from batch.comfy_client import PromptFailed
    ui.load(json.loads(OLD_01.read_text()), "01_old_layout")
    output = ui.page.evaluate("async () => (await window.app.graphToPrompt()).output")
    trainer = next(node for node in output.values() if node["class_type"] == "SeFiTrainIdentity")
    assert trainer["inputs"]["resolution"] == 5 and trainer["inputs"]["sample_prompt"] == "self-attention generator"
    with pytest.raises(PromptFailed, match=r"saved with the layout it had before SeFi Training Options existed.*"
                                           r"re-create the node"):
        browser_server.client.queue(output)
