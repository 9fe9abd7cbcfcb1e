"""SeFiTrainIdentity: learn a SeFi identity (per-stage K/V tokens) from face photos, inside ComfyUI.

The loop is sefi_core.training.run_training; the model side is nodes/training (SefiStep); names, checkpoint
folders and resume rules are nodes/train_policies.py. Files:
models/sefi_identities/<name>.safetensors (the identity) and models/sefi_identities/checkpoints/<name>.sefi-train
(resumable state; the loader lists only .safetensors, so checkpoints stay out of its dropdown).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from . import host
from .edges import GRAPH_HIDDEN, checked_inputs
from . import output_changes
from .identity import CATEGORY, IDENTITY
from .prompt_encoding import embedding_norms
from .sampling_support import check_model_sampling
from .sample_renders import SampleSpec, render_samples, sample_prompts
from .snapshots import STAGING_SUFFIX, RunSnapshots, existing_snapshots, new_run_id
from .train_options import NODE_NAME as OPTIONS_NODE_NAME
from .train_options import OPTION_INPUTS, TRAINING_OPTIONS, SeFiTrainingOptions, settings_values, training_options
from .train_inputs import check_entry, check_masks, check_photo_shapes, check_sample_prompts, log_sampling_cost
from .training_watch import PREVIEW_EVERY, SAMPLES_FOLDER, TrainingWatch, WatchFailedError, WatchSettings
from .train_policies import (CHECKPOINT_SUFFIX, PARAMETRISATIONS, check_name, check_resume_structure,
                             checkpoint_dir, identity_dir, load_checkpoint, log_resume_changes,
                             remove_stale_temp_files, resolve_checkpoint)
from .training import (DTYPE_NAMES, PRECISION_CHOICES, SefiStep, TextEncoder, attention_picture,
                       check_compile_available, compile_mode, fit_image, fit_mask, peak_memory_bytes,
                       reset_peak_memory, training_context)
from .training_photos import check_one_person, compare_with_checkpoint, drop_faceless, photo_records, survey
from ..sefi_core.generator import build_generator, rebuild_generator
from ..sefi_core.identity import Identity, save_identity
from ..sefi_core.identity_names import identity_file
from ..sefi_core.plot import render_loss_curve, term_shares
from ..sefi_core.token_scale import TokenScaleError
from ..sefi_core.tokens import check_trigger_apart_from_templates
from ..sefi_core.train_state import save_train_state
from ..sefi_core.training import TrainSettings, run_training

log = logging.getLogger("sefi")

DEFAULT_LR = {"self_attention": 1e-4, "direct": 5e-3}
LOG_EVERY = 25

NODE_NAME = "SeFi Train Identity"
HOST_OBJECTS = ("model", "clip", "vae")
"""Inputs checked where they are first used: every refusal that needs no model comes before them."""
WIDGETS = ("name", "trigger", "initializer", "steps", "learning_rate", "resolution")
"""The trainer's own single-value widgets, in the order _train() unpacks them (INPUT_IS_LIST hands each over as a
list); every other setting is an option of SeFi Training Options (nodes/train_options.py)."""


def _one(x):
    return x[0] if isinstance(x, list) else x


def _output_path(name) -> Path | None:
    """The identity file a run with this name writes; None when the name is not known yet (linked) or invalid
    (the run itself refuses it)."""
    try:
        return identity_dir() / f"{check_name(name)}.safetensors" if name is not None else None
    except (ValueError, TypeError):
        return None


def _image_list(images) -> list[torch.Tensor]:
    items = images if isinstance(images, list) else [images]
    out = []
    for im in items:
        out += [im] if im.dim() == 3 else list(im)
    if not out:
        raise ValueError("images: give at least one face photo")
    return out


class SeFiTrainIdentity:
    DESCRIPTION = ("Train a SeFi identity (per-stage key/value tokens) from one or more face photos, with the "
                   "frozen model, CLIP and VAE of an SD1.5 or SDXL checkpoint (SDXL trains clip_l and clip_g "
                   "tokens together). Saves models/sefi_identities/<name>.safetensors plus resumable "
                   "checkpoints; Cancel saves a checkpoint you can resume from.")
    INPUT_IS_LIST = True  # so photos of different sizes can come in as a list

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (frozen; never modified)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder (frozen)."}),
                "vae": ("VAE", {"tooltip": "The checkpoint's VAE; encodes the photos once before training."}),
                "images": ("IMAGE", {"tooltip": "Face photos or crops (one is enough). Each is resized so its "
                                                "shorter side is `resolution`, then centre-cropped."}),
                "name": ("STRING", {"default": "my_identity", "tooltip": "File name of the identity in "
                                    "models/sefi_identities (no folders)."}),
                "trigger": ("STRING", {"default": "sks", "tooltip": "The word you will write in prompts for "
                                       "this person."}),
                "initializer": ("STRING", {"default": "person", "tooltip": "A word whose embedding the tokens "
                                           "start from."}),
                "steps": ("INT", {"default": 600, "min": 1, "max": 100000, "tooltip": "Optimiser steps."}),
                "learning_rate": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e30, "step": 1e-5,
                                            "tooltip": "0 = default for the parametrisation (1e-4 for the "
                                                       "self-attention generator, 5e-3 for direct tokens)."}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 2048, "step": 8, "tooltip": "Training "
                                       "image size (also the sample renders' size)."}),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Face mask(s) matching the photos (e.g. from SeFi Face Mask); for "
                                  "attention_loss=mask and the masked diffusion loss."}),
                "options": (TRAINING_OPTIONS, {"tooltip": "From SeFi Training Options: the method, losses, "
                                               "augmentation, checkpoints and speed settings. Not connected = their "
                                               "defaults."}),
                "preview_every": ("INT", {"default": PREVIEW_EVERY, "min": 0, "max": 100000, "tooltip": "Refresh "
                                          "the live preview on this node (loss curve, latest samples) every N steps; "
                                          "0 = progress bar only."}),
                "sample_prompt": ("STRING", {"multiline": True, "default": "", "tooltip": "Prompts to render with "
                                             "the identity as it trains, one per line, each with the trigger (e.g. "
                                             "'a photo of sks person, smiling'). Empty = no samples."}),
                "sample_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Render the sample "
                                         "prompts every N steps and of the final tokens (fixed seed, 12 euler "
                                         "steps, the training resolution); 0 = only of the final tokens."}),
                "save_every": ("INT", {"default": 0, "min": 0, "max": 100000, "tooltip": "Save a snapshot "
                                       "<name>@<step>.safetensors every N steps, to keep the step that looks best; "
                                       "0 = never."}),
            },
            "hidden": dict(GRAPH_HIDDEN),  # the graph as sent: settings it sets here that this node does not take
        }

    @classmethod
    def IS_CHANGED(cls, name=None, sefi_node_id=None, **_):
        """Run again when the identity file this node wrote is gone or changed, not only when the inputs changed
        (nodes/output_changes.py); the host's cache answers otherwise."""
        return output_changes.change_value(_output_path(_one(name)), _one(sefi_node_id))

    RETURN_TYPES = (IDENTITY, "IMAGE", "STRING", "IMAGE", "IMAGE")
    RETURN_NAMES = ("identity", "loss_curve", "file_name", "samples", "attention_maps")
    OUTPUT_TOOLTIPS = ("The trained identity (for SeFi Apply Identity).", "Training loss curve.",
                       "The saved identity file name.", "The sample renders: a grid, one row per sampling point, "
                       "one column per prompt (one black frame without samples). Only the latest rows that fit in "
                       "256 MB are kept here; every row is also saved as "
                       "output/sefi_samples/<name>/<run id>/<name>@<step>.png.",
                       "Over each training photo, the identity token's attention map beside the reference word's "
                       "(what the face-wise loss pulls together): does the identity stay on the face?")
    FUNCTION = "train"
    CATEGORY = CATEGORY
    OUTPUT_NODE = True

    def train(self, model, clip, vae, images, name, trigger="sks", initializer="person", steps=600,
              learning_rate=0.0, resolution=512, mask=None, options=None, preview_every=PREVIEW_EVERY,
              sample_prompt="", sample_every=0, save_every=0, sefi_prompt=None, sefi_node_id=None,
              observer=None, **option_values):
        """The node's inputs; Python callers (tools, tests) may also give options as keywords, which take the
        place of the connected options' values, and an `observer` (step, total, loss, parts) called after every
        step of this run only (to print progress, collect logged parts, or press Cancel); ComfyUI passes none."""
        check_entry(SeFiTrainIdentity, NODE_NAME, dict(
            name=name, trigger=trigger, initializer=initializer, steps=steps, learning_rate=learning_rate,
            resolution=resolution, options=options, preview_every=preview_every, sample_prompt=sample_prompt,
            sample_every=sample_every, save_every=save_every), sefi_prompt, sefi_node_id, OPTION_INPUTS)
        chosen = training_options(_one(options))
        chosen.update(checked_inputs(SeFiTrainingOptions, OPTIONS_NODE_NAME,
                                     {k: _one(v) for k, v in training_options(option_values).items()
                                      if k in option_values}))
        watched = checked_inputs(SeFiTrainIdentity, NODE_NAME, dict(
            preview_every=preview_every, sample_prompt=sample_prompt, sample_every=sample_every,
            save_every=save_every, trigger=trigger))
        preview_every, sample_every, save_every, trigger_word = (_one(watched[k]) for k in (
            "preview_every", "sample_every", "save_every", "trigger"))
        prompts = watched["sample_prompt"]  # a list of prompts wired in: every one of them, not only the first
        prompts = "\n".join(str(p) for p in (prompts if isinstance(prompts, list) else [prompts]))
        watch = WatchSettings(int(preview_every), sample_prompts(prompts, str(trigger_word)), int(sample_every),
                              int(save_every))
        check_sample_prompts(watch.sample_prompts)
        log_sampling_cost(str(_one(name)), watch.sample_prompts, watch.sample_every, int(_one(steps)),
                          int(_one(chosen["batch_size"])))
        out_path = _output_path(_one(name))
        before = output_changes.change_value(out_path)
        result = self._train(model, clip, vae, images, name, trigger, initializer, steps, learning_rate,
                             resolution=resolution, mask=mask, watch=watch, observer=observer, **chosen)
        output_changes.remember(out_path, before, _one(sefi_node_id))
        return result

    def _train(self, model, clip, vae, images, name, trigger="sks", initializer="person", steps=600,
               learning_rate=0.0, resolution=512, mask=None, watch: WatchSettings = WatchSettings(), observer=None,
               **options):
        """The run; `options` are SeFi Training Options' values by name (training_options: missing ones take their
        defaults, unknown ones are refused)."""
        checked = checked_inputs(SeFiTrainIdentity, NODE_NAME, {key: value for key, value in locals().items()
                                                               if key not in ("self", "watch", "observer", "options",
                                                                              *HOST_OBJECTS)})
        images, mask = checked["images"], checked["mask"]
        name, trigger, initializer, steps, learning_rate, resolution = (_one(checked[key]) for key in WIDGETS)
        opt = SimpleNamespace(**{key: _one(value) for key, value in training_options(options).items()})
        watch = dataclasses.replace(watch, stop_on_failure=bool(opt.stop_on_watch_failure))
        model, clip, vae = _one(model), _one(clip), _one(vae)
        name = check_name(name)  # names, files and resume_from are checked before the model is touched
        out_path = identity_file(identity_dir(), name)  # refuses another spelling of an existing identity
        ckpt_path = checkpoint_dir() / f"{name}{CHECKPOINT_SUFFIX}"
        remove_stale_temp_files([out_path, ckpt_path], name)  # this name's debris, whatever is refused next
        if out_path.exists() and not opt.overwrite:
            raise FileExistsError(f"an identity named '{name}' already exists ({out_path}); pick another name or "
                                  f"set overwrite to true")
        if opt.parametrisation not in PARAMETRISATIONS:
            raise ValueError(f"parametrisation must be one of {list(PARAMETRISATIONS)}, got {opt.parametrisation!r}")
        kind = PARAMETRISATIONS[opt.parametrisation]
        settings = TrainSettings(steps=int(steps), lr=float(learning_rate) or DEFAULT_LR[kind],
                                 resolution=int(resolution), initializer=str(initializer), reference_word="person",
                                 precision="fp32",  # the dtype's name is filled in once the model is loaded
                                 **settings_values(vars(opt)))
        check_trigger_apart_from_templates(trigger, settings.templates)
        resume_path = resolve_checkpoint(opt.resume_from) if str(opt.resume_from).strip() else None
        if ckpt_path.exists() and resume_path != ckpt_path and not opt.overwrite:
            raise FileExistsError(
                f"an unfinished training run named '{name}' has a checkpoint ({ckpt_path}); set resume_from={name} "
                f"to continue it, or overwrite=true to start over (its checkpoint is then replaced), or pick "
                f"another name")
        snapshots = existing_snapshots(identity_dir(), name)
        if snapshots and resume_path is None and not opt.overwrite:
            shown = ", ".join(p.name for p in list(snapshots.values())[:3])
            raise FileExistsError(f"step snapshots of an earlier run named '{name}' exist ({shown}"
                                  f"{' …' if len(snapshots) > 3 else ''}); pick another name, or set overwrite to "
                                  f"true to replace them")
        if opt.precision not in PRECISION_CHOICES:
            raise ValueError(f"precision must be one of {list(PRECISION_CHOICES)}, got {opt.precision!r}")
        start_state = None
        if resume_path is not None:
            with torch.inference_mode(False):  # so the Adam state is made of ordinary tensors
                start_state = load_checkpoint(resume_path, opt.resume_from)
            check_resume_structure(start_state, kind, int(opt.stages), int(opt.vectors_per_token), bool(opt.kv_split),
                                   opt.resume_from)
        run_id = start_state.run_id if start_state is not None and start_state.run_id else new_run_id()
        run_snapshots = RunSnapshots(identity_dir(), checkpoint_dir() / f"{name}{STAGING_SUFFIX}", name, run_id)
        foreign = run_snapshots.foreign() if start_state is not None and not opt.overwrite else {}
        if foreign:
            shown = ", ".join(p.name for p in list(foreign.values())[:3])
            raise FileExistsError(f"step snapshots named '{name}' that this checkpoint's run did not write exist "
                                  f"({shown}{' …' if len(foreign) > 3 else ''}); set overwrite to true to replace "
                                  f"them once this run succeeds, move them away, or pick another name")

        pics = _image_list(images)
        mlist = None
        if mask is not None:
            mlist = []
            for m in (mask if isinstance(mask, list) else [mask]):
                mlist += [m] if m.dim() == 2 else list(m)
            if len(mlist) == 1 and len(pics) > 1:
                mlist = mlist * len(pics)
            if len(mlist) != len(pics):
                raise ValueError(f"{len(mlist)} masks for {len(pics)} images; give one mask per image")
            check_masks(pics, mlist)
        check_photo_shapes(pics, name)
        pics, mlist, found = drop_faceless(pics, mlist, survey(pics), name)
        check_one_person(found, opt.allow_multiple_people)
        photos, changed_photos = photo_records(pics, found), None
        if start_state is not None:
            photos, changed_photos = compare_with_checkpoint(photos, start_state.photos, opt.allow_multiple_people,
                                                             opt.resume_from, name)
        masks = None if mlist is None else torch.cat([fit_mask(m.float().cpu(), settings.resolution) for m in mlist])
        checked_inputs(SeFiTrainIdentity, NODE_NAME, {"model": model, "clip": clip, "vae": vae})
        check_model_sampling(model, NODE_NAME)
        if opt.compile_unet:
            check_compile_available(model.load_device)

        run_snapshots.begin(start_state.step if start_state is not None else None)
        device = host.torch_device()
        with training_context(model, clip, opt.precision) as dtype:
            settings.precision = DTYPE_NAMES[dtype]
            changed = log_resume_changes(start_state, settings, name) if start_state is not None else {}
            if changed_photos is not None:
                changed["photos"] = changed_photos
            reset_peak_memory(device)
            pixels = torch.cat([fit_image(p.float().cpu().clone(), settings.resolution) for p in pics])
            encoder = TextEncoder(clip)
            norms = embedding_norms(clip)
            step_fn = SefiStep(model, clip, vae, pixels, masks, settings, trigger, int(opt.vectors_per_token), encoder,
                               settings.initializer)
            if start_state is not None:
                generator = rebuild_generator(start_state.generator_config)
                if sorted(generator.encoders) != sorted(encoder.encoders):
                    raise ValueError(f"resume_from={opt.resume_from}: the checkpoint was trained with the text "
                                     f"encoder(s) {sorted(generator.encoders)}, the connected clip has "
                                     f"{sorted(encoder.encoders)}; connect the model family it was trained "
                                     f"with (SD1.5: clip_l, SDXL: clip_l + clip_g)")
            else:
                generator = build_generator(kind, encoder.initializer_embeddings(initializer),
                                            stages=int(opt.stages), vectors_per_token=int(opt.vectors_per_token),
                                            kv_split=bool(opt.kv_split), seed=int(opt.seed))
            generator.to(model.load_device)
            watcher = self._watcher(watch, settings, name, generator, encoder, trigger, settings.initializer, kind,
                                    photos, norms, (model, clip, vae), start_state, run_snapshots)
            started = time.perf_counter()
            with step_fn.unet.compiled(bool(opt.compile_unet)) as compiled_blocks, \
                    step_fn.unet.checkpointing(bool(opt.gradient_checkpointing)):
                if compiled_blocks:
                    log.info("[SeFi] %s: compiling %d U-Net blocks (mode %s); the first step waits for it", name,
                             compiled_blocks, compile_mode(model.load_device))
                result = self._run(generator, step_fn, settings, start_state, ckpt_path, name, photos, norms,
                                   opt.resume_from, watcher, run_id, observer)
                watcher.finish(result.steps_done, settings.steps)
            watcher.report(time.perf_counter() - started)
            peak = peak_memory_bytes(device)
            generator.eval()
            with torch.no_grad():
                live = {k: v.detach().float() for k, v in generator().items()}
                tokens = {k: v.cpu() for k, v in live.items()}
            log.info("[SeFi] %s: peak memory %s (%s, compute %s)", name, "not measurable here" if peak is None
                     else f"{peak / 2**20:.1f} MiB", device, dtype)
            training = settings.to_dict()
            training.update(parametrisation=kind, generator=generator.config(), steps_done=result.steps_done,
                            final_loss=result.loss_history[-1] if result.loss_history else None,
                            peak_memory_bytes=peak, device=str(device), host=host.DISTRIBUTION,
                            initializer=initializer, gradient_checkpointing=bool(opt.gradient_checkpointing),
                            compile_unet=bool(opt.compile_unet), run_id=run_id)
            if watcher.failures:
                training.update(watch_failures=list(watcher.failures))
            if start_state is not None:
                training.update(resumed_at_step=int(start_state.step), changed_on_resume=changed)
            identity = Identity(encoder.family, tokens, trigger, initializer, training,
                                tuple(r["sha256"] for r in photos), norms)
            if out_path.exists() and not opt.overwrite:
                raise FileExistsError(f"an identity named '{name}' appeared while training ({out_path}); the "
                                      f"checkpoint {ckpt_path} holds the result; resume it under another name")
            out_path.parent.mkdir(parents=True, exist_ok=True)
            save_identity(identity, out_path)
            if not opt.keep_checkpoint and ckpt_path.exists():
                ckpt_path.unlink()
                log.info("[SeFi] %s: identity saved; deleted its training checkpoint %s (keep_checkpoint=true "
                         "keeps it)", name, ckpt_path)
            run_snapshots.finish()  # the run succeeded: an earlier run's snapshots give way to its own
            maps = self._attention_maps(step_fn, live, pixels, int(opt.seed), name)
        picture = render_loss_curve(result.loss_history, shares=term_shares(result.state.parts_history))
        curve = torch.from_numpy(picture.astype(np.float32) / 255.0)[None]
        return identity, curve, out_path.name, watcher.samples(settings.resolution), maps

    @staticmethod
    def _attention_maps(step_fn, live, pixels, seed: int, name: str) -> torch.Tensor:
        """The attention-map picture, made after the identity is saved: a failure here (e.g. out of memory) costs
        the picture (a black frame, logged), never the identity."""
        try:
            with torch.no_grad():
                return attention_picture(step_fn, live, pixels, seed)
        except host.InterruptProcessingException:
            raise
        except Exception as e:
            log.warning("[SeFi] %s: the identity is saved, but its attention-map picture failed (%s: %s); the "
                        "attention-map output is a black frame", name, type(e).__name__, e)
            return torch.zeros(1, 64, 64, 3)

    @staticmethod
    def _watcher(watch: WatchSettings, settings: TrainSettings, name: str, generator, encoder, trigger: str,
                 initializer: str, kind: str, photos: list[dict], norms: dict[str, float], models,
                 start_state, run_snapshots: RunSnapshots) -> TrainingWatch:
        """The run's TrainingWatch: its progress bar, snapshots of the generator as it is, sample renders."""
        model, clip, vae = models

        def current_identity(step: int) -> Identity:
            generator.eval()  # the tokens the identity would get (no dropout, no draw from any RNG)
            try:
                with torch.no_grad():
                    tokens = {k: v.detach().float().cpu() for k, v in generator().items()}
            finally:
                generator.train()
            training = {**settings.to_dict(), "parametrisation": kind, "steps_done": step, "snapshot_of": name,
                        "run_id": run_snapshots.run_id}
            try:
                return Identity(encoder.family, tokens, trigger, initializer, training,
                                tuple(r["sha256"] for r in photos), norms)
            except TokenScaleError as e:  # never a snapshot (or a sample) of tokens that have blown up
                raise ValueError(f"training diverged by step {step}: {e}; no snapshot of it was written. Try a "
                                 f"lower learning_rate") from e

        spec = SampleSpec(watch.sample_prompts, seed=settings.seed, resolution=settings.resolution)
        render = (lambda identity: render_samples(model, clip, vae, identity, spec,
                                                  on_step=host.raise_if_interrupted))
        bar = host.progress_bar(settings.steps)
        if start_state is not None:
            bar.update(int(start_state.step))
        history = start_state.loss_history if start_state is not None else ()
        parts = start_state.parts_history if start_state is not None else ()
        samples_at = Path(host.folder_paths.get_output_directory()) / SAMPLES_FOLDER / name / run_snapshots.run_id
        return TrainingWatch(watch, bar, name, run_snapshots if watch.save_every else None, current_identity, render,
                             history, parts, sample_folder=samples_at,
                             resumed_at=start_state.step if start_state is not None else None)

    def _run(self, generator, step_fn, settings, start_state, ckpt_path: Path, name: str, photos: list[dict],
             norms: dict[str, float], resume_from: str, watch: TrainingWatch, run_id: str, observer=None):
        total = settings.steps
        saved_step = [start_state.step if start_state is not None else None]
        t0 = time.monotonic()

        def on_progress(step, total_, loss, parts):
            if step % LOG_EVERY == 0 or step == total_ or step == 1:
                txt = " ".join(f"{k}={v:.4g}" for k, v in parts.items())
                log.info("[SeFi] %s step %d/%d loss=%.5f %s (%.2f s/step)", name, step, total_, loss, txt,
                         (time.monotonic() - t0) / max(1, step - (start_state.step if start_state else 0)))
            if observer is not None:
                observer(step, total_, loss, parts)
            watch.on_step(step, total_, loss, parts)  # the progress bar, its preview, samples and snapshots

        def should_stop():
            host.raise_if_interrupted()  # raises on Cancel; so may the progress bar and the host's callbacks
            return False

        def save(state):
            ckpt_path.parent.mkdir(parents=True, exist_ok=True)
            state.photos, state.run_id = photos, run_id
            save_train_state(state, ckpt_path)
            saved_step[0] = state.step

        try:
            # run_training checkpoints the last completed step whichever host call raises the interrupt
            return run_training(generator, step_fn, settings, start_state=start_state, on_progress=on_progress,
                                should_stop=should_stop, save_checkpoint=save,
                                interrupts=(host.InterruptProcessingException, WatchFailedError), token_norms=norms,
                                settle_at=watch.needs_parameters_at)
        except TokenScaleError as e:  # the checkpoint resume_from names holds tokens that had blown up
            raise ValueError(f"resume_from={resume_from}: {e}") from e
        except WatchFailedError as e:  # run_training wrote the step's checkpoint first
            raise WatchFailedError(f"{e}; the checkpoint {ckpt_path} holds step {saved_step[0]}: set resume_from="
                                   f"{name} to continue") from e
        except host.InterruptProcessingException:
            log.info("[SeFi] %s: interrupted at step %s/%d, checkpoint %s (to continue: resume_from=%s)", name,
                     saved_step[0], total, ckpt_path, name)
            raise


NODE_CLASS_MAPPINGS = {"SeFiTrainIdentity": SeFiTrainIdentity}
NODE_DISPLAY_NAME_MAPPINGS = {"SeFiTrainIdentity": "SeFi Train Identity"}
