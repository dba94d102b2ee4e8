"""--full_bf16's optimizer: torch's AdamW on fp32 weights, stochastic rounding into bf16 weights."""

import copy

import pytest
import torch

from finetune import stochastic_adamw
from finetune.stochastic_adamw import StochasticAdamW, stochastic_round


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Conv2d(4, 4, 3)).to(dtype)


def _steps(model, optimizer, count, start=0):
    for i in range(start, start + count):
        data = torch.Generator().manual_seed(i)
        loss = (model[0](torch.randn(3, 8, generator=data).to(model[0].weight.dtype)).float().pow(2).sum()
                + model[1](torch.randn(1, 4, 5, 5, generator=data).to(model[0].weight.dtype)).float().sum())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_on_fp32_weights_it_is_torchs_adamw(monkeypatch):
    """Two parameter groups with their own learning rates, weight decay, chunks of a few tensors."""
    monkeypatch.setattr(stochastic_adamw, 'CHUNK_BYTES', 256)
    ours, theirs = _model(), _model()

    def groups(model):
        return [{'params': model[0].parameters()}, {'params': model[1].parameters(), 'lr': 3e-3}]

    _steps(ours, StochasticAdamW(groups(ours), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99)), 5)
    _steps(theirs, torch.optim.AdamW(groups(theirs), lr=1e-2, weight_decay=0.1, betas=(0.8, 0.99)), 5)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(a, b)  # the same operations in the same order
    assert not torch.equal(ours[0].weight, _model()[0].weight)


def test_stochastic_rounding_is_exact_on_average_and_keeps_bf16_numbers():
    value = torch.full((200_000,), 1.0 + 2**-10)  # a quarter of the way from 1 to the next bf16 number, 1 + 2**-7
    rounded = stochastic_round(value.clone(), torch.Generator().manual_seed(0))
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-10, abs=2e-5)
    assert (-rounded).mean().item() == pytest.approx(-(1.0 + 2**-10), abs=2e-5)  # by magnitude, for negatives too
    exact = torch.randn(1000).to(torch.bfloat16).float()
    assert torch.equal(stochastic_round(exact.clone(), torch.Generator().manual_seed(1)), exact)


def test_bf16_weights_keep_updates_that_rounding_to_nearest_drops():
    keeps_updates_that_rounding_to_nearest_drops('cpu')


def keeps_updates_that_rounding_to_nearest_drops(device):
    """DreamBooth's learning rate on weights near 1: each step moves a weight by about 5e-6, far below half of bf16's
    spacing there (2**-8): torch's AdamW on bf16 weights never moves them; ours moves them by the sum on average."""
    steps, lr = 200, 5e-6
    ours, nearest = (torch.nn.Parameter(torch.ones(50_000, dtype=torch.bfloat16, device=device)) for _ in range(2))
    ours_optimizer = StochasticAdamW([ours], lr=lr, weight_decay=0)
    nearest_optimizer = torch.optim.AdamW([nearest], lr=lr, weight_decay=0)
    for _ in range(steps):
        for param, optimizer in ((ours, ours_optimizer), (nearest, nearest_optimizer)):
            param.grad = torch.ones_like(param)  # Adam's step is then the learning rate itself
            optimizer.step()
    assert torch.equal(nearest, torch.ones_like(nearest))
    assert ours.dtype == torch.bfloat16
    assert ours.float().mean().item() == pytest.approx(1 - steps * lr, abs=2e-5)
    assert ours_optimizer.state[ours]['exp_avg'].dtype == torch.float32


def test_a_resumed_optimizer_repeats_the_uninterrupted_one_with_fp32_moments():
    whole, part = _model(torch.bfloat16), _model(torch.bfloat16)
    _steps(whole, StochasticAdamW(whole.parameters(), lr=1e-2, seed=3), 6)
    first = StochasticAdamW(part.parameters(), lr=1e-2, seed=3)
    _steps(part, first, 3)
    saved = copy.deepcopy(first.state_dict())
    resumed = StochasticAdamW(part.parameters(), lr=1e-2, seed=3)
    resumed.load_state_dict(saved)  # torch's own load would cast the moments to the weights' bf16
    assert all(state['exp_avg_sq'].dtype == torch.float32 for state in resumed.state.values())
    _steps(part, resumed, 3, start=3)
    for a, b in zip(whole.parameters(), part.parameters()):
        assert torch.equal(a, b)


def test_weights_it_cannot_round_to_are_refused():
    with pytest.raises(ValueError, match=r"StochasticAdamW rounds to bf16: weights of \['torch.float16'\]"):
        StochasticAdamW(_model(torch.float16).parameters())


def test_a_group_added_later_steps_as_one_given_at_the_start():
    at_start, added = _model(torch.bfloat16), _model(torch.bfloat16)
    _steps(at_start, StochasticAdamW([{'params': at_start[0].parameters()}, {'params': at_start[1].parameters()}],
                                     lr=1e-2, seed=3), 3)
    optimizer = StochasticAdamW(added[0].parameters(), lr=1e-2, seed=3)
    optimizer.add_param_group({'params': added[1].parameters()})
    _steps(added, optimizer, 3)
    for a, b in zip(at_start.parameters(), added.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"weights of \['torch.float16'\] are not bf16"):
        optimizer.add_param_group({'params': torch.nn.Linear(2, 2).half().parameters()})
    assert len(optimizer.param_groups) == 2
