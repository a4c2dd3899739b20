"""The validation loss: held-out images scored so that the number is comparable over a run.

Options (sd-scripts' train_network): `validation_split` / `validation_seed` (also dataset TOML keys, per dataset)
hold images out of training (data/dataset.py, split="validation"); the loss is computed at the end of every epoch
(or every `validate_every_n_epochs`), and every `validate_every_n_steps` steps when set, over at most
`max_validation_steps` batches.

What makes two validations of the same weights give the same number (and training unaware of them):
- fixed timesteps: each batch is evaluated at NUM_VALIDATION_TIMESTEPS timesteps spread evenly inside the family's
  training range (sd-scripts' rule: linspace(low, high, 4 + 2)[1:-1], i.e. 200, 400, 600, 800 of 1000); the family
  uses them instead of drawing its own (`Family.noised(..., timesteps=)`, flow matching: sigma = t / 1000);
- fixed noise: for batch i, a generator seeded afresh with validation_seed (else the run's seed) + i at every
  validation, whichever process scores the batch; the global RNGs (torch CPU and device, Python, NumPy) are seeded
  with it too and given back exactly as they were, and the training noise generator is never touched, so a run with
  validation trains exactly like one without;
- fixed batches: the validation dataset keeps one batch order and full captions (no token warmup);
- no gradients, and the trained module in eval mode (no dropout) for the duration, its modes restored after.
The loss itself is the training step's (`Trainer.batch_loss`): the family's maths, the same loss weighting.
"""
from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterator

import numpy as np
import torch

NUM_VALIDATION_TIMESTEPS = 4

# (batch, noise generator, timesteps [B]) -> the batch's mean loss (a 0-dim tensor)
BatchLoss = Callable[[dict, torch.Generator, torch.Tensor], torch.Tensor]


def validation_timesteps(low: int, high: int, count: int = NUM_VALIDATION_TIMESTEPS) -> list[int]:
    """`count` integer timesteps evenly inside [low, high], the ends left out: (0, 1000) -> [200, 400, 600, 800]."""
    return [int(t) for t in np.linspace(low, high, count + 2, dtype=int)[1:-1]]


@contextlib.contextmanager
def isolated_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Inside: torch's (CPU and `device`), Python's and NumPy's global RNGs seeded with `seed`. After: every one of
    them exactly as before."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [] if device.type == "cpu" else [device.index if device.index is not None else 0]
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """`module` in eval mode inside; every submodule's own train/eval mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class Validation:
    """When to validate, and the validation loss of the current weights."""

    def __init__(self, dataset, *, seed: int, timesteps: list[int], every_n_steps: int | None = None,
                 every_n_epochs: int | None = None, max_steps: int | None = None):
        self.dataset = dataset
        self.seed = int(seed)
        self.timesteps = list(timesteps)
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.num_batches = min(len(dataset), max_steps) if max_steps else len(dataset)
        self.last: tuple[int, float] | None = None  # (global step, loss) of the latest validation

    def due_after_step(self, step: int) -> bool:
        return bool(self.every_n_steps) and step % self.every_n_steps == 0

    def due_after_epoch(self, epoch: int) -> bool:
        """Every epoch unless validate_every_n_epochs says otherwise (sd-scripts)."""
        return self.every_n_epochs is None or epoch % self.every_n_epochs == 0

    def loss_at(self, step: int, batch_loss: BatchLoss, module: torch.nn.Module, accelerator,
                split: bool = True) -> float:
        """`evaluate`, computed once per global step (an epoch's end right after a step validation has the same
        weights, so the same loss)."""
        if self.last is None or self.last[0] != step:
            self.last = (step, self.evaluate(batch_loss, module, accelerator, split=split))
        return self.last[1]

    @torch.no_grad()
    def evaluate(self, batch_loss: BatchLoss, module: torch.nn.Module, accelerator, split: bool = True) -> float:
        """Mean loss over the validation batches (this process's share of them) and timesteps, averaged over the
        processes. One host sync. `split=False` (a sharded model, whose forward passes every process must make
        together): every process scores every batch."""
        device = accelerator.device
        rank, world = (accelerator.process_index, accelerator.num_processes) if split else (0, 1)
        total = torch.zeros((), device=device, dtype=torch.float32)
        count = 0
        generator = torch.Generator(device=device)
        with eval_mode(module):
            for index in range(rank, self.num_batches, world):
                # each batch its own fixed noise, whichever process scores it
                with isolated_rng(self.seed + index, device):
                    generator.manual_seed(self.seed + index)
                    batch = self.dataset[index]
                    size = len(batch["captions"])
                    for t in self.timesteps:
                        timesteps = torch.full((size,), t, dtype=torch.long, device=device)
                        total += batch_loss(batch, generator, timesteps).detach().float()
                        count += 1
        stats = torch.stack([total, torch.tensor(float(count), device=device)])
        if world > 1:
            stats = accelerator.reduce(stats, reduction="sum")
        total, count = stats.tolist()
        return total / count if count else float("nan")


def build_validation(args, configs, *, seed: int, dataset_kwargs: dict, timestep_range: tuple[int, int],
                     warn: Callable[[str], None]):
    """A Validation when some dataset holds images out (validation_split), else None (with a warning when
    validation options were given for nothing)."""
    from ..data.dataset import TrainDataset
    from ..errors import DatasetError

    asked = [name for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps")
             if getattr(args, name, None) is not None]
    if not any(c.validation_split > 0 for c in configs):
        if asked:
            warn(f"option '{asked[0]}' has no effect: no images are held out for validation (set validation_split)")
        return None
    try:
        dataset = TrainDataset(configs, seed=seed, split="validation", **dataset_kwargs)
    except DatasetError:
        warn("validation_split holds out no image (too few images): the run has no validation loss")
        return None
    dataset.set_step(dataset_kwargs.get("max_train_steps") or 0)  # full captions: no token warmup
    vseed = args.validation_seed if getattr(args, "validation_seed", None) is not None else seed
    return Validation(dataset, seed=vseed, timesteps=validation_timesteps(*timestep_range),
                      every_n_steps=getattr(args, "validate_every_n_steps", None),
                      every_n_epochs=getattr(args, "validate_every_n_epochs", None),
                      max_steps=getattr(args, "max_validation_steps", None))
