"""The Ray engine of the batch trainer (`python -m batch --engine ray`): many identities across a Ray cluster, no HTTP.

Each worker is a Ray actor (one GPU each, `num_gpus=1`; on a CPU-only cluster `--worker-cpus` CPUs each) that
boots the ComfyUI host in its own process once (host_boot.embedded_host: the PyPI host, or COMFYUI_PATH), loads the
checkpoint once, and then trains person after person by calling the host's nodes directly — LoadImage,
SeFiFaceMask, ImageBatch, SeFiTrainIdentity — which is the graph the HTTP engine queues, minus the server.
The driver keeps the queue: it hands the next person to whichever worker is idle.

Files: the worker's models/sefi_identities is a link to --out (a path every node sees: local disk on one machine,
a shared volume on a cluster), so identities and training checkpoints (--out/checkpoints) are written there by
the node itself, atomically.

Faults: a worker that dies mid-person (node lost, OOM kill, ray.kill, any Ray error on its result) is replaced by a
new actor, and the person goes back to the front of the queue and resumes from its last training checkpoint
(resume_from; batch/people.resume_plan, also when it had reached its last step but not saved its identity), so at
most one checkpoint interval is trained twice. A person whose own inputs fail (no face, bad settings, a checkpoint
of a longer run) fails at once; a person whose worker is lost --max-failures times is marked failed. Either way the
job goes on. The trainer's warnings reach the job's log with the person's name.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import shutil
import socket
import time
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import ray
import ray.exceptions

from batch.host_base import UPLOAD_FOLDER, local_base, remove_base
from batch.node_inputs import OPTIONS_NODE, input_names, widget_defaults
from batch.people import (CannotResume, Person, Result, UsageError, log, resume_plan, settled_since,
                          trained_identity)
from host_boot import embedded_host

OBJECT_STORE_BYTES = 128 * 2**20  # only small dicts travel through it; Ray's minimum is 75 MiB
POLL_SECONDS = 0.1
WORKER_START_TIMEOUT = 15 * 60  # a replacement that cannot be placed (no free GPU left) gives up after this

WATCH_HOOKS: list[Callable[["RayJob"], None]] = []
"""Callables run by the driver on every poll with the running job (its `running()` people -> worker handles);
for tests and fault drills, e.g. ray.kill of a worker."""


class WorkerLost(Exception):
    """The worker process died or ran out of memory; the person is retried on another worker."""


class _Collect(logging.Handler):
    def __init__(self, into: list[str]) -> None:
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextmanager
def trainer_warnings():
    """The trainer's warnings while one person trains — its log's (logger "sefi") and Python's (e.g. "resuming with
    different settings") — collected for the driver: workers run with log_to_driver=False, which keeps the hosts'
    own output out of the job's, and would hide these too."""
    found: list[str] = []
    handler = _Collect(found)
    logger = logging.getLogger("sefi")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
        found.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)


# ------------------------------------------------------------------------------------------------ worker


class PersonTrainer:
    """The body of one Ray actor: a booted host and a loaded checkpoint, reused for every person."""

    def __init__(self, out_dir: str, models_dir: str, checkpoint: str, device: str):
        self.base = local_base(Path(out_dir), Path(models_dir), Path(checkpoint))
        self.host = embedded_host.boot_in_process(self.base, device)
        self.model, self.clip, self.vae = self.host.run("CheckpointLoaderSimple", ckpt_name=Path(checkpoint).name)[:3]
        self.device = str(importlib.import_module(f"{self.host.pack_module.__name__}.nodes.host").torch_device())
        self.train_info = {"input": self.host.nodes["SeFiTrainIdentity"].INPUT_TYPES()}
        self.mask_info = {"input": self.host.nodes["SeFiFaceMask"].INPUT_TYPES()}
        self.options_info = {"input": self.host.nodes[OPTIONS_NODE].INPUT_TYPES()}

    def describe(self) -> dict[str, Any]:
        """Where this worker runs and which trainer inputs its host has (checked by the driver once)."""
        return {"node": socket.gethostname(), "pid": os.getpid(), "device": self.device, "base": str(self.base),
                "host": embedded_host.host_label(),
                "train_inputs": sorted(input_names(self.train_info) | input_names(self.options_info))}

    def _photo(self, person: str, index: int, photo: Path):
        """The photo as LoadImage reads it from the host's input folder (the HTTP engine's upload, as a link)."""
        rel = f"{UPLOAD_FOLDER}/{person}/{index:03d}{photo.suffix.lower()}"
        link = self.base / "input" / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(photo.resolve())
        return self.host.run("LoadImage", image=rel)[0]

    def train(self, person: str, photos: list[str], train_inputs: dict[str, Any], face_backend: str,
              resolution: int, resume_from: str) -> dict[str, Any]:
        """Train one person. Returns {status: trained|failed, message, first_step, last_step}; raises WorkerLost
        when the process ran out of memory (the driver retries the person elsewhere). The trainer's warnings come
        back with the result, for the driver to show."""
        steps: list[int] = []
        crop = max(64, int(resolution) // 8 * 8)
        mask_inputs = {**widget_defaults(self.mask_info), "backend": face_backend, "which_face": "largest",
                       "crop_size": crop, "on_no_face": "error"}
        try:
            with trainer_warnings() as said:
                out = self._train(person, photos, train_inputs, resume_from, mask_inputs, steps)
        finally:
            shutil.rmtree(self.base / "input" / UPLOAD_FOLDER / person, ignore_errors=True)
        return {**out, "warnings": said}

    def _train(self, person: str, photos: list[str], train_inputs: dict[str, Any], resume_from: str,
               mask_inputs: dict[str, Any], steps: list[int]) -> dict[str, Any]:
        import torch
        try:
            batch = None
            for index, photo in enumerate(map(Path, photos)):
                try:
                    face = self.host.run("SeFiFaceMask", image=self._photo(person, index, photo), **mask_inputs)[1]
                except (torch.OutOfMemoryError, MemoryError):
                    raise
                except Exception as exc:
                    if "No face found" in str(exc):
                        return {"status": "failed", "message": (
                            f"no face found in photo {photo.name}: replace it with a clear, frontal photo of the "
                            "person or remove it (or try --face-backend insightface)")}
                    return {"status": "failed", "message": f"SeFiFaceMask on photo {photo.name}: {exc}"}
                batch = face if batch is None else self.host.run("ImageBatch", image1=batch, image2=face)[0]
            # the trainer takes its options as keywords too (the same values SeFi Training Options would carry)
            inputs = {**widget_defaults(self.train_info), **train_inputs, "name": person, "overwrite": True,
                      "resume_from": resume_from, "model": self.model, "clip": self.clip, "vae": self.vae,
                      "images": batch}
            if inputs.get("attention_loss") == "mask" or inputs.get("masked_diffusion_loss"):
                inputs["mask"] = self.host.run("SeFiFaceMask", image=batch, **mask_inputs)[0]
            self.host.run("SeFiTrainIdentity", **inputs,
                          observer=lambda step, total, loss, parts: steps.append(int(step)))
        except (torch.OutOfMemoryError, MemoryError) as exc:
            raise WorkerLost(f"out of memory: {exc}") from exc
        except Exception as exc:  # the person's own failure; the worker stays usable
            return {"status": "failed", "message": f"{type(exc).__name__}: {exc}",
                    "first_step": steps[0] if steps else None, "last_step": steps[-1] if steps else None}
        return {"status": "trained", "first_step": steps[0] if steps else None,
                "last_step": steps[-1] if steps else None}

    def close(self) -> None:
        remove_base(self.base)


# ------------------------------------------------------------------------------------------------ driver


def progress_line(trained: int, failed: int, total: int, seconds: float, width: int = 20) -> str:
    done = trained + failed
    filled = round(width * done / total) if total else width
    rate = trained / seconds * 3600 if seconds > 0 else 0.0
    return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}: {trained} trained, {failed} failed, "
            f"{total - done} remaining, {rate:.1f} identities/h")


@dataclass
class Task:
    person: Person
    losses: int = 0  # workers lost while training this person
    started: float = 0.0
    worker: str = ""  # the label of the worker it was last given to


@dataclass
class Worker:
    label: str
    handle: Any
    ready_ref: Any = None  # set while booting
    info: dict[str, Any] = field(default_factory=dict)  # its describe(), once ready
    started: float = field(default_factory=time.monotonic)


class RayJob:
    """Driver-side queue: hands people to idle workers, replaces lost workers, retries their people."""

    def __init__(self, jobs: list[Person], args: argparse.Namespace, train_inputs: dict[str, Any], out_dir: Path,
                 checkpoint: Path, workers: int, actor_options: dict[str, Any], device: str):
        self.args, self.train_inputs, self.out_dir = args, train_inputs, out_dir
        self.actor_class = ray.remote(PersonTrainer).options(max_restarts=0, max_concurrency=1, **actor_options)
        self.actor_args = (str(out_dir), str(args.models_dir.expanduser().resolve()), str(checkpoint), device)
        self.pending: deque[Task] = deque(Task(p) for p in jobs)
        self.workers: dict[str, Worker] = {}
        self.idle: list[str] = []
        self.in_flight: dict[Any, tuple[str, Task]] = {}
        self.results: list[Result] = []
        self.total = len(jobs)
        self.count = 0
        self.checked_inputs = False
        self.start_error = ""
        for _ in range(workers):
            self._start_worker()

    def _start_worker(self) -> None:
        self.count += 1
        label = f"worker {self.count}"
        handle = self.actor_class.remote(*self.actor_args)
        self.workers[label] = Worker(label, handle, handle.describe.remote())

    def running(self) -> dict[str, Any]:
        """person name -> the handle of the worker training them now."""
        return {task.person.name: self.workers[label].handle for label, task in self.in_flight.values()}

    def _dispatch(self) -> None:
        while self.idle and self.pending:
            label = self.idle.pop(0)
            task = self.pending.popleft()
            name = task.person.name
            if task.losses and not trained_identity(self.out_dir, name):
                # the lost worker had saved the identity before it died: done, not trained twice
                self.idle.append(label)
                self._finish(task, Result(name, "trained", time.monotonic() - task.started,
                                          f"{name}.safetensors (saved before its worker was lost)", task.worker))
                continue
            settled = settled_since(self.out_dir, task.person)
            if settled is not None:
                self.idle.append(label)
                settled.server = label
                self._finish(task, settled)
                continue
            try:
                resume, note = resume_plan(self.out_dir, name, int(self.train_inputs["steps"]))
            except CannotResume as exc:
                self.idle.append(label)
                self._finish(task, Result(name, "failed", 0.0, str(exc), label))
                continue
            log(f"[{label}] {name}: start, {len(task.person.photos)} photo(s)" + (f", {note}" if note else "")
                + (f" (attempt {task.losses + 1})" if task.losses else ""))
            task.started, task.worker = time.monotonic(), label
            ref = self.workers[label].handle.train.remote(name, [str(p) for p in task.person.photos],
                                                          self.train_inputs, self.args.face_backend,
                                                          self.args.resolution, resume)
            self.in_flight[ref] = (label, task)

    def _finish(self, task: Task, result: Result) -> None:
        self.results.append(result)
        log(f"[{result.server}] {task.person.name}: {result.status} in {result.seconds:.1f} s"
            + (f" ({result.message})" if result.status == "failed" else ""))
        log("progress " + progress_line(sum(r.status == "trained" for r in self.results),
                                        sum(r.status == "failed" for r in self.results), self.total,
                                        time.monotonic() - self.started))

    def _end(self, label: str) -> None:
        """Kill a worker that is lost or stuck, and remove its temporary folder when it ran on this machine."""
        worker = self.workers.pop(label)
        ray.kill(worker.handle, no_restart=True)
        if worker.info.get("node") == socket.gethostname():
            remove_base(Path(worker.info["base"]))  # a killed worker cannot clean up after itself

    def _lose(self, label: str, task: Task | None, why: str) -> None:
        """A worker died: drop it, start a replacement while work remains, and retry its person."""
        self._end(label)
        if task is None:
            log(f"[{label}] could not start: {why}")
            self.start_error = self.start_error or why
        else:
            task.losses += 1
            seconds = time.monotonic() - task.started
            if task.losses >= self.args.max_failures:
                self._finish(task, Result(task.person.name, "failed", seconds,
                                          f"worker lost {task.losses} time(s), giving up (last: {why})", label))
            else:
                log(f"[{label}] lost ({why}); {task.person.name} goes back to the queue and resumes from its "
                    "last checkpoint")
                self.pending.appendleft(task)
        if task is not None and self.pending:
            self._start_worker()  # a lost worker is replaced; one that failed to boot is not (it would again)

    def _settle(self, ref: Any) -> None:
        label, task = self.in_flight.pop(ref)
        name = task.person.name
        try:
            out = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # WorkerLost, or an error outside the person's training
            if isinstance(exc.cause, WorkerLost):
                self._lose(label, task, str(exc.cause))
                return
            out = {"status": "failed", "message": f"{type(exc.cause).__name__}: {exc.cause}"}
        except ray.exceptions.RayError as exc:  # the actor, its process, node or result is gone, whatever the type
            self._lose(label, task, type(exc).__name__)
            return
        except Exception as exc:  # anything else stays this person's failure; the job goes on
            out = {"status": "failed", "message": f"{type(exc).__name__}: {exc}"}
        for said in dict.fromkeys(out.get("warnings", [])):
            log(f"[{label}] {name}: warning: {said}")
        seconds = time.monotonic() - task.started
        self.idle.append(label)
        if out["status"] == "trained":
            problem = trained_identity(self.out_dir, name)
            if problem:
                out = {"status": "failed", "message": (
                    f"trained on {label}, but {self.out_dir / (name + '.safetensors')} is "
                    f"{problem}: --out must be a folder every Ray node sees at "
                    "the same path (shared storage)")}
        if out["status"] == "trained":
            first = out.get("first_step")
            note = f"steps {first}-{out.get('last_step')}" if first is not None else "no steps left to train"
            self._finish(task, Result(name, "trained", seconds, f"{name}.safetensors ({note})", label))
        else:
            self._finish(task, Result(name, "failed", seconds, str(out["message"])[:500], label))

    def _ready(self, label: str) -> None:
        worker = self.workers[label]
        ref, worker.ready_ref = worker.ready_ref, None
        try:
            info = ray.get(ref)
        except (ray.exceptions.RayError) as exc:
            cause = getattr(exc, "cause", None) or exc
            self._lose(label, None, f"{type(cause).__name__}: {str(cause).strip().splitlines()[-1][:300]}")
            return
        if not self.checked_inputs:
            unknown = sorted(set(self.train_inputs) - set(info["train_inputs"]))
            if unknown:
                raise UsageError(f"SeFiTrainIdentity has no input(s) {', '.join(unknown)}; its inputs are "
                                 f"{', '.join(info['train_inputs'])}")
            self.checked_inputs = True
        worker.info = info
        log(f"[{label}] ready on {info['node']} (pid {info['pid']}, {info['device']}, {info['host']}) in "
            f"{time.monotonic() - worker.started:.1f} s")
        self.idle.append(label)

    def run(self) -> list[Result]:
        self.started = time.monotonic()
        while self.pending or self.in_flight:
            self._dispatch()
            booting = {w.ready_ref: w.label for w in self.workers.values() if w.ready_ref is not None}
            if not self.in_flight and not self.idle:
                if not booting:
                    break  # no worker left and none starting
                if all(time.monotonic() - self.workers[label].started > WORKER_START_TIMEOUT
                       for label in booting.values()):
                    self.start_error = self.start_error or (
                        f"no worker could be placed within {WORKER_START_TIMEOUT} s (free GPUs/CPUs in the cluster?)")
                    break
            ready, _ = ray.wait(list(self.in_flight) + list(booting), num_returns=1, timeout=POLL_SECONDS)
            for hook in list(WATCH_HOOKS):
                hook(self)
            for ref in ready:
                if ref in booting:
                    self._ready(booting[ref])
                else:
                    self._settle(ref)
            for ref, (label, task) in list(self.in_flight.items()):
                if time.monotonic() - task.started > self.args.timeout:
                    del self.in_flight[ref]
                    self._end(label)
                    self._finish(task, Result(task.person.name, "failed", time.monotonic() - task.started,
                                              f"did not finish within --timeout {self.args.timeout:g} s", label))
                    if self.pending:
                        self._start_worker()
        if self.pending:
            if not self.results and not self.in_flight:
                raise RuntimeError(f"no Ray worker could start: {self.start_error or 'see the Ray logs'}")
            for task in self.pending:
                self.results.append(Result(task.person.name, "failed", 0.0,
                                           f"no worker left to train it ({self.start_error or 'all were lost'})"))
        return self.results

    def stop(self) -> None:
        """Let each worker remove its temporary folder, then end every actor (the job's workers never outlive
        it, also on an existing cluster)."""
        closing = [w.handle.close.remote() for w in self.workers.values() if w.ready_ref is None]
        try:
            ray.wait(closing, num_returns=len(closing), timeout=30)
        except ray.exceptions.RayError:
            pass
        for worker in self.workers.values():
            ray.kill(worker.handle, no_restart=True)
        self.workers.clear()


def connect(address: str | None) -> bool:
    """Join the cluster at `address`, or start a small local Ray sized to this machine. True when started
    here (then the caller shuts it down)."""
    env = {"PYTHONPATH": os.pathsep.join([str(embedded_host.REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
        os.pathsep), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    if os.environ.get("COMFYUI_PATH"):
        env["COMFYUI_PATH"] = os.environ["COMFYUI_PATH"]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    options = dict(runtime_env={"env_vars": env}, log_to_driver=False, logging_level="WARNING")
    if address:
        ray.init(address=address, **options)
        return False
    # "local": always a new instance of our own, never a cluster that `ray start` left on this machine
    ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False,
             object_store_memory=OBJECT_STORE_BYTES, **options)
    return True


def run_ray(jobs: list[Person], args: argparse.Namespace, train_inputs: dict[str, Any], out_dir: Path,
            checkpoint: Path) -> list[Result]:
    """Train `jobs` on Ray workers; raises RuntimeError when no worker can start (exit code 3)."""
    started_here = connect(args.ray_address)
    job = None
    try:
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        worker_gpus = args.worker_gpus if args.worker_gpus is not None else (1 if gpus else 0)
        if worker_gpus > gpus:
            raise UsageError(f"--worker-gpus {worker_gpus}: the Ray cluster has {gpus} GPU(s); give --worker-gpus 0 "
                             "for CPU workers")
        worker_cpus = args.worker_cpus or (1 if worker_gpus else min(4, cpus))
        workers = args.workers or (gpus // worker_gpus if worker_gpus else max(1, cpus // worker_cpus))
        workers = max(1, min(workers, len(jobs)))
        options = {"num_gpus": worker_gpus, "num_cpus": worker_cpus}
        log(f"Ray {'started here' if started_here else 'at ' + args.ray_address}: {cpus} CPU(s), {gpus} GPU(s); "
            f"{workers} worker(s) with {worker_gpus} GPU and {worker_cpus} CPU(s) each")
        job = RayJob(jobs, args, train_inputs, out_dir, checkpoint, workers, options,
                     "auto" if worker_gpus else "cpu")
        return job.run()
    finally:
        if job is not None:
            job.stop()
        if started_here:
            ray.shutdown()
