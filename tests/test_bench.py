"""The benchmarks' own measuring, on the tiny model: the memory estimator behind the README's DreamBooth memory
numbers, the training bench's runs and the per-step profile."""

import gc
import gzip

import pytest
import torch

from bench.estimate_training_memory import estimate
from bench.profiling import device_profile


@pytest.fixture(scope='module')
def rows():
    return {name: estimate(name, tiny=True) for name in ('adamw', 'adafactor')}


def test_adamw_state_is_two_copies_of_the_weights(rows):
    kinds = rows['adamw']['step_peak_gib_by_kind']
    assert kinds['opt'] == pytest.approx(2 * kinds['param'], rel=0.05)
    assert kinds['grad'] <= kinds['param'] * 1.01
    assert rows['adamw']['estimated_peak_gib'] >= kinds['param'] + kinds['opt']


def test_adafactor_state_is_factored(rows):
    assert rows['adafactor']['step_peak_gib_by_kind']['opt'] < 0.5 * rows['adamw']['step_peak_gib_by_kind']['opt']


def test_fused_backward_pass_with_checkpointing_holds_no_gradients_and_no_cached_weight_copies():
    """--fused_backward_pass frees gradients a group at a time; with --gradient_checkpointing the trainer turns off
    autocast's cache, which would keep a bf16 copy of every weight until the forward ends (1.2 GiB of SD1.5's
    estimate). On the tiny model the weights' bf16 copies are ~1.9 MB."""
    plain = estimate('adamw', gradient_checkpointing=True, tiny=True)['step_peak_gib_by_kind']
    cached, uncached = (estimate('adamw', gradient_checkpointing=True, tiny=True, fused_backward_pass=True,
                                 group_bytes=64 * 2**10, autocast_cache=cache)['step_peak_gib_by_kind']
                        for cache in (True, False))
    weights = plain['param']
    assert plain['grad'] >= 0.9 * weights  # the plain loop's peak holds every gradient
    assert uncached.get('grad', 0) < 0.1 * weights
    assert cached['act'] - uncached['act'] > 0.3 * weights  # bf16 copies: half the fp32 weights' bytes


def test_a_training_run_leaves_no_optimizer_state_to_the_next(tmp_path, fresh_accelerate):
    """The timed run's peak memory must not hold the optimizer state of the runs before it."""
    from bench.bench_training import make_data, ours_step_runner
    from bench.models import build_components
    (tmp_path / 'data').mkdir()
    records = make_data(str(tmp_path / 'data'), 2, 32)
    runner = ours_step_runner(build_components(True, 'cpu'), 'dreambooth', 1, 'cpu', records, 32, {})
    for _ in range(2):
        runner(1)
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, torch.optim.Optimizer) and o.state]


def test_a_profile_against_a_baseline_is_one_steps_share():
    a = torch.randn(64, 64)

    def steps(n):
        return lambda: [torch.mm(a, a).relu().sum().item() for _ in range(n)]

    row = device_profile('mm', steps(7), 'cpu', baseline=steps(2), steps=5)
    counts = {key: count for key, _, count in row['top']}
    assert row['name'] == 'profile mm, per step'
    assert counts['aten::mm'] == 1 and counts['aten::relu'] == 1
    assert row['host_waits'] == 1  # the .item(): where a training loop makes the host wait for the GPU


def test_a_profile_can_keep_its_timeline(tmp_path):
    """--trace_dir: the profiled call's timeline, for finding where the device sat idle."""
    import json
    from bench.profiling import trace_path
    path = trace_path(str(tmp_path / 'traces'), 'ours fast=True (reduce-overhead)')
    a = torch.randn(32, 32)
    device_profile('mm', lambda: torch.mm(a, a), 'cpu', trace=path)
    assert path.endswith('ours-fast-True-reduce-overhead.json.gz')
    with gzip.open(path) as f:
        assert any(event.get('name') == 'aten::mm' for event in json.load(f)['traceEvents'])


@pytest.mark.parametrize('only', [('lora', 'dreambooth'), ('lora', 'dreambooth', 'compile')])
def test_the_training_rows_that_answer_the_goals_run_first(only):
    """A GPU session's time limit cuts the rows at the end: each goal's vanilla row and ours come first, ours being
    the compiled row where it is asked for (LoRA's replays CUDA graphs); DreamBooth's is --full_bf16, then (asked
    for) --full_bf16 replaying CUDA graphs."""
    from bench.bench_training import plan_runs
    runs = plan_runs(list(only))
    compiled = 'compile' in only
    first = [(mode, batch, options) for _, mode, batch, options in runs[:5]]
    graphs = {'torch_compile': True, 'torch_compile_mode': 'reduce-overhead'}
    full_bf16 = {'full_bf16': True, 'mixed_precision': 'bf16'}
    assert first[:4] == [('lora', 1, None), ('lora', 1, graphs if compiled else {}), ('dreambooth', 1, None),
                         ('dreambooth', 1, full_bf16)]
    if compiled:
        assert first[4] == ('dreambooth', 1, {**full_bf16, **graphs})
    assert len({(name, batch) for name, _, batch, _ in runs}) == len(runs)
    compiled_rows = [name for name, _, batch, options in runs if batch == 1 and (options or {}).get('torch_compile')]
    assert len(compiled_rows) == 5 * compiled  # LoRA's two, DreamBooth's --full_bf16 one and 8-bit AdamW's two


def test_flop_counts_split_by_kind_and_grow_with_the_batch():
    from bench.count_flops import count
    unet_1, unet_4, decoder = count(tiny=True, batches=(1, 4))
    for row in (unet_1, unet_4, decoder):
        assert row['tflop'] > 0 and set(row['tflop_by_kind']) == {'convolution', 'matmul', 'attention'}
        assert sum(row['tflop_by_kind'].values()) == pytest.approx(row['tflop'], rel=1e-9)
    assert unet_4['tflop'] == pytest.approx(4 * unet_1['tflop'], rel=1e-9)


def test_inference_bench_times_vanilla_and_ours_and_their_pictures_are_equal():
    """The bench's vanilla and plain rows on the tiny model, as a GPU session would run them (without the compiled
    rows, which test_fast.py covers): the bench's own conversions give vanilla's pixels and ours the same."""
    from bench.bench_inference import main
    rows = {row['name']: row for row in main(['--device', 'cpu', '--tiny', '--steps', '2', '--repeats', '1',
                                              '--batch', '2', '--skip_fast'])}
    assert rows['vanilla diffusers']['s_per_image_batch1'] > 0 and rows['ours']['images_per_s_batched'] > 0
    assert rows['ours vs vanilla, same seed']['max_abs_pixel_diff_0_255'] == 0


def test_a_training_row_whose_setup_noise_outweighs_its_steps_says_so_instead_of_a_negative_speed(monkeypatch):
    import bench.bench_training as bench
    from bench.bench_training import measure, parse_args
    seconds = iter([2.0, 1.5])  # the short run, then the longer one, which came out faster
    monkeypatch.setattr(bench, 'timed', lambda fn, device: (next(seconds), None))
    rows = []
    measure('row', lambda steps: None, parse_args(['--device', 'cpu', '--steps', '2']), 1, rows)
    assert rows[0]['it_per_s'] is None and rows[0]['images_per_s'] is None
    assert 'took 0.500 s less than the shorter' in rows[0]['note'] and 'pass more --steps' in rows[0]['note']
