"""What the tests that train through a live server share: the server made ready (its checkpoint's name, a face
photo uploaded) and the API graph checkpoint → photo → SeFi Train Identity, every widget given as a client sends
it."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def ready_to_train(server, photo: Path, upload_as: str):
    """(client, the server's checkpoint name, the uploaded photo's name)."""
    client = server.client
    ckpt_name = next((server.models_dir / "checkpoints").iterdir()).name
    return client, ckpt_name, client.upload_image(photo, name=upload_as)


TRAINER_INPUTS = ("name", "trigger", "initializer", "steps", "learning_rate", "resolution", "mask", "preview_every",
                  "sample_prompt", "sample_every", "save_every")
"""The trainer's own inputs; every other setting goes to its SeFi Training Options node."""


def train_graph(ckpt_name: str, image: str, **train: Any) -> dict[str, Any]:
    """The API graph; `train` replaces any of the trainer's or its options' inputs (a short, lr-0 run by default)."""
    values = dict(name="api_train", trigger="sks", initializer="person", steps=1, learning_rate=0.0, stages=1,
                  vectors_per_token=1, parametrisation="direct tokens", kv_split=True, attention_loss="off",
                  attention_weight=0.003, loss_sites="quarter", masked_diffusion_loss=False,
                  prompt_templates="a photo of the face of {}", flip_augmentation=False, scale_augmentation=False,
                  seed=5, resolution=64, batch_size=1, checkpoint_every=0, resume_from="", overwrite=False,
                  precision="auto", gradient_checkpointing=False, keep_checkpoint=False,
                  allow_multiple_people=False, compile_unet=False, stop_on_watch_failure=False)
    values.update(train)
    inputs = {k: v for k, v in values.items() if k in TRAINER_INPUTS}
    inputs.update(model=["1", 0], clip=["1", 1], vae=["1", 2], images=["2", 0], options=["4", 0])
    return {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
            "2": {"class_type": "LoadImage", "inputs": {"image": image}},
            "3": {"class_type": "SeFiTrainIdentity", "inputs": inputs},
            "4": {"class_type": "SeFiTrainingOptions",
                  "inputs": {k: v for k, v in values.items() if k not in TRAINER_INPUTS}}}
