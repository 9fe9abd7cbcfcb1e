"""The attention term's share of the gradient norm, for both reductions of the face-wise loss, side by side.

Runs the real trainer loop (sefi_core.training.run_training with nodes/training.SefiStep) for a few steps per
reduction on the same model, photo, seed and λ, logging every step's gradient shares (grad_share_every=1), and
prints them with the identity/reference map distance. docs/method.md quotes its figures when it reasons about
the default reduction.

    python -m bench.attention_share                        # tiny checkpoint, 64 px
    python -m bench.attention_share --full-sd15            # SD1.5's U-Net architecture (random weights), 512 px
    python -m bench.attention_share --full-sd15 --weight 0.01 --steps 6

Random weights are all this machine has: their cross-attention maps are nearly uniform, so the identity and
reference maps differ less than on a trained checkpoint, where the share is larger. Read the figures as a lower
bound and run this on a real checkpoint (`--checkpoint PATH`) to see the real one.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from bench.train_step import boot_bench_host, model_parser  # noqa: E402
from host_boot import embedded_host  # noqa: E402


def _photo(res: int) -> torch.Tensor:
    from skimage import data  # the astronaut portrait scikit-image ships (make demo uses it too)
    return torch.from_numpy(data.astronaut()).float()[None] / 255.0


def main(argv=None) -> int:
    ap = model_parser(__doc__, steps=4)
    ap.add_argument("--weight", type=float, default=0.003, help="λ (default: the paper's 0.003)")
    ap.add_argument("--parametrisation", default="self_attention", choices=("self_attention", "direct"))
    ap.add_argument("--initializer", default="person", help="initializer word; 'person' is also the reference "
                    "word, so its maps start equal to the reference (share ~0 at step 1); another word shows a "
                    "token that has moved away")
    args = ap.parse_args(argv)
    res = args.resolution or (512 if (args.full_sd15 or args.checkpoint) else 64)

    host, src = boot_bench_host(args.full_sd15, args.checkpoint)
    pkg = host.pack_module.__name__
    th = importlib.import_module(f"{pkg}.nodes.training")
    tr = importlib.import_module(f"{pkg}.sefi_core.training")
    gen = importlib.import_module(f"{pkg}.sefi_core.generator")
    losses = importlib.import_module(f"{pkg}.sefi_core.losses")
    model, clip, vae = host.run("CheckpointLoaderSimple", ckpt_name=src.name)[:3]
    photo = _photo(res)
    lr = 1e-4 if args.parametrisation == "self_attention" else 5e-3
    pairs = [(t, torch.randn(1, 4, res // 8, res // 8, generator=torch.Generator().manual_seed(t)))
             for t in (200, 500, 800)]

    rows = {}
    with torch.inference_mode(), th.training_context(model, clip) as dtype:
        init = th.TextEncoder(clip).initializer_embeddings(args.initializer)
        for reduction in losses.ATTENTION_REDUCTIONS:
            settings = tr.TrainSettings(steps=args.steps, lr=lr, resolution=res, flip=False, seed=0,
                                        attention_weight=args.weight, attention_reduction=reduction,
                                        grad_share_every=1, checkpoint_every=0, precision="fp32")
            step = th.SefiStep(model, clip, vae, th.fit_image(photo, res), None, settings, "sks", 1)
            g = gen.build_generator(args.parametrisation, init, stages=5, vectors_per_token=1, kv_split=True,
                                    seed=0).to(model.load_device)
            result = tr.run_training(g, step, settings)
            g.eval()
            with torch.no_grad():
                ev = step.evaluate({k: v.float() for k, v in g().items()}, pairs)
            ids = torch.cat([torch.cat(s, 2) for s in ev["id_maps"]], 2)
            refs = torch.cat([torch.cat(s, 2) for s in ev["ref_maps"]], 2)
            shares = [p["grad_share_attention"] for p in result.state.parts_history]
            rows[reduction] = (shares, [p["attention"] for p in result.state.parts_history],
                               losses.attention_map_distance(ids, refs))
    label = args.checkpoint.name if args.checkpoint else ("SD1.5 U-Net, random" if args.full_sd15 else "tiny")
    print(f"host: {embedded_host.host_label()}; model {label}; {res} px; compute {dtype}; λ = {args.weight:g}; "
          f"{args.parametrisation} from '{args.initializer}', lr {lr:g}, {args.steps} steps")
    for reduction, (shares, att, dist) in rows.items():
        print(f"{reduction:12s} attention grad share per step: " + " ".join(f"{100 * s:.3g}%" for s in shares))
        print(f"{'':12s} attention term per step:       " + " ".join(f"{a:.3g}" for a in att)
              + f"   map distance after: {dist:.4f}")
    mean = rows["mean"][0][-1]
    print(f"share ratio sum_spatial/mean at the last step: {rows['sum_spatial'][0][-1] / max(mean, 1e-30):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
