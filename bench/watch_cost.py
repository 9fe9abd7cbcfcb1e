"""What watching a training costs: SeFi Train Identity run three ways on the same model, photo and seed — nothing
watched (`preview_every` 0), the defaults (the live preview), and the defaults plus sample renders — printed as
ratios of the unwatched run's time.

    python -m bench.watch_cost                              # tiny checkpoint, 64 px
    python -m bench.watch_cost --checkpoint .cache/tiny/world-sd15.safetensors --steps 60
    python -m bench.watch_cost --full-sd15 --steps 200      # on a GPU

Two figures for the preview: the end-to-end ratio (noisy on a shared machine) and the time the node itself spent
drawing and handing over the previews, which it logs (`live preview N× in S s (P % of T s training)`). The sample
renders' cost is the share the node logs for them (`sample renders at K step(s) in S s`).
"""
from __future__ import annotations

import logging
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from bench.attention_share import _photo  # noqa: E402
from bench.train_step import boot_bench_host, model_parser  # noqa: E402
from host_boot import embedded_host  # noqa: E402

PREVIEW_LOG = re.compile(r"live preview (\d+)× in ([\d.]+) s")
SAMPLES_LOG = re.compile(r"sample renders at (\d+) step\(s\) in ([\d.]+) s")


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main(argv=None) -> int:
    ap = model_parser(__doc__, steps=40)
    ap.add_argument("--repeats", type=int, default=2, help="runs per variant (the fastest counts)")
    args = ap.parse_args(argv)
    res = args.resolution or (512 if args.full_sd15 else 64)

    host, src = boot_bench_host(args.full_sd15, args.checkpoint)
    model, clip, vae = host.run("CheckpointLoaderSimple", ckpt_name=src.name)[:3]
    photo = _photo(res)
    lines = _Lines()
    logging.getLogger("sefi").addHandler(lines)
    logging.getLogger("sefi").setLevel(logging.INFO)
    prompts = "a photo of sks person\na close-up photo of the face of sks person, smiling"
    variants = {"unwatched": dict(preview_every=0), "preview (defaults)": {},
                "preview + samples": dict(sample_prompt=prompts, sample_every=max(1, args.steps // 2))}
    options = host.run("SeFiTrainingOptions", **{**host.pack_module.nodes.train_options.OPTION_DEFAULTS,
                                                  "overwrite": True, "checkpoint_every": 0})[0]

    def run(watch: dict) -> tuple[float, list[str]]:
        lines.lines.clear()
        started = time.perf_counter()
        host.run("SeFiTrainIdentity", model=model, clip=clip, vae=vae, images=photo, name="bench_watch",
                 trigger="sks", initializer="person", steps=args.steps, learning_rate=0.0, resolution=res,
                 options=options, **watch)
        return time.perf_counter() - started, list(lines.lines)

    run({"preview_every": 0})  # warm-up: the first run loads the models
    results = {}
    for label, watch in variants.items():
        runs = [run(watch) for _ in range(args.repeats)]
        results[label] = min(runs, key=lambda r: r[0])
    base = results["unwatched"][0]
    label = args.checkpoint.name if args.checkpoint else ("SD1.5 U-Net, random" if args.full_sd15 else "tiny")
    print(f"host: {embedded_host.host_label()}; model {label}; {res} px; {args.steps} steps; device "
          f"{model.load_device}; fastest of {args.repeats}")
    for name, (seconds, logged) in results.items():
        text = "\n".join(logged)
        preview = PREVIEW_LOG.search(text)
        samples = SAMPLES_LOG.search(text)
        extra = ""
        if preview:
            extra += f"; previews {preview.group(1)}× {float(preview.group(2)):.3f} s = " \
                     f"{100 * float(preview.group(2)) / seconds:.2f} % of this run"
        if samples:
            extra += f"; samples at {samples.group(1)} step(s) {float(samples.group(2)):.2f} s = " \
                     f"{100 * float(samples.group(2)) / seconds:.1f} % of this run"
        print(f"{name:20s} {seconds:8.2f} s  ratio {seconds / base:.3f}{extra}")
    return 0


if __name__ == "__main__":
    with torch.inference_mode():
        sys.exit(main())
