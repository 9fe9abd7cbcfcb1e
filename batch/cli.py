"""Train one SeFi identity per person, headless, on one or more ComfyUI servers.

    python -m batch PEOPLE_DIR --out IDENTITIES_DIR [--server URL ...] [--checkpoint NAME] [--steps N]

PEOPLE_DIR holds one sub-folder per person (the folder name becomes the identity's file name) with their photos.
For each person the photos are uploaded to a server (POST /upload/image, so no shared input folder is needed)
and one API-format graph is queued: LoadImage per photo -> SeFiFaceMask (aligned face crop; a photo without a
face fails the person) -> ImageBatch -> SeFiTrainIdentity with the graph's own checkpoint.

Servers: every `--server URL` is fed from one shared queue (one thread per server). Without `--server` the
embedded host is started here (`--local-servers N` of them, on free ports, stopped by PID at the end) with its
models/sefi_identities folder linked to --out, so the identities land there directly. A remote server writes
into *its own* models/sefi_identities (there is no API to download a model file): --out must be that same folder
(shared disk, or a path on that machine). See docs/batch.md.

Engines: `--engine http` (the default) is the above. `--engine ray [--ray-address auto|ray://HOST:10001]` trains on
Ray actors instead, each booting the host in-process once (batch/ray_engine.py; `pip install "sefi-ide[ray]"`).

Resume: a person whose --out/<name>.safetensors exists and loads (sefi_core.identity.load_identity) is skipped.
One failing person (no photos, an unreadable photo, no face, a training error; an identity file in --out that
cannot be read, which is kept; a folder name that is another person's or identity's spelled differently) is
reported and the others go on.
Exit codes: 0 all trained or skipped; 1 some failed; 2 bad arguments or folders; 3 no usable server (or, with
--engine ray, no worker could start).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from batch import http_engine
from batch.people import Result, UsageError, settle_people, summary_table
from host_boot import embedded_host
from sefi_core.console import tolerant_console

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth")
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NO_SERVER = 0, 1, 2, 3


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
    p = argparse.ArgumentParser(prog="python -m batch", description=__doc__.split("\n\n")[0],
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
    p.add_argument("--models-dir", type=Path, default=embedded_host.REPO_ROOT / "models",
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
    tolerant_console()  # a person's name the console cannot show must not stop the batch
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

    code = EXIT_OK
    try:
        if jobs and args.engine == "ray":
            try:
                from batch import ray_engine
            except ImportError as exc:
                raise UsageError(f"--engine ray needs Ray ({exc}): pip install \"sefi-ide[ray]\" (or pip install "
                                 "ray)") from exc
            results += ray_engine.run_ray(jobs, args, train_inputs, out_dir, checkpoint_path)
        elif jobs:
            results += http_engine.run_http(jobs, args, train_inputs, out_dir, checkpoint_path)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = EXIT_NO_SERVER
        done = {r.person for r in results}
        results += [Result(p.name, "failed", 0.0, f"not run: {str(exc).splitlines()[0]}") for p in jobs
                    if p.name not in done]

    order = {p: i for i, p in enumerate(sorted(r.person for r in results))}
    results.sort(key=lambda r: order[r.person])
    print(summary_table(results), flush=True)
    if code == EXIT_OK and any(r.status == "failed" for r in results):
        code = EXIT_FAILED
    return code
