"""--full_bf16: AdamW for weights stored in bf16, written back with stochastic rounding.

A full fine-tune keeps fp32 weights by default, and autocast casts them to bf16 in every forward: 3.2 GiB of SD1.5
UNet weights, 3.2 GiB of gradients, and 1,087 casts per forward and backward (counted on the CPU). In bf16 the
weights and gradients take half that and leave 151 casts, but bf16 holds 8 significant bits: a step of DreamBooth's
learning rate (5e-6) is far below half the spacing of bf16 numbers near a weight (2^-8 of it), so rounding to nearest
drops every update and the weights never move. OneTrainer and kohya's sd-scripts (its fused Adafactor) round
stochastically instead: up with the probability of the fraction dropped, so each update survives on average.

Here Adam's moments stay fp32, the update is computed in fp32 a chunk of weights at a time (its temporaries
bounded by ``CHUNK_BYTES``, a few kernels per chunk rather than per tensor), and only the weight is rounded. With
fp32 weights nothing is rounded and a step is ``torch.optim.AdamW``'s. The random bits of a chunk come from a
generator seeded with (seed, step, the chunk's first weight), so a resumed run repeats the uninterrupted one."""

from typing import List, Tuple

import torch

CHUNK_BYTES = 128 * 2**20  # fp32 size of one chunk: its update's temporaries hold two such buffers at most


def stochastic_round(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """fp32 ``value`` with its low 16 bits cut after adding random ones: exactly a bf16 number, the one above or
    below ``value`` with the odds that make it ``value`` on average (in place: ``value`` is overwritten)."""
    bits = value.view(torch.int32)
    bits += torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=generator)
    return bits.bitwise_and_(-65536).view(torch.float32)


class StochasticAdamW(torch.optim.Optimizer):
    """torch's AdamW (decoupled weight decay, bias correction) with fp32 moments for bf16 or fp32 weights; bf16
    weights get the result by stochastic rounding. Weights without a gradient are skipped, so
    ``--fused_backward_pass`` can step a group at a time."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 seed: int = 0):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f'lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}: out of range.')
        self._position = {}  # weight → its place in the order of groups, filled as groups are added
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, seed=seed))

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        params = self.param_groups[-1]['params']
        dtypes = {p.dtype for p in params} - {torch.float32, torch.bfloat16}
        if dtypes:
            del self.param_groups[-1]
            raise ValueError(f'StochasticAdamW rounds to bf16: weights of {sorted(map(str, dtypes))} are not bf16 or '
                             'fp32.')
        for param in params:  # numbered once: a chunk's random bits are seeded with its first weight's number
            self._position.setdefault(id(param), len(self._position))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            chunk, size = [], 0
            for param in group['params']:
                if param.grad is None:
                    continue
                if chunk and (size >= CHUNK_BYTES or (param.device, param.dtype) != (chunk[0].device, chunk[0].dtype)):
                    self._step_chunk(group, chunk)
                    chunk, size = [], 0
                chunk.append(param)
                size += param.numel() * 4
            if chunk:
                self._step_chunk(group, chunk)
        return loss

    def _step_chunk(self, group: dict, params: List[torch.nn.Parameter]) -> None:
        beta1, beta2 = group['betas']
        lr, eps, decay = group['lr'], group['eps'], group['weight_decay']
        states = [self._state(p) for p in params]
        for state in states:
            state['step'] += 1
        steps = [state['step'] for state in states]
        exp_avgs, exp_avg_sqs = [s['exp_avg'] for s in states], [s['exp_avg_sq'] for s in states]
        sizes = [p.numel() for p in params]
        rounded = params[0].dtype == torch.bfloat16  # a chunk holds one dtype
        grads = _fp32(params, sizes, [p.grad for p in params])[1] if rounded else [p.grad for p in params]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        del grads
        denominators = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_div_(denominators, [(1 - beta2 ** s) ** 0.5 for s in steps])
        torch._foreach_add_(denominators, eps)
        flat, values = _fp32(params, sizes, params) if rounded else (None, params)  # fp32: in place, as torch's
        if decay:
            torch._foreach_mul_(values, 1 - lr * decay)
        torch._foreach_addcdiv_(values, exp_avgs, denominators, [-lr / (1 - beta1 ** s) for s in steps])
        del denominators
        if rounded:
            generator = torch.Generator(params[0].device)
            generator.manual_seed(((group['seed'] * 1_000_003 + steps[0]) * 1_000_003 + self._position[id(params[0])])
                                  % 2**63)
            stochastic_round(flat, generator)
            torch._foreach_copy_(params, values)  # exact: each value is a bf16 number now

    def _state(self, param: torch.nn.Parameter) -> dict:
        state = self.state[param]
        if not state:
            state['step'] = 0
            state['exp_avg'] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
            state['exp_avg_sq'] = torch.zeros_like(param, dtype=torch.float32, memory_format=torch.preserve_format)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        # torch casts every saved state tensor to its weight's dtype: the moments stay fp32 whatever the weight
        super().load_state_dict(state_dict)
        saved = state_dict['state']
        ids = [i for group in state_dict['param_groups'] for i in group['params']]
        for param, index in zip((p for g in self.param_groups for p in g['params']), ids):
            for key in ('exp_avg', 'exp_avg_sq'):
                if index in saved and key in saved[index]:
                    self.state[param][key] = saved[index][key].to(param.device, torch.float32)


def _fp32(params, sizes: List[int], tensors) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """``tensors`` copied to one new flat fp32 buffer (a few kernels for the chunk), and its views shaped like
    ``params``."""
    flat = torch.empty(sum(sizes), dtype=torch.float32, device=params[0].device)
    views = [part.view_as(p) for part, p in zip(flat.split(sizes), params)]
    torch._foreach_copy_(views, tensors)
    return flat, views
