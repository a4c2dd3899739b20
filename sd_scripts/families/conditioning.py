"""Memoised caption conditioning for frozen text encoders, shared by every family.

With frozen text encoders the same caption always encodes the same, so each caption is encoded once and kept (the
main waste of a naive LoRA step is re-running the text encoders on fixed captions). The memo is an LRU bounded by
`memo_size`; `encode_all` (before training, or for the text-encoder output cache) lifts the bound, after which
`release_text_encoders` can drop the encoders. A family's conditioning is a tensor or a dataclass of tensors with
`__getitem__` (one caption, no batch dimension) and a static `stack(items)`.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Iterable, Sequence

import torch


def _detached(item: Any) -> Any:
    if isinstance(item, torch.Tensor):
        return item.detach()
    return dataclasses.replace(item, **{f.name: getattr(item, f.name).detach() for f in dataclasses.fields(item)
                                        if isinstance(getattr(item, f.name), torch.Tensor)})


def _stack(items: Sequence[Any]) -> Any:
    return torch.stack(list(items)) if isinstance(items[0], torch.Tensor) else type(items[0]).stack(items)


class MemoisedCaptions:
    """Mixin for a Family: `encode_captions` through the memo. Subclasses implement `encode_batch(captions)` (with the
    text encoders, gradients as the caller allows) and call `init_memo()`."""

    def init_memo(self, memo_size: int = 4096) -> None:
        self._memo: OrderedDict[str, Any] = OrderedDict()
        self._memo_size = memo_size

    def encode_batch(self, captions: list[str]) -> Any:
        raise NotImplementedError

    def text_encoders_loaded(self) -> bool:
        return any(te is not None for te in self.bundle.text_encoders)

    def encode_captions(self, captions: list[str], *, train_text_encoder: bool) -> Any:
        """Captions -> conditioning; with frozen encoders each caption is encoded once and memoised."""
        if train_text_encoder:
            return self.encode_batch(captions)
        missing = list(dict.fromkeys(c for c in captions if c not in self._memo))
        if missing:
            if not self.text_encoders_loaded():
                raise RuntimeError(f"caption {missing[0]!r} was not encoded before the text encoders were released")
            with torch.no_grad():
                self.remember(missing, self.encode_batch(missing))
        for caption in captions:
            self._memo.move_to_end(caption)
        return _stack([self._memo[c] for c in captions])

    def remember(self, captions: Iterable[str], conditioning: Any) -> None:
        """Memoise the conditioning of each caption (batch order), e.g. from a text-encoder output cache."""
        for i, caption in enumerate(captions):
            self._memo[caption] = _detached(conditioning[i])
            if len(self._memo) > self._memo_size:
                self._memo.popitem(last=False)

    def encode_all(self, captions: list[str], batch_size: int = 16) -> None:
        """Encode and memoise every caption (no limit on the memo), with the frozen encoders."""
        self._memo_size = max(self._memo_size, len(self._memo) + len(captions))
        todo = [c for c in dict.fromkeys(captions) if c not in self._memo]
        with torch.no_grad():
            for start in range(0, len(todo), batch_size):
                chunk = todo[start:start + batch_size]
                self.remember(chunk, self.encode_batch(chunk))

    def release_text_encoders(self, captions: list[str], max_captions: int = 1024) -> bool:
        """Encode every caption the run can draw, then drop the frozen text encoders (saves their memory)."""
        if len(captions) > max_captions:
            return False
        self.encode_all(captions)
        self.bundle.text_encoders = [None] * len(self.bundle.text_encoders)
        return True
