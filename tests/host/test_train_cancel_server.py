"""Cancel as a user presses it: POST /interrupt to a running server while SeFiTrainIdentity trains (issue 11,
point 1). The host raises the interrupt from inside the node's progress-bar update; the trainer must still save the
step it reached, say so in the log, stop the queue, and continue from there when resumed."""
from __future__ import annotations

import json
import re
import time

from safetensors import safe_open

from .server_training import ready_to_train, train_graph

STEPS = 20


def _graph(ckpt_name: str, image: str, **train):
    return train_graph(ckpt_name, image, **{"name": "srv_cut", "steps": STEPS, "stages": 2, **train})


def _wait_for(predicate, timeout: float, what: str, log):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}; server log tail:\n{log()[-3000:]}")


def test_post_interrupt_saves_the_step_reached_and_resume_continues_from_it(server, faces_dir):
    client, ckpt_name, image = ready_to_train(server, faces_dir / "obama_1.jpg", "cancel_face.jpg")
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
