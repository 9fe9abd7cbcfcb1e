"""The HTTP engine of the batch trainer (`--engine http`, the default): ComfyUI servers fed from one queue.

For each person the photos are uploaded to a server (POST /upload/image, so no shared input folder is needed)
and one API-format graph is queued: LoadImage per photo -> SeFiFaceMask (aligned face crop; a photo without a
face fails the person) -> ImageBatch -> SeFiTrainIdentity with the graph's own checkpoint. Every `--server URL` is
fed from one shared queue (one thread per server); without `--server` embedded hosts are started here (see
batch/cli.py).
"""
from __future__ import annotations

import argparse
import queue
import subprocess
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batch import comfy_client
from batch.host_base import UPLOAD_FOLDER, local_base, remove_base
from batch.node_inputs import OPTIONS_NODE, combo_choices, input_names, split_options, widget_defaults
from batch.people import (CannotResume, Person, Result, UsageError, log, resume_plan, settled_since,
                          trained_identity)
from host_boot import embedded_host


class ServerGone(Exception):
    """The server stopped answering; the job goes back to the queue for another server."""


def build_graph(person: str, images: list[str], checkpoint: str, train_info: dict[str, Any],
                mask_info: dict[str, Any], train_inputs: dict[str, Any], face_backend: str,
                resolution: int, resume_from: str = "", options_info: dict[str, Any] | None = None
                ) -> tuple[dict[str, Any], dict[str, int]]:
    """The API graph for one person, and which node id loads/detects which photo (its index in `images`)."""
    graph: dict[str, Any] = {}
    owners: dict[str, int] = {}
    crop = max(64, int(resolution) // 8 * 8)
    mask_inputs = {**widget_defaults(mask_info), "backend": face_backend, "which_face": "largest", "crop_size": crop,
                   "on_no_face": "error"}
    graph["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}}
    last = None
    next_id = 2
    for index, image in enumerate(images):
        load, face = str(next_id), str(next_id + 1)
        next_id += 2
        graph[load] = {"class_type": "LoadImage", "inputs": {"image": image}}
        graph[face] = {"class_type": "SeFiFaceMask", "inputs": {**mask_inputs, "image": [load, 0]}}
        owners[load] = owners[face] = index
        if last is None:
            last = [face, 1]
        else:
            graph[str(next_id)] = {"class_type": "ImageBatch", "inputs": {"image1": last, "image2": [face, 1]}}
            last = [str(next_id), 0]
            next_id += 1
    train = {**widget_defaults(train_info), **train_inputs, "name": person, "overwrite": True,
             "resume_from": resume_from, "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": last}
    if train.get("attention_loss") == "mask" or train.get("masked_diffusion_loss"):
        graph[str(next_id)] = {"class_type": "SeFiFaceMask", "inputs": {**mask_inputs, "image": last}}
        train["mask"] = [str(next_id), 0]  # the face mask of each crop, same size as the crops
        next_id += 1
    train, options = split_options(train, options_info or {})
    graph[str(next_id)] = {"class_type": OPTIONS_NODE, "inputs": options}
    train["options"] = [str(next_id), 0]
    graph[str(next_id + 1)] = {"class_type": "SeFiTrainIdentity", "inputs": train}
    return graph, owners


def _error_details(client: comfy_client.ComfyClient, prompt_id: str, owners: dict[str, str]) -> str:
    """The host's execution error for a prompt, naming the photo when a photo's node failed."""
    try:
        entry = (client.get(f"/history/{prompt_id}") or {}).get(prompt_id) or {}
    except (urllib.error.URLError, OSError):
        return ""
    for kind, data in (entry.get("status") or {}).get("messages", []):
        if kind == "execution_error":
            message = str(data.get("exception_message", "")).strip().splitlines()
            where = data.get("node_type", "?")
            photo = owners.get(str(data.get("node_id")))
            text = message[0] if message else data.get("exception_type", "error")
            if photo and where == "SeFiFaceMask" and "No face found" in text:
                return (f"no face found in photo {photo}: replace it with a clear, frontal photo of the person or "
                        "remove it (or try --face-backend insightface)")
            return f"{where}" + (f" on photo {photo}" if photo else "") + f": {text}"
    return ""


# ------------------------------------------------------------------------------------------------ servers


@dataclass
class Server:
    url: str
    client: comfy_client.ComfyClient
    proc: subprocess.Popen | None = None
    base_dir: Path | None = None
    log_file: Any = None
    train_info: dict[str, Any] = field(default_factory=dict)
    mask_info: dict[str, Any] = field(default_factory=dict)
    options_info: dict[str, Any] = field(default_factory=dict)


def start_local_servers(count: int, out_dir: Path, models_dir: Path, checkpoint: Path) -> list[Server]:
    servers = []
    try:
        for i in range(count):
            base = local_base(out_dir, models_dir, checkpoint)
            port = comfy_client.free_port()
            log_file = open(base / "server.log", "wb")
            proc = subprocess.Popen(embedded_host.server_command(base, port), cwd=embedded_host.REPO_ROOT,
                                    stdout=log_file, stderr=subprocess.STDOUT)
            url = f"http://127.0.0.1:{port}"
            servers.append(Server(url, comfy_client.ComfyClient(url), proc, base, log_file))
            log(f"starting local ComfyUI {i + 1}/{count} ({embedded_host.host_label()}, pid {proc.pid}) on {url}")
        for server in servers:
            try:
                comfy_client.wait_until_ready(server.proc, server.url)
            except RuntimeError as exc:
                tail = (server.base_dir / "server.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{exc}\n--- server log ---\n{tail}") from exc
    except BaseException:
        stop_local_servers(servers)
        raise
    return servers


def stop_local_servers(servers: list[Server]) -> None:
    for server in servers:
        if server.proc is None:
            continue
        comfy_client.stop(server.proc)  # by PID: SIGTERM, then SIGKILL
        server.log_file.close()
        remove_base(server.base_dir)  # unlinks first: never follows the links into --out or the repository


def prepare_server(server: Server, checkpoint: str) -> None:
    """Check that the server answers, has the pack's nodes and the checkpoint; keep the nodes' input specs."""
    try:
        server.client.get("/system_stats", timeout=10)
        info = {name: server.client.get(f"/object_info/{name}", timeout=60).get(name)
                for name in ("SeFiTrainIdentity", OPTIONS_NODE, "SeFiFaceMask", "CheckpointLoaderSimple")}
    except (urllib.error.URLError, OSError) as exc:
        raise RuntimeError(f"{server.url} does not answer ({exc}): start ComfyUI there or fix the URL") from exc
    missing = [name for name, spec in info.items() if not spec]
    if missing:
        raise RuntimeError(f"{server.url} has no {', '.join(missing)} node: install SeFi-IDE in that ComfyUI's "
                           "custom_nodes and restart it")
    choices = combo_choices(info["CheckpointLoaderSimple"], "ckpt_name")
    if checkpoint not in choices:
        raise RuntimeError(f"{server.url} has no checkpoint '{checkpoint}' (it has: {', '.join(choices) or 'none'}); "
                           "put it in that server's models/checkpoints or pick one with --checkpoint")
    server.train_info, server.mask_info = info["SeFiTrainIdentity"], info["SeFiFaceMask"]
    server.options_info = info[OPTIONS_NODE]


# ------------------------------------------------------------------------------------------------ work


def train_person(server: Server, person: Person, args: argparse.Namespace, train_inputs: dict[str, Any],
                 out_dir: Path, label: str) -> Result:
    start = time.monotonic()
    settled = settled_since(out_dir, person)
    if settled is not None:
        settled.server = label
        return settled
    try:  # a run cut off earlier continues from its checkpoint (--out is the server's sefi_identities folder)
        resume, note = resume_plan(out_dir, person.name, int(train_inputs["steps"]))
    except CannotResume as exc:
        return Result(person.name, "failed", 0.0, str(exc), label)
    if note:
        log(f"[{label}] {person.name}: {note}")
    try:
        subfolder = f"{UPLOAD_FOLDER}/{person.name}"
        names = [server.client.upload_image(p, subfolder, name=f"{i:03d}{p.suffix.lower()}")
                 for i, p in enumerate(person.photos)]
    except (urllib.error.URLError, ConnectionError) as exc:
        raise ServerGone(str(exc)) from exc
    graph, owners = build_graph(person.name, names, args.checkpoint_name, server.train_info, server.mask_info,
                                train_inputs, args.face_backend, args.resolution, resume, server.options_info)
    owners = {node: person.photos[index].name for node, index in owners.items()}
    try:
        prompt_id = server.client.queue(graph)
    except comfy_client.PromptFailed as exc:
        return Result(person.name, "failed", time.monotonic() - start, str(exc)[:500], label)
    except (urllib.error.URLError, ConnectionError) as exc:
        raise ServerGone(str(exc)) from exc
    log(f"[{label}] {person.name}: {len(person.photos)} photo(s) uploaded, training (prompt {prompt_id[:8]})")
    try:
        server.client.wait(prompt_id, timeout=args.timeout, poll=0.5)
    except comfy_client.PromptFailed as exc:
        detail = _error_details(server.client, prompt_id, owners) or str(exc)
        if "did not finish" in str(exc):
            server.client.interrupt()
        return Result(person.name, "failed", time.monotonic() - start, detail[:500], label)
    except (urllib.error.URLError, ConnectionError) as exc:
        raise ServerGone(str(exc)) from exc
    seconds = time.monotonic() - start
    problem = trained_identity(out_dir, person.name)
    if problem:
        where = out_dir / f"{person.name}.safetensors"
        return Result(person.name, "failed", seconds,
                      f"trained on {server.url}, but {where} is {problem}: --out "
                      "must be that server's models/sefi_identities folder (shared disk); the file is in the "
                      "server's own folder", label)
    return Result(person.name, "trained", seconds, f"{person.name}.safetensors", label)


def run_queue(servers: list[Server], jobs: list[Person], args: argparse.Namespace, train_inputs: dict[str, Any],
              out_dir: Path) -> list[Result]:
    """One thread per server pulls people from one shared queue until it is empty."""
    todo: queue.Queue[Person] = queue.Queue()
    for person in jobs:
        todo.put(person)
    results: list[Result] = []
    lock = threading.Lock()

    def worker(index: int, server: Server) -> None:
        label = f"server {index + 1}"
        while True:
            try:
                person = todo.get_nowait()
            except queue.Empty:
                return
            log(f"[{label}] {person.name}: start")
            try:
                result = train_person(server, person, args, train_inputs, out_dir, label)
            except ServerGone as exc:
                log(f"[{label}] {server.url} stopped answering ({exc}); {person.name} goes back to the queue")
                todo.put(person)
                return
            except Exception as exc:  # one person's unexpected failure must not stop the others
                result = Result(person.name, "failed", 0.0, f"{type(exc).__name__}: {exc}"[:500], label)
            log(f"[{label}] {person.name}: {result.status} in {result.seconds:.1f} s"
                + (f" ({result.message})" if result.status == "failed" else ""))
            with lock:
                results.append(result)

    threads = [threading.Thread(target=worker, args=(i, s), daemon=True) for i, s in enumerate(servers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    while not todo.empty():
        person = todo.get_nowait()
        results.append(Result(person.name, "failed", 0.0, "no server left to train it (all stopped answering)"))
    return results


def run_http(jobs: list[Person], args: argparse.Namespace, train_inputs: dict[str, Any], out_dir: Path,
             checkpoint: Path | None) -> list[Result]:
    """Train `jobs` on the --server URLs, or on embedded hosts started here (and stopped at the end) when there
    are none; raises RuntimeError when no server is usable (exit code 3)."""
    servers: list[Server] = []
    try:
        if not args.server:
            servers = start_local_servers(min(args.local_servers, len(jobs)), out_dir, args.models_dir, checkpoint)
        else:
            servers = [Server(url.rstrip("/"), comfy_client.ComfyClient(url.rstrip("/"))) for url in args.server]
        ready = []
        for server in servers:
            try:
                prepare_server(server, args.checkpoint_name)
                ready.append(server)
            except RuntimeError as exc:
                log(f"leaving out {server.url}: {exc}")
        if not ready:
            raise RuntimeError("no usable ComfyUI server (see above)")
        known = input_names(ready[0].train_info) | input_names(ready[0].options_info)
        unknown = sorted(set(train_inputs) - known)
        if unknown:
            raise UsageError(f"SeFiTrainIdentity has no input(s) {', '.join(unknown)} (nor has SeFiTrainingOptions); "
                             f"their inputs are {', '.join(sorted(known))}")
        return run_queue(ready, jobs, args, train_inputs, out_dir)
    finally:
        stop_local_servers([s for s in servers if s.proc is not None])
