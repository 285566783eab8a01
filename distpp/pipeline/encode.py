"""Prompt encoding with a per-prompt LRU cache (SD1.5-style and SDXL-style CLIP encoders)."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any, Sequence

import torch

from ..errors import ConfigError


class PromptEncoder:
    """One set of CLIP tokenizers/encoders: SD1.5-style (one encoder, last hidden state) or SDXL-style
    (two encoders, penultimate hidden states concatenated, pooled text_embeds from the second).

    encode(prompts) -> (states [B, L, D] float32, pooled [B, P] float32 | None) on the encoders' device.
    Rows are cached per prompt text (LRU of ``cache_size`` prompts); only unseen prompts run the encoders,
    in one batch.
    """

    def __init__(self, tokenizers: Sequence[Any], encoders: Sequence[Any], *, cache_size: int = 256):
        if len(tokenizers) != len(encoders) or len(encoders) not in (1, 2):
            raise ConfigError("a prompt encoder takes one (SD1.5) or two (SDXL) tokenizer/encoder pairs")
        self.tokenizers, self.encoders = tuple(tokenizers), tuple(encoders)
        lengths = {int(t.model_max_length) for t in self.tokenizers}
        if len(lengths) != 1:
            raise ConfigError(f"the SDXL tokenizers have different model_max_length {sorted(lengths)}: their states "
                              "are concatenated per token, so they must pad to one length")
        self.sdxl = len(encoders) == 2
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor | None]] = OrderedDict()
        self.encoder_calls = 0  # batches run through the encoders (tests check the cache with it)

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

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        new = list(OrderedDict.fromkeys(p for p in prompts if p not in self._cache))
        if new:
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
        pooled = torch.stack([r[1] for r in rows]) if self.sdxl else None
        return states, pooled

    @torch.inference_mode()
    def _run(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        self.encoder_calls += 1
        states, pooled = [], None
        for i, (tok, enc) in enumerate(zip(self.tokenizers, self.encoders)):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)
            out = enc(ids, output_hidden_states=self.sdxl)
            # SDXL conditions on the penultimate layer of both encoders; SD1.5 on the last (normed) one.
            states.append((out.hidden_states[-2] if self.sdxl else out.last_hidden_state).float())
            if self.sdxl and i == 1:
                pooled = out.text_embeds.float()
        return torch.cat(states, dim=-1), pooled


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
