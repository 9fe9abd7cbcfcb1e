"""The trainable part of SeFi-IDE: what produces the per-stage K/V identity tokens.

SeFi-IDE represents an identity as ``S`` per-stage pairs of word-embedding vectors
``(P_i^K, P_i^V)`` living in the text encoder's *input* (token-embedding) space
(method.md §1.1). Only the module that produces them is trained; CLIP and the U-Net stay
frozen. Two producers are offered here:

* :class:`SelfAttentionTokenGenerator` — the method's generator, a ProSpect-style
  transformer block fed with the frozen initializer-word embedding (method.md §1.2).
* :class:`DirectTokens` — free vectors initialised from the initializer embedding. Cheaper
  and simpler, but a **deviation** from the paper (method.md §1.2 "cheaper variant").

Both return, from a call with no arguments, ``{encoder_name: Tensor[S, 2, n, C]}``:

* ``S`` stages (stage ``i`` covers DDPM timesteps ``[i*1000/S, (i+1)*1000/S)``),
* ``2`` = (K, V): index 0 builds keys, index 1 builds values,
* ``n`` vectors per token (the placeholder expands to ``n`` consecutive word slots),
* ``C`` the encoder's embedding width (768 for SD1.x / SDXL clip_l, 1280 for SDXL clip_g).

SDXL has two text encoders whose embedding tables differ in width; each gets its own
independent generator, keyed by encoder name (``"clip_l"``, ``"clip_g"``) in a
:class:`torch.nn.ModuleDict`.

With ``kv_split=False`` the module produces one set per stage and returns it in both the K
and the V slot (``V == K``), i.e. ordinary per-stage textual inversion (ProSpect).

Everything runs in float32; callers cast the output to the text encoder's dtype.
"""

from __future__ import annotations

import hashlib
from typing import Any, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .stages import check_stages
from .tokens import MAX_VECTORS_PER_TOKEN

__all__ = [
    "TokenGenerator",
    "SelfAttentionTokenGenerator",
    "DirectTokens",
    "GENERATOR_KINDS",
    "build_generator",
    "rebuild_generator",
    "flat_output_index",
    "parameter_count",
]

GENERATOR_KINDS = ("self_attention", "direct")
InitMode = Literal["near_initializer", "prospect"]


def flat_output_index(stage: int, kv: int, j: int, vectors_per_token: int, kv_split: bool = True) -> int:
    """Index of output vector ``(stage, kv, j)`` in the generator's flat output row.

    The self-attention generator emits one long row of ``S * 2 * n`` (or ``S * n`` without the
    K/V split) vectors of width ``C``. The method does not say which output is which
    (method.md §1.2 [I]); this mapping is fixed here once and for all so that saved weights
    keep their meaning:

    * with K/V split: ``(stage * 2 + kv) * n + j`` — all K vectors of a stage, then its V
      vectors, then the next stage;
    * without: ``stage * n + j`` (``kv`` ignored, V reuses K).
    """
    if kv_split:
        return (stage * 2 + kv) * vectors_per_token + j
    return stage * vectors_per_token + j


def _initial_vectors(init_embedding: Tensor, vectors_per_token: int) -> Tensor:
    """Starting vectors ``[n, C]`` derived from an initializer embedding ``[m, C]``.

    If the initializer word tokenises to exactly ``n`` pieces, vector ``j`` starts from piece
    ``j`` (so a 2-piece word fills a 2-vector token naturally). Otherwise every vector starts
    from the mean of the pieces — the usual textual-inversion compromise for a multi-piece
    initializer.
    """
    if init_embedding.shape[0] == vectors_per_token:
        return init_embedding.clone()
    return init_embedding.mean(dim=0, keepdim=True).expand(vectors_per_token, -1).clone()


def _check_embeddings(init_embeddings: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if not init_embeddings:
        raise ValueError("init_embeddings is empty: pass one [m, C] initializer embedding per text encoder")
    out: dict[str, Tensor] = {}
    for name, emb in init_embeddings.items():
        if not isinstance(name, str) or not name or "." in name:
            raise ValueError(f"encoder name {name!r} must be a non-empty string without '.' (e.g. 'clip_l')")
        if not isinstance(emb, Tensor):
            raise TypeError(f"init_embeddings[{name!r}] must be a tensor, got {type(emb).__name__}")
        if emb.dim() == 1:
            emb = emb.unsqueeze(0)
        if emb.dim() != 2 or emb.shape[0] < 1 or emb.shape[1] < 1:
            raise ValueError(
                f"init_embeddings[{name!r}] must have shape [m, C] (m word pieces of the initializer word), "
                f"got {tuple(emb.shape)}"
            )
        if not torch.isfinite(emb).all():
            raise ValueError(f"init_embeddings[{name!r}] contains NaN/inf")
        out[name] = emb.detach().to(device="cpu", dtype=torch.float32).clone()
    return out


def _encoder_seed(seed: int, name: str) -> int:
    """A seed per encoder that does not depend on dict order or on which other encoders exist."""
    digest = hashlib.blake2b(f"sefi-generator:{int(seed)}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


class TokenGenerator(nn.Module):
    """Common surface of the token producers.

    Subclasses hold one sub-module (or parameter set) per encoder and implement
    :meth:`_produce`. :meth:`config` returns the JSON-able constructor arguments so that a
    saved ``state_dict`` can be loaded back into an identically shaped module.
    """

    kind: str = ""

    def __init__(self, init_embeddings: Mapping[str, Tensor], stages: int, vectors_per_token: int, kv_split: bool):
        super().__init__()
        check_stages(stages)
        if isinstance(vectors_per_token, bool) or not 1 <= int(vectors_per_token) <= MAX_VECTORS_PER_TOKEN:
            raise ValueError(f"vectors_per_token must be from 1 to {MAX_VECTORS_PER_TOKEN}, got {vectors_per_token!r}")
        self.stages = int(stages)
        self.vectors_per_token = int(vectors_per_token)
        self.kv_split = bool(kv_split)
        self._init_embeddings = _check_embeddings(init_embeddings)
        self.encoder_dims = {name: int(e.shape[1]) for name, e in self._init_embeddings.items()}

    @property
    def encoders(self) -> list[str]:
        return list(self.encoder_dims)

    @property
    def output_sets(self) -> int:
        """Distinct vector sets per stage: 2 with the K/V split, 1 without."""
        return 2 if self.kv_split else 1

    def forward(self) -> dict[str, Tensor]:
        """``{encoder: Tensor[S, 2, n, C]}``; ``[:, 0]`` builds keys, ``[:, 1]`` builds values."""
        out: dict[str, Tensor] = {}
        for name in self.encoder_dims:
            sets = self._produce(name)  # [S, output_sets, n, C]
            if not self.kv_split:
                # V = K: the same tensor in both slots, so both uses send gradient to one set.
                sets = torch.cat([sets, sets], dim=1)
            out[name] = sets
        return out

    def _produce(self, name: str) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """JSON-able description (kind, shapes, options); :func:`build_generator` accepts it back."""
        return {
            "kind": self.kind,
            "stages": self.stages,
            "vectors_per_token": self.vectors_per_token,
            "kv_split": self.kv_split,
            "encoder_dims": dict(self.encoder_dims),
        }


# --------------------------------------------------------------------------------------
# ProSpect-style transformer block (ldm's BasicTransformerBlock with a dim_out and no FF residual)
# --------------------------------------------------------------------------------------


# Where the layers come from, as ComfyUI's own ldm modules take it (``operations=``): torch.nn, because the
# generator is trained from its own initialisation in float32, while comfy.ops layers skip initialisation: they
# are for weights loaded from a checkpoint, the model code comfy-test's lint has in mind when it asks for them.
LAYERS = nn


class _Attention(nn.Module):
    """ldm ``CrossAttention``: bias-free q/k/v projections, output Linear + Dropout."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float, operations=LAYERS):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head**-0.5
        self.to_q = operations.Linear(dim, inner, bias=False)
        self.to_k = operations.Linear(dim, inner, bias=False)
        self.to_v = operations.Linear(dim, inner, bias=False)
        self.to_out = nn.Sequential(operations.Linear(inner, dim), nn.Dropout(dropout))

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        context = x if context is None else context
        b, nq, _ = x.shape
        h = self.heads
        q = self.to_q(x).view(b, nq, h, -1).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], h, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], h, -1).transpose(1, 2)
        probs = torch.softmax((q @ k.transpose(-1, -2)) * self.scale, dim=-1)
        out = (probs @ v).transpose(1, 2).reshape(b, nq, -1)
        return self.to_out(out)


class _GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, operations=LAYERS):
        super().__init__()
        self.proj = operations.Linear(dim_in, dim_out * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class _FeedForward(nn.Module):
    """ldm ``FeedForward(dim, dim_out, mult=4, glu=True)``: GEGLU -> Dropout -> Linear."""

    def __init__(self, dim: int, dim_out: int, mult: int, dropout: float, operations=LAYERS):
        super().__init__()
        inner = dim * mult
        self.net = nn.Sequential(_GEGLU(dim, inner, operations), nn.Dropout(dropout),
                                 operations.Linear(inner, dim_out))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    @property
    def out_proj(self) -> nn.Linear:
        return self.net[2]  # type: ignore[return-value]


class _TokenBlock(nn.Module):
    """ProSpect's ``TransformerBlock(dim, n_heads, d_head, dropout, dim_out)`` for one encoder.

    ``x = attn1(norm1(x)) + x; x = attn2(norm2(x), context=e_init) + x; out = ff(norm3(x))``
    — note: the feed-forward has **no residual**, so the output is whatever the final Linear
    makes of it (see ``init_mode`` in :class:`SelfAttentionTokenGenerator`). Parameter names
    mirror ldm's BasicTransformerBlock (attn1.to_q, ff.net.0.proj, ff.net.2, ...).
    """

    def __init__(self, dim: int, dim_out: int, heads: int, dropout: float, ff_mult: int, operations=LAYERS):
        super().__init__()
        if dim % heads:
            raise ValueError(f"embedding width {dim} is not divisible by heads={heads}")
        d_head = dim // heads
        self.norm1 = operations.LayerNorm(dim)
        self.attn1 = _Attention(dim, heads, d_head, dropout, operations)
        self.norm2 = operations.LayerNorm(dim)
        self.attn2 = _Attention(dim, heads, d_head, dropout, operations)
        self.norm3 = operations.LayerNorm(dim)
        self.ff = _FeedForward(dim, dim_out, ff_mult, dropout, operations)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x))


class SelfAttentionTokenGenerator(TokenGenerator):
    """The method's token generator: frozen initializer embedding -> transformer block -> tokens.

    Per encoder (method.md §1.2, ProSpect ``embedding_manager.py``):

    * **Input** ``x``: the mean of the frozen initializer embedding pieces, ``[1, 1, C]`` (the
      figure's "embedding lookup -> one vector"). **Context** for the cross-attention: all
      ``m`` pieces ``[1, m, C]`` (for a one-piece word — the usual case, e.g. "person" — this
      is exactly ProSpect's call ``block(x, context=x)``). Both are stored as non-trainable
      buffers and saved in the ``state_dict``.
    * **Block**: LayerNorm -> self-attention + residual; LayerNorm -> cross-attention to the
      initializer + residual; LayerNorm -> GEGLU feed-forward (``mult=4``) with **no
      residual** and ``dim_out = S * sets * n * C``.
    * **Output** row viewed as ``[S, sets, n, C]`` with the mapping of
      :func:`flat_output_index`; ``sets`` is 2 with the K/V split (``[:, 0]`` = K,
      ``[:, 1]`` = V), 1 without (then returned as V = K).

    With a single input token both attentions are degenerate (softmax over one key = 1); the
    block is effectively an over-parameterised MLP, which is what the method uses. With a
    one-piece initializer, ``to_q``/``to_k`` of both attentions and ``norm2`` (which only
    feeds the cross-attention's query) get exactly zero gradient — kept for fidelity with
    ProSpect's parameter layout. Size at C=768, S=5, n=1: 33.05 M parameters, 23.6 M of them in
    the final 3072->7680 Linear.

    Step size: Adam's first updates are roughly ``lr·sign(grad)`` per weight, and every output
    sums ``4C`` hidden units, so one step moves the outputs by about ``lr·4C·mean|h|``
    whatever the init. Measured at C=768, lr=1e-4: ~0.026 RMS per element after one step,
    about twice a CLIP-L word embedding's RMS (~0.014). ProSpect's lr is kept as the default
    (``TrainSettings.lr``), but this is the first knob to turn if tokens drift off the
    embedding manifold.

    ``init_mode`` (the paper is silent; our choice, documented):

    * ``"near_initializer"`` (default): the final Linear's bias is set to the initializer
      vectors (tiled over stages / K / V) and its weight is rescaled so that, at init and
      without dropout, the random part of every output has an RMS of ``init_perturbation`` ×
      the initializer's RMS. Training therefore starts *at* the initializer word (as textual
      inversion does) with a small per-output perturbation so the outputs are not identical;
      unlike a zero-initialised final Linear, gradient reaches the hidden layers from step one.
    * ``"prospect"``: PyTorch's default init, exactly as ProSpect. Because the FF has no
      residual the initial outputs are then **not** the initializer embedding: they are random
      vectors whose scale is unrelated to a real word embedding's (measured at C=768: RMS
      ~7.7× a CLIP-L-like embedding's),
      and the first part of training is spent pulling them back into the embedding manifold.

    Dropout (default 0.1, as ProSpect) is active in ``train()`` mode; call ``eval()`` to
    export the final tokens.
    """

    kind = "self_attention"

    def __init__(
        self,
        init_embeddings: Mapping[str, Tensor],
        stages: int = 5,
        vectors_per_token: int = 1,
        kv_split: bool = True,
        *,
        heads: int = 8,
        dropout: float = 0.1,
        ff_mult: int = 4,
        init_mode: InitMode = "near_initializer",
        init_perturbation: float = 0.05,
        seed: int = 0,
    ):
        super().__init__(init_embeddings, stages, vectors_per_token, kv_split)
        if init_mode not in ("near_initializer", "prospect"):
            raise ValueError(f"init_mode must be 'near_initializer' or 'prospect', got {init_mode!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.heads = int(heads)
        self.dropout = float(dropout)
        self.ff_mult = int(ff_mult)
        self.init_mode: InitMode = init_mode
        self.init_perturbation = float(init_perturbation)
        self.seed = int(seed)
        self.blocks = nn.ModuleDict()
        n_out = self.stages * self.output_sets * self.vectors_per_token
        for name, emb in self._init_embeddings.items():
            dim = emb.shape[1]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(_encoder_seed(self.seed, name))
                block = _TokenBlock(dim, n_out * dim, self.heads, self.dropout, self.ff_mult)
            self.blocks[name] = block
            self.register_buffer(f"init_input_{name}", emb.mean(dim=0, keepdim=True).unsqueeze(0))
            self.register_buffer(f"init_context_{name}", emb.unsqueeze(0))
            if init_mode == "near_initializer":
                self._init_near(name, emb)
        del self._init_embeddings

    @torch.no_grad()
    def _init_near(self, name: str, emb: Tensor) -> None:
        block: _TokenBlock = self.blocks[name]  # type: ignore[assignment]
        out_proj = block.ff.out_proj
        start = _initial_vectors(emb, self.vectors_per_token)  # [n, C]
        bias = start.unsqueeze(0).expand(self.stages * self.output_sets, -1, -1).reshape(-1)
        out_proj.bias.zero_()
        was_training = block.training
        block.eval()
        random_part = block(getattr(self, f"init_input_{name}"), getattr(self, f"init_context_{name}"))
        block.train(was_training)
        rms_random = random_part.pow(2).mean().sqrt().clamp_min(1e-12)
        rms_init = start.pow(2).mean().sqrt()
        out_proj.weight.mul_(self.init_perturbation * rms_init / rms_random)
        out_proj.bias.copy_(bias)

    def _produce(self, name: str) -> Tensor:
        block: _TokenBlock = self.blocks[name]  # type: ignore[assignment]
        row = block(getattr(self, f"init_input_{name}"), getattr(self, f"init_context_{name}"))
        return row.view(self.stages, self.output_sets, self.vectors_per_token, self.encoder_dims[name])

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg.update(
            heads=self.heads,
            dropout=self.dropout,
            ff_mult=self.ff_mult,
            init_mode=self.init_mode,
            init_perturbation=self.init_perturbation,
            seed=self.seed,
        )
        return cfg


class DirectTokens(TokenGenerator):
    """Free token vectors ``[S, sets, n, C]`` per encoder, initialised from the initializer word.

    **Deviation from the method** (method.md §1.2): SeFi-IDE/ProSpect produce the tokens with
    a trained transformer block; this is plain per-stage textual inversion with optional K/V
    split. Orders of magnitude fewer parameters (``S*2*n*C`` instead of ~31.5 M for SD1.5),
    usually wants a larger learning rate (textual inversion uses ~5e-3) and has no dropout.

    Every stage and both K and V start from the same vectors (see :func:`_initial_vectors`);
    they diverge because different stages see different timesteps and K/V receive different
    gradients.
    """

    kind = "direct"

    def __init__(
        self,
        init_embeddings: Mapping[str, Tensor],
        stages: int = 5,
        vectors_per_token: int = 1,
        kv_split: bool = True,
        *,
        seed: int = 0,
    ):
        super().__init__(init_embeddings, stages, vectors_per_token, kv_split)
        self.seed = int(seed)  # recorded for config(); the init itself is deterministic
        self.tokens = nn.ParameterDict()
        for name, emb in self._init_embeddings.items():
            start = _initial_vectors(emb, self.vectors_per_token)
            full = start.unsqueeze(0).unsqueeze(0).expand(self.stages, self.output_sets, -1, -1).clone()
            self.tokens[name] = nn.Parameter(full)
        del self._init_embeddings

    def _produce(self, name: str) -> Tensor:
        return self.tokens[name]

    def config(self) -> dict[str, Any]:
        cfg = super().config()
        cfg["seed"] = self.seed
        return cfg


def build_generator(
    kind: str,
    init_embeddings: Mapping[str, Tensor],
    stages: int = 5,
    vectors_per_token: int = 1,
    kv_split: bool = True,
    seed: int = 0,
    **options: Any,
) -> TokenGenerator:
    """Construct a generator; the same arguments always give bit-identical initial weights.

    ``kind``: ``"self_attention"`` (the method) or ``"direct"`` (free vectors, a deviation).
    ``init_embeddings``: ``{encoder_name: Tensor[m, C]}``, the initializer word's rows of each
    encoder's token-embedding table (``m`` word pieces, usually 1). ``options`` go to the
    class (``heads``, ``dropout``, ``ff_mult``, ``init_mode``, ``init_perturbation`` for
    ``self_attention``). Initialisation never touches the global RNG state.

    To rebuild a saved generator: ``build_generator(**cfg, init_embeddings=...)`` with
    ``cfg = generator.config()`` minus ``encoder_dims``, then ``load_state_dict``.
    """
    if kind == "self_attention":
        return SelfAttentionTokenGenerator(
            init_embeddings, stages, vectors_per_token, kv_split, seed=seed, **options
        )
    if kind == "direct":
        if options:
            raise TypeError(f"DirectTokens takes no options, got {sorted(options)}")
        return DirectTokens(init_embeddings, stages, vectors_per_token, kv_split, seed=seed)
    raise ValueError(f"unknown generator kind {kind!r}; choose one of {GENERATOR_KINDS}")


def rebuild_generator(config: Mapping[str, Any], init_embeddings: Mapping[str, Tensor] | None = None) -> TokenGenerator:
    """An identically shaped generator from :meth:`TokenGenerator.config`, ready for ``load_state_dict``.

    ``init_embeddings`` may be omitted: placeholders of the recorded widths are used, which
    is fine because the subsequent ``load_state_dict`` overwrites every parameter and buffer
    (the self-attention generator stores its initializer embedding as buffers; the direct
    one has nothing else).
    """
    cfg = dict(config)
    kind = cfg.pop("kind")
    dims: dict[str, int] = cfg.pop("encoder_dims")
    if init_embeddings is None:
        init_embeddings = {name: torch.ones(1, int(dim)) for name, dim in dims.items()}
    elif {k: int(v.shape[-1]) for k, v in init_embeddings.items()} != {k: int(v) for k, v in dims.items()}:
        raise ValueError(f"init_embeddings widths do not match the saved generator's encoder_dims {dims}")
    return build_generator(kind, init_embeddings, **cfg)


def parameter_count(generator: nn.Module) -> int:
    """Number of trainable parameters (for logs and the node's info output)."""
    return sum(p.numel() for p in generator.parameters() if p.requires_grad)
