"""Token generators: output layout, K/V sharing, initialisation, determinism, serialisation."""

from __future__ import annotations

import pytest
import torch

from sefi_core.generator import (
    DirectTokens,
    SelfAttentionTokenGenerator,
    build_generator,
    flat_output_index,
    parameter_count,
    rebuild_generator,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _embeddings(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # Small stand-ins for clip_l (768) and clip_g (1280); real CLIP rows have RMS ~0.015.
    return {"clip_l": torch.randn(1, 32, generator=g) * 0.02, "clip_g": torch.randn(1, 48, generator=g) * 0.02}


@pytest.mark.parametrize("kind", ["self_attention", "direct"])
@pytest.mark.parametrize("kv_split", [True, False])
def test_output_shapes_per_encoder(kind: str, kv_split: bool) -> None:
    gen = build_generator(kind, _embeddings(), stages=3, vectors_per_token=2, kv_split=kv_split, seed=1)
    out = gen()
    assert set(out) == {"clip_l", "clip_g"}
    assert out["clip_l"].shape == (3, 2, 2, 32)
    assert out["clip_g"].shape == (3, 2, 2, 48)
    assert all(t.dtype == torch.float32 and t.requires_grad for t in out.values())


@pytest.mark.parametrize("kind", ["self_attention", "direct"])
def test_kv_split_off_means_v_equals_k_and_both_train_one_set(kind: str) -> None:
    gen = build_generator(kind, _embeddings(), stages=2, vectors_per_token=1, kv_split=False, seed=0)
    out = gen()
    for t in out.values():
        assert torch.equal(t[:, 0], t[:, 1])
    split = build_generator(kind, _embeddings(), stages=2, vectors_per_token=1, kv_split=True, seed=0)
    if kind == "direct":
        assert parameter_count(gen) * 2 == parameter_count(split)
    else:
        assert parameter_count(gen) < parameter_count(split)
    # A loss on V alone still moves K, because they are one set.
    gen.eval()
    before = gen()["clip_l"][:, 0].detach().clone()
    opt = torch.optim.SGD(gen.parameters(), lr=1.0)
    gen()["clip_l"][:, 1].pow(2).sum().backward()
    opt.step()
    assert not torch.equal(gen()["clip_l"][:, 0], before)


def test_kv_split_on_gives_distinct_k_and_v() -> None:
    gen = build_generator("self_attention", _embeddings(), stages=2, vectors_per_token=1, kv_split=True, seed=0)
    gen.eval()
    out = gen()["clip_l"]
    assert not torch.equal(out[:, 0], out[:, 1])


def test_flat_output_mapping_matches_documented_index() -> None:
    S, n = 3, 2
    gen = SelfAttentionTokenGenerator(_embeddings(), stages=S, vectors_per_token=n, kv_split=True, seed=3)
    gen.eval()
    for name, C in (("clip_l", 32), ("clip_g", 48)):
        block = gen.blocks[name]
        row = block(getattr(gen, f"init_input_{name}"), getattr(gen, f"init_context_{name}")).reshape(-1, C)
        out = gen()[name]
        for s in range(S):
            for kv in range(2):
                for j in range(n):
                    assert torch.equal(out[s, kv, j], row[(s * 2 + kv) * n + j])
                    assert flat_output_index(s, kv, j, n) == (s * 2 + kv) * n + j
    assert flat_output_index(2, 1, 1, n, kv_split=False) == 2 * n + 1


def test_near_initializer_init_starts_at_the_initializer_embedding() -> None:
    emb = _embeddings()
    gen = build_generator("self_attention", emb, stages=5, vectors_per_token=1, kv_split=True, seed=0)
    gen.eval()
    for name, e in emb.items():
        out = gen()[name]
        rel = (out - e).pow(2).mean().sqrt() / e.pow(2).mean().sqrt()
        assert rel.item() == pytest.approx(gen.init_perturbation, rel=1e-3)
        # outputs are not all identical (the perturbation breaks the symmetry)
        assert not torch.equal(out[0, 0], out[1, 1])


def test_prospect_init_does_not_start_at_the_initializer() -> None:
    emb = _embeddings()
    gen = build_generator("self_attention", emb, stages=5, kv_split=True, seed=0, init_mode="prospect")
    gen.eval()
    out = gen()["clip_l"]
    rms_ratio = out.pow(2).mean().sqrt() / emb["clip_l"].pow(2).mean().sqrt()
    assert rms_ratio > 2.0  # no FF residual: the output scale is the random Linear's, not the word's


def test_direct_tokens_start_from_initializer_pieces() -> None:
    pieces = torch.randn(2, 32)
    same_n = DirectTokens({"clip_l": pieces}, stages=2, vectors_per_token=2)()["clip_l"]
    assert torch.equal(same_n[1, 0], pieces)
    other_n = DirectTokens({"clip_l": pieces}, stages=2, vectors_per_token=3)()["clip_l"]
    assert torch.allclose(other_n[0, 1], pieces.mean(0).expand(3, -1))


def test_gradient_reaches_every_parameter_except_the_degenerate_attention_logits() -> None:
    # One input token and a one-piece initializer: both softmaxes run over a single key and are
    # constant 1, so to_q/to_k get exactly zero gradient, and so does norm2, which only feeds the
    # cross-attention's query (method.md §1.2: the block acts as an MLP).
    gen = build_generator("self_attention", _embeddings(), stages=2, kv_split=True, seed=0)
    gen.eval()
    sum(t.pow(2).sum() for t in gen().values()).backward()
    for name, p in gen.named_parameters():
        assert p.grad is not None, name
        if name.endswith(("to_q.weight", "to_k.weight")) or ".norm2." in name:
            assert p.grad.abs().sum() == 0, name
        else:
            assert p.grad.abs().sum() > 0, name
    assert all(not b.requires_grad for b in gen.buffers())
    # With a two-piece initializer the cross-attention has two keys and its logits do train.
    two = build_generator("self_attention", {"clip_l": torch.randn(2, 32) * 0.02}, stages=2, seed=0)
    two.eval()
    two()["clip_l"].pow(2).sum().backward()
    assert two.blocks["clip_l"].attn2.to_k.weight.grad.abs().sum() > 0
    assert two.blocks["clip_l"].attn1.to_k.weight.grad.abs().sum() == 0


def test_dropout_active_only_in_train_mode() -> None:
    gen = build_generator("self_attention", _embeddings(), stages=2, seed=0, dropout=0.5)
    gen.train()
    a, b = gen()["clip_l"], gen()["clip_l"]
    assert not torch.equal(a, b)
    gen.eval()
    assert torch.equal(gen()["clip_l"], gen()["clip_l"])


@pytest.mark.parametrize("kind", ["self_attention", "direct"])
def test_build_is_deterministic_and_leaves_global_rng_alone(kind: str) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = build_generator(kind, _embeddings(), stages=3, seed=7)
    assert torch.equal(torch.rand(3), expected_next)
    b = build_generator(kind, _embeddings(), stages=3, seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    if kind == "self_attention":
        c = build_generator(kind, _embeddings(), stages=3, seed=8)
        assert not torch.equal(a.blocks["clip_l"].ff.out_proj.weight, c.blocks["clip_l"].ff.out_proj.weight)


def test_encoder_init_does_not_depend_on_other_encoders() -> None:
    both = build_generator("self_attention", _embeddings(), stages=2, seed=5)
    only_l = build_generator("self_attention", {"clip_l": _embeddings()["clip_l"]}, stages=2, seed=5)
    for (k1, v1), (k2, v2) in zip(both.blocks["clip_l"].state_dict().items(), only_l.blocks["clip_l"].state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


@pytest.mark.parametrize("kind", ["self_attention", "direct"])
def test_state_dict_round_trip_through_config(kind: str) -> None:
    gen = build_generator(kind, _embeddings(), stages=3, vectors_per_token=2, kv_split=True, seed=2)
    with torch.no_grad():
        for p in gen.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # "trained"
    gen.eval()
    clone = rebuild_generator(gen.config())
    clone.load_state_dict(gen.state_dict())
    clone.eval()
    for name, t in gen().items():
        assert torch.equal(clone()[name], t)
    assert clone.config() == gen.config()


def test_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown generator kind"):
        build_generator("lstm", _embeddings())
    with pytest.raises(ValueError, match="not divisible by heads"):
        build_generator("self_attention", {"clip_l": torch.randn(1, 30)})
    with pytest.raises(ValueError, match="stages"):
        build_generator("direct", _embeddings(), stages=0)
    with pytest.raises(ValueError, match=r"\[m, C\]"):
        build_generator("direct", {"clip_l": torch.randn(1, 2, 3)})
    with pytest.raises(ValueError, match="encoder name"):
        build_generator("direct", {"clip.l": torch.randn(1, 8)})
    with pytest.raises(TypeError, match="no options"):
        build_generator("direct", _embeddings(), dropout=0.1)
