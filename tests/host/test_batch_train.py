"""The batch trainer (python -m batch) against real ComfyUI servers: three people built from tests/data/faces (one has only a
noise image), two servers on free ports fed from one queue, 2 steps at 64 px on the tiny SD1.5 checkpoint.
The first run trains 2 and reports 1; the second run (on a host the CLI starts itself) skips the 2."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from batch import cli, comfy_client, http_engine, people as batch_people
from batch.host_base import UPLOAD_FOLDER
from host_boot import embedded_host
from tools.dev_requirements import import_required

import_required("dlib", reason="needs dlib-bin==20.0.1.post1 (prebuilt dlib)")

FAST = ["--steps", "2", "--resolution", "64", "--set", "parametrisation=direct tokens", "--set", "stages=1",
        "--face-backend", "dlib"]


@pytest.fixture
def people(tmp_path, people_folder):
    return people_folder(tmp_path / "people", {"obama": ["obama_1.jpg", "obama_2.jpg"], "biden": ["biden_1.jpg"]})


@pytest.fixture
def two_servers(tmp_path, tiny_sd15):
    """Two servers whose models/sefi_identities is one shared folder (the 'shared disk' set-up)."""
    out = tmp_path / "identities"
    out.mkdir()
    servers = []
    try:
        for i in range(2):
            base = tmp_path / f"server{i}"
            (base / "models" / "checkpoints").mkdir(parents=True)
            (base / "models" / "checkpoints" / tiny_sd15.name).symlink_to(tiny_sd15)
            (base / "models" / "sefi_identities").symlink_to(out, target_is_directory=True)
            port = comfy_client.free_port()
            log = open(base / "server.log", "wb")
            proc = subprocess.Popen(embedded_host.server_command(base, port), cwd=embedded_host.REPO_ROOT,
                                    stdout=log, stderr=subprocess.STDOUT)
            servers.append((proc, f"http://127.0.0.1:{port}", base, log))
        for proc, url, base, _ in servers:
            try:
                comfy_client.wait_until_ready(proc, url)
            except RuntimeError as err:
                pytest.fail(f"{err}\n{(base / 'server.log').read_text(errors='replace')[-4000:]}")
        yield out, [s[1] for s in servers], [s[2] for s in servers]
    finally:
        for proc, _, _, log in servers:
            comfy_client.stop(proc)
            log.close()


ROW = re.compile(r"^(\S+)\s+(trained|skipped|failed)\s+([\d.]+)\s+(server \d+|-)\s*(.*)$")


def _rows(text: str) -> dict[str, tuple[str, ...]]:
    """The summary table: person -> (person, status, seconds, server, message)."""
    return {m.group(1): m.groups() for m in map(ROW.match, text.splitlines()) if m}


def _cut_off_run(host, sd15, face_photo, out, person: str, photo: str, steps: int) -> None:
    """--out/checkpoints/<person>.sefi-train at `steps`, as a run cut off after that checkpoint leaves it (trained
    in this process on the crop the graph makes, with the inputs it gives)."""
    crop = host.run("SeFiFaceMask", image=face_photo(photo), backend="dlib", which_face="largest", crop_size=64,
                    on_no_face="error")[1]
    model, clip, vae = sd15
    host.run("SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=crop, name=f"http_seed_{person}",
             overwrite=True, keep_checkpoint=True, trigger="sks", steps=steps, resolution=64,
             parametrisation="direct tokens", stages=1)
    source = Path(host.folder_paths.models_dir) / "sefi_identities" / "checkpoints" / f"http_seed_{person}.sefi-train"
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copy(source, out / "checkpoints" / f"{person}.sefi-train")


@pytest.mark.slow  # two servers of its own
def test_two_servers_train_two_report_one_then_skip(people, two_servers, tiny_sd15, host, sd15, face_photo, capsys):
    out, urls, bases = two_servers
    _cut_off_run(host, sd15, face_photo, out, "biden", "biden_1.jpg", 1)  # resumed, not trained again from 0
    rc = cli.main([str(people), "--out", str(out), "--server", *urls, "--checkpoint", tiny_sd15.name, *FAST])
    text = capsys.readouterr().out
    print(text)
    rows = _rows(text)
    assert rc == cli.EXIT_FAILED, text
    assert rows["obama"][1] == rows["biden"][1] == "trained", text
    assert rows["nobody"][1] == "failed" and "no face found in photo noise.png" in rows["nobody"][4], text
    assert "2 trained, 0 skipped, 1 failed" in text
    assert {row[3] for row in rows.values()} == {"server 1", "server 2"}, text  # one queue fed both servers
    from sefi_core.identity import load_identity
    for person in ("obama", "biden"):
        identity = load_identity(out / f"{person}.safetensors")
        assert identity.training["steps_done"] == 2 and identity.trigger == "sks"
    assert "biden: resuming from its checkpoint at step 1" in text
    assert load_identity(out / "biden.safetensors").training["resumed_at_step"] == 1
    assert "resumed_at_step" not in load_identity(out / "obama.safetensors").training
    assert not (out / "nobody.safetensors").exists()
    # the photos went through the upload API into each server's own input folder, not through a shared disk
    uploaded = {p.parent.name for b in bases for p in (b / "input" / UPLOAD_FOLDER).rglob("*.*")}
    assert uploaded == {"obama", "biden", "nobody"}

    # second run, default mode: the CLI starts the embedded host itself (models/sefi_identities -> --out)
    rc = cli.main([str(people), "--out", str(out), "--checkpoint", str(tiny_sd15), *FAST])
    text = capsys.readouterr().out
    print(text)
    rows = _rows(text)
    assert rc == cli.EXIT_FAILED, text
    assert rows["obama"][1] == rows["biden"][1] == "skipped" and rows["nobody"][1] == "failed", text
    assert "starting local ComfyUI 1/1" in text and "0 trained, 2 skipped, 1 failed" in text


def test_where_a_cut_off_run_resumes(tmp_path):
    """Its checkpoint whatever step it reached, also the last one (the identity was not saved yet); a longer run's
    checkpoint is the person's failure, never replaced."""
    from sefi_core.train_state import TrainState, save_train_state
    out = tmp_path / "out"
    (out / "checkpoints").mkdir(parents=True)
    for name, step in (("half", 3), ("last", 6), ("longer", 9)):
        save_train_state(TrainState({}, {}, step, [], {}), out / "checkpoints" / f"{name}.sefi-train")
    (out / "checkpoints" / "junk.sefi-train").write_bytes(b"not a checkpoint")
    assert batch_people.resume_plan(out, "half", 6) == ("half", "resuming from its checkpoint at step 3")
    assert batch_people.resume_plan(out, "last", 6) == ("last", "its checkpoint is at the last step (6): saving the "
                                                                 "identity from it")
    assert batch_people.resume_plan(out, "new", 6) == batch_people.resume_plan(out, "junk", 6) == ("", "")
    with pytest.raises(batch_people.CannotResume, match=r"is at step 9, beyond --steps 6: give --steps 9 or more"):
        batch_people.resume_plan(out, "longer", 6)


def test_settled_without_a_server(tmp_path, people, capsys):
    """Everything valid is skipped and a broken photo fails before any server is started."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.rmtree(people / "nobody")
    (people / "broken").mkdir()
    (people / "broken" / "x.jpg").write_bytes(b"not a jpeg")
    (people / "empty").mkdir()
    (out / "biden.safetensors").write_bytes(b"junk")  # unreadable is not absent: refused and kept, not trained over
    with pytest.raises(batch_people.Unreadable, match="cannot be read .*it is kept"):
        batch_people.existing_identity(out, "biden")
    problems = {p.name: batch_people.check_photos(p) for p in batch_people.find_people(people)}
    assert "x.jpg is not a readable image" in problems["broken"] and "no photos" in problems["empty"]
    assert problems["obama"] == problems["biden"] == ""
    rc = cli.main([str(people), "--out", str(out), "--server", "http://127.0.0.1:9", "--checkpoint",
                           "x.safetensors", *FAST])
    captured = capsys.readouterr()
    assert rc == cli.EXIT_NO_SERVER and "does not answer" in captured.out + captured.err
    rows = _rows(captured.out)
    assert rows["broken"][1] == rows["empty"][1] == rows["obama"][1] == rows["biden"][1] == "failed"
    assert "it is kept" in rows["biden"][4] and (out / "biden.safetensors").read_bytes() == b"junk"


def test_graph_shape_and_usage_errors(tmp_path, capsys):
    train_info = {"input": {"required": {"model": ["MODEL"], "images": ["IMAGE"], "steps": ["INT", {"default": 600}]},
                            "optional": {"mask": ["MASK"], "options": ["SEFI_TRAINING_OPTIONS"]}}}
    options_info = {"input": {"required": {"attention_loss": [["reference", "mask", "off"]],
                                           "overwrite": ["BOOLEAN", {"default": False}],
                                           "resume_from": ["STRING", {"default": ""}]}}}
    mask_info = {"input": {"required": {"image": ["IMAGE"], "crop_size": ["INT", {"default": 512}],
                                        "backend": ["COMBO", {"options": ["auto", "dlib"]}]}}}
    graph, owners = http_engine.build_graph("ann", ["a/0.png", "a/1.png", "a/2.png"], "m.safetensors", train_info,
                                            mask_info, {"steps": 2}, "dlib", 64, options_info=options_info)
    kinds = [n["class_type"] for n in graph.values()]
    assert kinds.count("LoadImage") == 3 and kinds.count("SeFiFaceMask") == 3 and kinds.count("ImageBatch") == 2
    train = next(n for n in graph.values() if n["class_type"] == "SeFiTrainIdentity")["inputs"]
    assert train["steps"] == 2 and train["name"] == "ann" and "mask" not in train
    options = graph[train["options"][0]]
    assert options["class_type"] == "SeFiTrainingOptions" and train["options"][1] == 0
    assert options["inputs"] == {"attention_loss": "reference", "overwrite": True, "resume_from": ""}
    assert sorted(set(owners.values())) == [0, 1, 2]
    graph, _ = http_engine.build_graph("ann", ["a/0.png"], "m", train_info, mask_info,
                                       {"attention_loss": "mask"}, "dlib", 64, options_info=options_info)
    train = next(n for n in graph.values() if n["class_type"] == "SeFiTrainIdentity")["inputs"]
    assert graph[train["mask"][0]]["class_type"] == "SeFiFaceMask" and train["images"] == ["3", 1]
    assert cli.main([str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--server", "http://x",
                             "--checkpoint", "m"]) == cli.EXIT_USAGE
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "p" / "a").mkdir(parents=True)
    assert cli.main([str(tmp_path / "p"), "--out", str(tmp_path / "o"), "--server", "http://x"]) == 2
    assert "--checkpoint NAME is needed" in capsys.readouterr().err
