"""Cancel as a user presses it: POST /interrupt to a running server while SeFiTrainIdentity trains (issue 11,
point 1). The host raises the interrupt from inside the node's progress-bar update; the trainer must still save the
step it reached, say so in the log, stop the queue, and continue from there when resumed."""
from __future__ import annotations

import json
import re
import time

from safetensors import safe_open

STEPS = 20


def _graph(ckpt_name: str, image: str, **train):
    inputs = dict(model=["1", 0], clip=["1", 1], vae=["1", 2], images=["2", 0], name="srv_cut", trigger="sks",
                  initializer="person", steps=STEPS, learning_rate=0.0, stages=2, vectors_per_token=1,
                  parametrisation="direct tokens", kv_split=True, attention_loss="off", attention_weight=0.003,
                  loss_sites="quarter", masked_diffusion_loss=False, prompt_templates="a photo of the face of {}",
                  flip_augmentation=False, scale_augmentation=False, seed=5, resolution=64, batch_size=1,
                  checkpoint_every=0, resume_from="", overwrite=False, precision="auto",
                  gradient_checkpointing=False)
    inputs.update(train)
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
            "2": {"class_type": "LoadImage", "inputs": {"image": image}},
            "3": {"class_type": "SeFiTrainIdentity", "inputs": inputs}}


def _wait_for(predicate, timeout: float, what: str, log):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; server log tail:\n{log()[-3000:]}")


def test_post_interrupt_saves_the_step_reached_and_resume_continues_from_it(server, faces_dir):
    client = server.client
    ckpt_name = next((server.models_dir / "checkpoints").iterdir()).name
    image = client.upload_image(faces_dir / "obama_1.jpg", name="cancel_face.jpg")
    start = len(server.log())
    prompt_id = client.queue(_graph(ckpt_name, image))
    _wait_for(lambda: "srv_cut step 1/" in server.log()[start:], 300, "the first training step", server.log)
    client.interrupt()  # what the UI's Cancel button sends
    entry = _wait_for(lambda: client.get(f"/history/{prompt_id}").get(prompt_id), 120, "the prompt to end",
                      server.log)
    status = entry.get("status") or {}
    assert status.get("status_str") == "error" and any(m[0] == "execution_interrupted" for m in status["messages"])
    log = server.log()[start:]
    found = re.search(r"srv_cut: interrupted at step (\d+)/20, checkpoint (\S+)", log)
    assert found, log[-3000:]
    reached = int(found.group(1))
    ckpt = server.models_dir / "sefi_identities" / "checkpoints" / "srv_cut.sefi-train"
    assert found.group(2) == str(ckpt) and 1 <= reached < STEPS
    with safe_open(str(ckpt), framework="pt") as f:
        assert int(f.metadata()["sefi.step"]) == reached
    assert not (server.models_dir / "sefi_identities" / "srv_cut.safetensors").exists()

    client.run(_graph(ckpt_name, image, resume_from="srv_cut"), timeout=600)
    with safe_open(str(server.models_dir / "sefi_identities" / "srv_cut.safetensors"), framework="pt") as f:
        training = json.loads(f.metadata()["sefi.training"])
    assert training["resumed_at_step"] == reached and training["steps_done"] == STEPS
    assert not ckpt.exists()  # finished, keep_checkpoint off: the checkpoint is deleted
