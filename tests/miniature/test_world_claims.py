"""The claims benchmark's whole path, small: one held-out person, one step, two variants, two prompts — every score
computed and in range, each run cached, the report and its figures written. (The full table is a bench run:
docs/results.md.)"""
from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from bench.world_claims import plan, report
from bench.world_claims.__main__ import main
from bench.world_claims.measure import World


def _in_unit(x) -> bool:
    return isinstance(x, float) and 0.0 <= x <= 1.0


@pytest.mark.slow  # trains and renders two variants
def test_claims_bench_runs_two_variants_and_writes_the_report(tmp_path, host, pack, world_sd15, capsys):
    from host_boot import embedded_host
    world = World(host, world_sd15.name, embedded_host.host_label())
    argv = ["--out", str(tmp_path), "--people", "0", "--seeds", "0", "--variants", "ti,sefi", "--steps", "1",
            "--prompts", "2"]
    assert main(argv, world=world) == 0
    results = {}
    for name in ("ti", "sefi"):
        path = tmp_path / "runs" / f"{name}-person0-seed0-steps1.json"
        results[name] = r = json.loads(path.read_text())
        assert path.with_suffix(".npz").is_file()
        assert r["variant"] == name and r["steps"] == 1 and len(r["pictures"]) == 2
        assert _in_unit(r["photo_face_share"]) and r["photo_face_share"] > 0.0  # the photo has a face
        for picture, move in zip(r["pictures"], plan.MOVES):
            assert "sks person" in picture["prompt"]
            assert picture["identity"] is None or _in_unit(picture["identity"])
            assert _in_unit(picture["prompt_fidelity"])
            assert picture["face_share"] is None or _in_unit(picture["face_share"])
            assert set(picture["items"]) >= {"person", "scene", "framing"}
            assert math.isclose(picture["prompt_fidelity"], sum(picture["items"].values()) / len(picture["items"]))
            assert picture["moves"] == list(move.moves)
    # the attention loss is on for SeFi only: its gradient share is logged at step 1, TI has none
    assert results["ti"]["grad_shares"] == []
    (step, share), = results["sefi"]["grad_shares"]
    assert step == 1 and 0.0 <= share <= 1.0
    # the two variants are one pair: trained from the same photo with their own switches, sampled with the same
    # noise (a variant's settings dropped on the way to the node, or another person's photo, fails here)
    import numpy as np
    from sefi_core.identity import load_identity
    from bench.world_claims.measure import sample_seed
    folder = pack.glue("train_policies").identity_dir()
    ti, sefi = (load_identity(folder / f"{name}-person0-seed0.safetensors") for name in ("ti", "sefi"))
    assert ti.image_hashes and ti.image_hashes == sefi.image_hashes
    arrays = {name: np.load(tmp_path / "runs" / f"{name}-person0-seed0-steps1.npz") for name in ("ti", "sefi")}
    assert np.array_equal(arrays["ti"]["photo"], arrays["sefi"]["photo"])
    assert ([sample_seed(plan.Run("ti", 0, 0), i) for i in range(2)]
            == [sample_seed(plan.Run("sefi", 0, 0), i) for i in range(2)])
    assert (ti.stages, ti.training["parametrisation"], ti.training["attention_loss"]) == (1, "direct", "off")
    assert torch.equal(ti.tokens["clip_l"][:, 0], ti.tokens["clip_l"][:, 1])  # no K/V split: K is V
    assert sefi.stages > 1 and sefi.training["parametrisation"] == "self_attention"
    assert (sefi.training["attention_loss"], sefi.training["attention_weight"]) == ("reference", 0.003)
    assert not torch.equal(sefi.tokens["clip_l"][:, 0], sefi.tokens["clip_l"][:, 1])
    text = (tmp_path / "results.md").read_text()
    assert "| ti — textual inversion" in text and "| sefi — SeFi-IDE" in text
    assert "## The paper's predictions" in text
    assert report.HAND_WRITTEN in text
    # the gradient-share table has SeFi's logged step and no row for TI (no attention loss)
    assert f"| sefi | {100 * share:.1f} | 1 |" in text and "| ti |" not in text
    for figure in ("tradeoff.png", "against_ti.png", "pictures.png", "attention_ti_vs_sefi.png"):
        assert (tmp_path / "results" / figure).read_bytes()[:4] == b"\x89PNG", figure

    # a second call measures nothing new (no host is given: it would have to boot one) and keeps hand-written notes
    (tmp_path / "results.md").write_text(text + "\nmy reading of the table\n")
    capsys.readouterr()
    assert main(argv) == 0
    assert "2 cached" in capsys.readouterr().out
    assert (tmp_path / "results.md").read_text().endswith("my reading of the table\n")

    # --report-only starts no run for a person not yet measured (a world that cannot measure would fail if it did)
    # and reports the cached ones: how sharded calls are joined into one table
    capsys.readouterr()
    assert main(argv[:3] + ["0,1"] + argv[4:] + ["--report-only"], world=object()) == 0
    assert "2 cached" in capsys.readouterr().out
    assert not (tmp_path / "runs" / "ti-person1-seed0-steps1.json").exists()
    assert "runs: 2 of the design's 4" in (tmp_path / "results.md").read_text()

    # every run records where it ran and on what, and files its result under a key of everything that changes it
    from world import checkpoint
    for r in results.values():
        prov = r["provenance"]
        assert prov["weights_sha256"] == hashlib.sha256(world.weights.read_bytes()).hexdigest()
        assert prov["recipe"] == checkpoint.recipe(world.weights) and prov["threads"] >= 1
        assert prov["cpu"] and prov["torch"] == torch.__version__ and prov["host"] == world.host_label
    text = (tmp_path / "results.md").read_text()
    assert "## Provenance" in text and f"- CPU: {results['ti']['provenance']['cpu']}" in text
    assert "every person and seed ran all its variants on one machine" in text
    # a cached result for other prompts is not this run's: left out of a report, measured again by a run
    sefi_path = tmp_path / "runs" / "sefi-person0-seed0-steps1.json"
    assert main(argv[:-1] + ["1"], world=world) == 0          # one prompt: a new key, both runs measured again
    assert len(json.loads(sefi_path.read_text())["pictures"]) == 1
    capsys.readouterr()
    assert main(argv + ["--report-only"], world=object()) == 1    # two prompts asked: neither cached run counts
    out = capsys.readouterr().out
    assert "2 cached runs are of other weights, recipe, settings or prompts" in out and "left out" in out
    assert "no finished runs to report" in out


def test_interval_is_the_95_percent_t_interval():
    mean, half, n = report.interval([1.0, 2.0, 3.0, None])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    assert math.isnan(report.interval([0.5])[1]) and report.interval([])[2] == 0


def _table(**means):
    """A summary table where every metric of a variant has the given mean and a half-width of 0.01."""
    metrics = ("identity", "prompt", "overfit_photo", "overfit_generated", "grad_share", "scene", "framing",
               "attribute")
    return {v: {m: (values.get(m, 0.5), 0.01, 16) for m in metrics} for v, values in means.items()}


def test_predictions_say_yes_no_and_unclear_from_the_intervals():
    held = {p: v for p, _, v in report.predictions(_table(
        ti=dict(identity=0.80, prompt=0.50, overfit_photo=0.20),
        sefi=dict(identity=0.78, prompt=0.70, overfit_photo=0.60),
        no_attention=dict(identity=0.80, prompt=0.695, overfit_photo=0.30)))}
    assert held["TI puts the least of its attention on the face (the highest overfit)"] == "yes"
    assert held["TI has the lowest prompt fidelity"] == "yes"
    assert held["SeFi's identity token keeps more of its attention on the face than TI's"] == "yes"
    assert held["SeFi keeps identity fidelity within a few (5) points of TI"] == "yes"
    assert held["SeFi's prompt fidelity rises clearly above TI's"] == "yes"
    assert held["the attention loss adds something (SeFi vs without it)"] == "unclear (intervals overlap)"
    held = {p: v for p, _, v in report.predictions(_table(ti=dict(prompt=0.7, identity=0.9),
                                                           sefi=dict(prompt=0.5, identity=0.6)))}
    assert held["SeFi's prompt fidelity rises clearly above TI's"] == "no"
    assert held["SeFi keeps identity fidelity within a few (5) points of TI"] == "no"


def test_predictions_pair_runs_of_the_same_person_and_seed():
    # The people differ by 40 points, SeFi beats TI by 10 on each: unpaired intervals overlap, the paired one is clear.
    runs = {"ti": {(p, 0): {"prompt": 0.2 + 0.4 * p, "identity": 0.5, "overfit_photo": 0.2, "scene": 0.1 * p,
                            "overfit_generated": 0.2}
                   for p in range(3)},
            "sefi": {(p, 0): {"prompt": 0.3 + 0.4 * p + 0.001 * p * p, "identity": 0.5, "overfit_photo": 0.3,
                              "overfit_generated": 0.3, "scene": 0.1 * p + 0.05 + 0.001 * p * p} for p in range(3)}}
    metrics = ("prompt", "identity", "overfit_photo", "overfit_generated", "scene")
    table = {v: {m: report.interval([r[m] for r in rs.values()]) for m in metrics} for v, rs in runs.items()}
    unpaired = {p: (m, v) for p, m, v in report.predictions(table)}
    paired = {p: (m, v) for p, m, v in report.predictions(table, runs)}
    claim = "SeFi's prompt fidelity rises clearly above TI's"
    assert unpaired[claim][1] == "unclear (intervals overlap)" and paired[claim][1] == "yes"
    assert paired["TI's studio leaks into the scenes asked for (scene fidelity: SeFi above TI)"][1] == "yes"
    assert paired["TI has the lowest prompt fidelity"][1] == "yes"
    # A difference whose mean is inside the 5-point margin but whose interval is not proves nothing.
    wide = {v: {"identity": (m, 0.2, 3), "prompt": (0.5, 0.01, 3), "overfit_photo": (0.5, 0.01, 3),
                "overfit_generated": (0.5, 0.01, 3), "scene": (0.5, 0.01, 3)}
            for v, m in (("ti", 0.50), ("sefi", 0.48))}
    held = {p: v for p, _, v in report.predictions(wide)}
    assert held["SeFi keeps identity fidelity within a few (5) points of TI"] == "unclear (intervals overlap)"


def test_large_lambda_claim_compares_a_lambda_above_the_default_or_nothing():
    sweep_to_default = {"ti": {}, "sefi": dict(identity=0.6), "no_attention": {}, "lambda_1e-4": {}}
    held = {p: (m, v) for p, m, v in report.predictions(_table(**sweep_to_default))}
    assert "small λ overfits (less attention on the face than large λ)" in held
    assert "large λ loses the identity" not in held   # no λ above 0.003 measured yet: nothing to compare
    held = {p: (m, v) for p, m, v in report.predictions(_table(
        ti={}, sefi=dict(identity=0.6), **{"lambda_1e-2": dict(identity=0.55), "lambda_5e-2": dict(identity=0.3)}))}
    measured, verdict = held["large λ loses the identity"]
    assert measured.startswith("identity at λ 0.05 − at 0.003: -30.0") and verdict == "yes"


def test_runs_cover_every_variant_on_the_same_people_first():
    runs = plan.runs(["ti", "sefi"], [0, 1], [0, 1])
    assert [r.key for r in runs[:4]] == ["ti-person0-seed0", "sefi-person0-seed0", "ti-person1-seed0",
                                         "sefi-person1-seed0"]
    with pytest.raises(ValueError, match="unknown variant"):
        plan.runs(["tii"], [0], [0])
    assert plan.LAMBDA_SWEEP == ("no_attention", "lambda_1e-4", "sefi", "lambda_1e-2", "lambda_5e-2")


def _result(variant, person, seed, identity, cpu="cpu A", recipe="r1"):
    """A cached run's result with one picture and the given provenance (None: a run from before it was recorded)."""
    r = {"variant": variant, "person": person, "seed": seed, "steps": 1, "host": "h", "seconds": 1.0,
         "photo_face_share": 0.5, "grad_shares": [],
         "pictures": [{"identity": identity, "prompt_fidelity": 0.5, "face_share": 0.5, "items": {"scene": True}}]}
    if cpu is not None:
        r["provenance"] = {"cpu": cpu, "threads": 1, "torch": "t", "host": "h", "weights_sha256": "w",
                           "recipe": recipe, "commit": "c"}
    return r


def test_intervals_are_over_people_with_each_persons_seeds_averaged():
    # person 0's two seeds (0.2, 0.4) are one observation, 0.3; person 1 has one seed, 0.7
    results = [_result("ti", 0, 0, 0.2), _result("ti", 0, 1, 0.4), _result("ti", 1, 0, 0.7)]
    people = report.per_person(results)
    assert people["ti"][0]["identity"] == pytest.approx(0.3) and people["ti"][1]["identity"] == pytest.approx(0.7)
    mean, half, n = report.summarise(results)["ti"]["identity"]
    assert n == 2 and mean == pytest.approx(0.5)
    assert half == pytest.approx(report.interval([0.3, 0.7])[1])


def test_the_report_refuses_runs_of_different_worlds_and_flags_split_machines():
    report.check_one_world([_result("ti", 0, 0, 0.5), _result("sefi", 0, 0, 0.5)])
    with pytest.raises(SystemExit, match="2 different recipes"):
        report.check_one_world([_result("ti", 0, 0, 0.5), _result("sefi", 0, 0, 0.5, recipe="r2")])
    with pytest.raises(SystemExit, match="1 of them predate provenance"):
        report.check_one_world([_result("ti", 0, 0, 0.5), _result("sefi", 0, 0, 0.5, cpu=None)])
    lines = "\n".join(report.provenance_lines([_result("ti", 0, 0, 0.5), _result("sefi", 0, 0, 0.5, cpu="cpu B"),
                                               _result("ti", 1, 0, 0.5), _result("sefi", 1, 0, 0.5)]))
    assert "- CPU: cpu A, cpu B" in lines and "different machines: person 0 seed 0" in lines
    assert "person 1" not in lines
    old = "\n".join(report.provenance_lines([_result("ti", 0, 0, 0.5, cpu=None)]))
    assert "1 of 1 runs predate provenance records" in old


def test_the_cache_key_changes_with_everything_that_changes_a_run():
    from bench.world_claims.provenance import cache_key
    base = dict(variant_settings={"name": "ti"}, person=0, seed=0, steps=150, prompts=["a"], recipe="r")
    keys = {cache_key(**base)}
    for field, other in (("variant_settings", {"name": "sefi"}), ("person", 1), ("seed", 1), ("steps", 2),
                         ("prompts", ["a", "b"]), ("recipe", "s")):
        keys.add(cache_key(**{**base, field: other}))
    assert len(keys) == 7 and cache_key(**base) == cache_key(**dict(base))

