"""Timestep -> stage: floor(t * S / 1000), clamped, identical for numbers and tensors."""

from __future__ import annotations

import math

import pytest
import torch

from sefi_core.stages import MAX_STAGES, StageRange, check_stages, stage_of_timestep, stage_ranges


@pytest.mark.parametrize(
    ("t", "stage"),
    [(0, 0), (199, 0), (199.999, 0), (200, 1), (399.5, 1), (800, 4), (999, 4), (999.9, 4), (1000, 4), (5000, 4),
     (-0.001, 0), (-50, 0)],
)
def test_five_stages_for_numbers(t: float, stage: int) -> None:
    assert stage_of_timestep(t, 5) == stage
    assert isinstance(stage_of_timestep(t, 5), int)


def test_single_stage_is_always_zero() -> None:
    assert stage_of_timestep(999.0, 1) == 0
    assert stage_of_timestep(torch.tensor([0.0, 500.0, 999.0]), 1).tolist() == [0, 0, 0]


@pytest.mark.parametrize("stages", range(1, MAX_STAGES + 1))
def test_tensor_matches_numbers_everywhere(stages: int) -> None:
    ts = torch.arange(0, 1000, dtype=torch.float32)
    expected = [stage_of_timestep(float(t), stages) for t in range(1000)]
    got = stage_of_timestep(ts, stages)
    assert got.dtype == torch.int64
    assert got.tolist() == expected
    assert stage_of_timestep(ts.long(), stages).tolist() == expected
    assert stage_of_timestep(ts.double(), stages).tolist() == expected


@pytest.mark.parametrize("stages", range(1, MAX_STAGES + 1))
def test_half_precision_does_not_shift_boundaries(stages: int) -> None:
    ts = torch.arange(0, 1000, dtype=torch.float32)
    exact = ts[ts == ts.half().float()]  # the integer timesteps fp16 can hold
    assert stage_of_timestep(exact.half(), stages).tolist() == stage_of_timestep(exact, stages).tolist()


def test_tensor_clamps_and_keeps_shape() -> None:
    t = torch.tensor([[-3.0, 0.0], [1000.0, 1e6]])
    assert stage_of_timestep(t, 5).tolist() == [[0, 0], [4, 4]]


def test_ranges_for_five_stages() -> None:
    assert stage_ranges(5) == (
        StageRange(0, 0, 199),
        StageRange(1, 200, 399),
        StageRange(2, 400, 599),
        StageRange(3, 600, 799),
        StageRange(4, 800, 999),
    )


@pytest.mark.parametrize("stages", range(1, MAX_STAGES + 1))
def test_ranges_tile_the_timesteps_and_agree_with_stage_of_timestep(stages: int) -> None:
    ranges = stage_ranges(stages)
    assert ranges[0].first == 0 and ranges[-1].last == 999
    for prev, cur in zip(ranges, ranges[1:]):
        assert cur.first == prev.last + 1
    for r in ranges:
        assert {stage_of_timestep(t, stages) for t in range(r.first, r.last + 1)} == {r.stage}


@pytest.mark.parametrize("bad", [0, MAX_STAGES + 1, -1, True, 5.0, "5"])
def test_bad_stage_counts_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match=f"stages must be an integer from 1 to {MAX_STAGES}"):
        check_stages(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        stage_of_timestep(10.0, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        stage_ranges(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("t", [math.nan, math.inf])
def test_non_finite_number_is_refused(t: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        stage_of_timestep(t, 5)


def test_stage_combinations_follow_every_identitys_switch_points():
    from sefi_core.stages import stage_combinations

    assert stage_combinations([5]) == [(0,), (1,), (2,), (3,), (4,)]
    combos = stage_combinations([5, 3])
    # switches at t = 200, 400, 600, 800 (S=5) and 334, 667 (S=3): 7 distinct pairs, in timestep order
    assert combos == [(0, 0), (1, 0), (1, 1), (2, 1), (3, 1), (3, 2), (4, 2)]
    assert stage_combinations([2, 2]) == [(0, 0), (1, 1)]
