"""The claims benchmark's report: per variant, means with 95 % intervals over the held-out people (the independent
unit: each person's seeds are averaged first), the paper's predictions checked against them, the runs' provenance,
and the plots."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .plan import LAMBDA_SWEEP, MOVE_KINDS, VARIANT_NAMES, variant

HAND_WRITTEN = "<!-- Written by hand below this line; the bench keeps it when it rewrites this file. -->"
KIND_ITEMS = {"scene": ("scene",), "framing": ("framing",),
              "attribute": ("hair", "eyes", "glasses", "hat", "smiling", "old")}


def interval(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95 % t-interval, n); the half-width is nan for fewer than two values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    if v.size == 1:
        return float(v[0]), float("nan"), 1
    from scipy.stats import t
    return float(v.mean()), float(t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)), int(v.size)


def run_scores(result: dict) -> dict[str, float | None]:
    """One run's numbers: means over its pictures (identity counts 0 where no person was drawn)."""
    pics = result["pictures"]
    scores = {
        "identity": float(np.mean([p["identity"] or 0.0 for p in pics])),
        "prompt": float(np.mean([p["prompt_fidelity"] for p in pics])),
        "overfit_photo": result["photo_face_share"],
        "overfit_generated": _mean([p["face_share"] for p in pics]),
        "grad_share": _mean([s for step, s in result["grad_shares"] if step > 1]),
    }
    for kind in MOVE_KINDS:
        shown = [ok for p in pics for item, ok in p["items"].items() if item in KIND_ITEMS[kind]]
        scores[kind] = float(np.mean(shown)) if shown else None
    return scores


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise(results: list[dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """variant → metric → (mean, 95 % half-width, n people): over people, each person's seeds averaged first — two
    seeds of one person are not two independent observations of the method."""
    people = per_person(results)
    table = {}
    for name in VARIANT_NAMES:
        if name in people:
            rows = list(people[name].values())
            table[name] = {m: interval([r[m] for r in rows]) for m in rows[0]}
    return table


def _pct(cell: tuple[float, float, int]) -> str:
    mean, half, n = cell
    if n == 0:
        return "—"
    return f"{100 * mean:.1f}" + ("" if math.isnan(half) else f" ± {100 * half:.1f}")


def _pm(delta: float, slack: float) -> str:
    return f"{100 * delta:+.1f}" + ("" if math.isnan(slack) else f" ± {100 * slack:.1f}") + " points"


def per_person(results: list[dict]) -> dict[str, dict[int, dict]]:
    """variant → person → that person's scores, averaged over their seeds (a metric a run lacks is left out of its
    person's mean): the unit every interval and paired comparison is taken over."""
    runs: dict[str, dict[int, list[dict]]] = {}
    for r in results:
        runs.setdefault(r["variant"], {}).setdefault(r["person"], []).append(run_scores(r))
    return {name: {person: {m: _mean([s[m] for s in seeds]) for m in seeds[0]} for person, seeds in people.items()}
            for name, people in runs.items()}


def difference(table, runs, a: str, b: str, metric: str) -> tuple[float, float]:
    """(a − b, the 95 % half-width of that difference): paired over the people both variants share when there are
    two or more (runs: per_person), else the difference of the means with the sum of their half-widths (nan below
    two people each)."""
    if runs and a in runs and b in runs:
        shared = [k for k in runs[a] if k in runs[b]
                  and runs[a][k][metric] is not None and runs[b][k][metric] is not None]
        if len(shared) >= 2:
            mean, half, _ = interval([runs[a][k][metric] - runs[b][k][metric] for k in shared])
            return mean, half
    (ma, ha, _), (mb, hb, _) = table[a][metric], table[b][metric]
    return ma - mb, ha + hb


def predictions(table, runs=None) -> list[tuple[str, str, str]]:
    """The paper's predictions, each with what was measured and whether it held (yes / no / unclear: the 95 %
    interval of the difference holds 0, or the margin). `runs` (per_person): where two variants were trained on the
    same people, their difference is taken person by person — the people differ far more than the variants, and
    pairing takes that spread out; without it, or with under two shared people, the difference's slack is the sum
    of the two variants' half-widths."""
    out = []
    if not {"ti", "sefi"} <= set(table):
        return out

    def diff(a, b, metric):
        return difference(table, runs, a, b, metric)

    def verdict(delta, slack, want_positive=True):
        if math.isnan(slack):
            return "unclear (one run)"
        if (delta > slack) if want_positive else (delta < -slack):
            return "yes"
        if (delta < -slack) if want_positive else (delta > slack):
            return "no"
        return "unclear (intervals overlap)"

    def ti_lowest(metric) -> tuple[str, str]:
        """(how many variants TI is clearly below, the verdict): yes when it is clearly below each other variant,
        no when one is clearly below TI, else unclear."""
        others = [v for v in table if v != "ti" and not math.isnan(table[v][metric][0])]
        gaps = [diff(v, "ti", metric) for v in others]
        below = sum(d - s > 0 for d, s in gaps if not math.isnan(s))
        count = f"; TI clearly below {below} of the {len(others)} others"
        if any(d + s < 0 for d, s in gaps if not math.isnan(s)):
            return count, "no"
        if gaps and below == len(gaps):
            return count, "yes"
        return count, "unclear (one run)" if any(math.isnan(s) for _, s in gaps) else "unclear (intervals overlap)"

    def lowest(metric):
        """The variant with the lowest mean, or None on a tie."""
        ranked = sorted(table, key=lambda v: table[v][metric][0])
        tie = len(ranked) > 1 and table[ranked[0]][metric][0] == table[ranked[1]][metric][0]
        return None if tie else ranked[0]

    overfit = table["ti"]["overfit_photo"][0]
    top = lowest("overfit_photo")
    count, held = ti_lowest("overfit_photo")
    out.append(("TI puts the least of its attention on the face (the highest overfit)",
                f"TI {100 * overfit:.1f} % of its attention on the face; the least: "
                + (f"{top} {100 * table[top]['overfit_photo'][0]:.1f} %" if top else "a tie") + count, held))
    d, s = diff("sefi", "ti", "overfit_photo")
    dg, sg = diff("sefi", "ti", "overfit_generated")
    out.append(("SeFi's identity token keeps more of its attention on the face than TI's",
                f"SeFi − TI on the photo = {_pm(d, s)}; on the generated pictures = {_pm(dg, sg)}", verdict(d, s)))
    low = lowest("prompt")
    count, held = ti_lowest("prompt")
    out.append(("TI has the lowest prompt fidelity", "lowest: " + (
        f"{low} {100 * table[low]['prompt'][0]:.1f} %" if low else "a tie") + count, held))
    d, s = diff("sefi", "ti", "identity")
    # Within the margin only when the whole interval is: a mean inside it with a wide interval proves nothing.
    out.append(("SeFi keeps identity fidelity within a few (5) points of TI",
                f"SeFi − TI = {_pm(d, s)}", "unclear (one run)" if math.isnan(s) else (
                    "yes" if d - s > -0.05 else ("no" if d + s < -0.05 else "unclear (intervals overlap)"))))
    d, s = diff("sefi", "ti", "prompt")
    out.append(("SeFi's prompt fidelity rises clearly above TI's", f"SeFi − TI = {_pm(d, s)}", verdict(d, s)))
    # The photo is a studio close-up: a token that learned the whole picture drags the studio into other scenes.
    d, s = diff("sefi", "ti", "scene")
    out.append(("TI's studio leaks into the scenes asked for (scene fidelity: SeFi above TI)",
                f"SeFi − TI = {_pm(d, s)}", verdict(d, s)))
    for name, what in (("no_attention", "the attention loss"), ("no_kv_split", "the K/V split"),
                       ("one_stage", "the stage split")):
        if name in table:
            d, s = diff("sefi", name, "prompt")
            di, _ = diff("sefi", name, "identity")
            out.append((f"{what} adds something (SeFi vs without it)",
                        f"prompt {_pm(d, s)}, identity {100 * di:+.1f} points", verdict(d, s)))
    sweep = [n for n in LAMBDA_SWEEP if n in table]
    if len(sweep) >= 3:
        first, last = sweep[0], sweep[-1]
        d, s = diff(last, first, "overfit_photo")
        out.append(("small λ overfits (less attention on the face than large λ)",
                    f"face share at λ {variant(last).weight:g} − at λ {variant(first).weight:g}: "
                    f"{_pm(d, s)}", verdict(d, s)))
    # Only a λ above the default can show what a large λ does (a sweep still missing them compares nothing).
    large = [n for n in sweep if variant(n).weight > variant("sefi").weight]
    if "sefi" in table and large:
        d, s = diff(large[-1], "sefi", "identity")
        out.append(("large λ loses the identity", f"identity at λ {variant(large[-1]).weight:g} − at 0.003: "
                    f"{_pm(d, s)}", verdict(d, s, want_positive=False)))
    return out


def check_one_world(results: list[dict]) -> None:
    """Refuse to put runs of different world weights or checkpoint recipes in one table, and runs that recorded
    theirs beside runs that did not (their weights cannot be compared)."""
    recipes = {(r.get("provenance") or {}).get("recipe") for r in results}
    if len(recipes) > 1:
        unrecorded = sum(1 for r in results if "provenance" not in r)
        detail = (f"{unrecorded} of them predate provenance records" if None in recipes
                  else f"{len(recipes)} different recipes")
        raise SystemExit(f"these {len(results)} runs were not measured on one world ({detail}); report each world's "
                         "runs apart (--out) or measure the older ones again (delete their files in OUT/runs/)")


def provenance_lines(results: list[dict]) -> list[str]:
    """Markdown lines: where the runs ran (CPU, threads, versions, weights, code), and the (person, seed) groups whose
    variants ran on different machines — their timings, and possibly their last bits, are not comparable."""
    from .provenance import machine
    recorded = [r["provenance"] for r in results if "provenance" in r]
    lines = ["## Provenance", ""]
    if len(recorded) < len(results):
        lines.append(f"- {len(results) - len(recorded)} of {len(results)} runs predate provenance records: their "
                     "machine, threads, versions, weights hash and code commit are not recorded")
    for field, label in (("cpu", "CPU"), ("threads", "torch threads"), ("torch", "torch"), ("host", "host"),
                         ("weights_sha256", "world weights sha256"), ("commit", "code commit")):
        values = sorted({str(p[field]) for p in recorded})
        if values:
            lines.append(f"- {label}: {', '.join(values)}")
    groups: dict[tuple[int, int], set] = {}
    for r in results:
        if machine(r) is not None:
            groups.setdefault((r["person"], r["seed"]), set()).add(machine(r))
    split = sorted(k for k, machines in groups.items() if len(machines) > 1)
    if split:
        lines.append("- variants of one person and seed that ran on different machines: "
                     + ", ".join(f"person {p} seed {s}" for p, s in split))
    elif groups:
        lines.append("- every person and seed ran all its variants on one machine")
    return lines + [""]


def markdown(table, results: list[dict], command: str, figures: dict[str, str], planned: int | None = None) -> str:
    """`planned`: the number of runs the command's design holds, so a partial table says how partial it is."""
    people = sorted({r["person"] for r in results})
    seeds = sorted({r["seed"] for r in results})
    steps = sorted({r["steps"] for r in results})
    hosts = sorted({r["host"] for r in results})
    hours = sum(r["seconds"] for r in results) / 3600
    of_design = f" of the design's {planned}" if planned else ""
    lines = [
        "# The method's claims, measured in the miniature world",
        "",
        "Generated by `python -m bench.world_claims` (bench/world_claims/); docs/world.md describes the world.",
        "",
        f"- command: `{command}`",
        f"- runs: {len(results)}{of_design} — held-out people {_listed(people)}, seeds {_listed(seeds)}, "
        f"{_listed(steps)} training steps each, one studio "
        f"close-up per person; {sum(len(r['pictures']) for r in results)} pictures",
        f"- host: {', '.join(hosts)}; measured run time {hours:.2f} h "
        "(the runs' own times summed, each timed on the machine that ran it)",
        "- scores are means over the held-out people with 95 % t-intervals (each person's seeds averaged first: "
        "the people are the independent unit, n = people); identity: share of "
        "the person's wordless traits the picture shows (0 where no person is drawn); prompt: share of what the "
        "prompt asks that the picture shows; face share: the identity token's cross-attention mass inside the face "
        "(on the training photo, and on the generated pictures), at the trainer's loss sites, mean over three "
        "timesteps",
        "",
        "| variant | identity % | prompt % | scene % | framing % | attributes % | face share, photo % | "
        "face share, generated % | attention grad share % | people |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in table.items():
        lines.append(f"| {name} — {variant(name).label} | {_pct(row['identity'])} | {_pct(row['prompt'])} | "
                     f"{_pct(row['scene'])} | {_pct(row['framing'])} | {_pct(row['attribute'])} | "
                     f"{_pct(row['overfit_photo'])} | {_pct(row['overfit_generated'])} | "
                     f"{_pct(row['grad_share'])} | {row['identity'][2]} |")
    lines += ["", "## The paper's predictions", "",
              "Differences are taken person by person (the same person under both variants, seeds averaged) where "
              "two or more such pairs exist, with the 95 % t-interval of the paired differences over the people; a "
              "prediction holds (yes) only "
              "when that whole interval is on its side, fails (no) when it is wholly on the other.", "",
              "| prediction | measured | held |", "|---|---|---|"]
    lines += [f"| {p} | {m} | {v} |" for p, m, v in predictions(table, per_person(results))]
    lines += [""] + grad_share_table(results) + provenance_lines(results)
    for title, path in figures.items():
        lines += [f"![{title}]({path})", ""]
    return "\n".join(lines)


def grad_share_table(results: list[dict]) -> list[str]:
    """Markdown lines: the attention term's share of the gradient at each logged step, per variant with an attention
    loss, mean over its runs — the evidence docs/method.md asks for when choosing λ and the reduction."""
    by_variant: dict[str, dict[int, list[float]]] = {}
    for r in results:   # a run without an attention loss logs no shares and adds no row
        for step, share in r["grad_shares"]:
            if share is not None:
                by_variant.setdefault(r["variant"], {}).setdefault(step, []).append(share)
    if not by_variant:
        return []
    steps = sorted({step for shares in by_variant.values() for step in shares})
    lines = ["## The attention term's share of the gradient, step by step", "",
             "Mean over each variant's runs, in % (the trainer's own grad_share_attention at its logged steps); "
             "docs/method.md aims the default at 5–40 %.", "",
             "| variant | " + " | ".join(f"step {s}" for s in steps) + " | runs |",
             "|---|" + "---|" * (len(steps) + 1)]
    for name in VARIANT_NAMES:
        if name in by_variant:
            cells = [f"{100 * float(np.mean(by_variant[name][s])):.1f}" if s in by_variant[name] else "—"
                     for s in steps]
            runs = sum(r["variant"] == name for r in results)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {runs} |")
    return lines + [""]


def _listed(values) -> str:
    return ", ".join(str(v) for v in values)


def write_markdown(path: Path, text: str) -> None:
    """Write the generated report, keeping whatever follows HAND_WRITTEN in the existing file."""
    from sefi_core.atomic import atomic_write_text
    kept = ""
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if HAND_WRITTEN in old:
            kept = old[old.index(HAND_WRITTEN) + len(HAND_WRITTEN):]
    atomic_write_text(path, text + "\n" + HAND_WRITTEN + (kept if kept else "\n"))


def plot_tradeoff(table, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    for name, row in table.items():
        (mi, hi, _), (mp, hp, _) = row["identity"], row["prompt"]
        _labelled_point(ax, name, (mp, hp), (mi, hi))
    ax.set_xlabel("prompt fidelity (%)")
    ax.set_ylabel("identity fidelity (%)")
    ax.set_title("identity vs prompt fidelity per variant (95 % intervals)")
    ax.grid(alpha=0.3)
    _save(fig, path)


def _labelled_point(ax, name: str, x: tuple[float, float], y: tuple[float, float]) -> None:
    """One variant as a point with its 95 % intervals (x and y: (value, half-width), fractions; drawn in %)."""
    (vx, hx), (vy, hy) = x, y
    ax.errorbar(100 * vx, 100 * vy, xerr=None if math.isnan(hx) else 100 * hx,
                yerr=None if math.isnan(hy) else 100 * hy, fmt="o", capsize=3,
                color="tab:red" if name == "ti" else ("tab:blue" if name == "sefi" else "tab:gray"))
    ax.annotate(name, (100 * vx, 100 * vy), textcoords="offset points", xytext=(5, 4), fontsize=8)


def plot_against_ti(table, runs, path: Path) -> None:
    """Each variant's identity and prompt fidelity minus TI's, paired by person: the trade-off with the
    spread between people taken out (the absolute plot's intervals are mostly that spread)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5), dpi=100)
    for name in table:
        if name == "ti":
            continue
        _labelled_point(ax, name, difference(table, runs, name, "ti", "prompt"),
                        difference(table, runs, name, "ti", "identity"))
    ax.axhline(0, color="tab:red", lw=1)
    ax.axvline(0, color="tab:red", lw=1)
    ax.set_xlabel("prompt fidelity − TI's (points)")
    ax.set_ylabel("identity fidelity − TI's (points)")
    ax.set_title("each variant − TI (red lines: TI), paired by person, 95 % intervals over people", fontsize=10)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_lambda(table, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [n for n in LAMBDA_SWEEP if n in table]
    labels = [f"{variant(n).weight:g}" for n in names]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for metric, colour in (("identity", "tab:purple"), ("prompt", "tab:green"), ("overfit_photo", "tab:orange")):
        means = [100 * table[n][metric][0] for n in names]
        halves = [0 if math.isnan(table[n][metric][1]) else 100 * table[n][metric][1] for n in names]
        ax.errorbar(range(len(names)), means, yerr=halves, fmt="-o", capsize=3, color=colour,
                    label={"overfit_photo": "face share of attention (photo)"}.get(metric, f"{metric} fidelity"))
    ax.set_xticks(range(len(names)), labels)
    ax.set_xlabel("λ (reference attention loss)")
    ax.set_ylabel("%")
    ax.set_title("the λ sweep")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    import io

    from sefi_core.atomic import atomic_write_bytes
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    import matplotlib.pyplot as plt
    plt.close(fig)


def picture_rows(rows: list[tuple[str, np.ndarray]], path: Path, scale: int = 3) -> None:
    """Labelled rows of uint8 pictures stacked into one PNG."""
    from PIL import Image, ImageDraw
    width = max(r.shape[1] for _, r in rows) * scale
    parts = []
    for label, row in rows:
        image = Image.fromarray(row).resize((row.shape[1] * scale, row.shape[0] * scale), Image.NEAREST)
        header = Image.new("RGB", (width, 14), (255, 255, 255))
        ImageDraw.Draw(header).text((4, 1), label, fill=(20, 20, 20))
        canvas = Image.new("RGB", (width, image.height), (255, 255, 255))
        canvas.paste(image, (0, 0))
        parts += [np.asarray(header), np.asarray(canvas)]
    from sefi_core.atomic import atomic_write
    atomic_write(path, lambda f: Image.fromarray(np.concatenate(parts)).save(f, format="PNG"))
