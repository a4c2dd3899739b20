"""Fused backward pass: the optimizer steps each parameter as soon as its gradient is ready, inside backward.

Full fine-tuning otherwise holds a gradient for every weight of the U-Net (and text encoder) until the optimizer
step; here each gradient is used and freed right away (`Tensor.register_post_accumulate_grad_hook`), so at most a
few gradients are alive at once. The same idea as sd-scripts' `--fused_backward_pass` (sdxl_train.py) and PyTorch's
"optimizer step in backward" recipe, but it works with any optimizer that updates parameters independently (AdamW,
AdamW8bit): the wrapped optimizer is stepped with a parameter group holding only that parameter, so there is still a
single optimizer, one state dict for save_state/resume, and learning-rate schedules act on its groups as usual.

Consequences, checked by `check_fused_backward_options`:
- no gradient accumulation (a gradient would have to outlive its backward pass);
- no fp16 mixed precision (the gradient scaler must see every gradient before any step);
- `max_grad_norm` clips each parameter's gradient to that norm on its own, as sd-scripts does: a global norm
  needs every gradient at once, which is what the fused pass avoids. Set max_grad_norm 0 to turn clipping off.
With several processes each gradient is averaged across them inside its hook, before the step.
"""
from __future__ import annotations

import argparse
import torch

from ..options import OptionError
from .distributed import allreduce_gradients, is_distributed


def fused_backward_wanted(args: argparse.Namespace) -> bool:
    """fused_backward_pass, or sd-scripts' blockwise_fused_optimizers / fused_optimizer_groups (the same mechanism
    here)."""
    return bool(getattr(args, "fused_backward_pass", False) or getattr(args, "blockwise_fused_optimizers", False)
                or getattr(args, "fused_optimizer_groups", None))


def check_fused_backward_options(args: argparse.Namespace) -> None:
    """OptionError naming the clash when fused_backward_pass is combined with something it cannot do."""
    if not fused_backward_wanted(args):
        return
    if args.gradient_accumulation_steps > 1:
        raise OptionError("option 'fused_backward_pass' steps the optimizer inside each backward pass, so "
                          "gradients cannot be accumulated: set gradient_accumulation_steps to 1 (raise "
                          "train_batch_size instead) or turn fused_backward_pass off")
    if args.mixed_precision == "fp16" or getattr(args, "full_fp16", False):
        raise OptionError("option 'fused_backward_pass' does not work with fp16 (the gradient scaler needs every "
                          "gradient before the first step): use mixed_precision bf16 or no, or turn "
                          "fused_backward_pass off")


class FusedBackwardOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer so that each trained parameter is stepped by a hook during backward.

    `step()` and `zero_grad()` do nothing (the work happened in backward); `param_groups`, `state` and the state
    dict are the wrapped optimizer's, so accelerate, LR schedulers and save_state see a normal optimizer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, max_grad_norm: float | None = None):
        # torch.optim.Optimizer.__init__ is not called: every attribute it would set is the wrapped optimizer's.
        self.optimizer = optimizer
        self.max_grad_norm = max_grad_norm or 0.0
        self._group_of: dict[torch.Tensor, dict] = {}
        self._handles = []
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.requires_grad:
                    self._group_of[param] = group
                    self._handles.append(param.register_post_accumulate_grad_hook(self._on_gradient))

    # ---- what accelerate and the LR scheduler use
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value):
        self.optimizer.state = value

    @property
    def defaults(self):
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.optimizer.defaults = value

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def step(self, closure=None):
        """Nothing left to do: every parameter was stepped when its gradient arrived."""
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are freed in the hooks already."""

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # ---- the work
    def _on_gradient(self, param: torch.Tensor) -> None:
        if param.grad is None:
            return
        if is_distributed():
            allreduce_gradients([param])
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_([param], self.max_grad_norm)
        self.step_parameter(param)
        param.grad = None

    def step_parameter(self, param: torch.Tensor) -> None:
        """One optimizer step for `param` alone, with its group's current hyper-parameters (e.g. the scheduled lr)."""
        group = self._group_of[param]
        single = {**group, "params": [param]}
        groups = self.optimizer.param_groups
        self.optimizer.param_groups = [single]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups
        for key, value in single.items():  # optimizers that keep running values in their group
            if key != "params":
                group[key] = value

