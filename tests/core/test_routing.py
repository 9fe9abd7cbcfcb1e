"""Routing per-stage K/V contexts over ComfyUI's cond/uncond batch chunks (comfyui-host.md A4)."""

from __future__ import annotations

import math

import pytest
import torch

from sefi_core import routing
from sefi_core.routing import Binding, ContextRouter, match_chunks, route_contexts

C = 16


def rand(length: int, seed: int, width: int = C) -> torch.Tensor:
    return torch.randn(1, length, width, generator=torch.Generator().manual_seed(seed))


def binding(seed: int, length: int = 77, key_length: int | None = None) -> Binding:
    kl = key_length or length
    return Binding(base=rand(length, seed), keys=rand(kl, seed + 100), values=rand(kl, seed + 200))


def batch(parts: list[torch.Tensor], rows: int = 1) -> torch.Tensor:
    """The host's context: every cond repeated to the LCM length, expanded to `rows` rows, concatenated."""
    length = math.lcm(*(p.shape[1] for p in parts))
    return torch.cat([p.repeat(1, length // p.shape[1], 1).expand(rows, -1, -1) for p in parts])


NEG = rand(77, 999)


@pytest.mark.parametrize(
    ("codes", "ours"),
    [([1, 0], [1]), ([0, 1], [0]), ([0], [0]), ([0, 0, 1], [0]), ([0, 0, 1], [1]), ([1, 0, 0], [2])],
)
@pytest.mark.parametrize("rows", [1, 3])
def test_orders_and_rows(codes: list[int], ours: list[int], rows: int) -> None:
    b = binding(1)
    parts = [b.base if i in ours else (NEG if c == 1 else rand(77, 50 + i)) for i, c in enumerate(codes)]
    context = batch(parts, rows)
    value = context * 2  # a previous patch may already have made value differ from context
    ctx, val = route_contexts(context, value, codes, [b])
    assert ctx.shape == val.shape == context.shape
    for i, (c_out, v_out) in enumerate(zip(ctx.chunk(len(codes)), val.chunk(len(codes)))):
        c_in, v_in = context.chunk(len(codes))[i], value.chunk(len(codes))[i]
        if i in ours:
            assert torch.equal(c_out, b.keys.expand(rows, -1, -1))
            assert torch.equal(v_out, b.values.expand(rows, -1, -1))
        else:
            assert torch.equal(c_out, c_in) and torch.equal(v_out, v_in)


def test_no_match_returns_the_same_objects() -> None:
    context = batch([NEG, rand(77, 5)])
    value = context.clone()
    out = route_contexts(context, value, [1, 0], [binding(1), binding(2)])
    assert out[0] is context and out[1] is value


def test_negative_chunk_equal_to_base_is_not_ours() -> None:
    b = binding(1)
    context = batch([b.base, b.base])
    ctx, _ = route_contexts(context, context, [1, 0], [b])
    assert torch.equal(ctx[:1], b.base) and torch.equal(ctx[1:], b.keys)


def test_two_bindings_match_different_chunks_first_binding_wins_ties() -> None:
    b1, b2, b1_twin = binding(1), binding(2), binding(1)
    other = rand(77, 7)
    context = batch([b2.base, other, NEG, b1.base])
    ctx, val = route_contexts(context, context, [0, 0, 1, 0], [b1, b2, b1_twin])
    assert torch.equal(ctx[0:1], b2.keys) and torch.equal(val[0:1], b2.values)
    assert torch.equal(ctx[1:2], other) and torch.equal(val[1:2], other)
    assert torch.equal(ctx[2:3], NEG)
    assert torch.equal(ctx[3:4], b1.keys) and torch.equal(val[3:4], b1.values)
    assert match_chunks(context, [0, 0, 1, 0], [b1, b2, b1_twin]) == (1, None, None, 0)


def test_base_repeated_to_lcm_is_recognised_and_lengths_follow_lcm() -> None:
    # Our cond is 77 tokens, the negative 154: the host repeats ours twice.
    b = binding(1)
    neg = rand(154, 3)
    context = batch([neg, b.base], rows=2)
    assert context.shape[1] == 154
    ctx, val = route_contexts(context, context + 1, [1, 0], [b])
    assert ctx.shape == (4, 154, C)
    assert torch.equal(ctx[:2], neg.expand(2, -1, -1))
    assert torch.equal(val[:2], neg.expand(2, -1, -1) + 1)
    assert torch.equal(ctx[2:], b.keys.repeat(1, 2, 1).expand(2, -1, -1))
    assert torch.equal(val[2:], b.values.repeat(1, 2, 1).expand(2, -1, -1))


def test_longer_keys_raise_the_common_length() -> None:
    # The K/V prompt may span more chunks than everything else: others get repeated, never zero-padded.
    b = binding(1, length=77, key_length=231)
    other = rand(154, 4)
    context = batch([NEG, b.base, other])
    assert context.shape[1] == 154
    ctx, val = route_contexts(context, context, [1, 0, 0], [b])
    assert ctx.shape == val.shape == (3, 462, C)
    assert torch.equal(ctx[0:1], NEG.repeat(1, 6, 1))
    assert torch.equal(ctx[1:2], b.keys.repeat(1, 2, 1))
    assert torch.equal(val[1:2], b.values.repeat(1, 2, 1))
    assert torch.equal(ctx[2:3], other.repeat(1, 3, 1))
    assert (ctx.abs().sum(-1) > 0).all()


def test_repetition_leaves_attention_unchanged() -> None:
    # Why repeating is a valid way to equalise lengths (and zero padding is not).
    q, k, v = torch.randn(1, 5, C), torch.randn(1, 7, C), torch.randn(1, 7, C)
    attend = torch.nn.functional.scaled_dot_product_attention
    assert torch.allclose(attend(q, k, v), attend(q, k.repeat(1, 3, 1), v.repeat(1, 3, 1)), atol=1e-6)
    padded = torch.cat([k, torch.zeros(1, 7, C)], 1), torch.cat([v, torch.zeros(1, 7, C)], 1)
    assert not torch.allclose(attend(q, k, v), attend(q, *padded), atol=1e-3)


def test_length_not_a_multiple_of_base_is_not_ours() -> None:
    b = binding(1, length=77)
    context = torch.cat([b.base, b.base[:, :1]], 1)  # 78 tokens starting with base
    assert route_contexts(context, context, [0], [b])[0] is context


def test_one_differing_row_is_not_ours() -> None:
    b = binding(1)
    context = batch([b.base], rows=3).clone()
    context[1, 10, 3] += 1e-3
    assert route_contexts(context, context, [0], [b])[0] is context


def test_atol_accepts_tiny_differences() -> None:
    b = binding(1)
    context = b.base + 1e-6
    assert route_contexts(context, context, [0], [b])[0] is context
    ctx, _ = route_contexts(context, context, [0], [b], atol=1e-5)
    assert torch.equal(ctx, b.keys)


def test_half_precision_context_matches_float32_base() -> None:
    b = binding(1)
    context = batch([NEG, b.base], rows=2).half()
    ctx, val = route_contexts(context, context, [1, 0], [b])
    assert ctx.dtype == val.dtype == torch.float16
    assert torch.equal(ctx[2:], b.keys.half().expand(2, -1, -1))
    assert torch.equal(val[2:], b.values.half().expand(2, -1, -1))


def test_width_mismatch_is_simply_not_ours() -> None:
    b = binding(1)
    context = rand(77, 1, width=C * 2)
    assert route_contexts(context, context, [0], [b])[0] is context


def test_output_does_not_alias_bindings_or_inputs() -> None:
    b = binding(1)
    context = batch([b.base, NEG])
    ctx, val = route_contexts(context, context, [0, 1], [b])
    ctx.add_(1)
    val.add_(1)
    assert torch.equal(b.keys, binding(1).keys) and torch.equal(context, batch([b.base, NEG]))


def test_bad_batch_split_and_value_shape_are_errors() -> None:
    context = torch.zeros(3, 77, C)
    with pytest.raises(ValueError, match="cannot be split into 2 equal batch chunks"):
        route_contexts(context, context, [0, 1], [binding(1)])
    with pytest.raises(ValueError, match="cannot be split"):
        route_contexts(context, context, [], [binding(1)])
    with pytest.raises(ValueError, match="must have the batch and length of context"):
        route_contexts(context, context[:, :10], [0, 1, 0], [binding(1)])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"base": torch.zeros(77, C)}, r"Binding.base must be a tensor \[1, L, C\]"),
        ({"keys": torch.zeros(2, 77, C)}, r"Binding.keys must be a tensor \[1, L, C\]"),
        ({"values": torch.zeros(1, 154, C)}, "must have the same shape"),
        ({"keys": torch.zeros(1, 77, 8), "values": torch.zeros(1, 77, 8)}, "differs from base width"),
    ],
)
def test_binding_validation(kwargs: dict, fragment: str) -> None:
    args = {"base": rand(77, 1), "keys": rand(77, 2), "values": rand(77, 3), **kwargs}
    with pytest.raises(ValueError, match=fragment):
        Binding(**args)


def test_binding_casts_once_per_dtype_and_device() -> None:
    b = binding(1)
    first = b.cast(torch.float16, torch.device("cpu"))
    assert b.cast(torch.float16, torch.device("cpu")) is first
    assert first[1].dtype == torch.float16
    assert b.cast(torch.float32, torch.device("cpu"))[1] is not first[1]


def test_router_matches_once_per_context_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    b = binding(1)
    context = batch([NEG, b.base])
    expected = route_contexts(context, context, [1, 0], [b])
    calls = []
    real = routing._match
    monkeypatch.setattr(routing, "_match", lambda *a: calls.append(1) or real(*a))
    router = ContextRouter([b])
    for _ in range(5):  # 5 attention sites in one step
        ctx, val = router(context, context, [1, 0])
        assert torch.equal(ctx, expected[0]) and torch.equal(val, expected[1])
    assert len(calls) == 1
    router(context, context, [0, 1])  # different chunk order: decide again
    assert len(calls) == 2
    other = batch([NEG, rand(77, 5)])
    assert router(other, other, [1, 0])[0] is other  # a new tensor: decide again
    assert len(calls) == 3


def test_concatenated_conditioning_swaps_only_our_blocks() -> None:
    """ConditioningConcat glues our tokens to another prompt's: only our 77-token block takes the stage's
    keys/values, in either position, also after LCM repetition."""
    b = binding(3)
    other, other_value = rand(77, 11), rand(77, 12)
    for tokens, values, ours in (([b.base, other], [b.base, other_value], 0), ([other, b.base], [other_value, b.base], 1)):
        chunk = torch.cat(tokens, dim=1)
        value_chunk = torch.cat(values, dim=1)
        context = torch.cat([NEG.repeat(1, 2, 1), chunk])
        value = torch.cat([NEG.repeat(1, 2, 1), value_chunk])
        ctx, val = route_contexts(context, value, [1, 0], [b])
        assert torch.equal(ctx[1:, ours * 77:(ours + 1) * 77], b.keys[0:1])
        assert torch.equal(val[1:, ours * 77:(ours + 1) * 77], b.values[0:1])
        rest = slice((1 - ours) * 77, (2 - ours) * 77)
        assert torch.equal(ctx[1:, rest], chunk[:, rest]) and torch.equal(val[1:, rest], value_chunk[:, rest])
        assert torch.equal(ctx[:1], context[:1])
        longer = torch.cat([chunk, chunk], dim=1)  # the host repeated it to the LCM with a 154-token chunk
        ctx2, _ = route_contexts(longer, longer, [0], [b])
        assert torch.equal(ctx2[:, ours * 77:(ours + 1) * 77], b.keys) and torch.equal(ctx2[:, 154 + ours * 77:154 + (ours + 1) * 77], b.keys)


def test_concatenation_is_not_spliced_when_keys_have_another_length() -> None:
    base = rand(77, 21)
    b = Binding(base, rand(154, 22), rand(154, 23))
    chunk = torch.cat([base, rand(77, 24)], dim=1)
    assert match_chunks(chunk, [0], [b]) == (None,)
    ctx, _ = route_contexts(chunk, chunk, [0], [b])
    assert ctx is chunk


def test_router_reuses_the_routed_pair_within_a_step_and_respects_a_new_value() -> None:
    b = binding(5)
    context = batch([NEG, b.base])
    router = ContextRouter([b])
    first = router(context, context, [1, 0])
    again = router(context, context, [1, 0])
    assert again[0] is first[0] and again[1] is first[1]
    other_value = context * 2  # an earlier patch changed the value input: route it, do not reuse
    ctx, val = router(context, other_value, [1, 0])
    assert torch.equal(ctx, first[0]) and torch.equal(val[:1], other_value[:1]) and torch.equal(val[1:], b.values)


def test_multi_chunk_prompt_concatenated_with_a_short_one_is_routed() -> None:
    """A 154-token identity prompt glued after (or before) a 77-token one: both of its chunks take the stage's
    keys/values on the 77-token grid, the glued-on prompt keeps its own (before: only the fallback, silently)."""
    base = rand(154, 31)
    b = Binding(base, rand(154, 32), rand(154, 33), block_len=77)
    other = rand(77, 34)
    for parts, at in (([other, base], 77), ([base, other], 0)):
        chunk = torch.cat(parts, dim=1)  # 231 tokens: no multiple of 154
        context = torch.cat([NEG.repeat(1, 3, 1), chunk])
        ctx, val = route_contexts(context, context, [1, 0], [b])
        assert torch.equal(ctx[1:, at:at + 154], b.keys) and torch.equal(val[1:, at:at + 154], b.values)
        keep = slice(0, 77) if at else slice(154, 231)
        assert torch.equal(ctx[1:, keep], other) and torch.equal(ctx[:1], context[:1])


def test_off_grid_run_is_not_ours() -> None:
    """On the 77-token grid, a base that starts mid-chunk is someone else's tokens that happen to match."""
    base = rand(154, 41)
    b = Binding(base, rand(154, 42), rand(154, 43), block_len=77)
    chunk = torch.cat([rand(38, 44), base, rand(39, 45)], dim=1)
    assert match_chunks(chunk, [0], [b]) == (None,)


def test_router_reports_a_concatenation_it_cannot_splice() -> None:
    base = rand(77, 51)
    calls = []
    router = ContextRouter([Binding(base, rand(154, 52), rand(154, 53))], on_unspliced=lambda: calls.append(1))
    chunk = torch.cat([base, rand(77, 54)], dim=1)
    assert router(chunk, chunk, [0])[0] is chunk
    assert calls == [1]
    router(torch.cat([base, base], dim=1), torch.cat([base, base], dim=1), [0])  # whole chunk: spliced, silent
    assert calls == [1]
