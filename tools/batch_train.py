"""Train one SeFi identity per person, headless, on one or more ComfyUI servers.

    python -m tools.batch_train PEOPLE_DIR --out IDENTITIES_DIR [--server URL ...] [--checkpoint NAME] [--steps N]

PEOPLE_DIR holds one sub-folder per person (the folder name becomes the identity's file name) with their photos.
For each person the photos are uploaded to a server (POST /upload/image, so no shared input folder is needed)
and one API-format graph is queued: LoadImage per photo → SeFiFaceMask (aligned face crop; a photo without a
face fails the person) → ImageBatch → SeFiTrainIdentity with the graph's own checkpoint.

Servers: every `--server URL` is fed from one shared queue (one thread per server). Without `--server` the
embedded host is started here (`--local-servers N` of them, on free ports, stopped by PID at the end) with its
models/sefi_identities folder linked to --out, so the identities land there directly. A remote server writes
into *its own* models/sefi_identities (there is no API to download a model file): --out must be that same folder
(shared disk, or a path on that machine). See docs/batch.md.

Engines: `--engine http` (the default) is the above. `--engine ray [--ray-address auto|ray://HOST:10001]` trains on
Ray actors instead, each booting the host in-process once (tools/batch_ray.py; `pip install "sefi-ide[ray]"`).

Resume: a person whose --out/<name>.safetensors exists and loads (sefi_core.identity.load_identity) is skipped.
One failing person (no photos, an unreadable photo, no face, a training error) is reported and the others go on.
Exit codes: 0 all trained or skipped; 1 some failed; 2 bad arguments or folders; 3 no usable server (or, with
--engine ray, no worker could start).
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from tools import comfy_client, embedded_host

REPO_ROOT = embedded_host.REPO_ROOT
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth")
UPLOAD_FOLDER = "sefi_batch"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_SERVER = 0, 1, 2, 3


class UsageError(Exception):
    """Bad arguments or folders; the message says what to give instead."""


class ServerGone(Exception):
    """The server stopped answering; the job goes back to the queue for another server."""


@dataclass
class Person:
    name: str
    folder: Path
    photos: list[Path] = field(default_factory=list)


@dataclass
class Result:
    person: str
    status: str  # trained | skipped | failed
    seconds: float = 0.0
    message: str = ""
    server: str = ""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------------------ people


def find_people(people_dir: Path) -> list[Person]:
    if not people_dir.is_dir():
        raise UsageError(f"{people_dir} is not a folder: give a folder with one sub-folder of photos per person")
    people = []
    for folder in sorted(p for p in people_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
        photos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        people.append(Person(folder.name, folder, photos))
    if not people:
        raise UsageError(f"{people_dir} has no sub-folders: put each person's photos in a folder named after them "
                         f"({people_dir}/alice/1.jpg, {people_dir}/bob/1.jpg, …)")
    return people


def existing_identity(out_dir: Path, name: str) -> tuple[bool, str]:
    """(valid, note): whether --out already holds a loadable identity for `name`."""
    path = out_dir / f"{name}.safetensors"
    if not path.exists():
        return False, ""
    from sefi_core.identity import load_identity
    try:
        load_identity(path)
    except Exception as exc:  # IdentityFileError and anything a damaged file raises
        return False, f"existing {path.name} is not valid ({exc}); training it again"
    return True, f"{path.name} already present and valid"


def check_photos(person: Person) -> str:
    """'' when every photo opens as an image, else what is wrong."""
    if not person.photos:
        return f"no photos in {person.folder} ({', '.join(IMAGE_EXTENSIONS)})"
    for photo in person.photos:
        try:
            with Image.open(photo) as im:
                im.verify()
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            return f"photo {photo.name} is not a readable image ({exc}); replace or remove it"
    return ""


# ------------------------------------------------------------------------------------------------ graph


def _defaults(info: dict[str, Any]) -> dict[str, Any]:
    """Widget defaults of a node from /object_info, for required inputs that are not links."""
    out = {}
    for name, spec in info.get("input", {}).get("required", {}).items():
        kind = spec[0] if spec else None
        options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if isinstance(kind, list):  # a combo: its default, else its first choice
            out[name] = options.get("default", kind[0] if kind else None)
        elif kind == "COMBO":
            choices = options.get("options", [])
            out[name] = options.get("default", choices[0] if choices else None)
        elif "default" in options:
            out[name] = options["default"]
    return out


def _input_names(info: dict[str, Any]) -> set[str]:
    spec = info.get("input", {})
    return set(spec.get("required", {})) | set(spec.get("optional", {}))


def combo_choices(info: dict[str, Any], name: str) -> list[str]:
    spec = info.get("input", {}).get("required", {}).get(name) or [[]]
    if isinstance(spec[0], list):
        return list(spec[0])
    return list((spec[1] if len(spec) > 1 else {}).get("options", []))


def build_graph(person: str, images: list[str], checkpoint: str, train_info: dict[str, Any],
                mask_info: dict[str, Any], train_inputs: dict[str, Any], face_backend: str,
                resolution: int) -> tuple[dict[str, Any], dict[str, int]]:
    """The API graph for one person, and which node id loads/detects which photo (its index in `images`)."""
    graph: dict[str, Any] = {}
    owners: dict[str, int] = {}
    crop = max(64, int(resolution) // 8 * 8)
    mask_inputs = {**_defaults(mask_info), "backend": face_backend, "which_face": "largest", "crop_size": crop,
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
    train = {**_defaults(train_info), **train_inputs, "name": person, "overwrite": True,
             "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "images": last}
    if train.get("attention_loss") == "mask" or train.get("masked_diffusion_loss"):
        graph[str(next_id)] = {"class_type": "SeFiFaceMask", "inputs": {**mask_inputs, "image": last}}
        train["mask"] = [str(next_id), 0]  # the face mask of each crop, same size as the crops
        next_id += 1
    graph[str(next_id)] = {"class_type": "SeFiTrainIdentity", "inputs": train}
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


def _link(link: Path, target: Path) -> None:
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        return
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def local_base(out_dir: Path, models_dir: Path, checkpoint: Path) -> Path:
    """A base folder for a self-started host: models/sefi_identities → --out, models/checkpoints holding the
    checkpoint, the other model folders of --models-dir (insightface, …) linked as they are."""
    base = Path(tempfile.mkdtemp(prefix="sefi-batch-"))
    models = base / "models"
    _link(models / "sefi_identities", out_dir)
    _link(models / "checkpoints" / checkpoint.name, checkpoint)
    if models_dir.is_dir():
        for sub in models_dir.iterdir():
            if sub.is_dir() and sub.name not in ("sefi_identities", "checkpoints"):
                _link(models / sub.name, sub)
    return base


def start_local_servers(count: int, out_dir: Path, models_dir: Path, checkpoint: Path) -> list[Server]:
    servers = []
    try:
        for i in range(count):
            base = local_base(out_dir, models_dir, checkpoint)
            port = comfy_client.free_port()
            log_file = open(base / "server.log", "wb")
            proc = subprocess.Popen(embedded_host.server_command(base, port), cwd=REPO_ROOT, stdout=log_file,
                                    stderr=subprocess.STDOUT)
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
        base = server.base_dir
        for link in [base / "models" / "sefi_identities", base / "custom_nodes" / embedded_host.PACK_DIR_NAME]:
            if link.is_symlink():
                link.unlink()  # never follow the links into --out or the repository
        shutil.rmtree(base, ignore_errors=True)


def prepare_server(server: Server, checkpoint: str) -> None:
    """Check that the server answers, has the pack's nodes and the checkpoint; keep the nodes' input specs."""
    try:
        server.client.get("/system_stats", timeout=10)
        info = {name: server.client.get(f"/object_info/{name}", timeout=60).get(name)
                for name in ("SeFiTrainIdentity", "SeFiFaceMask", "CheckpointLoaderSimple")}
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


# ------------------------------------------------------------------------------------------------ work


def train_person(server: Server, person: Person, args: argparse.Namespace, train_inputs: dict[str, Any],
                 out_dir: Path, label: str) -> Result:
    start = time.monotonic()
    try:
        subfolder = f"{UPLOAD_FOLDER}/{person.name}"
        names = [server.client.upload_image(p, subfolder, name=f"{i:03d}{p.suffix.lower()}")
                 for i, p in enumerate(person.photos)]
    except (urllib.error.URLError, ConnectionError) as exc:
        raise ServerGone(str(exc)) from exc
    graph, owners = build_graph(person.name, names, args.checkpoint_name, server.train_info, server.mask_info,
                                train_inputs, args.face_backend, args.resolution)
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
    valid, note = existing_identity(out_dir, person.name)
    if not valid:
        where = out_dir / f"{person.name}.safetensors"
        return Result(person.name, "failed", seconds,
                      f"trained on {server.url}, but {where} is {'not valid: ' + note if note else 'missing'}: --out "
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


def summary_table(results: list[Result]) -> str:
    rows = [("person", "status", "seconds", "server", "message")]
    rows += [(r.person, r.status, f"{r.seconds:.1f}", r.server or "-", r.message) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * 7)
    counts = {s: sum(1 for r in results if r.status == s) for s in ("trained", "skipped", "failed")}
    lines.append(f"{counts['trained']} trained, {counts['skipped']} skipped, {counts['failed']} failed")
    return "\n".join(line.rstrip() for line in lines)


# ------------------------------------------------------------------------------------------------ CLI


def parse_set(values: list[str]) -> dict[str, Any]:
    """--set KEY=VALUE: any other SeFiTrainIdentity input; VALUE is read as JSON when it parses (numbers,
    true/false), else taken as a string."""
    out = {}
    for item in values:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: write KEY=VALUE, e.g. --set stages=3")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tools.batch_train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other SeFiTrainIdentity input: --set KEY=VALUE (repeatable).")
    p.add_argument("people_dir", type=Path, metavar="PEOPLE_DIR", help="one sub-folder of photos per person")
    p.add_argument("--out", type=Path, required=True, metavar="IDENTITIES_DIR",
                   help="where the identities end up (for --server: that server's models/sefi_identities)")
    p.add_argument("--server", action="extend", nargs="+", default=[], metavar="URL",
                   help="running ComfyUI server(s) with SeFi-IDE, fed from one queue; default: start the embedded "
                        "host here")
    p.add_argument("--local-servers", type=int, default=1, metavar="N",
                   help="without --server: how many embedded hosts to start here (CPU; default 1)")
    p.add_argument("--checkpoint", metavar="NAME_OR_PATH",
                   help="SD1.5 checkpoint: its name in the servers' models/checkpoints, or (local servers) a file "
                        "path; default: the only checkpoint in --models-dir/checkpoints")
    p.add_argument("--models-dir", type=Path, default=REPO_ROOT / "models",
                   help="local servers: the models folder to take checkpoints (and insightface) from")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--learning-rate", type=float, default=0.0, help="0 = the node's default")
    p.add_argument("--trigger", default="sks")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--face-backend", choices=("auto", "dlib", "insightface"), default="auto")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="extra")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds one person may take (default 6 h)")
    ray_options = p.add_argument_group("--engine ray (see docs/batch.md)")
    ray_options.add_argument("--engine", choices=("http", "ray"), default="http",
                     help="http: ComfyUI servers (--server, or embedded ones started here); ray: Ray actors that "
                          "boot the host in-process")
    ray_options.add_argument("--ray-address", metavar="ADDRESS",
                     help="an existing Ray cluster (auto, ray://HOST:10001); default: start a local Ray sized to "
                          "this machine and shut it down at the end")
    ray_options.add_argument("--workers", type=int, default=0, metavar="N",
                     help="actors to start (default: one per GPU; CPU-only: CPUs / --worker-cpus)")
    ray_options.add_argument("--worker-gpus", type=int, choices=(0, 1), default=None,
                     help="GPUs per actor (default 1 when the cluster has GPUs, else 0 = CPU workers)")
    ray_options.add_argument("--worker-cpus", type=int, default=0, metavar="N",
                     help="CPUs per actor (default 1 with a GPU, else 4 or all the cluster has)")
    ray_options.add_argument("--max-failures", type=int, default=2, metavar="N",
                     help="a person whose worker is lost N times is marked failed (default 2)")
    return p


def resolve_checkpoint(args: argparse.Namespace, local: bool) -> Path | None:
    """Sets args.checkpoint_name; returns the local file for self-started servers."""
    value = args.checkpoint
    if not local:
        if not value:
            raise UsageError("--checkpoint NAME is needed with --server: the checkpoint's file name in the "
                             "servers' models/checkpoints")
        args.checkpoint_name = value
        return None
    folder = args.models_dir / "checkpoints"
    if value and Path(value).expanduser().is_file():
        path = Path(value).expanduser()
    elif value:
        path = folder / value
        if not path.is_file():
            raise UsageError(f"--checkpoint {value}: not a file and not in {folder}; give a path or put it there")
    else:
        found = sorted(p for p in folder.glob("*") if p.suffix in CHECKPOINT_EXTENSIONS) if folder.is_dir() else []
        if len(found) != 1:
            raise UsageError(f"--checkpoint is needed: {folder} holds {len(found)} checkpoints "
                             f"({', '.join(p.name for p in found) or 'none'}); name one or give a path")
        path = found[0]
    args.checkpoint_name = path.name
    return path


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def check_engine(args: argparse.Namespace) -> None:
    """Options that belong to the other engine are refused rather than ignored."""
    if args.engine == "ray":
        if args.server:
            raise UsageError("--server is for --engine http; with --engine ray give --ray-address (or nothing, "
                             "for a local Ray)")
        if args.workers < 0 or args.worker_cpus < 0 or args.max_failures < 1:
            raise UsageError("--workers and --worker-cpus must be >= 0 (0 = automatic), --max-failures >= 1")
    elif args.ray_address or args.workers or args.worker_gpus is not None or args.worker_cpus:
        raise UsageError("--ray-address, --workers, --worker-gpus and --worker-cpus need --engine ray")


def settle_people(people_dir: Path, out_dir: Path) -> tuple[list[Result], list[Person]]:
    """(settled, to train): valid identities are skipped and people with unusable photos fail, before any
    engine starts."""
    results: list[Result] = []
    jobs: list[Person] = []
    for person in find_people(people_dir):
        valid, note = existing_identity(out_dir, person.name)
        if valid:
            results.append(Result(person.name, "skipped", 0.0, note))
            log(f"{person.name}: skipped ({note})")
            continue
        if note:
            log(f"{person.name}: {note}")
        problem = check_photos(person)
        if problem:
            results.append(Result(person.name, "failed", 0.0, problem))
            log(f"{person.name}: failed ({problem})")
            continue
        jobs.append(person)
    log(f"{len(jobs)} to train, {len(results)} settled before training ({out_dir})")
    return results, jobs


def run(args: argparse.Namespace) -> int:
    out_dir = args.out.expanduser().resolve()
    check_engine(args)
    local = not args.server
    bad = [u for u in args.server if not u.startswith(("http://", "https://"))]
    if bad:
        raise UsageError(f"--server {' '.join(bad)}: give URLs such as http://127.0.0.1:8188 (put PEOPLE_DIR before "
                         "--server, which takes every word after it)")
    checkpoint_path = resolve_checkpoint(args, local)
    if args.resolution < 64 or args.steps < 1 or args.local_servers < 1:
        raise UsageError("--resolution must be >= 64, --steps >= 1 and --local-servers >= 1")
    out_dir.mkdir(parents=True, exist_ok=True)
    train_inputs = {"trigger": args.trigger, "steps": args.steps, "resolution": args.resolution,
                    "learning_rate": args.learning_rate, "seed": args.seed, **parse_set(args.extra)}

    results, jobs = settle_people(args.people_dir.expanduser(), out_dir)

    servers: list[Server] = []
    code = EXIT_OK
    try:
        if jobs and args.engine == "ray":
            try:
                from tools import batch_ray
            except ImportError as exc:
                raise UsageError(f"--engine ray needs Ray ({exc}): pip install \"sefi-ide[ray]\" (or pip install "
                                 "ray)") from exc
            results += batch_ray.run_ray(jobs, args, train_inputs, out_dir, checkpoint_path)
        elif jobs:
            if local:
                servers = start_local_servers(min(args.local_servers, len(jobs)), out_dir, args.models_dir,
                                              checkpoint_path)
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
            unknown = sorted(set(train_inputs) - _input_names(ready[0].train_info))
            if unknown:
                raise UsageError(f"SeFiTrainIdentity has no input(s) {', '.join(unknown)}; its inputs are "
                                 f"{', '.join(sorted(_input_names(ready[0].train_info)))}")
            results += run_queue(ready, jobs, args, train_inputs, out_dir)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_NO_SERVER
        done = {r.person for r in results}
        results += [Result(p.name, "failed", 0.0, f"not run: {str(exc).splitlines()[0]}") for p in jobs
                    if p.name not in done]
    finally:
        stop_local_servers([s for s in servers if s.proc is not None])

    order = {p: i for i, p in enumerate(sorted(r.person for r in results))}
    results.sort(key=lambda r: order[r.person])
    print(summary_table(results), flush=True)
    if code == EXIT_OK and any(r.status == "failed" for r in results):
        code = EXIT_FAILED
    return code


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
