"""The host's CLIP run by hand so that spliced identity vectors get gradients (SD1: clip_l; SDXL: clip_l +
clip_g), and the pairing of the training prompt's key columns with the reference prompt's."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import host
from ..prompt_encoding import clip_family, plan_prompt, word_token_ids
from ...sefi_core.identity import FAMILY_ENCODERS
from ...sefi_core.tokens import ENCODER_TOKEN_KEYS, find_positions


@dataclass(frozen=True)
class TriggerWord:  # the duck-typed identity plan_prompt / initializer_text need
    trigger: str
    vectors_per_token: int
    initializer: str = "person"


@dataclass(frozen=True)
class PromptTokens:
    ids: list[int]            # 77 token ids of the rewritten prompt (placeholders in place), clip_l's tokenizer
    slots: list[int]          # positions of the identity vectors 0..n-1, in order
    eos: int                  # position of the first end token
    by_encoder: dict = None   # encoder name -> (ids, slots) for every encoder of the family (SDXL: clip_g too)


class _ClipRunner:
    """One of the host's CLIP text encoders (an SDClipModel) run by hand.

    token_embedding(ids) with the identity positions replaced (index_put, out-of-place) + position embedding ->
    the encoder layers up to the layer the host's SDClipModel would use (`layer`/`layer_idx` of the model's own
    configuration, honouring CLIPSetLastLayer) -> final_layer_norm (if `layer_norm_hidden_state`), with a causal
    mask and out-of-place residuals."""

    def __init__(self, clip, enc, key: str):
        if getattr(enc, "enable_attention_masks", False) or getattr(enc, "zero_out_masked", False):
            raise NotImplementedError("this CLIP uses attention masks; SeFi training supports the standard SD1/SDXL "
                                      "CLIP-L/CLIP-G text encoders")
        self.enc, self.key = enc, key
        self.tm = enc.transformer.text_model
        layer, idx = enc.options_default[0], enc.options_default[1]
        if getattr(clip, "layer_idx", None) is not None:  # CLIPSetLastLayer: set_clip_options({"layer": idx})
            idx = clip.layer_idx
            layer = "last" if abs(idx) > enc.num_layers else "hidden"
        if layer not in ("last", "hidden"):
            raise NotImplementedError(f"CLIP layer mode {layer!r} is not supported for training")
        n_layers = len(self.tm.encoder.layers)
        self.stop = n_layers - 1 if layer == "last" else (idx if idx >= 0 else n_layers + idx)
        self.final_norm = layer == "last" or bool(enc.layer_norm_hidden_state)
        self.end_token = clip.tokenize("")[key][0][1][0]

    @property
    def width(self) -> int:
        return int(self.tm.embeddings.token_embedding.weight.shape[1])

    def run(self, ids: Tensor, slots: Sequence[int] | None = None, vectors: Tensor | None = None) -> Tensor:
        weight = self.tm.embeddings.token_embedding.weight
        device = weight.device
        ids = ids.to(device, non_blocking=True)  # a blocking copy would wait for the GPU's queue (step_sync)
        x = F.embedding(ids, weight).float()
        if vectors is not None:
            b, n, c = vectors.shape
            rows = torch.arange(b, device=device).repeat_interleave(n)
            cols = torch.tensor(list(slots), dtype=torch.long).to(device, non_blocking=True).repeat(b)
            x = torch.index_put(x, (rows, cols), vectors.reshape(b * n, c).to(device=device, dtype=x.dtype))
        t = x.shape[1]
        x = x + self.tm.embeddings.position_embedding.weight[:t].to(x.dtype).clone()
        mask = torch.full((t, t), -torch.finfo(x.dtype).max, dtype=x.dtype, device=device).triu_(1)
        attention = host.clip_attention(device)
        for i, layer in enumerate(self.tm.encoder.layers):
            x = x + layer.self_attn(layer.layer_norm1(x), mask, attention)
            x = x + layer.mlp(layer.layer_norm2(x))
            if i == self.stop:
                break
        if self.final_norm:
            x = self.tm.final_layer_norm(x)
        return x.float()


class TextEncoder:
    """The host's CLIP run by hand so that spliced vectors get gradients, on both hosts.

    SD1: clip_l alone. SDXL: clip_l and clip_g each run by hand with its own configuration (both read hidden layer
    -2 without the final norm in the stock SDXLClipModel) and concatenated [clip_l | clip_g] -> [B, 77, 2048], as
    SDXLClipModel.encode_token_weights does. Equal to `clip.encode_from_tokens` for the same spliced tokens
    (tested for both families)."""

    def __init__(self, clip):
        self.family = clip_family(clip)
        self.clip = clip
        self.encoders: tuple[str, ...] = tuple(FAMILY_ENCODERS[self.family])
        csm = clip.cond_stage_model
        self.runners = {name: _ClipRunner(clip, getattr(csm, name), ENCODER_TOKEN_KEYS[name])
                        for name in self.encoders}
        first = self.runners["clip_l"]
        self.enc, self.tm, self.end_token = first.enc, first.tm, first.end_token

    @property
    def width(self) -> int:
        """Width of the concatenated context (768 for SD1, 2048 for SDXL)."""
        return sum(r.width for r in self.runners.values())

    def initializer_embedding(self, word: str, encoder: str = "clip_l") -> Tensor:
        runner = self.runners[encoder]
        ids = word_token_ids(self.clip, word, runner.key)
        if not ids:
            raise ValueError(f"the initializer word {word!r} gives no tokens; use a plain word such as 'person'")
        weight = runner.tm.embeddings.token_embedding.weight
        return weight.detach()[torch.tensor(ids, device=weight.device)].float().cpu().clone()

    def initializer_embeddings(self, word: str) -> dict[str, Tensor]:
        """{encoder: [k, C]} for every encoder of the family (what build_generator takes)."""
        return {name: self.initializer_embedding(word, name) for name in self.encoders}

    def prompt(self, template: str, trigger: str, n: int) -> PromptTokens:
        plan = plan_prompt(self.clip, template.replace("{}", trigger), [TriggerWord(trigger, n)], 1.0)
        pid = plan.placeholder_ids[0]
        by_encoder = {}
        for name, runner in self.runners.items():
            chunks = plan.tokens[runner.key]
            if len(chunks) != 1:
                raise ValueError(f"training prompt {template!r} is longer than one 77-token chunk; shorten it")
            slots = find_positions(chunks, {pid: n})[pid]
            by_encoder[name] = ([int(t) for t, *_ in chunks[0]], [s.index for s in sorted(slots, key=lambda s: s.index)])
        ids, slots = by_encoder["clip_l"]
        return PromptTokens(ids, slots, self._eos(ids), by_encoder)

    def plain(self, text: str) -> list[int]:
        chunks = self.clip.tokenize(text)["l"]
        if len(chunks) != 1:
            raise ValueError(f"prompt {text!r} is longer than one 77-token chunk")
        return [int(t) for t, *_ in chunks[0]]

    def _eos(self, ids: Sequence[int]) -> int:
        return next(i for i in range(1, len(ids)) if ids[i] == self.end_token)

    def encode(self, ids: Tensor, slots: Sequence[int] | None = None, vectors: Tensor | None = None,
               encoder: str = "clip_l") -> Tensor:
        """One encoder: ids [B, 77] long; vectors [B, n, C] for positions `slots` -> [B, 77, C] float32."""
        return self.runners[encoder].run(ids, slots, vectors)

    def encode_prompt(self, prompt: PromptTokens, vectors: dict[str, Tensor]) -> Tensor:
        """The prompt with vectors[encoder] ([B, n, C_enc]) at its identity slots in every encoder -> the model's
        context [B, 77, sum of the C] (SDXL: [clip_l | clip_g]). All B rows go through each encoder in one forward."""
        outs = []
        for name, runner in self.runners.items():
            ids, slots = prompt.by_encoder[name]
            vec = vectors[name]
            batch = torch.tensor(ids, dtype=torch.long)[None].expand(vec.shape[0], -1)
            outs.append(runner.run(batch, slots, vec))
        return outs[0] if len(outs) == 1 else torch.cat(outs, -1)


def align_columns(target: PromptTokens, reference: Sequence[int], ref_slots: Sequence[int], mode: str,
                  eos_ref: int) -> tuple[list[int], list[int]]:
    """Pair the training prompt's key columns with the reference prompt's (settings.attention_tokens).

    "identity": identity slots <-> the reference word's slots; "words_eos": every position 1..first EOS, the
    identity slots paired with the reference word (repeated/truncated when the piece counts differ) and the
    words around it paired in order; "all": all 77 positions (only when the two prompts align one to one)."""
    n, m = len(target.slots), len(ref_slots)
    id_pairs = [(s, ref_slots[min(j, m - 1)]) for j, s in enumerate(target.slots)]
    if mode == "identity":
        return [a for a, _ in id_pairs], [b for _, b in id_pairs]
    first, last = target.slots[0], target.slots[-1]
    rlast = ref_slots[-1]
    pairs = [(i, i) for i in range(1, first)] + id_pairs
    pairs += [(last + k, rlast + k) for k in range(1, target.eos - last + 1) if rlast + k <= eos_ref]
    if mode == "all":
        if n != m:
            raise ValueError("attention_tokens='all' needs the identity and the reference word to have the same "
                             "token count; use 'words_eos'")
        return list(range(len(target.ids))), list(range(len(target.ids)))
    return [a for a, _ in pairs], [b for _, b in pairs]


def reference_slots(template: str, target: PromptTokens, reference: Sequence[int], word_ids: Sequence[int],
                    word: str) -> list[int]:
    """Positions of the reference word in the reference prompt that pair with the identity's slots.

    Both prompts are the same template, so their tokens agree up to the identity's first slot and the reference
    word must start exactly there — not wherever the word first occurs ("a person, the face of {}" has "person"
    twice). Anything else means the template glues {} to other characters, and the maps would be paired with the
    wrong columns: refused."""
    start = target.slots[0]
    if list(reference[start:start + len(word_ids)]) != list(word_ids) or list(reference[:start]) != target.ids[:start]:
        raise ValueError(f"prompt_templates: in {template!r} the reference word {word!r} does not take the place of "
                         f"{{}}; write {{}} as a separate word, e.g. 'a photo of the face of {{}}'")
    return list(range(start, start + len(word_ids)))
