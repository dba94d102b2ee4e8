"""--fused_backward_pass: the optimizer steps the weights while backward runs, a group at a time, and frees their
gradients, so a full fine-tune never holds all of its gradients at once (3.2 GiB of fp32 for SD1.5's UNet).

kohya's sd-scripts offer the flag of this name, stepping one tensor at a time with Adafactor. Here the optimizer
steps groups of about ``GROUP_BYTES`` of gradients, in the order backward makes them: a few optimizer calls per
step instead of one per tensor (each is a fused kernel and some host work, and these loops are bound by the host's
launches), with gradient memory bounded by a group. Any optimizer the trainers build works, as it is: its
``step()`` skips the weights whose gradient is None, which at each call are all but the group's. Its state, its
learning-rate schedule and its checkpoints are those of the plain loop, so a run may resume with or without the
flag. Gradients are clipped to ``--max_grad_norm`` per group, as kohya's clips per tensor: a group's norm is at most
the whole gradient's, so this clips no more than the plain loop does; with no clipping the weights equal the plain
loop's."""

from typing import Iterable, List, Optional

import torch

# about 1/13 of SD1.5's UNet gradients per optimizer call; the step's peak then holds one group (estimate on the CPU:
# README, Speed)
GROUP_BYTES = 256 * 2**20


class OptimizerInBackward:
    """Hooks on ``params`` that hand each finished gradient to a group; a full group is clipped, stepped and freed.
    ``flush()`` after backward steps the last group. Use as a context manager: the hooks go on exit."""

    def __init__(self, optimizer, params: Iterable[torch.nn.Parameter], max_grad_norm: float,
                 group_bytes: Optional[int] = None):
        self.optimizer, self.max_grad_norm = optimizer, max_grad_norm
        self.group_bytes = group_bytes or GROUP_BYTES
        self.params = [p for p in params if p.requires_grad]
        self.order = {id(p): i for i, p in enumerate(self.params)}
        self.pending: List[torch.nn.Parameter] = []
        self.pending_bytes = 0
        self.handles = []

    def __enter__(self):
        self.handles = [p.register_post_accumulate_grad_hook(self._finished) for p in self.params]
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles, self.pending, self.pending_bytes = [], [], 0
        return False

    def _finished(self, param: torch.nn.Parameter) -> None:
        self.pending.append(param)
        self.pending_bytes += param.grad.numel() * param.grad.element_size()
        if self.pending_bytes >= self.group_bytes:
            self.flush()

    def flush(self) -> None:
        """Clip, step and free the gradients handed over since the last call."""
        if not self.pending:
            return
        # in the parameters' order, not backward's: one group of all of them clips as the plain loop does, to the bit
        self.pending.sort(key=lambda p: self.order[id(p)])
        torch.nn.utils.clip_grad_norm_(self.pending, self.max_grad_norm)
        self.optimizer.step()  # only the group's weights have a gradient now
        for param in self.pending:
            param.grad = None
        self.pending, self.pending_bytes = [], 0
