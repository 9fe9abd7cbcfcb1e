"""SeFiTrainIdentity refuses unsafe or ambiguous requests before any work, and leaves no debris: names, unfinished
runs, resume_from, resume structure, stale temp files and the checkpoint's lifetime (issue 11, points 2–6).

Refusals that must come "before any work" are called with model, clip and vae set to None: reaching the model at
all would fail with an AttributeError instead of the expected message."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

RES = 64
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def photo(face_photo):
    return face_photo("obama_1.jpg", 160)


def _args(**kw):
    args = dict(name="t", trigger="sks", initializer="person", steps=1, learning_rate=0.0, stages=2,
                vectors_per_token=1, parametrisation="direct tokens", kv_split=True, attention_loss="off",
                attention_weight=0.003, loss_sites="quarter", masked_diffusion_loss=False,
                prompt_templates="a photo of the face of {}", flip_augmentation=False, scale_augmentation=False,
                seed=3, resolution=RES, batch_size=1, checkpoint_every=0, resume_from="", overwrite=False)
    args.update(kw)
    return args


def _train(host, sd15, photo, **kw):
    model, clip, vae = sd15
    return host.run("SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=photo, **_args(**kw))


def _refused(host, photo, **kw):
    """Run the node without any model: only a refusal that comes before any work gets the expected error."""
    return host.run("SeFiTrainIdentity", model=None, clip=None, vae=None, images=photo, **_args(**kw))


def _interrupted_run(host, sd15, photo, pack, name, at_step=1, **kw):
    """A run cancelled after `at_step` steps (the host's own interrupt call), leaving its checkpoint."""
    train, hostmod = pack.glue("train"), pack.glue("host")

    def cancel(step, total, loss, parts):
        if step == at_step:
            hostmod.interrupt_current_processing(True)
    with pytest.raises(hostmod.InterruptProcessingException):
        _train(host, sd15, photo, name=name, overwrite=True, observer=cancel, **{"steps": 3, **kw})
    return train.checkpoint_dir() / f"{name}.sefi-train"


# ----------------------------------------------------------------------------- 3. names


@pytest.mark.parametrize("bad, why", [
    ("a" * 226, "too long"),  # its temp file .<name>.safetensors.<12 hex>.tmp would be 256 bytes
    ("é" * 113, "too long"),  # 226 bytes in UTF-8
    ("nul\x00byte", "control characters"),
    ("tab\there", "control characters"),
    ("sub/dir", "without folders"),
    ("..", "without folders"),
    ("/abs", "without folders"),
    ("CON", "device name"),
    ("lpt1.backup", "device name"),
    ("Aux", "device name"),
    ("trailing.", "end with"),
    ("trailing ", "end with"),
    (" leading", "start or end"),
    ("what?", "contains '?'"),
    ('quote"d', "contains '\"'"),
    ("a:b", "contains ':'"),
    ("a<b>", "contains '<' '>'"),
    ("a#b", "contains '#'"),
    ("50%", "contains '%'"),
    ("x²", "contains '²'"),
    ("CONIN$", "device name"),
    ("conout$.txt", "device name"),
    ("COM¹", "device name"),
    ("LPT³", "device name"),
    ("COM0", "device name"),
    ("NUL", "device name"),
    (".hidden", "must not start with '.'"),
    ("", "empty"),
])
def test_bad_names_are_refused_before_any_work(host, pack, photo, bad, why):
    with pytest.raises(ValueError, match=re.escape(why)) as info:
        _refused(host, photo, name=bad)
    msg = str(info.value)
    assert "a valid name is a plain file name such as 'my_face'" in msg
    assert len(msg) < 600


@pytest.mark.parametrize("good", ["John Smith", "Élodie", "李小龙", "my-face_2.v1", "Zoë O Brien", "नमस्ते"])
def test_the_hint_and_the_check_are_one_rule(pack, good):
    """Everything the hint allows passes (letters of any script, digits, '-', '_', '.', inner spaces), and the
    hint names every device name the check refuses, each once."""
    policies = pack.glue("train_policies")
    assert policies.check_name(good) == good
    listed = policies.VALID_NAME_HINT.split("Windows device name (")[1].split(")")[0].split(", ")
    assert sorted(listed) == sorted(["CON", "PRN", "AUX", "NUL", "CONIN$", "CONOUT$", "COM0-COM9", "LPT0-LPT9",
                                     "COM¹-COM³", "LPT¹-LPT³"])
    refused = {n for n in policies.WINDOWS_DEVICES}
    assert {"CON", "NUL", "COM1", "COM¹", "LPT³", "CONIN$"} <= refused


def test_the_longest_valid_name_writes_all_its_files(host, sd15, pack, photo):
    """218 bytes is the limit: the temp file of a snapshot at step 999999 is then exactly 255 bytes, and training
    and saving work (keep_checkpoint=true keeps the checkpoint; the default deletes it, see the crash test)."""
    train, policies = pack.glue("train"), pack.glue("train_policies")
    name = "n" * 218
    assert max(len(f) for f in policies.produced_file_names(name)) == 255
    with pytest.raises(ValueError, match="too long"):
        policies.check_name(name + "n")
    _train(host, sd15, photo, name=name, overwrite=True, keep_checkpoint=True, save_every=1)
    assert (train.identity_dir() / f"{name}.safetensors").is_file()
    assert (train.identity_dir() / f"{name}@1.safetensors").is_file()
    assert (train.checkpoint_dir() / f"{name}.sefi-train").is_file()


# ----------------------------------------------------------------------------- 2. unfinished runs


def test_a_fresh_run_never_replaces_an_unfinished_one(host, sd15, pack, photo):
    tr = pack.core("train_state")
    ckpt = _interrupted_run(host, sd15, photo, pack, "unfinished")
    before = ckpt.read_bytes()
    with pytest.raises(FileExistsError) as info:
        _refused(host, photo, name="unfinished")
    msg = str(info.value)
    assert "resume_from=unfinished" in msg and "overwrite=true" in msg
    assert ckpt.read_bytes() == before
    # resuming from another run's checkpoint under this name would replace it too
    other = ckpt.with_name("other.sefi-train")
    other.write_bytes(before)
    with pytest.raises(FileExistsError, match="resume_from=unfinished"):
        _refused(host, photo, name="unfinished", resume_from="other", steps=3)
    assert ckpt.read_bytes() == before and other.is_file()
    # overwrite=true starts over
    identity = _train(host, sd15, photo, name="unfinished", overwrite=True, steps=2, keep_checkpoint=True)[0]
    assert identity.training["steps_done"] == 2 and tr.load_train_state(ckpt).step == 2


# ----------------------------------------------------------------------------- 6. resume_from stays inside


def test_resume_from_outside_the_checkpoint_folders_is_refused_without_looking(host, pack, photo, tmp_path):
    readme = REPO_ROOT / "README.md"
    assert readme.is_file()
    messages = set()
    for outside in (str(readme), str(tmp_path / "missing.sefi-train"), "../../README.md", "~/x", "C:\\x",
                    "checkpoints/../../../README.md", "a//b"):
        with pytest.raises(ValueError) as info:
            _refused(host, photo, name="probe", resume_from=outside)
        messages.add(str(info.value))
    assert len(messages) == 1, messages  # the same words whether or not the file exists
    msg = messages.pop()
    assert "resume_from must be the name of a training checkpoint" in msg and "delete" not in msg


def test_resume_from_a_file_the_pack_did_not_write_never_advises_deleting_it(host, pack, photo):
    train = pack.glue("train")
    folder = train.checkpoint_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "foreign.sefi-train").write_bytes(b"# someone's notes, not a checkpoint\n")
    with pytest.raises(ValueError) as info:
        _refused(host, photo, name="foreign_resumed", resume_from="foreign")
    msg = str(info.value)
    assert "not a readable SeFi training checkpoint" in msg and "delete" not in msg.lower()
    with pytest.raises(FileNotFoundError, match="no training checkpoint of that name") as info:
        _refused(host, photo, name="x", resume_from="no_such_run")
    assert "foreign" in str(info.value)  # lists what is there


# ----------------------------------------------------------------------------- 5. resume structure


def test_resume_with_another_structure_is_refused_listing_the_differences(host, sd15, pack, photo, caplog):
    tr = pack.core("train_state")
    ckpt = _interrupted_run(host, sd15, photo, pack, "struct", stages=2, parametrisation="direct tokens")
    with pytest.raises(ValueError) as info:
        _refused(host, photo, name="struct", resume_from="struct", steps=3, stages=3,
                 parametrisation="self-attention generator", kv_split=False)
    msg = str(info.value)
    assert "parametrisation is 'self-attention generator' here but 'direct tokens' in the checkpoint" in msg
    assert "stages is 3 here but 2 in the checkpoint" in msg and "kv_split is False here but True" in msg
    assert "vectors_per_token" not in msg
    assert tr.load_train_state(ckpt).step == 1
    # changeable settings take the node's values, are logged, and the metadata says what trained
    with caplog.at_level("INFO", logger="sefi"):
        identity = _train(host, sd15, photo, name="struct", resume_from="struct", steps=3, learning_rate=0.02,
                          attention_weight=0.5)[0]
    training = identity.training
    assert training["steps_done"] == 3 and training["resumed_at_step"] == 1
    assert training["lr"] == 0.02 and training["attention_weight"] == 0.5
    assert training["parametrisation"] == "direct" and training["generator"]["stages"] == 2
    assert training["changed_on_resume"]["learning_rate"] == [5e-3, 0.02]
    assert training["changed_on_resume"]["attention_weight"] == [0.003, 0.5]
    assert "resuming at step 1 with learning_rate 0.02 (the checkpoint had 0.005)" in caplog.text


# ----------------------------------------------------------------------------- 4. debris and checkpoint lifetime


KILLED_WRITER = """
import sys, time
sys.path.insert(0, {repo!r})
from sefi_core import train_state
state = train_state.load_train_state({ckpt!r})
state.step = 999  # must never become the checkpoint

def half_then_hang(f, data):
    f.write(data[: len(data) // 2]); f.flush()
    print("writing", flush=True)
    time.sleep(120)

train_state._write_payload = half_then_hang
train_state.save_train_state(state, {ckpt!r})
"""


def test_a_write_killed_midway_leaves_the_checkpoint_and_the_next_run_clears_the_debris(host, sd15, pack, photo,
                                                                                         caplog):
    train, tr = pack.glue("train"), pack.core("train_state")
    ckpt = _interrupted_run(host, sd15, photo, pack, "crashed")
    folder = ckpt.parent
    unrelated = folder / ".notes.txt.0123456789ab.tmp"  # not this pack's temp file for this name
    unrelated.write_text("keep")
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER.format(repo=str(REPO_ROOT), ckpt=str(ckpt))],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    debris = sorted(p.name for p in folder.glob(".crashed.sefi-train.*.tmp"))
    assert len(debris) == 1
    assert tr.load_train_state(ckpt).step == 1  # the last good checkpoint is intact
    with caplog.at_level("INFO", logger="sefi"):
        identity = _train(host, sd15, photo, name="crashed", resume_from="crashed", steps=3)[0]
    assert identity.training["steps_done"] == 3
    assert not list(folder.glob(".crashed.*.tmp")) and unrelated.read_text() == "keep"
    assert debris[0] in caplog.text and "left over from an interrupted write" in caplog.text
    # finished and keep_checkpoint off (the default): the checkpoint is gone
    assert not ckpt.exists() and "deleted its training checkpoint" in caplog.text
    unrelated.unlink()


# ----------------------------------------------------------------------------- 7. faceless input


def test_faceless_images_are_dropped_and_none_left_is_refused(host, sd15, pack, photo, caplog):
    """SeFi Face Mask with on_no_face=skip passes a black placeholder crop and an empty mask on, and a photo given
    straight to the trainer may show no face at all (a plain gray image): the trainer drops them (logged by index
    and why) and refuses a batch with nothing left, before any work."""
    h, w = photo.shape[1:3]
    black, gray = torch.zeros_like(photo), torch.full_like(photo, 0.5)
    face_mask = torch.zeros(1, h, w)
    face_mask[:, h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1.0
    with pytest.raises(ValueError, match="none of the 2 image") as info:
        _refused(host, torch.cat([black, gray]), name="faceless")
    assert "image 0: black placeholder crop" in str(info.value) and "image 1: no face found" in str(info.value)
    model, clip, vae = sd15
    with caplog.at_level("INFO", logger="sefi"):
        identity = host.run("SeFiTrainIdentity", model=model, clip=clip, vae=vae,
                            images=torch.cat([black, photo, gray]), **_args(name="one_face", overwrite=True))[0]
    assert len(identity.image_hashes) == 1
    assert "dropped 2 of 3 image(s) without a face: image 0: black placeholder crop" in caplog.text
    assert "image 2: no face found" in caplog.text
    # a face mask marks the face where the detector (made for photographs) sees none: drawings, renders
    photos = pack.glue("training_photos")
    pics = [black, photo, gray]
    kept, masks, _ = photos.drop_faceless(pics, [torch.zeros(1, h, w), face_mask, face_mask], photos.survey(pics),
                                          "masked")
    assert len(kept) == 2 and kept[1] is gray and masks[1] is face_mask


def test_an_emptied_mask_is_named_as_the_problem_not_the_face(host, pack, photo):
    """A mask shrunk away (SeFi Face Mask's grow=-1024) was reported as "SeFi Face Mask found no face"."""
    h, w = photo.shape[1:3]
    with pytest.raises(ValueError, match=r"mask 0 \(counted from 0\) is all zeros although its image shows a "
                                         r"face: the mask was shrunk away"):
        _refused(host, photo, name="emptied", mask=torch.zeros(1, h, w))


def test_wrong_things_linked_into_the_trainer_are_named(host, pack, photo):
    h, w = photo.shape[1:3]
    with pytest.raises(TypeError, match=r"SeFi Train Identity: input 'name' got an IMAGE \[1, \d+, \d+, 3\], "
                                        r"but it takes text"):
        _refused(host, photo, name=photo)
    with pytest.raises(TypeError, match="input 'mask' got an IMAGE .*but it takes a MASK"):
        _refused(host, photo, mask=photo)  # trained and saved with an IMAGE taken for a mask
    with pytest.raises(TypeError, match="input 'images' got a MASK .*but it takes an IMAGE"):
        _refused(host, torch.ones(1, h, w))
    with pytest.raises(TypeError, match="input 'model' got an IMAGE"):
        host.run("SeFiTrainIdentity", model=photo, clip=None, vae=None, images=photo, **_args(name="typed"))
    with pytest.raises(ValueError, match="kv_split must be true or false, got 'yes'"):
        _refused(host, photo, kv_split="yes")
    with pytest.raises(ValueError, match="trigger 'a' is a function word"):  # also a word of the templates
        _refused(host, photo, trigger="a")


def test_boolean_strings_at_the_node_mean_what_they_say(host, sd15, pack, photo):
    identity = _train(host, sd15, photo, name="bool_strings", overwrite="true", kv_split="false")[0]
    assert identity.training["generator"]["kv_split"] is False


def test_a_refused_fresh_run_still_clears_its_names_debris(host, sd15, pack, photo, caplog):
    """A kill -9 while writing leaves a temp file; the refused fresh run of that name (an unfinished checkpoint is
    there) removes it too, not only a resume."""
    ckpt = _interrupted_run(host, sd15, photo, pack, "debris")
    temp = ckpt.parent / f".{ckpt.name}.0123456789ab.tmp"
    temp.write_bytes(b"half a checkpoint")
    with caplog.at_level("INFO", logger="sefi"), pytest.raises(FileExistsError, match="resume_from=debris"):
        _refused(host, photo, name="debris")
    assert not temp.exists() and "left over from an interrupted write" in caplog.text
    assert ckpt.is_file()
