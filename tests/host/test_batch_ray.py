"""python -m batch --engine ray: a local Ray (2 CPUs, 2 CPU workers) trains three people from the face photos
(6 steps at 64 px on the tiny SD1.5 checkpoint, a checkpoint every 2 steps). One worker is killed after its
person's first checkpoint: that person is retried on another worker and resumes from the checkpoint, and every
identity checked equals the one the in-process trainer makes from the same photos and seed. A folder without a face
fails alone; a re-run skips everyone without starting Ray."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch

from batch import cli, people as batch_people
from tools.dev_requirements import import_required

ray = import_required("ray", reason="needs the ray extra (pip install 'sefi-ide[ray]')")
import_required("dlib", reason="needs dlib-bin==20.0.1.post1 (prebuilt dlib)")
from batch import ray_engine  # noqa: E402  (needs ray)

STEPS, EVERY = 6, 2
TRAIN = {"steps": STEPS, "resolution": 64, "parametrisation": "direct tokens", "stages": 1, "checkpoint_every": EVERY}
ARGS = ["--engine", "ray", "--workers", "2", "--worker-cpus", "1", "--worker-gpus", "0", "--steps", str(STEPS),
        "--resolution", "64", "--set", "parametrisation=direct tokens", "--set", "stages=1", "--set",
        f"checkpoint_every={EVERY}", "--face-backend", "dlib"]
PHOTOS = {"obama": ["obama_1.jpg", "obama_2.jpg"], "biden": ["biden_1.jpg"], "rose_leslie": ["rose_leslie_1.jpg"]}
ROW = re.compile(r"^(\S+)\s+(trained|skipped|failed)\s+([\d.]+)\s+(worker \d+|-)\s*(.*)$")


@pytest.fixture
def people(tmp_path, people_folder):
    return people_folder(tmp_path / "people", PHOTOS)


def _rows(text: str) -> dict[str, tuple[str, ...]]:
    return {m.group(1): m.groups() for m in map(ROW.match, text.splitlines()) if m}


def _run_watched(people, out, tiny_sd15, watch, capsys) -> tuple[int, str, dict[str, tuple[str, ...]]]:
    """The batch CLI with `watch` among the driver's hooks: (exit code, its output, its summary rows)."""
    ray_engine.WATCH_HOOKS.append(watch)
    try:
        rc = cli.main([str(people), "--out", str(out), "--checkpoint", str(tiny_sd15), *ARGS])
    finally:
        ray_engine.WATCH_HOOKS.remove(watch)
    text = capsys.readouterr().out
    return rc, text, _rows(text)


def _in_process_identity(host, sd15, face_photo, person: str):
    """The same person trained by the node in this process (same crops, inputs and seed)."""
    mask_inputs = {"backend": "dlib", "which_face": "largest", "crop_size": 64, "on_no_face": "error"}
    crops = torch.cat([host.run("SeFiFaceMask", image=face_photo(name), **mask_inputs)[1] for name in PHOTOS[person]])
    model, clip, vae = sd15
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a worker with one CPU (Ray sets OMP_NUM_THREADS=1): same float sums
    try:
        return host.run("SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=crops,
                        name=f"ray_reference_{person}", overwrite=True, trigger="sks", seed=0, learning_rate=0.0,
                        **TRAIN)[0]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # a local Ray whose two workers each boot a host
def test_ray_workers_survive_a_kill_and_match_the_in_process_trainer(people, tmp_path, tiny_sd15, host, sd15,
                                                                      face_photo, capsys):
    out = tmp_path / "identities"
    killed: list[tuple[str, int]] = []

    def kill_after_first_checkpoint(job: ray_engine.RayJob) -> None:
        if killed:
            return
        for name, worker in job.running().items():
            step = batch_people.checkpoint_step(out, name)
            if step is not None and step >= EVERY:
                killed.append((name, step))
                ray.kill(worker, no_restart=True)
                return

    rc, text, rows = _run_watched(people, out, tiny_sd15, kill_after_first_checkpoint, capsys)
    assert rc == cli.EXIT_FAILED, text
    assert all(rows[p][1] == "trained" for p in PHOTOS), text
    assert rows["nobody"][1] == "failed" and "no face found in photo noise.png" in rows["nobody"][4], text
    assert "3 trained, 0 skipped, 1 failed" in text and "[####################] 4/4" in text
    assert not ray.is_initialized()  # the local Ray was shut down, its workers with it

    # the killed person went back to the queue and resumed from its latest checkpoint on another worker
    assert killed, "no worker was killed: training finished before the first checkpoint was seen"
    name, kill_step = killed[0]
    resumed = re.findall(rf"\[(worker \d+)\] {name}: start, \d photo\(s\), resuming from its checkpoint at step "
                         rf"(\d+) \(attempt 2\)", text)
    assert len(resumed) == 1, text
    resume_step = int(resumed[0][1])
    assert kill_step <= resume_step < STEPS and resume_step % EVERY == 0, text  # at most one interval again
    assert rows[name][4].endswith(f"(steps {resume_step + 1}-{STEPS})"), text
    assert f"{name} goes back to the queue" in text

    # nothing partial or doubled: exactly one identity per trained person, at most one checkpoint each, no
    # temporary files
    assert sorted(p.name for p in out.iterdir()) == ["biden.safetensors", "checkpoints", "obama.safetensors",
                                                     "rose_leslie.safetensors"]
    assert {p.name for p in (out / "checkpoints").iterdir()} <= {f"{p}.sefi-train" for p in PHOTOS}

    from sefi_core.identity import load_identity
    for person in PHOTOS:
        assert load_identity(out / f"{person}.safetensors").training["steps_done"] == STEPS
    for person in sorted({name, "obama"}):  # the resumed one, and two photos joined by ImageBatch
        trained = load_identity(out / f"{person}.safetensors")
        reference = _in_process_identity(host, sd15, face_photo, person)
        assert trained.image_hashes == reference.image_hashes  # the same face crops
        assert trained.tokens.keys() == reference.tokens.keys()
        for key, value in reference.tokens.items():
            assert torch.equal(trained.tokens[key], value), (person, key)

    # re-run: everyone finished is skipped before Ray is even started
    shutil.rmtree(people / "nobody")
    rc = cli.main([str(people), "--out", str(out), "--checkpoint", str(tiny_sd15), *ARGS])
    text = capsys.readouterr().out
    assert rc == cli.EXIT_OK, text
    assert "0 trained, 3 skipped, 0 failed" in text and "Ray" not in text


def _seed_checkpoint(host, sd15, face_photo, out, person: str, photo: str, steps: int, **train) -> None:
    """--out/checkpoints/<person>.sefi-train at `steps`, trained in this process on the crop a worker makes."""
    mask_inputs = {"backend": "dlib", "which_face": "largest", "crop_size": 64, "on_no_face": "error"}
    crop = host.run("SeFiFaceMask", image=face_photo(photo), **mask_inputs)[1]
    model, clip, vae = sd15
    host.run("SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=crop, name=f"ray_seed_{person}",
             overwrite=True, keep_checkpoint=True, trigger="sks", seed=0, **{**TRAIN, "steps": steps, **train})
    source = Path(host.folder_paths.models_dir) / "sefi_identities" / "checkpoints" / f"ray_seed_{person}.sefi-train"
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(source, out / "checkpoints" / f"{person}.sefi-train")


@pytest.mark.slow  # a local Ray whose two workers each boot a host
def test_ray_never_redoes_nor_loses_work(tmp_path, people_folder, tiny_sd15, host, sd15, face_photo, monkeypatch,
                                         capsys):
    """A worker lost after its person's last checkpoint but before the identity was saved: the person restarted
    from step 0 (the test was step < steps); a longer run's checkpoint was overwritten while the log said it
    resumed; a Ray error other than the four caught ended the whole job; the trainer's warnings never reached
    the user (log_to_driver=False)."""
    people = people_folder(tmp_path / "people", {"done": ["obama_1.jpg"], "longer": ["biden_1.jpg"],
                                                 "flaky": ["rose_leslie_1.jpg"]})
    out = tmp_path / "identities"
    _seed_checkpoint(host, sd15, face_photo, out, "done", "obama_1.jpg", STEPS, learning_rate=1e-2)
    _seed_checkpoint(host, sd15, face_photo, out, "longer", "biden_1.jpg", STEPS + 2)
    longer_before = (out / "checkpoints" / "longer.sefi-train").read_bytes()
    flaky_refs: list = []
    injected: list = []
    real_get = ray.get

    def note_flaky(job: ray_engine.RayJob) -> None:
        flaky_refs.extend(ref for ref, (_, task) in job.in_flight.items() if task.person.name == "flaky")

    def get(ref, *args, **kwargs):  # a Ray error none of the four types caught before
        if ref in flaky_refs and not injected:
            injected.append(ref)
            raise ray.exceptions.RaySystemError("the object store went away (injected)")
        return real_get(ref, *args, **kwargs)

    monkeypatch.setattr(ray_engine.ray, "get", get)
    rc, text, rows = _run_watched(people, out, tiny_sd15, note_flaky, capsys)
    assert rc == cli.EXIT_FAILED, text
    assert "done: start, 1 photo(s), its checkpoint is at the last step (6): saving the identity from it" in text
    assert rows["done"][1] == "trained" and "no steps left to train" in rows["done"][4], text
    from sefi_core.identity import load_identity
    done = load_identity(out / "done.safetensors")
    assert done.training["resumed_at_step"] == STEPS and done.training["steps_done"] == STEPS
    assert re.search(r"done: warning: resuming with different settings \['lr'\]", text), text
    assert rows["longer"][1] == "failed" and "is at step 8, beyond --steps 6" in rows["longer"][4], text
    assert (out / "checkpoints" / "longer.sefi-train").read_bytes() == longer_before
    assert not (out / "longer.safetensors").exists() and "longer: start" not in text
    assert injected and "lost (RaySystemError); flaky goes back to the queue" in text, text
    assert rows["flaky"][1] == "trained", text
    assert not ray.is_initialized()


def test_engine_options_are_checked(tmp_path, capsys):
    (tmp_path / "p" / "a").mkdir(parents=True)
    argv = [str(tmp_path / "p"), "--out", str(tmp_path / "o"), "--checkpoint", "m"]
    assert cli.main([*argv, "--engine", "ray", "--server", "http://x"]) == cli.EXIT_USAGE
    assert "--server is for --engine http" in capsys.readouterr().err
    assert cli.main([*argv, "--workers", "2"]) == cli.EXIT_USAGE
    assert "need --engine ray" in capsys.readouterr().err
    assert cli.main([*argv, "--engine", "ray", "--max-failures", "0"]) == cli.EXIT_USAGE
    assert "--max-failures >= 1" in capsys.readouterr().err
