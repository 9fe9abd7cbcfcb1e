"""Pretrain the world's U-Net from scratch on rendered pictures and their captions (docs/world.md).

The U-Net (world/model.py) is built with the host's own class and trained with SD's own ε-objective and
scaled-linear noise schedule, so the host samples from it exactly as from any SD1.5 checkpoint. Latents are the
constructed VAE's (world/vae.py) after the host's SD1 latent scale: 2·colour − 1 per cell, channel 3 zero. The text
encoder's output is computed from its two embedding tables (world/text_encoder.WordTable), equal to the host's CLIP.

Runs resume from their own checkpoint (saved atomically every `--checkpoint-every` steps), so a stopped run loses
minutes. The result is the EMA of the weights, written as fp16 safetensors in the host's UNetModel key names, by
default beside the run's state outside the repository: only `--out world/weights` (or `world/third/weights`)
replaces a committed model. `--world third` trains the third world (world/third/); `--init` starts a run from a
committed round's weights (a later session on a fresh machine continues the schedule there, without the optimiser's
moments, which are not committed).
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from sefi_core.atomic import atomic_write, atomic_write_text
from host_boot import embedded_host
from tools import tiny_checkpoints

from . import text_encoder
from .model import TIMESTEPS, grow, new_unet, sd_alphas_cumprod
from .captions import training_pair
from .render import held_out_identities, render_cells

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WORLD_WEIGHTS = {"second": WEIGHTS_DIR, "third": Path(__file__).resolve().parent / "third" / "weights"}
UNET_FILE = "unet.safetensors"
LOG_FILE = "training_log.json"
INIT_WARMUP = 50      # steps of warm-up after starting from committed weights (fresh optimiser moments)


def cells_to_unet_latent(cells: np.ndarray) -> torch.Tensor:
    """[B, G, G, 3] colours → [B, 4, G, G]: what the U-Net sees (VAE latent × 0.18215) for those pictures."""
    x = torch.from_numpy(cells).float().permute(0, 3, 1, 2) * 2.0 - 1.0
    return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)


def draw_batch(world: str, rng: np.random.Generator, batch: int, held_out) -> tuple[np.ndarray, list[str]]:
    """One batch of the world's pretraining stream: cell colours [B, G, G, 3] and captions (looked up at call time,
    so tests can watch the stream)."""
    if world == "second":
        pairs = [training_pair(rng, held_out) for _ in range(batch)]
        return np.stack([render_cells(f) for f, _ in pairs]), [c for _, c in pairs]
    from .third import captions as third_captions, render as third_render
    pairs = [third_captions.pretraining_pair(rng) for _ in range(batch)]
    return np.stack([third_render.render_cells(f) for f, _ in pairs]), [c for _, c in pairs]


class CaptionEncoder:
    """Caption → context through the host's own SD1 tokenizer and the world encoder's exact output (cached ids)."""

    def __init__(self, clip_weights: dict[str, torch.Tensor]):
        import comfy.sd1_clip
        self.tokenizer = comfy.sd1_clip.SD1Tokenizer(embedding_directory=None)
        self.table = text_encoder.WordTable(clip_weights)
        self._ids: dict[str, torch.Tensor] = {}

    def ids(self, caption: str) -> torch.Tensor:
        if caption not in self._ids:
            chunks = self.tokenizer.tokenize_with_weights(caption)["l"]
            self._ids[caption] = torch.tensor([t for t, _ in chunks[0]], dtype=torch.long)
        return self._ids[caption]

    def __call__(self, captions: list[str]) -> torch.Tensor:
        return self.table.encode(torch.stack([self.ids(c) for c in captions]))


def clip_weights() -> dict[str, torch.Tensor]:
    """The constructed text encoder's state dict in the host's SD1ClipModel names."""
    import comfy.sd1_clip
    with torch.device("meta"), torch.no_grad():
        shapes = comfy.sd1_clip.SD1ClipModel(device="meta", dtype=torch.float32).state_dict()
    return text_encoder.construct(shapes)


def _clone_saved(t: torch.Tensor):
    # The PyPI host's blocks add residuals in place (`x += ...`), which would invalidate tensors autograd saved:
    # saving clones keeps the backward exact on both hosts (parameters are never modified, so they are kept as is).
    return t if isinstance(t, torch.nn.Parameter) else t.clone()


def _atomic_save(obj, path: Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def read_round(weights: Path) -> tuple[dict[str, torch.Tensor], int, list[dict], dict]:
    """A committed round: its EMA weights (fp32), the step it reached, its loss history and its metadata."""
    import safetensors
    import safetensors.torch
    with safetensors.safe_open(str(weights), framework="pt") as f:
        meta = dict(f.metadata() or {})
    tensors = {k: v.float() for k, v in safetensors.torch.load_file(str(weights)).items()}
    log_file = Path(weights).with_name(LOG_FILE)
    history = json.loads(log_file.read_text())["history"] if log_file.exists() else []
    if "steps" not in meta:
        raise SystemExit(f"{weights} has no 'steps' in its metadata: it was not written by `python -m world train`")
    return tensors, int(meta["steps"]), history, meta


def train(seed: int, steps: int, batch: int, run_dir: Path, out_dir: Path, lr: float = 5e-4, warmup: int = 100,
          ema_decay: float = 0.995, caption_dropout: float = 0.1, checkpoint_every: int = 50,
          threads: int | None = None, rounds: tuple[int, ...] = (), log=print, world: str = "second",
          init: Path | None = None, min_snr: float = 0.0) -> Path:
    embedded_host.import_host_modules("cpu")
    import comfy.ldm.modules.attention as host_attention
    # The PyPI host picks sub-quadratic attention on the CPU (chunked by free memory: ~2× slower here); the same
    # arithmetic through torch's SDPA. Only this process is affected; sampling later uses the host's own choice.
    host_attention.optimized_attention = host_attention.attention_pytorch
    if threads:
        torch.set_num_threads(threads)
    run_dir.mkdir(parents=True, exist_ok=True)
    state_path = run_dir / "state.pt"
    clip = clip_weights()
    encode = CaptionEncoder(clip)
    unet = new_unet(seed, world)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    held_out = held_out_identities()
    history: list[dict] = []
    start, elapsed_before, init_step, grown_at = 0, 0.0, None, None
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        if state["seed"] != seed or state["batch"] != batch or state.get("world", "second") != world:
            raise SystemExit(f"{state_path} belongs to a run of the {state.get('world', 'second')} world with seed "
                             f"{state['seed']} and batch {state['batch']}; use another --run-dir or the same settings")
        if float(state.get("min_snr", 0.0)) != min_snr:
            raise SystemExit(f"{state_path} was trained with --min-snr {state.get('min_snr', 0.0)}; resume it with "
                             "the same weighting or use another --run-dir")
        init_step, grown_at = state.get("init_step"), state.get("grown_at")
        unet.load_state_dict(state["unet"])
        ema = state["ema"]
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = json.loads(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        history = json.loads(state["history"])
        start, elapsed_before = int(state["step"]), float(state["elapsed"])
        log(f"resuming from step {start} ({state_path})")
    elif init is not None:
        weights, init_step, history, meta = read_round(Path(init))
        if meta.get("world", "second") != world or int(meta.get("seed", seed)) != seed:
            raise SystemExit(f"{init} is a round of the {meta.get('world', 'second')} world with seed "
                             f"{meta.get('seed')}; pass the same --world and --seed to continue it")
        added = grow(unet, weights)   # a plain load when the round has this shape
        if added:   # a round of an earlier, smaller shape of this world's U-Net: it goes on in the grown one
            grown_at = init_step
            log(f"growing the round's U-Net to the {world} world's shape: {len(added)} tensors added, each added "
                "block starting as the identity")
        ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
        start = init_step
        elapsed_before = float(history[-1]["seconds"]) if history else 0.0
        # A fresh stream for the continuation: the first part's rng state is not committed.
        rng = np.random.default_rng([seed, start])
        torch.manual_seed(seed * 1_000_003 + start)
        log(f"continuing from the round at step {start} ({init}): fresh optimiser, {INIT_WARMUP} warm-up steps")
    alphas = sd_alphas_cumprod()
    t0 = time.perf_counter()

    def save_state(step: int) -> None:
        _atomic_save({"seed": seed, "batch": batch, "step": step, "world": world, "init_step": init_step,
                      "grown_at": grown_at, "min_snr": min_snr,
                      "unet": unet.state_dict(), "ema": ema,
                      "opt": opt.state_dict(), "rng": json.dumps(rng.bit_generator.state),
                      "torch_rng": torch.get_rng_state(), "history": json.dumps(history),
                      "elapsed": elapsed_before + time.perf_counter() - t0}, state_path)

    unet.train()
    running = []
    for step in range(start, steps):
        cells, drawn = draw_batch(world, rng, batch, held_out)
        captions = ["" if rng.random() < caption_dropout else c for c in drawn]
        x0 = cells_to_unet_latent(cells)
        context = encode(captions)
        t = torch.randint(0, TIMESTEPS, (batch,))
        noise = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        rate = lr_at(step, steps, lr, warmup)
        if init_step is not None:
            rate *= min(1.0, (step - init_step + 1) / INIT_WARMUP)
        for group in opt.param_groups:
            group["lr"] = rate
        with torch.autograd.graph.saved_tensors_hooks(_clone_saved, lambda t_: t_):
            pred = unet(xt, timesteps=t.float(), context=context)
            loss = (loss_weights(alphas[t], min_snr) * (pred - noise).square().mean(dim=(1, 2, 3))).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                ema[k].mul_(decay).add_(v.detach(), alpha=1 - decay)
        running.append(float(loss.detach()))
        done = step + 1
        if done % 10 == 0 or done == steps:
            elapsed = elapsed_before + time.perf_counter() - t0
            history.append({"step": done, "loss": float(np.mean(running)), "seconds": round(elapsed, 1)})
            running = []
            log(f"step {done}/{steps} loss {history[-1]['loss']:.4f} lr {rate:.2e} "
                f"{elapsed / 60:.1f} min")
        if done % checkpoint_every == 0 or done == steps:
            save_state(done)
            write_weights(ema, out_dir, history, seed=seed, steps=done, batch=batch,
                          rounds=",".join(map(str, rounds or (steps,))), world=world,
                          **({"continued_from": init_step} if init_step is not None else {}),
                          **({"grown_at": grown_at} if grown_at is not None else {}),
                          **({"min_snr": min_snr} if min_snr else {}))
    return out_dir / UNET_FILE


def loss_weights(alphas_cumprod: torch.Tensor, min_snr: float) -> torch.Tensor:
    """Per-sample weights of the ε-loss: 1 (SD's plain objective), or Min-SNR-γ (Hang et al. 2023, γ = min_snr):
    min(SNR, γ) / SNR, which stops the nearly clean timesteps, whose ε-error is largest and least informative, from
    dominating the gradient that shapes the layout at the noisy ones."""
    if not min_snr:
        return torch.ones_like(alphas_cumprod)
    snr = alphas_cumprod / (1 - alphas_cumprod)
    return snr.clamp(max=min_snr) / snr


def write_weights(ema: dict[str, torch.Tensor], out_dir: Path, history: list[dict], **meta) -> None:
    """The EMA weights as fp16 safetensors (what is committed) and the loss log beside them, both atomically."""
    tiny_checkpoints.save({k: v.to(torch.float16) for k, v in ema.items()}, out_dir / UNET_FILE,
                          metadata={k: str(v) for k, v in meta.items()})
    atomic_write_text(out_dir / LOG_FILE, json.dumps({**meta, "history": history}, indent=1))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=_rounds, default=(3000,),
                        help="the step to train to; several (e.g. 1200,2400) train in rounds: each round resumes "
                             "the last and runs its own cosine schedule to its step "
                             "(the committed model: one 3000-step schedule)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--world", choices=tuple(WORLD_WEIGHTS), default="second",
                        help="which world: the second (shipped) or the third (world/third/, in pretraining)")
    parser.add_argument("--run-dir", type=Path,
                        help="where the resumable training state lives (default: ~/.cache/sefi-world/train-WORLD, "
                             "outside the repository)")
    parser.add_argument("--out", type=Path,
                        help="where unet.safetensors and training_log.json are written (default: RUN_DIR/weights; "
                             "name world/weights or world/third/weights to replace a committed model)")
    parser.add_argument("--init", type=Path,
                        help="start from a committed round's unet.safetensors (its step, seed and loss log "
                             "continue; the optimiser starts fresh; a round of a smaller shape of the world's "
                             "U-Net grows into the present one, world.model.grow); ignored once the run dir holds "
                             "a state")
    parser.add_argument("--min-snr", type=float, default=0.0,
                        help="weight the ε-loss by Min-SNR-γ with this γ (e.g. 5; default 0: SD's plain objective)")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, 2 threads were 3× slower per step)")


def _rounds(text: str) -> tuple[int, ...]:
    rounds = tuple(int(part) for part in text.split(","))
    if any(r <= 0 for r in rounds) or list(rounds) != sorted(set(rounds)):
        raise argparse.ArgumentTypeError(f"{text!r}: give increasing positive step counts, e.g. 1200 or 1200,2400")
    return rounds


def output_paths(world: str, run_dir: Path | None, out: Path | None) -> tuple[Path, Path]:
    """The run dir and the weights folder: outside the repository unless `out` names a world's weights folder, and
    never the other world's committed model."""
    run_dir = run_dir or Path.home() / ".cache" / "sefi-world" / f"train-{world}"
    out = out or run_dir / "weights"
    for other, folder in WORLD_WEIGHTS.items():
        if other != world and out.resolve() == folder.resolve():
            raise SystemExit(f"--out {out} is the {other} world's committed model; a {world}-world run cannot "
                             f"replace it (use {WORLD_WEIGHTS[world]} or a folder outside the repository)")
    return run_dir, out


def run(args: argparse.Namespace) -> int:
    run_dir, out = output_paths(args.world, args.run_dir, args.out)
    for steps in args.steps:  # a round already finished is skipped: its state is past its step
        path = train(args.seed, steps, args.batch, run_dir, out, lr=args.lr,
                     checkpoint_every=args.checkpoint_every, threads=args.threads, rounds=args.steps,
                     world=args.world, init=args.init, min_snr=args.min_snr)
    print(f"wrote {path}")
    return 0
