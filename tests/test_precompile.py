"""precompile=True: compiled functions kept whole on disk (torch's AOT precompile), loaded by later processes
without tracing; guards still decide which graph a call may use. On the CPU (inductor's C++ kernels)."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from modelscope_sd import precompile
from modelscope_sd.precompile import PrecompiledFunction


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.scale = 1.0  # a Python float the graph bakes in, as peft's LoRA scaling

    def forward(self, x):
        return self.linear(x) * self.scale


def scaled_forward(module, x):
    return type(module).forward(module, x)


def breaks_graph(module, x):
    y = module(x)
    print('', end='')  # a graph break: not one graph, so not precompilable
    return y + 1


@pytest.fixture
def module():
    torch.manual_seed(0)
    return Scaled().eval()


def _no_compiling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('compiled instead of loading')
    monkeypatch.setattr(torch, 'compile', refuse)


def test_a_new_instance_loads_the_saved_graph_without_compiling(module, tmp_path, monkeypatch):
    x = torch.randn(2, 4)
    first = PrecompiledFunction(scaled_forward, 'default', str(tmp_path))
    with torch.inference_mode():
        expected = module(x)
        assert torch.allclose(first(module, x), expected)
    (saved,) = os.listdir(tmp_path)
    assert saved.startswith('scaled_forward-') and saved.endswith('.bin')
    _no_compiling(monkeypatch)  # as in a new process: the file, not dynamo
    with torch.inference_mode():
        assert torch.allclose(PrecompiledFunction(scaled_forward, 'default', str(tmp_path))(module, x), expected)


def test_guards_still_hold_a_changed_attribute_or_grad_mode_compiles_again(module, tmp_path):
    x = torch.randn(2, 4)
    fn = PrecompiledFunction(scaled_forward, 'default', str(tmp_path))
    with torch.inference_mode():
        fn(module, x)
        module.scale = 2.0  # same weights and shapes: only the saved guards see it
        assert torch.allclose(fn(module, x), module(x))
        assert len(fn.loaded) == 2
    with torch.no_grad():  # another grad mode is another graph, not the inference-mode one
        assert torch.allclose(fn(module, x), module(x))
    assert len(fn.loaded) == 3


def test_each_shape_has_its_file_and_switching_back_compiles_nothing(module, tmp_path, monkeypatch):
    fn = PrecompiledFunction(scaled_forward, 'default', str(tmp_path))
    small, large = torch.randn(1, 4), torch.randn(3, 4)
    with torch.inference_mode():
        fn(module, small)
        fn(module, large)
        assert len(os.listdir(tmp_path)) == 2
        _no_compiling(monkeypatch)
        assert torch.allclose(fn(module, small), module(small))
        assert torch.allclose(fn(module, large), module(large))


def test_a_file_of_another_model_state_is_compiled_anew_and_replaced(module, tmp_path):
    x = torch.randn(2, 4)
    with torch.inference_mode():
        PrecompiledFunction(scaled_forward, 'default', str(tmp_path))(module, x)
        module.scale = 3.0  # same file name (weights' shapes), other guards
        fn = PrecompiledFunction(scaled_forward, 'default', str(tmp_path))
        assert torch.allclose(fn(module, x), module(x))
        assert len(os.listdir(tmp_path)) == 1
        # the file now holds the new state's graph
        assert torch.allclose(PrecompiledFunction(scaled_forward, 'default', str(tmp_path))(module, x), module(x))


def test_a_damaged_file_is_compiled_again_with_a_warning(module, tmp_path, caplog):
    x = torch.randn(2, 4)
    fn = PrecompiledFunction(scaled_forward, 'default', str(tmp_path))
    with torch.inference_mode():
        expected = fn(module, x)
    (saved,) = os.listdir(tmp_path)
    with open(tmp_path / saved, 'wb') as f:
        f.write(b'not a compiled function')
    with caplog.at_level(logging.WARNING, logger='modelscope_sd.precompile'), torch.inference_mode():
        assert torch.allclose(PrecompiledFunction(scaled_forward, 'default', str(tmp_path))(module, x), expected)
    assert 'could not load' in caplog.text and saved in caplog.text
    with torch.inference_mode():  # and the file is whole again
        assert torch.allclose(PrecompiledFunction(scaled_forward, 'default', str(tmp_path))(module, x), expected)


def test_a_module_holding_its_precompiled_forward_saves_later_signatures_too(module, tmp_path):
    """fast=True puts the compiled forward on the module, and torch's precompile pickles the guarded module's
    attributes with each new graph: the graphs already loaded (their guard managers cannot be pickled) stay out."""
    fn = PrecompiledFunction(scaled_forward, 'default', str(tmp_path))
    module.compiled_forward = fn
    with torch.inference_mode():
        fn(module, torch.randn(1, 4))
        large = torch.randn(3, 4)
        assert torch.allclose(fn(module, large), module(large))
    assert fn.fallback is None and len(os.listdir(tmp_path)) == 2


def test_a_folder_it_cannot_write_keeps_the_compiled_graph_for_this_process(module, tmp_path, caplog):
    blocked = tmp_path / 'a file, not a folder'
    blocked.write_text('')
    fn = PrecompiledFunction(scaled_forward, 'default', str(blocked))
    x = torch.randn(2, 4)
    with caplog.at_level(logging.WARNING, logger='modelscope_sd.precompile'), torch.inference_mode():
        assert torch.allclose(fn(module, x), module(x))
        assert torch.allclose(fn(module, x), module(x))
    assert caplog.text.count('could not save scaled_forward') == 1 and fn.fallback is None and len(fn.loaded) == 1


def test_a_saved_file_that_does_not_load_is_removed_and_torch_compile_takes_over(module, tmp_path, caplog,
                                                                                monkeypatch):
    def unreadable(self, path):
        raise RuntimeError('Missing required external references')
    monkeypatch.setattr(PrecompiledFunction, '_read', unreadable)
    fn = PrecompiledFunction(scaled_forward, 'default', str(tmp_path))
    x = torch.randn(2, 4)
    with caplog.at_level(logging.WARNING, logger='modelscope_sd.precompile'), torch.inference_mode():
        assert torch.allclose(fn(module, x), module(x))
    assert 'scaled_forward: compiled, but its file does not load (RuntimeError: Missing' in caplog.text
    assert fn.fallback is not None and os.listdir(tmp_path) == []


def test_a_precompiled_graph_that_fails_its_first_call_hands_over_to_torch_compile(module, tmp_path, caplog,
                                                                                  monkeypatch):
    class Failing:
        def __call__(self, *args, **kwargs):
            raise RuntimeError('CUDA graph capture failed')
    monkeypatch.setattr(PrecompiledFunction, '_load_or_compile', lambda self, args, kwargs: Failing())
    fn = PrecompiledFunction(scaled_forward, 'default', str(tmp_path))
    x = torch.randn(2, 4)
    with caplog.at_level(logging.WARNING, logger='modelscope_sd.precompile'), torch.inference_mode():
        assert torch.allclose(fn(module, x), module(x))
        assert torch.allclose(fn(module, x), module(x))
    assert caplog.text.count('scaled_forward: its precompiled graph failed its first call (RuntimeError: CUDA') == 1
    assert fn.loaded == []


def test_a_function_with_a_graph_break_falls_back_to_torch_compile_with_a_warning(module, tmp_path, caplog):
    x = torch.randn(2, 4)
    fn = PrecompiledFunction(breaks_graph, 'default', str(tmp_path), fullgraph=False)
    with caplog.at_level(logging.WARNING, logger='modelscope_sd.precompile'), torch.inference_mode():
        assert torch.allclose(fn(module, x), module(x) + 1)
        assert torch.allclose(fn(module, x), module(x) + 1)
    assert caplog.text.count('breaks_graph: cannot be precompiled') == 1
    assert fn.fallback is not None and os.listdir(tmp_path) == []


def test_the_file_name_changes_with_the_libraries_and_the_arguments(module, monkeypatch, tmp_path):
    fn = PrecompiledFunction(scaled_forward, 'default', str(tmp_path))
    x = torch.randn(2, 4)
    base = fn.path((module, x), {})
    assert fn.path((module, x.clone()), {}) == base  # values are not part of it
    assert fn.path((module, x.half()), {}) != base
    assert fn.path((module, x.t()), {}) != base  # strides
    assert fn.path((module, torch.randn(3, 4)), {}) != base
    assert PrecompiledFunction(scaled_forward, 'reduce-overhead', str(tmp_path)).path((module, x), {}) != base
    environment = precompile.environment()
    monkeypatch.setattr(precompile, 'environment', lambda: {**environment, 'diffusers': '0.0.1'})
    assert fn.path((module, x), {}) != base


def test_precompile_without_fast_is_refused_by_name(tiny_model_dir):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    with pytest.raises(ValueError, match='precompile=True.*fast=True'):
        StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', precompile=True)


NEW_PROCESS = '''
import json, sys, numpy as np, torch
from modelscope_sd import StableDiffusionText2ImagePipeline
pipe = StableDiffusionText2ImagePipeline(sys.argv[1], device=sys.argv[2], progress_bar=False, fast=True, precompile=True)
image = pipe('a cat', num_inference_steps=4, seed=0)['output_imgs'][0]
np.save(sys.argv[3], image)
manager = None
if torch.cuda.is_available():
    from torch._inductor import cudagraph_trees
    manager = cudagraph_trees.get_manager(0, create_if_none_exists=False)
print('RESULT', json.dumps({'traced_s': sum(torch._dynamo.utils.compilation_time_metrics.get('bytecode_tracing', [])),
                            'cuda_graphs': 0 if manager is None else len(manager.roots)}))
'''


def run_in_new_processes(model_dir, device, tmp_path, runs=2):
    """The fast pipeline's first image in ``runs`` processes one after the other, with one cache folder: each one's
    image, dynamo's tracing seconds, and its CUDA-graph trees' roots."""
    env = {**os.environ, 'TORCHINDUCTOR_CACHE_DIR': str(tmp_path / 'cache')}
    results = []
    for run in range(runs):
        out = subprocess.run([sys.executable, '-c', NEW_PROCESS, model_dir, device, str(tmp_path / f'{run}.npy')],
                             env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        results.append({'image': np.load(tmp_path / f'{run}.npy').astype(int),
                        **json.loads(out.stdout.split('RESULT')[-1])})
    return results


@pytest.mark.slow
def test_a_second_process_loads_step_decoder_and_text_encoder_and_draws_the_same_image(tiny_model_dir, sd_pipe,
                                                                                       tmp_path):
    """fast=True, precompile=True on the tiny model (about a minute): the first process compiles and saves the step,
    the decoder and the text encoder; a second one loads all three without dynamo tracing anything."""
    first, second = run_in_new_processes(tiny_model_dir, 'cpu', tmp_path)
    names = sorted(name.split('-')[0] for name in os.listdir(tmp_path / 'cache' / 'modelscope_sd_precompiled'))
    assert names == ['decoder_forward', 'denoise_step', 'text_encoder_forward']
    assert first['traced_s'] > 0 and second['traced_s'] == 0
    assert np.array_equal(first['image'], second['image'])
    plain = sd_pipe('a cat', num_inference_steps=4, seed=0)['output_imgs'][0].astype(int)
    assert np.abs(first['image'] - plain).max() <= 1
