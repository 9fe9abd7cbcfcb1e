"""python -m bench.world_claims: run what is missing of the design (each run cached as it finishes), then write the
report. See bench/world_claims/__init__.py."""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))

from bench.world_claims import plan, report  # noqa: E402

DEFAULT_STEPS = 150  # the demo's: enough for the world's identities to form (docs/world.md)


def _ints(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        try:
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: give numbers and ranges, e.g. 0-7 or 0,1") from None
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.world_claims", description=__doc__)
    # Committed, not under .cache: every session here starts on a fresh machine, and the full design takes longer
    # than one session, so the finished runs must travel with the repository for the table to accumulate.
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "results",
                    help="where each run's result is cached, in OUT/runs/ (resumable: finished runs are not "
                         "repeated; default docs/results, committed)")
    ap.add_argument("--people", type=_ints, default=_ints("0-7"), help="held-out people (default 0-7)")
    ap.add_argument("--seeds", type=_ints, default=[0, 1], help="training seeds (default 0,1)")
    ap.add_argument("--variants", default=",".join(plan.VARIANT_NAMES),
                    help=f"comma-separated, of {', '.join(plan.VARIANT_NAMES)} (default: all)")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default {DEFAULT_STEPS})")
    ap.add_argument("--prompts", type=int, default=len(plan.MOVES), help="the first N prompts (default: all)")
    ap.add_argument("--hours", type=float, default=0.0,
                    help="start no new run after this many hours (0 = no limit); the report covers what is done")
    ap.add_argument("--report-only", action="store_true",
                    help="start no run: write the report from the runs already cached (e.g. after sharded calls)")
    ap.add_argument("--report", type=Path, default=None,
                    help="the report's markdown file (default docs/results.md when OUT is the default, else "
                         "OUT/results.md); its figures go to a folder named like it without .md")
    return ap


def run_path(out: Path, run: plan.Run, steps: int) -> Path:
    return out / "runs" / f"{run.key}-steps{steps}.json"


STALE = object()
"""A cached result that is not this run's: measured on other weights, recipe, settings or prompts."""


def cached_result(out: Path, run: plan.Run, steps: int, recipe: str, moves) -> dict | object | None:
    """The cached result of `run` (None: none cached; STALE: one for something else). A result from before cache
    keys were recorded counts when it holds every prompt; the report then says its provenance is not recorded."""
    from bench.world_claims.measure import run_key
    path = run_path(out, run, steps)
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if "cache_key" not in result:
        return result if len(result["pictures"]) == len(moves) else STALE
    return result if result["cache_key"] == run_key(run, steps, recipe, moves) else STALE


def _committed_recipe() -> str:
    from world import checkpoint
    return checkpoint.recipe(checkpoint.UNET_WEIGHTS)


def main(argv=None, world=None) -> int:
    """`world`: a measure.World already booted (tests); by default the host is booted here when runs are missing."""
    args = parser().parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    runs = plan.runs(variants, args.people, args.seeds)
    moves = plan.MOVES[:args.prompts]
    if args.steps < 1 or not 1 <= args.prompts <= len(plan.MOVES):
        raise SystemExit(f"--steps must be >= 1 and --prompts 1..{len(plan.MOVES)}")
    recipe = getattr(world, "recipe", None) or _committed_recipe()
    cached = {r: cached_result(args.out, r, args.steps, recipe, moves) for r in runs}
    missing = [r for r in runs if cached[r] is None or cached[r] is STALE]
    stale = [r for r in runs if cached[r] is STALE]
    print(f"claims benchmark: {len(runs)} runs ({len(variants)} variants × {len(args.people)} people × "
          f"{len(args.seeds)} seeds, {args.steps} steps, {len(moves)} prompts); {len(runs) - len(missing)} cached in "
          f"{args.out}", flush=True)
    if stale:
        print(f"{len(stale)} cached runs are of other weights, recipe, settings or prompts than this command's "
              f"(e.g. {stale[0].key}): {'left out' if args.report_only else 'measured again'}", flush=True)
    if missing and not args.report_only:
        from bench.world_claims.measure import boot_world, measure
        from sefi_core.atomic import atomic_write, atomic_write_text
        world = world or boot_world(Path(tempfile.mkdtemp(prefix="sefi-world-claims-")))
        started = time.perf_counter()
        for i, run in enumerate(missing):
            if args.hours and time.perf_counter() - started > args.hours * 3600:
                print(f"--hours {args.hours} reached: {len(missing) - i} runs left for the next call", flush=True)
                break
            result, arrays = measure(world, run, args.steps, moves)
            path = run_path(args.out, run, args.steps)
            path.parent.mkdir(parents=True, exist_ok=True)
            maps = arrays["photo_maps"]
            atomic_write(path.with_suffix(".npz"), lambda f: np.savez_compressed(
                f, photo=arrays["photo"], pictures=np.stack(arrays["pictures"]),
                id_map=maps[0].numpy(), ref_map=maps[1].numpy()))
            atomic_write_text(path, json.dumps(result, indent=1))  # last: a run counts as done once this exists
            cached[run] = result
            scores = report.run_scores(result)
            print(f"[{i + 1}/{len(missing)}] {run.key}: identity {100 * scores['identity']:.0f} %, prompt "
                  f"{100 * scores['prompt']:.0f} %, face share {100 * (scores['overfit_photo'] or 0):.0f} % "
                  f"({result['seconds']:.0f} s)", flush=True)
    done = [cached[r] for r in runs if cached[r] is not None and cached[r] is not STALE]
    if not done:
        print("no finished runs to report")
        return 1
    default_out = parser().get_default("out")
    target = args.report or (REPO / "docs" / "results.md" if args.out == default_out else args.out / "results.md")
    write_report(done, args, target, argv, planned=len(runs))
    print(f"report: {target}")
    return 0


def write_report(done: list[dict], args, target: Path, argv, planned: int | None = None) -> None:
    from sefi_core.attention_picture import render_attention_picture
    import torch
    report.check_one_world(done)
    table = report.summarise(done)
    figures_dir = target.with_suffix("")
    figures_dir.mkdir(parents=True, exist_ok=True)
    rel = figures_dir.name
    figures = {}
    report.plot_tradeoff(table, figures_dir / "tradeoff.png")
    figures["identity vs prompt fidelity"] = f"{rel}/tradeoff.png"
    if "ti" in table and len(table) > 1:
        report.plot_against_ti(table, report.per_person(done), figures_dir / "against_ti.png")
        figures["each variant against TI, paired"] = f"{rel}/against_ti.png"
    if sum(n in table for n in plan.LAMBDA_SWEEP) >= 2:
        report.plot_lambda(table, figures_dir / "lambda_sweep.png")
        figures["the λ sweep"] = f"{rel}/lambda_sweep.png"

    def arrays(variant, person, seed):
        path = run_path(args.out, plan.Run(variant, person, seed), args.steps).with_suffix(".npz")
        return np.load(path) if path.exists() else None

    first = min((r["person"], r["seed"]) for r in done)
    rows = []
    for name in table:
        a = arrays(name, *first)
        if a is not None:
            tiles = [a["photo"]] + list(a["pictures"])
            row = np.concatenate([np.pad(t, ((2, 2), (2, 2), (0, 0)), constant_values=1.0) for t in tiles], axis=1)
            rows.append((f"{name}: the photo, then the prompts in order", (row * 255).round().astype(np.uint8)))
    if rows:
        report.picture_rows(rows, figures_dir / "pictures.png")
        figures[f"person {first[0]}, seed {first[1]}: each variant's pictures"] = f"{rel}/pictures.png"
    attention = []
    for person in sorted({r["person"] for r in done})[:3]:
        for name in ("ti", "sefi"):
            a = arrays(name, person, first[1])
            if a is not None:
                picture = render_attention_picture(torch.from_numpy(a["photo"])[None],
                                                   [torch.from_numpy(a["id_map"])], [torch.from_numpy(a["ref_map"])])
                attention.append((f"{name}, person {person}", picture))
    if attention:
        report.picture_rows(attention, figures_dir / "attention_ti_vs_sefi.png", scale=1)
        figures["the identity token's attention over the photo: TI vs SeFi"] = f"{rel}/attention_ti_vs_sefi.png"
    command = "python -m bench.world_claims " + shlex.join(argv if argv is not None else sys.argv[1:])
    report.write_markdown(target, report.markdown(table, done, command, figures, planned=planned))


if __name__ == "__main__":
    sys.exit(main())
