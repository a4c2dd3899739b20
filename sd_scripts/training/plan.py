"""How long a run is (torch-free): steps per epoch, total steps and epochs from the batches one process sees per
epoch and the options. The trainer and the GUI's pre-flight use this same arithmetic."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Plan:
    """How long the run is: derived once from the dataset size and the options."""

    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    total_epochs: int


def plan_steps(batches_per_epoch: int, gradient_accumulation_steps: int = 1, max_train_steps: int | None = None,
               max_train_epochs: int | None = None) -> Plan:
    """An optimizer step per `gradient_accumulation_steps` batches; max_train_epochs wins over max_train_steps."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / max(1, gradient_accumulation_steps)))
    total = max_train_epochs * steps_per_epoch if max_train_epochs else (max_train_steps or 0)
    return Plan(batches_per_epoch, steps_per_epoch, total, math.ceil(total / steps_per_epoch))


def batches_per_process(draws: int, batch_size: int, num_processes: int = 1) -> int:
    """Batches one process sees per epoch when `draws` images are drawn (ignoring buckets, which can add a partly
    filled batch each): the data loader is split across processes."""
    return math.ceil(math.ceil(draws / max(1, batch_size)) / max(1, num_processes))
