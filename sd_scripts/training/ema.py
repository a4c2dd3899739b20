"""Exponential moving average of the trained weights (`use_ema`, `ema_decay`), on diffusers' EMAModel.

After every optimizer step the average moves towards the weights: ema = ema - (1 - d_n) * (ema - w). The decay of
step n (1-based) is diffusers' warm-up schedule d_n = min(ema_decay, n / (n + 9)), with d_1 = 0, so a short run's
average is not stuck at the base model (with a fixed 0.9999 a 1000-step run would move it by only ~10%).
Parameters that stop being trained (a DreamBooth text encoder after stop_text_encoder_training) are copied as they
are from then on.

Memory: one float32 copy of every trained weight, on the training device. Saved models and sample images use the
averaged weights (`swapped_in`); training continues on the raw weights, which are put back afterwards.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch


def ema_decay_at(step: int, max_decay: float) -> float:
    """The decay used at optimizer step `step` (1-based): 0 at step 1, then min(max_decay, step / (step + 9))."""
    from diffusers.training_utils import EMAModel

    return EMAModel([], decay=max_decay).get_decay(step)


class TrainedWeightsEMA:
    """EMA of a fixed list of parameters."""

    def __init__(self, params: Iterable[torch.nn.Parameter], decay: float):
        from diffusers.training_utils import EMAModel

        self.params = list(params)
        self.ema = EMAModel(self.params, decay=decay, foreach=True)

    @property
    def steps(self) -> int:
        return self.ema.optimization_step

    def update(self) -> None:
        """Call once after each optimizer step."""
        self.ema.step(self.params)

    def averaged(self) -> list[torch.Tensor]:
        """The averaged tensors, in the order of the parameters."""
        return list(self.ema.shadow_params)

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The parameters hold the averaged weights inside the block; the raw ones come back on exit."""
        self.ema.store(self.params)  # a CPU copy of the raw weights
        try:
            self.ema.copy_to(self.params)
            yield
        finally:
            self.ema.restore(self.params)
