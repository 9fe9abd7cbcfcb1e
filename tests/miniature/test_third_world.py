"""The third world (world/third/): rendered pictures read back to their facts through views and two people, the reader
rejects what the world cannot draw, captions never name what a view hides, the names are single CLIP tokens, chance
identity is ≤ 25 %, and the pretraining stream itself never shows a held-out person."""
from __future__ import annotations

import numpy as np
import pytest

from world.third import captions, read as reader, roster
from world.third.captions import Request, prompt, random_facts, request_facts
from world.third.render import (CELL, FRAMING_LAYOUT, FRAMINGS, GRID, VIEWS, Facts, face_box, face_mask,
                                head_columns, render, render_cells, visible_look, visible_traits)
from world.third.score import chance_fidelity, chance_table, identity_fidelity, prompt_fidelity, traits_right


def _truth_of(person) -> dict:
    """What a person's framing and view show of their wordless traits, as the reader reports them."""
    out = {}
    for trait in visible_traits(person.framing, person.view):
        if trait.startswith("mark_"):
            out[trait] = person.identity.mark == trait[len("mark_"):]
        else:
            out[trait] = getattr(person.identity, trait)
    return out


def _wrong(facts: Facts, reading, skin_tolerance: float = 1e-6) -> list[str]:
    wrong = [] if reading.scene == facts.scene else ["scene"]
    if len(reading.people) != len(facts.people):
        return wrong + ["people"]
    for person, seen in zip(facts.people, reading.people):
        if (seen.framing, seen.view) != (person.framing, person.view):
            wrong.append("framing/view")
            continue
        if seen.column != person.x or seen.face_box != face_box(person):
            wrong.append("place")
        look = {k: getattr(person.look, k) for k in visible_look(person.framing, person.view)} | \
            {"old": person.look.old}
        wrong += [f"look {k}" for k in look if seen.look.get(k) != look[k]]
        for trait, value in _truth_of(person).items():
            got = seen.identity.get(trait)
            if got is None or (abs(got - value) > skin_tolerance if trait == "skin" else got != value):
                wrong.append(trait)
        if set(seen.identity) != set(visible_traits(person.framing, person.view)):
            wrong.append("traits shown")
    return wrong


def test_rendered_pictures_read_back_exactly_through_views_and_two_people():
    rng = np.random.default_rng(11)
    samples = [random_facts(rng) for _ in range(300)]
    failures = [(f, w) for f in samples if (w := _wrong(f, reader.read(render(f))))]
    assert not failures, failures[:3]
    people = [p for f in samples for p in f.people]
    assert {len(f.people) for f in samples} == {0, 1, 2}
    assert {(p.framing, p.view) for p in people} == {(f, v) for f in FRAMINGS for v in FRAMING_LAYOUT[f].views}
    assert max(reader.read(render(f)).error for f in samples[:20]) < 1e-6


def test_reader_tolerates_generation_noise():
    """Generated pictures are never exact: colours off by a little still read as the same facts, unrejected."""
    rng = np.random.default_rng(3)
    samples = [random_facts(rng) for _ in range(150)]
    readings = [reader.read_cells(np.clip(render_cells(f) + rng.normal(0, 0.04, (GRID, GRID, 3)), 0, 1))
                for f in samples]
    wrong = [w for f, r in zip(samples, readings) if (w := _wrong(f, r, skin_tolerance=0.1))]
    assert len(wrong) / len(samples) <= 0.05, wrong[:5]
    assert not any(r.rejected for r in readings)


def test_reject_threshold_is_the_calibrated_one_and_rejects_what_the_world_cannot_draw():
    assert reader.calibrate_threshold() == pytest.approx(reader.REJECT_THRESHOLD, abs=5e-4)
    rng = np.random.default_rng(0)
    grey = np.full((GRID * CELL, GRID * CELL, 3), 0.5, np.float32)
    noise = rng.uniform(0, 1, (GRID, GRID, 3)).repeat(CELL, 0).repeat(CELL, 1)
    person = roster.held_out_identities()[0]
    request = Request(scene="beach", framing="close-up")
    for picture in (grey, noise):
        reading = reader.read(picture)
        assert reading.rejected and reading.error > reader.REJECT_THRESHOLD
        assert identity_fidelity(reading, person) == 0.0 and prompt_fidelity(reading, request) == 0.0
    clean = reader.read(render(request_facts(request, person, rng)))
    assert not clean.rejected and identity_fidelity(clean, person) == pytest.approx(1.0)


def test_views_hide_the_far_cheek_and_profiles_the_far_eye():
    assert visible_traits("close-up", "front") == ("skin", "brow", "nose", "mark")
    assert visible_traits("close-up", "three-quarter-left") == ("skin", "brow", "nose", "ear", "mark_left")
    assert visible_traits("close-up", "profile-right") == ("skin", "brow", "nose", "ear", "mark_right")
    assert visible_traits("wide", "front") == ("skin",)
    # A mark on the hidden cheek leaves the picture as if there were none: not counted, so not scored.
    rng = np.random.default_rng(1)
    person = roster.held_out_identities()[2]            # mark on the right cheek
    assert person.mark == "right"
    facts = request_facts(Request(scene="studio", framing="close-up", view="profile-left"), person, rng)
    reading = reader.read(render(facts))
    assert reading.people[0].identity["mark_left"] is False
    assert identity_fidelity(reading, person) == pytest.approx(1.0)
    eyes = {v: sum(col.count("E") for col in head_columns("close-up", v)) for v in VIEWS}
    assert eyes["front"] == eyes["three-quarter-left"] == 2 and eyes["profile-left"] == eyes["profile-right"] == 1


def test_chance_identity_is_at_most_a_quarter_in_every_framing_and_view():
    table = chance_table()
    assert max(table.values()) <= 0.25, table
    # and the formula is what random people's traits score against a rendered truth's reading
    rng = np.random.default_rng(2)
    for framing, view in (("close-up", "profile-left"), ("head-and-shoulders", "front")):
        scores = []
        for _ in range(40):
            truth = roster.unnamed_identity(rng)
            reading = reader.read(render(request_facts(Request(scene="studio", framing=framing, view=view), truth,
                                                       rng)))
            scores += [identity_fidelity(reading, roster.unnamed_identity(rng)) for _ in range(25)]
        assert np.mean(scores) == pytest.approx(chance_fidelity(framing, view), abs=0.03)


def test_two_people_are_read_on_their_own_sides_with_their_own_traits():
    rng = np.random.default_rng(4)
    left, right = roster.held_out_identities()[3], roster.held_out_identities()[4]
    for framing in FRAMINGS:
        request = Request(scene="library", framing=framing, pair=True)
        reading = reader.read(render(request_facts(request, left, rng, partner=right)))
        assert len(reading.people) == 2 and reading.people[0].column < reading.people[1].column
        assert identity_fidelity(reading, left, 0) == pytest.approx(1.0) == identity_fidelity(reading, right, 1)
        assert identity_fidelity(reading, right, 0) < 1.0
        assert traits_right(reading, left, 0)[0] == traits_right(reading, left, 0)[1] > 0
        assert prompt_fidelity(reading, request) == 1.0
        assert face_mask(request_facts(request, left, rng, partner=right), which=1).sum() > 0


def test_names_are_single_clip_tokens_of_the_hosts_tokenizer(host):
    import comfy.sd1_clip
    tokenizer = comfy.sd1_clip.SD1Tokenizer(embedding_directory=None)

    def ids(text):
        return [t for t, _ in tokenizer.tokenize_with_weights(text)["l"][0] if t not in (49406, 49407)]

    assert len(roster.NAMES) == len(set(roster.NAMES)) == 200
    tokens = {name: ids(name) for name in roster.NAMES}
    assert all(len(t) == 1 for t in tokens.values()), {n: t for n, t in tokens.items() if len(t) != 1}
    assert len({t[0] for t in tokens.values()}) == len(roster.NAMES)
    # no name is a word the world's other captions use (captions with every name left out)
    from dataclasses import replace
    rng = np.random.default_rng(9)
    unnamed = [replace(captions.mentioned(random_facts(rng), rng), name=None, partner=None) for _ in range(400)]
    vocabulary = {t for request in unnamed for t in ids(prompt(request, rng=rng))}
    assert len(vocabulary) > 50 and not vocabulary & {t[0] for t in tokens.values()}
    assert ids("a photo of emma on a beach") == ids("a photo of") + tokens["emma"] + ids("on a beach")


def _held_out_in(people) -> list:
    held = roster.held_out_identities()
    return [p for p in people if roster.nearest_distance(p, held) < roster.MARGIN]


def _stream_people(monkeypatch, batches: int) -> list:
    """Every person the pretraining loop's own draw (world.train.draw_batch) puts in its pictures."""
    from world import train as pretrain
    seen = []
    real = captions.pretraining_pair

    def watch(rng):
        facts, caption = real(rng)
        seen.extend(p.identity for p in facts.people)
        return facts, caption

    monkeypatch.setattr(captions, "pretraining_pair", watch)
    rng = np.random.default_rng(0)
    for _ in range(batches):
        pretrain.draw_batch("third", rng, 32, held_out=None)
    return seen


def test_the_pretraining_stream_never_shows_a_held_out_person(monkeypatch):
    people = _stream_people(monkeypatch, batches=60)
    assert len(people) > 1500
    assert not _held_out_in(people)
    assert all(roster.is_kept_out(p) for p in roster.ROSTER.values())


def test_the_stream_check_catches_a_held_out_person_who_slips_in(monkeypatch):
    """The same check on the same stream with the exclusion switched off finds people inside the margin: the test
    above has the power to fail."""
    monkeypatch.setattr(roster, "is_kept_out", lambda identity: True)
    assert _held_out_in(_stream_people(monkeypatch, batches=60))


def test_captions_name_people_views_and_pairs_as_the_picture_shows_them():
    rng = np.random.default_rng(5)
    named = persons = 0
    for _ in range(800):
        facts, caption = captions.pretraining_pair(rng)
        if not facts.people:
            assert "person" not in caption and "people" not in caption
            continue
        names_said = [w for w in caption.replace(",", " ").split() if w in roster.ROSTER]
        assert all(n in [p.name for p in facts.people] for n in names_said), (caption, facts)
        if len(facts.people) == 2:
            assert not any(v in caption for v in ("facing", "from the front", "glasses", "smiling", " eyes"))
            order = [p.name for p in facts.people if p.name in names_said]
            assert names_said == order, (caption, facts)   # the left person is named first
            continue
        person = facts.people[0]
        persons += 1
        named += bool(names_said)
        for phrase in captions.VIEW_PHRASE.values():
            assert phrase not in caption or phrase == captions.VIEW_PHRASE[person.view], (caption, facts)
        shown = visible_look(person.framing, person.view)
        for word, look in ((" eyes", "eyes"), ("glasses", "glasses"), ("smiling", "smiling")):
            assert word not in caption or look in shown, (caption, facts)
    # a good share of person captions name the person, the rest say "a person"
    assert 0.55 < named / persons < 0.8
    assert prompt(Request(scene="beach", framing="close-up", name="emma", view="profile-left")) == \
        "a close-up photo of the face of emma in profile facing left, on a beach"
    assert prompt(Request(scene="library", framing="head-and-shoulders", pair=True, name="emma", partner="noah")) == \
        "a portrait photo of emma and noah in a library"
    assert prompt(Request(scene="beach", framing="close-up"), subject="sks person") == \
        "a close-up photo of the face of a sks person on a beach"
