"""Prompt encoding with a per-prompt LRU cache, one encoder kind per model family: SD1.5-style and
SDXL-style CLIP encoders (PromptEncoder), SD3-style CLIP-L + CLIP-G + T5 (SD3PromptEncoder) and FLUX-style
CLIP-L + T5 (FluxPromptEncoder)."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Sequence

import torch

from ..errors import ConfigError


class _CachedEncoder:
    """The prompt cache every encoder kind shares: rows cached per prompt text (LRU of ``cache_size``
    prompts); only unseen prompts run the encoders, in one batch (``_run``).

    encode(prompts) -> (states [B, L, D] float32, pooled [B, P] float32 | None) on the encoders' device.
    Subclasses set ``tokenizers``, ``encoders`` and the properties tokens / width / pooled_width, and say
    whether the model also takes SDXL's time_ids (``time_ids``).
    """

    time_ids = False

    def __init__(self, cache_size: int):
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.encoder_calls = 0  # batches run through the encoders (tests check the cache with it)

    @property
    def pooled_width(self) -> int | None:
        raise NotImplementedError

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        new = list(OrderedDict.fromkeys(p for p in prompts if p not in self._cache))
        if new:
            with torch.inference_mode():
                self.encoder_calls += 1
                states, pooled = self._run(new)
            for i, p in enumerate(new):
                self._cache[p] = (states[i], None if pooled is None else pooled[i])
        rows = []
        for p in prompts:
            self._cache.move_to_end(p)
            rows.append(self._cache[p])
        while len(self._cache) > max(self.cache_size, len(set(prompts))):
            self._cache.popitem(last=False)
        states = torch.stack([r[0] for r in rows])
        pooled = torch.stack([r[1] for r in rows]) if self.pooled_width is not None else None
        return states, pooled

    def _run(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


def _clip_ids(tok, prompts: list[str], device) -> torch.Tensor:
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids.to(device)


class PromptEncoder(_CachedEncoder):
    """One set of CLIP tokenizers/encoders: SD1.5-style (one encoder, last hidden state) or SDXL-style
    (two encoders, penultimate hidden states concatenated, pooled text_embeds from the second)."""

    def __init__(self, tokenizers: Sequence[Any], encoders: Sequence[Any], *, cache_size: int = 256):
        if len(tokenizers) != len(encoders) or len(encoders) not in (1, 2):
            raise ConfigError("a prompt encoder takes one (SD1.5) or two (SDXL) tokenizer/encoder pairs")
        super().__init__(cache_size)
        self.tokenizers, self.encoders = tuple(tokenizers), tuple(encoders)
        _same_lengths("SDXL", self.tokenizers)
        self.sdxl = self.time_ids = len(encoders) == 2

    @property
    def tokens(self) -> int:
        """L: the token rows of every encoded prompt (the tokenizers' model_max_length)."""
        return int(self.tokenizers[0].model_max_length)

    @property
    def width(self) -> int:
        return sum(int(e.config.hidden_size) for e in self.encoders)

    @property
    def pooled_width(self) -> int | None:
        return int(self.encoders[-1].config.projection_dim) if self.sdxl else None

    def _run(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        states, pooled = [], None
        for i, (tok, enc) in enumerate(zip(self.tokenizers, self.encoders)):
            out = enc(_clip_ids(tok, prompts, enc.device), output_hidden_states=self.sdxl)
            # SDXL conditions on the penultimate layer of both encoders; SD1.5 on the last (normed) one.
            states.append((out.hidden_states[-2] if self.sdxl else out.last_hidden_state).float())
            if self.sdxl and i == 1:
                pooled = out.text_embeds.float()
        return torch.cat(states, dim=-1), pooled


class SD3PromptEncoder(_CachedEncoder):
    """SD3 / SD3.5 conditioning from CLIP-L, CLIP-G (both with projection) and T5, as
    StableDiffusion3Pipeline.encode_prompt builds it (clip_skip None):

    states [B, Lc + Lt, D_t5]: the two CLIP encoders' penultimate hidden states concatenated per token
    (width D_l + D_g), zero-padded on the feature axis to the T5 width, then followed along the token
    axis by T5's last hidden state (``max_sequence_length`` tokens, diffusers' default 256);
    pooled [B, P_l + P_g]: the two CLIP projections concatenated.
    """

    def __init__(self, tokenizers: Sequence[Any], encoders: Sequence[Any], *, max_sequence_length: int = 256,
                 cache_size: int = 256):
        if len(tokenizers) != 3 or len(encoders) != 3:
            raise ConfigError("an SD3 prompt encoder takes three tokenizer/encoder pairs (CLIP-L, CLIP-G, T5)")
        super().__init__(cache_size)
        self.tokenizers, self.encoders = tuple(tokenizers), tuple(encoders)
        _same_lengths("SD3 CLIP", self.tokenizers[:2])
        self.max_sequence_length = check_max_sequence_length(max_sequence_length)
        clip = sum(int(e.config.hidden_size) for e in self.encoders[:2])
        if clip > self.width:
            raise ConfigError(f"the SD3 CLIP states are {clip} wide but T5's d_model is only {self.width}: they are "
                              "zero-padded to the T5 width, so pass encoders with CLIP-L + CLIP-G <= T5 width")

    @property
    def tokens(self) -> int:
        return int(self.tokenizers[0].model_max_length) + self.max_sequence_length

    @property
    def width(self) -> int:
        return int(self.encoders[2].config.d_model)

    @property
    def pooled_width(self) -> int:
        return sum(int(e.config.projection_dim) for e in self.encoders[:2])

    def _run(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled = [], []
        for tok, enc in zip(self.tokenizers[:2], self.encoders[:2]):
            out = enc(_clip_ids(tok, prompts, enc.device), output_hidden_states=True)
            states.append(out.hidden_states[-2].float())
            pooled.append(out.text_embeds.float())
        clip = torch.cat(states, dim=-1)
        clip = torch.nn.functional.pad(clip, (0, self.width - clip.shape[-1]))
        t5 = _t5_states(self.tokenizers[2], self.encoders[2], prompts, self.max_sequence_length)
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


class FluxPromptEncoder(_CachedEncoder):
    """FLUX.1 conditioning from CLIP-L (CLIPTextModel) and T5, as FluxPipeline.encode_prompt builds it:
    states [B, max_sequence_length, D_t5] = T5's last hidden state (diffusers' default 512 tokens);
    pooled [B, D_clip] = CLIP-L's pooler output (the final-layer-normed EOS token, no projection)."""

    def __init__(self, tokenizers: Sequence[Any], encoders: Sequence[Any], *, max_sequence_length: int = 512,
                 cache_size: int = 256):
        if len(tokenizers) != 2 or len(encoders) != 2:
            raise ConfigError("a FLUX prompt encoder takes two tokenizer/encoder pairs (CLIP-L, T5)")
        super().__init__(cache_size)
        self.tokenizers, self.encoders = tuple(tokenizers), tuple(encoders)
        self.max_sequence_length = check_max_sequence_length(max_sequence_length)

    @property
    def tokens(self) -> int:
        return self.max_sequence_length

    @property
    def width(self) -> int:
        return int(self.encoders[1].config.d_model)

    @property
    def pooled_width(self) -> int:
        return int(self.encoders[0].config.hidden_size)

    def _run(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tok, enc = self.tokenizers[0], self.encoders[0]
        pooled = enc(_clip_ids(tok, prompts, enc.device), output_hidden_states=False).pooler_output.float()
        return _t5_states(self.tokenizers[1], self.encoders[1], prompts, self.max_sequence_length), pooled


def _t5_states(tok, enc, prompts: list[str], length: int) -> torch.Tensor:
    """T5's last hidden state [B, length, d_model] of prompts padded / truncated to ``length`` tokens."""
    ids = tok(prompts, padding="max_length", max_length=length, truncation=True, add_special_tokens=True,
              return_tensors="pt").input_ids.to(enc.device)
    return enc(ids)[0].float()


def check_max_sequence_length(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"max_sequence_length must be a positive int (T5 tokens), got {n!r}")
    return n


def _same_lengths(who: str, tokenizers) -> None:
    lengths = {int(t.model_max_length) for t in tokenizers}
    if len(lengths) != 1:
        raise ConfigError(f"the {who} tokenizers have different model_max_length {sorted(lengths)}: their states "
                          "are concatenated per token, so they must pad to one length")


def tokenizer_signature(tok) -> str:
    """Everything that decides the ids a tokenizer produces: its class, the full pipeline of a
    tokenizers-backed one (normalizer, pre-tokenizer, vocabulary, merges, post-processor) or the
    vocabulary and merges of a Python one, its special tokens, max length and sides. Two tokenizers with
    equal signatures give the same ids for every prompt."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        core: Any = json.loads(backend.to_str())
        for state in ("truncation", "padding"):  # set per call by the wrapper from the arguments below
            core.pop(state, None)
    else:
        ranks = getattr(tok, "bpe_ranks", {})
        core = [sorted(tok.get_vocab().items()), sorted((" ".join(k), v) for k, v in ranks.items())]
    return json.dumps([type(tok).__name__, core, sorted(tok.special_tokens_map.items(), key=str),
                       int(tok.model_max_length), tok.padding_side, tok.truncation_side], default=str)


def same_tokenizers(a: Sequence[Any], b: Sequence[Any]) -> bool:
    return len(a) == len(b) and all(tokenizer_signature(x) == tokenizer_signature(y) for x, y in zip(a, b))
