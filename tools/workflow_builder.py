"""The example workflows in workflows/: one compact description per graph, written out in both formats.

Each workflow is described once, below, as nodes with named inputs (widget values or links to another node's
output). From that description this module writes
  workflows/<name>.json          the UI format ComfyUI's "Save" writes (what users open), and
  workflows/api/<name>.api.json  its API-format twin (what POST /prompt takes; the tests run these).
The API twins live in a subfolder because ComfyUI lists every *.json directly in a pack's workflows/ folder as a
workflow template, and an API-format file is not a loadable template.

The UI format needs each node's input order, sockets and outputs; those come from a live host's /object_info
(core nodes and this pack) and, for the one third-party pack used (06), from THIRD_PARTY_SPECS below, copied
from its source. Regenerate after changing a description or a node's inputs:

    python -m tools.workflow_builder                  # boots the host (COMFYUI_PATH picks upstream), writes
    python -m tools.workflow_builder --object-info F  # uses a saved /object_info JSON instead

tests/workflows/test_workflows.py checks that the committed files are what this module writes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS_DIR = REPO_ROOT / "workflows"
API_DIR = WORKFLOWS_DIR / "api"

# File names as a user has them; the tests substitute their tiny fixtures.
CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
CONTROLNET = "control_v11p_sd15_canny.safetensors"
IDENTITY = "my_identity.safetensors"
IDENTITY_2 = "friend_identity.safetensors"
PHOTO = "face.png"
PHOTO_2 = "friend.png"
DRIVING_PHOTO = "driving_face.png"
SEED = 42
# The miniature world (world/, docs/world.md): its checkpoint and the held-out person's studio photo and face mask,
# as `make serve` writes them (world.checkpoint.NAME, world.demo.write_photo; tests check the names agree).
WORLD_CHECKPOINT = "world-sd15.safetensors"
WORLD_PHOTO = "world_person_0.png"
WORLD_MASK = "world_person_0_mask.png"
# world.demo.REQUESTS as prompts: each another scene than the studio photo, the last two with an attribute edit.
WORLD_PROMPTS = ("a portrait photo of a sks person on a beach",
                 "a close-up photo of the face of a sks person in a forest",
                 "a portrait photo of a sks person wearing a hat, at night",
                 "a close-up photo of the face of a sks person wearing glasses, in the snow")
NEGATIVE = "blurry, lowres, deformed face, extra fingers, watermark, text"

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = ("seed", "noise_seed")

# kijai/ComfyUI-LivePortraitKJ 1.1.0 (pyproject version; main at commit 4d9dc62, 2024-08-05), nodes.py, in
# /object_info form: only what the UI format needs (input order, socket types, widget defaults, outputs).
LIVEPORTRAIT_PACK = "kijai/ComfyUI-LivePortraitKJ 1.1.0 (commit 4d9dc62)"
THIRD_PARTY_SPECS: dict[str, dict[str, Any]] = {
    "DownloadAndLoadLivePortraitModels": {
        "input": {"required": {}, "optional": {"precision": [["fp16", "fp32", "auto"], {"default": "auto"}],
                                               "mode": [["human", "animal"]]}},
        "output": ["LIVEPORTRAITPIPE"], "output_name": ["live_portrait_pipe"],
        "display_name": "(Down)Load LivePortraitModels"},
    "LivePortraitLoadMediaPipeCropper": {
        "input": {"required": {"landmarkrunner_onnx_device": [["CPU", "CUDA", "ROCM", "CoreML", "torch_gpu"],
                                                              {"default": "CPU"}],
                               "keep_model_loaded": ["BOOLEAN", {"default": True}]}},
        "output": ["LPCROPPER"], "output_name": ["cropper"],
        "display_name": "LivePortrait Load MediaPipeCropper"},
    "LivePortraitCropper": {
        "input": {"required": {
            "pipeline": ["LIVEPORTRAITPIPE"], "cropper": ["LPCROPPER"], "source_image": ["IMAGE"],
            "dsize": ["INT", {"default": 512, "min": 64, "max": 2048}],
            "scale": ["FLOAT", {"default": 2.3, "min": 1.0, "max": 4.0, "step": 0.01}],
            "vx_ratio": ["FLOAT", {"default": 0.0, "min": -1.0, "max": 1.0, "step": 0.001}],
            "vy_ratio": ["FLOAT", {"default": -0.125, "min": -1.0, "max": 1.0, "step": 0.001}],
            "face_index": ["INT", {"default": 0, "min": 0, "max": 100}],
            "face_index_order": [["large-small", "left-right", "right-left", "top-bottom", "bottom-top",
                                  "small-large", "distance-from-retarget-face"]],
            "rotate": ["BOOLEAN", {"default": True}]}},
        "output": ["IMAGE", "CROPINFO"], "output_name": ["cropped_image", "crop_info"],
        "display_name": "LivePortrait Cropper"},
    "LivePortraitProcess": {
        "input": {"required": {
            "pipeline": ["LIVEPORTRAITPIPE"], "crop_info": ["CROPINFO", {"default": {}}],
            "source_image": ["IMAGE"], "driving_images": ["IMAGE"],
            "lip_zero": ["BOOLEAN", {"default": False}],
            "lip_zero_threshold": ["FLOAT", {"default": 0.03, "min": 0.001, "max": 4.0, "step": 0.001}],
            "stitching": ["BOOLEAN", {"default": True}],
            "delta_multiplier": ["FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.001}],
            "mismatch_method": [["constant", "cycle", "mirror", "cut"], {"default": "constant"}],
            "relative_motion_mode": [["relative", "source_video_smoothed", "relative_rotation_only",
                                      "single_frame", "off"]],
            "driving_smooth_observation_variance": ["FLOAT", {"default": 3e-6, "min": 1e-11, "max": 1e-2,
                                                              "step": 1e-11}]},
            "optional": {
                "opt_retargeting_info": ["RETARGETINGINFO", {"default": None}],
                "expression_friendly": ["BOOLEAN", {"default": False}],
                "expression_friendly_multiplier": ["FLOAT", {"default": 1.0, "min": 0.01, "max": 100.0,
                                                             "step": 0.001}]}},
        "output": ["IMAGE", "LP_OUT"], "output_name": ["cropped_image", "output"],
        "display_name": "LivePortrait Process"},
    "LivePortraitComposite": {
        "input": {"required": {"source_image": ["IMAGE"], "cropped_image": ["IMAGE"],
                               "liveportrait_out": ["LP_OUT"]},
                  "optional": {"mask": ["MASK", {"default": None}]}},
        "output": ["IMAGE", "MASK"], "output_name": ["full_images", "mask"],
        "display_name": "LivePortrait Composite"},
}


# ---------------------------------------------------------------------------------------------------------------
# Specs: the parts of an /object_info entry the formats need.

def input_specs(spec: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any], bool]]:
    """(name, type, options, optional) of every input in the order the frontend creates them."""
    inputs = spec.get("input", {})
    order = spec.get("input_order") or {sec: list(inputs.get(sec, {})) for sec in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            entry = inputs[section][name]
            out.append((name, entry[0], entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {},
                        section == "optional"))
    return out


def is_widget(kind: Any, options: dict[str, Any]) -> bool:
    """The frontend makes a widget (not a socket) for primitive and COMBO inputs unless forceInput is set."""
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not options.get("forceInput")


def combo_options(kind: Any, options: dict[str, Any]) -> list[Any] | None:
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return list(options.get("options", []))
    return None


def extra_widget_value(name: str, kind: Any, options: dict[str, Any]) -> tuple[bool, Any]:
    """Widgets the frontend adds for an input, saved in widgets_values but not sent to the API:
    control_after_generate right after seed-like INTs, the upload button of an image_upload COMBO (after all the
    node's widgets: LoadImageMask saves [image, channel, "image"])."""
    if kind == "INT" and (options.get("control_after_generate") or name in SEED_NAMES):
        return True, "fixed"
    if options.get("image_upload"):
        return True, "image"
    return False, None


def default_value(workflow: str, node_type: str, name: str, kind: Any, options: dict[str, Any]) -> Any:
    """The value a freshly added node shows: the input's default, else a COMBO's first choice."""
    if "default" in options:
        return options["default"]
    choices = combo_options(kind, options)
    if choices:
        return choices[0]
    raise ValueError(f"{workflow}: {node_type}.{name} has no default; give it a value in the description")


def socket_type(kind: Any) -> str:
    return "COMBO" if isinstance(kind, list) else kind


# ---------------------------------------------------------------------------------------------------------------
# Descriptions.

@dataclass(frozen=True)
class Out:
    node: Node
    slot: int


@dataclass
class Node:
    id: int
    type: str
    col: int
    inputs: dict[str, Any]
    title: str | None = None

    def __getitem__(self, slot: int) -> Out:
        return Out(self, slot)


@dataclass
class Workflow:
    name: str
    summary: str
    nodes: list[Node] = field(default_factory=list)
    third_party: tuple[str, ...] = ()

    def add(self, type_: str, *, col: int, title: str | None = None, **inputs: Any) -> Node:
        node = Node(len(self.nodes) + 1, type_, col, inputs, title)
        self.nodes.append(node)
        return node


def _checkpoint(wf: Workflow, col: int = 0) -> Node:
    return wf.add("CheckpointLoaderSimple", col=col, ckpt_name=CHECKPOINT)


def _sampler(wf: Workflow, col: int, model: Out, positive: Out, negative: Out, latent: Out,
             title: str | None = None) -> Node:
    return wf.add("KSampler", col=col, title=title, model=model, seed=SEED, steps=25, cfg=7.0,
                  sampler_name="dpmpp_2m", scheduler="karras", positive=positive, negative=negative,
                  latent_image=latent, denoise=1.0)


def train_identity() -> Workflow:
    wf = Workflow("01_train_identity", "A face photo → SeFi Face Mask (aligned crop + mask) → SeFi Train Identity "
                  "with the checkpoint's MODEL/CLIP/VAE, its less-touched settings on SeFi Training Options; the "
                  "node shows the loss curve and sample renders while it trains and saves a snapshot every 100 "
                  "steps; previews the crop, the loss curve and the attention maps, saves the samples. Saves "
                  "models/sefi_identities/my_identity.safetensors (and my_identity@<step>.safetensors).")
    photo = wf.add("LoadImage", col=0, title="Face photo", image=PHOTO)
    ckpt = _checkpoint(wf, col=0)
    faces = wf.add("SeFiFaceMask", col=1, image=photo[0], backend="auto", which_face="largest", face_index=0,
                   mask_shape="ellipse", grow=0, feather=0, crop_size=512, crop_margin=0.25, on_no_face="error",
                   insightface_pack="antelopev2")
    wf.add("PreviewImage", col=1, title="Face crop", images=faces[1])
    options = wf.add("SeFiTrainingOptions", col=1, stages=5, vectors_per_token=1,
                     parametrisation="self-attention generator", kv_split=True, attention_loss="reference",
                     attention_weight=0.003, loss_sites="quarter", masked_diffusion_loss=False,
                     prompt_templates="a photo of the face of {}\na close-up photo of {}", flip_augmentation=False,
                     scale_augmentation=False, seed=0, batch_size=1, checkpoint_every=100, resume_from="",
                     overwrite=False, precision="auto", gradient_checkpointing=False, keep_checkpoint=False,
                     allow_multiple_people=False, compile_unet=False, stop_on_watch_failure=False)
    train = wf.add("SeFiTrainIdentity", col=2, model=ckpt[0], clip=ckpt[1], vae=ckpt[2], images=faces[1],
                   mask=faces[2], options=options[0], name="my_identity", trigger="sks", initializer="person",
                   steps=600, learning_rate=0.0, resolution=512, preview_every=25,
                   sample_prompt="a photo of sks person, smiling\na photo of sks person in a park, golden hour",
                   sample_every=100, save_every=100)
    wf.add("PreviewImage", col=3, title="Loss curve", images=train[1])
    wf.add("PreviewImage", col=3, title="Attention maps", images=train[4])
    wf.add("SaveImage", col=3, title="Samples", images=train[3], filename_prefix="sefi/training_samples")
    return wf


def generate_with_identity() -> Workflow:
    wf = Workflow("02_generate_with_identity", "Load a trained identity and use its trigger word in a prompt: "
                  "SeFi Apply Identity gives the KSampler both the patched MODEL and the positive CONDITIONING.")
    ckpt = _checkpoint(wf)
    ident = wf.add("SeFiLoadIdentity", col=0, identity_name=IDENTITY)
    apply = wf.add("SeFiApplyIdentity", col=1, model=ckpt[0], clip=ckpt[1], identity=ident[0],
                   text="a photo of sks person, smiling, in a park, golden hour", strength=1.0, start_percent=0.0,
                   end_percent=1.0)
    neg = wf.add("CLIPTextEncode", col=1, title="Negative prompt", text=NEGATIVE, clip=ckpt[1])
    latent = wf.add("EmptyLatentImage", col=1, width=512, height=512, batch_size=1)
    sample = _sampler(wf, 2, apply[0], apply[1], neg[0], latent[0])
    image = wf.add("VAEDecode", col=3, samples=sample[0], vae=ckpt[2])
    wf.add("SaveImage", col=3, images=image[0], filename_prefix="sefi/portrait")
    return wf


def reenactment_controlnet() -> Workflow:
    wf = Workflow("03_reenactment_controlnet", "The identity takes the head pose and expression of another "
                  "person's photo: Canny edges of the driving face, kept inside its SeFi Face Mask, drive a "
                  "ControlNet applied to SeFi Apply Identity's conditioning.")
    ckpt = _checkpoint(wf)
    ident = wf.add("SeFiLoadIdentity", col=0, identity_name=IDENTITY)
    driving = wf.add("LoadImage", col=0, title="Driving face (pose + expression)", image=DRIVING_PHOTO)
    faces = wf.add("SeFiFaceMask", col=1, image=driving[0], backend="auto", which_face="largest", face_index=0,
                   mask_shape="landmark hull", grow=24, feather=16, crop_size=512, crop_margin=0.25,
                   on_no_face="error", insightface_pack="antelopev2")
    edges = wf.add("Canny", col=1, image=driving[0], low_threshold=0.2, high_threshold=0.5)
    mask_image = wf.add("MaskToImage", col=2, mask=faces[0])
    control = wf.add("ImageBlend", col=2, title="Face edges only", image1=edges[0], image2=mask_image[0],
                     blend_factor=1.0, blend_mode="multiply")
    wf.add("PreviewImage", col=2, title="Control image", images=control[0])
    apply = wf.add("SeFiApplyIdentity", col=1, model=ckpt[0], clip=ckpt[1], identity=ident[0],
                   text="a photo of sks person, studio portrait, soft light", strength=1.0, start_percent=0.0,
                   end_percent=1.0)
    neg = wf.add("CLIPTextEncode", col=1, title="Negative prompt", text=NEGATIVE, clip=ckpt[1])
    cnet = wf.add("ControlNetLoader", col=2, control_net_name=CONTROLNET)
    applied = wf.add("ControlNetApplyAdvanced", col=3, positive=apply[1], negative=neg[0], control_net=cnet[0],
                     image=control[0], strength=0.8, start_percent=0.0, end_percent=0.8)
    latent = wf.add("EmptyLatentImage", col=3, width=512, height=512, batch_size=1)
    sample = _sampler(wf, 4, apply[0], applied[0], applied[1], latent[0])
    image = wf.add("VAEDecode", col=5, samples=sample[0], vae=ckpt[2])
    wf.add("SaveImage", col=5, images=image[0], filename_prefix="sefi/reenactment")
    return wf


VIEWS = (("front", "front view, looking at the camera"),
         ("three-quarter", "three-quarter view, head turned slightly to the left"),
         ("profile", "side view, profile, head turned to the left"),
         ("looking up", "looking up, low angle shot"),
         ("looking down", "looking down, high angle shot"))


def multiview() -> Workflow:
    wf = Workflow("04_multiview", "One identity, one seed, five view prompts (front, three-quarter, profile, "
                  "looking up, looking down) sampled side by side and saved as one batch, shown as a grid.")
    ckpt = _checkpoint(wf)
    ident = wf.add("SeFiLoadIdentity", col=0, identity_name=IDENTITY)
    neg = wf.add("CLIPTextEncode", col=0, title="Negative prompt", text=NEGATIVE, clip=ckpt[1])
    latent = wf.add("EmptyLatentImage", col=0, width=512, height=512, batch_size=1)
    samples = []
    for title, view in VIEWS:
        apply = wf.add("SeFiApplyIdentity", col=1, title=f"View: {title}", model=ckpt[0], clip=ckpt[1],
                       identity=ident[0], text=f"a photo of sks person, {view}, plain grey background",
                       strength=1.0, start_percent=0.0, end_percent=1.0)
        samples.append(_sampler(wf, 2, apply[0], apply[1], neg[0], latent[0], title=f"KSampler: {title}"))
    batch = samples[0][0]
    # LatentBatch, though frontend 1.58 labels it deprecated: its successor (BatchLatentsNode) is in neither tested
    # host, upstream 0.3.64 nor PyPI 0.0.1 (workflows/README.md). The same in 07.
    for sample in samples[1:]:
        batch = wf.add("LatentBatch", col=3, samples1=batch, samples2=sample[0])[0]
    image = wf.add("VAEDecode", col=4, samples=batch, vae=ckpt[2])
    wf.add("SaveImage", col=4, title="Views (grid)", images=image[0], filename_prefix="sefi/multiview")
    return wf


def two_identities() -> Workflow:
    wf = Workflow("05_two_identities", "Two identities in one prompt: each has its own trigger word (sks, zwx); "
                  "connect the second to identity_2 of the same SeFi Apply Identity.")
    ckpt = _checkpoint(wf)
    first = wf.add("SeFiLoadIdentity", col=0, title="Identity 1 (sks)", identity_name=IDENTITY)
    second = wf.add("SeFiLoadIdentity", col=0, title="Identity 2 (zwx)", identity_name=IDENTITY_2)
    apply = wf.add("SeFiApplyIdentity", col=1, model=ckpt[0], clip=ckpt[1], identity=first[0],
                   text="a photo of sks person and zwx person standing side by side, smiling, in a park",
                   strength=1.0, start_percent=0.0, end_percent=1.0, identity_2=second[0])
    neg = wf.add("CLIPTextEncode", col=1, title="Negative prompt", text=NEGATIVE, clip=ckpt[1])
    latent = wf.add("EmptyLatentImage", col=1, width=768, height=512, batch_size=1)
    sample = _sampler(wf, 2, apply[0], apply[1], neg[0], latent[0])
    image = wf.add("VAEDecode", col=3, samples=sample[0], vae=ckpt[2])
    wf.add("SaveImage", col=3, images=image[0], filename_prefix="sefi/two_identities")
    return wf


def liveportrait_chain() -> Workflow:
    wf = Workflow("06_liveportrait_chain", "A generated portrait of the identity as the source image of "
                  "LivePortrait (kijai/ComfyUI-LivePortraitKJ): the driving photo's head pose and expression are "
                  "transferred onto it. Needs that pack installed.",
                  third_party=tuple(THIRD_PARTY_SPECS))
    ckpt = _checkpoint(wf)
    ident = wf.add("SeFiLoadIdentity", col=0, identity_name=IDENTITY)
    apply = wf.add("SeFiApplyIdentity", col=1, model=ckpt[0], clip=ckpt[1], identity=ident[0],
                   text="a photo of sks person, head and shoulders portrait, looking at the camera, neutral "
                        "expression, plain background", strength=1.0, start_percent=0.0, end_percent=1.0)
    neg = wf.add("CLIPTextEncode", col=1, title="Negative prompt", text=NEGATIVE, clip=ckpt[1])
    latent = wf.add("EmptyLatentImage", col=1, width=512, height=512, batch_size=1)
    sample = _sampler(wf, 2, apply[0], apply[1], neg[0], latent[0])
    portrait = wf.add("VAEDecode", col=3, samples=sample[0], vae=ckpt[2])
    wf.add("SaveImage", col=3, title="Portrait", images=portrait[0], filename_prefix="sefi/portrait")
    pipe = wf.add("DownloadAndLoadLivePortraitModels", col=2, precision="auto", mode="human")
    cropper = wf.add("LivePortraitLoadMediaPipeCropper", col=2, landmarkrunner_onnx_device="CPU",
                     keep_model_loaded=True)
    driving = wf.add("LoadImage", col=3, title="Driving face (pose + expression)", image=DRIVING_PHOTO)
    crop = wf.add("LivePortraitCropper", col=4, pipeline=pipe[0], cropper=cropper[0], source_image=portrait[0],
                  dsize=512, scale=2.3, vx_ratio=0.0, vy_ratio=-0.125, face_index=0,
                  face_index_order="large-small", rotate=True)
    process = wf.add("LivePortraitProcess", col=5, pipeline=pipe[0], crop_info=crop[1], source_image=portrait[0],
                     driving_images=driving[0], lip_zero=False, lip_zero_threshold=0.03, stitching=True,
                     delta_multiplier=1.0, mismatch_method="constant", relative_motion_mode="single_frame",
                     driving_smooth_observation_variance=3e-6, expression_friendly=False,
                     expression_friendly_multiplier=1.0)
    composite = wf.add("LivePortraitComposite", col=6, source_image=portrait[0], cropped_image=process[0],
                       liveportrait_out=process[1])
    wf.add("SaveImage", col=6, title="Reenacted portrait", images=composite[0],
           filename_prefix="sefi/liveportrait")
    return wf


def world_identity() -> Workflow:
    wf = Workflow("07_world_identity", "The miniature world (docs/world.md; `make serve` puts its checkpoint, photo "
                  "and mask in place): a held-out person's studio photo and the world's own face mask → SeFi Train "
                  "Identity (64 px, loss_sites all on SeFi Training Options: the world's one attention site is at "
                  "the full latent; samples of two prompts every 25 steps on the node) → four prompts in other "
                  "scenes, two with an attribute edit, shown 4× enlarged.")
    photo = wf.add("LoadImage", col=0, title="World photo (held-out person 0)", image=WORLD_PHOTO)
    mask = wf.add("LoadImageMask", col=0, title="Its face mask", image=WORLD_MASK, channel="red")
    ckpt = wf.add("CheckpointLoaderSimple", col=0, ckpt_name=WORLD_CHECKPOINT)
    options = wf.add("SeFiTrainingOptions", col=0, loss_sites="all", checkpoint_every=50)
    train = wf.add("SeFiTrainIdentity", col=1, model=ckpt[0], clip=ckpt[1], vae=ckpt[2], images=photo[0],
                   mask=mask[0], options=options[0], name="world_person_0", trigger="sks", initializer="person",
                   steps=150, resolution=64, preview_every=5, sample_prompt="\n".join(WORLD_PROMPTS[:2]),
                   sample_every=25, save_every=50)
    wf.add("PreviewImage", col=2, title="Loss curve", images=train[1])
    wf.add("PreviewImage", col=2, title="Attention maps", images=train[4])
    wf.add("PreviewImage", col=2, title="Samples while training", images=train[3])
    neg = wf.add("CLIPTextEncode", col=1, title="Negative prompt (empty)", text="", clip=ckpt[1])
    latent = wf.add("EmptyLatentImage", col=1, width=64, height=64, batch_size=1)
    batch = None
    for i, text in enumerate(WORLD_PROMPTS):
        apply = wf.add("SeFiApplyIdentity", col=2, title=f"Prompt {i + 1}", model=ckpt[0], clip=ckpt[1],
                       identity=train[0], text=text, strength=1.0, start_percent=0.0, end_percent=1.0)
        sample = wf.add("KSampler", col=3, title=f"KSampler {i + 1}", model=apply[0], seed=SEED + i, steps=20,
                        cfg=5.0, sampler_name="euler", scheduler="normal", positive=apply[1], negative=neg[0],
                        latent_image=latent[0], denoise=1.0)
        batch = sample[0] if batch is None else wf.add("LatentBatch", col=4, samples1=batch, samples2=sample[0])[0]
    image = wf.add("VAEDecode", col=5, samples=batch, vae=ckpt[2])
    big = wf.add("ImageScaleBy", col=5, title="4× (nearest)", image=image[0], upscale_method="nearest-exact",
                 scale_by=4.0)
    wf.add("SaveImage", col=6, images=big[0], filename_prefix="sefi/world")
    return wf


WORKFLOWS: tuple[Callable[[], Workflow], ...] = (train_identity, generate_with_identity, reenactment_controlnet,
                                                 multiview, two_identities, liveportrait_chain,
                                                 world_identity)


def all_workflows() -> list[Workflow]:
    return [build() for build in WORKFLOWS]


# ---------------------------------------------------------------------------------------------------------------
# Writers.

def complete(wf: Workflow, specs: dict[str, dict[str, Any]]) -> Workflow:
    """Give every widget a value (an input added to a node after its description was written gets the value a
    freshly added node shows) and put each node's inputs in the node's input order."""
    for node in wf.nodes:
        spec = specs.get(node.type)
        if spec is None:
            raise KeyError(f"{wf.name}: no node spec for {node.type} (not in /object_info, not third-party)")
        ordered = {}
        for name, kind, options, _ in input_specs(spec):
            if name in node.inputs:
                ordered[name] = node.inputs[name]
            elif is_widget(kind, options):
                ordered[name] = default_value(wf.name, node.type, name, kind, options)
        unknown = set(node.inputs) - set(ordered)
        if unknown:
            raise KeyError(f"{wf.name}: {node.type} has no input(s) {sorted(unknown)}")
        node.inputs = ordered
    return wf


def to_api(wf: Workflow) -> dict[str, Any]:
    """The API format: {"<id>": {"inputs": {name: value | [source_id, slot]}, "class_type", "_meta"}}."""
    graph = {}
    for node in wf.nodes:
        inputs = {name: [str(v.node.id), v.slot] if isinstance(v, Out) else v for name, v in node.inputs.items()}
        entry: dict[str, Any] = {"inputs": inputs, "class_type": node.type}
        if node.title:
            entry["_meta"] = {"title": node.title}
        graph[str(node.id)] = entry
    return graph


def _order(wf: Workflow) -> dict[int, int]:
    """Execution order (topological, ties by id), as the frontend writes it in each node's "order"."""
    deps = {n.id: {v.node.id for v in n.inputs.values() if isinstance(v, Out)} for n in wf.nodes}
    order: dict[int, int] = {}
    while len(order) < len(deps):
        ready = [i for i in sorted(deps) if i not in order and deps[i] <= set(order)]
        if not ready:
            raise ValueError(f"{wf.name}: the graph has a cycle")
        order[ready[0]] = len(order)
    return order


def _size(sockets: int, outputs: int, widgets: list[tuple[str, Any, dict]],
          node_type: str) -> list[int]:
    width = 320
    height = 6 + 22 * max(sockets, outputs, 1)
    for name, kind, options in widgets:
        if kind == "STRING" and options.get("multiline"):
            height += 110
            width = 420
        else:
            height += 24 * (2 if extra_widget_value(name, kind, options)[0] else 1)
    # Room for the picture the node draws below its widgets: the image it shows or loads. Every frontend draws it
    # inside the node's saved size if it fits; the 1.5x frontend grows a node that is too short (over the next).
    if node_type in ("PreviewImage", "SaveImage") or any(options.get("image_upload") for _, _, options in widgets):
        height += 260
        width = max(width, 300)
    return [width, height]


def to_ui(wf: Workflow, specs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The UI format ComfyUI's Save writes (workflow version 0.4): positional widgets_values, link table."""
    order = _order(wf)
    links: list[list[Any]] = []
    out_links: dict[tuple[int, int], list[int]] = {}
    ui_nodes: list[dict[str, Any]] = []
    for node in wf.nodes:
        spec = specs.get(node.type)
        if spec is None:
            raise KeyError(f"{wf.name}: no node spec for {node.type} (not in /object_info, not third-party)")
        known = {name for name, *_ in input_specs(spec)}
        unknown = set(node.inputs) - known
        if unknown:
            raise KeyError(f"{wf.name}: {node.type} has no input(s) {sorted(unknown)}")
        inputs, values, uploads, widget_specs = [], [], [], []
        for name, kind, options, optional in input_specs(spec):
            given = node.inputs.get(name)
            if is_widget(kind, options):
                if isinstance(given, Out):
                    raise ValueError(f"{wf.name}: {node.type}.{name} is a widget; links to widgets are not used")
                if name not in node.inputs:
                    raise ValueError(f"{wf.name}: {node.type}.{name} has no value (run complete() first)")
                values.append(given)
                widget_specs.append((name, kind, options))
                has_extra, extra = extra_widget_value(name, kind, options)
                if has_extra:
                    # the frontends add the upload button as an input of its own after all the node's inputs
                    (uploads if options.get("image_upload") else values).append(extra)
                continue
            link_id = None
            if isinstance(given, Out):
                source_spec = specs[given.node.type]
                link_type = socket_type(source_spec["output"][given.slot])
                link_id = len(links) + 1
                links.append([link_id, given.node.id, given.slot, node.id, len(inputs), link_type])
                out_links.setdefault((given.node.id, given.slot), []).append(link_id)
            elif given is not None:
                raise ValueError(f"{wf.name}: {node.type}.{name} is a socket; give it a link")
            elif not optional:
                raise ValueError(f"{wf.name}: {node.type}.{name} is required and not connected")
            inputs.append({"name": name, "type": socket_type(kind), "link": link_id})
        values += uploads
        outputs = [{"name": (spec.get("output_name") or spec["output"])[i], "type": socket_type(t), "links": [],
                    "slot_index": i} for i, t in enumerate(spec["output"])]
        # Sized by the sockets every host shows: an unlinked optional socket that only one host declares
        # (e.g. upstream's ControlNetApplyAdvanced.vae) must not move the layout.
        shown = sum(1 for name, kind, options, optional in input_specs(spec)
                    if not is_widget(kind, options) and (not optional or name in node.inputs))
        ui: dict[str, Any] = {"id": node.id, "type": node.type, "pos": [0, 0],
                              "size": _size(shown, len(outputs), widget_specs, node.type),
                              "flags": {}, "order": order[node.id], "mode": 0, "inputs": inputs,
                              "outputs": outputs, "properties": {"Node name for S&R": node.type},
                              "widgets_values": values}
        if node.title:
            ui["title"] = node.title
        ui_nodes.append(ui)
    for ui in ui_nodes:
        for output in ui["outputs"]:
            output["links"] = out_links.get((ui["id"], output["slot_index"]), [])
    _layout(wf, ui_nodes)
    return {"last_node_id": max(n["id"] for n in ui_nodes), "last_link_id": len(links), "nodes": ui_nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def _layout(wf: Workflow, ui_nodes: list[dict[str, Any]]) -> None:
    """Columns left to right (the description's `col`), nodes stacked top-down in description order."""
    by_id = {n["id"]: n for n in ui_nodes}
    columns: dict[int, list[dict[str, Any]]] = {}
    for node in wf.nodes:
        columns.setdefault(node.col, []).append(by_id[node.id])
    x = 40
    for col in range(max(columns) + 1):
        members = columns.get(col, [])
        y = 60
        for ui in members:
            ui["pos"] = [x, y]
            y += ui["size"][1] + 70
        x += max((ui["size"][0] for ui in members), default=0) + 60


def names() -> list[str]:
    return [wf.name for wf in all_workflows()]


def load_ui(name: str) -> dict[str, Any]:
    return json.loads(ui_path(name).read_text())


def load_api(name: str) -> dict[str, Any]:
    return json.loads(api_path(name).read_text())


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def ui_path(name: str) -> Path:
    return WORKFLOWS_DIR / f"{name}.json"


def api_path(name: str) -> Path:
    return API_DIR / f"{name}.api.json"


def render(specs: dict[str, dict[str, Any]]) -> dict[Path, str]:
    """Every file this module writes, by path, as text."""
    specs = {**specs, **THIRD_PARTY_SPECS}
    files = {}
    for wf in all_workflows():
        complete(wf, specs)
        files[ui_path(wf.name)] = dumps(to_ui(wf, specs))
        files[api_path(wf.name)] = dumps(to_api(wf))
    return files


def live_object_info() -> dict[str, Any]:
    """Boot the host's server (host_boot.embedded_host; COMFYUI_PATH selects upstream) and read /object_info."""
    from batch import comfy_client
    from host_boot import embedded_host
    with tempfile.TemporaryDirectory(prefix="sefi-workflows-") as tmp:
        base = Path(tmp)
        port = comfy_client.free_port()
        with open(base / "server.log", "wb") as log:
            proc = subprocess.Popen(embedded_host.server_command(base, port), cwd=REPO_ROOT, stdout=log,
                                    stderr=subprocess.STDOUT)
            try:
                comfy_client.wait_until_ready(proc, f"http://127.0.0.1:{port}")
                return comfy_client.ComfyClient(f"http://127.0.0.1:{port}").object_info()
            finally:
                comfy_client.stop(proc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--object-info", type=Path, help="a saved /object_info JSON (default: boot the host)")
    args = parser.parse_args(argv)
    specs = json.loads(args.object_info.read_text()) if args.object_info else live_object_info()
    for path, text in render(specs).items():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
