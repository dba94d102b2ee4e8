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


def test_precompiles_where_torch_leaves_aot_compile_off_by_default(module, tmp_path):
    """torch 2.9-2.12 (the GPU image's 2.11 among them) give ``torch.compile(...)`` its ``aot_compile`` only under
    ``enable_aot_compile``, off by default there; 2.13 turns it on. Without the flag the function fell back."""
    x = torch.randn(2, 4)
    with torch._dynamo.config.patch(enable_aot_compile=False), torch.inference_mode():
        PrecompiledFunction(scaled_forward, 'default', str(tmp_path))(module, x)
    assert [name.endswith('.bin') for name in os.listdir(tmp_path)] == [True]


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
    assert not fn.unsupported and len(os.listdir(tmp_path)) == 2


def test_a_folder_it_cannot_write_keeps_the_compiled_graph_for_this_process(module, tmp_path, caplog):
    blocked = tmp_path / 'a file, not a folder'
    blocked.write_text('')
    fn = PrecompiledFunction(scaled_forward, 'default', str(blocked))
    x = torch.randn(2, 4)
    with caplog.at_level(logging.WARNING, logger='modelscope_sd.precompile'), torch.inference_mode():
        assert torch.allclose(fn(module, x), module(x))
        assert torch.allclose(fn(module, x), module(x))
    assert caplog.text.count('could not save scaled_forward') == 1 and not fn.unsupported and len(fn.loaded) == 1


def test_a_saved_file_that_does_not_load_is_removed_and_torch_compile_takes_over(module, tmp_path, caplog,
                                                                                monkeypatch):
    def unreadable(self, path):
        raise RuntimeError('Missing required external references')
    monkeypatch.setattr(PrecompiledFunction, '_read', unreadable)
    fn = PrecompiledFunction(scaled_forward, 'default', str(tmp_path))
    x = torch.randn(2, 4)
    with caplog.at_level(logging.WARNING, logger='modelscope_sd.precompile'), torch.inference_mode():
        assert torch.allclose(fn(module, x), module(x))
    assert ('scaled_forward with these arguments: compiled, but its file does not load (RuntimeError: Missing'
            in caplog.text)
    assert len(fn.unsupported) == 1 and [name.split('.')[-1] for name in os.listdir(tmp_path)] == ['unsupported']


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
    assert caplog.text.count('scaled_forward with these arguments: its precompiled graph failed its first call '
                             '(RuntimeError: CUDA') == 1
    assert fn.loaded == []


def breaks_graph_when_large(module, x):
    if x.shape[0] > 2:
        print('', end='')  # a graph break for this signature only
    return module(x)


def test_a_signature_with_a_graph_break_runs_torch_compile_and_the_next_process_does_not_try_again(
        module, tmp_path, caplog, monkeypatch):
    fn = PrecompiledFunction(breaks_graph_when_large, 'default', str(tmp_path), fullgraph=False)
    small, large = torch.randn(1, 4), torch.randn(3, 4)
    with caplog.at_level(logging.WARNING, logger='modelscope_sd.precompile'), torch.inference_mode():
        for x in (small, large, small, large):
            assert torch.allclose(fn(module, x), module(x))
    assert caplog.text.count('breaks_graph_when_large with these arguments: cannot be precompiled') == 1
    assert len(fn.loaded) == 1 and len(fn.unsupported) == 1  # the small signature stays precompiled
    assert sorted(name.split('.')[-1] for name in os.listdir(tmp_path)) == ['bin', 'unsupported']
    aot_compiles = []
    compile = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda *a, **k: aot_compiles.append(k) or compile(*a, **k))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='modelscope_sd.precompile'), torch.inference_mode():
        fresh = PrecompiledFunction(breaks_graph_when_large, 'default', str(tmp_path), fullgraph=False)
        for x in (small, large):
            assert torch.allclose(fresh(module, x), module(x))
    # the small one loaded, the large one went straight to the plain compile (no fullgraph attempt), silently
    assert aot_compiles == [{'mode': 'default', 'fullgraph': False}] and caplog.text == ''


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
pipe = StableDiffusionText2ImagePipeline(sys.argv[1], device=sys.argv[2], progress_bar=False, fast=True,
                                         precompile=True)
image = pipe('a cat', num_inference_steps=4, seed=0)['output_imgs'][0]
np.save(sys.argv[3], image)
manager = None
if torch.cuda.is_available():
    from torch._inductor import cudagraph_trees
    manager = cudagraph_trees.get_manager(0, create_if_none_exists=False)
print('RESULT', json.dumps({'traced_s': sum(torch._dynamo.utils.compilation_time_metrics.get('bytecode_tracing', [])),
                            'cuda_graphs': 0 if manager is None else len(manager.roots)}))
'''


def new_process_env(tmp_path, run):
    """One cache folder, and each process its own hash seed: under seed 2 diffusers builds the text encoder before
    the safety checker, under 7 after, and a text encoder saved under one then failed to load under the other until
    transformers' output-capture registry was sorted (`fast.sort_output_capture_registry`)."""
    return {**os.environ, 'TORCHINDUCTOR_CACHE_DIR': str(tmp_path / 'cache'), 'PYTHONHASHSEED': ('2', '7')[run % 2]}


def run_in_new_processes(model_dir, device, tmp_path, runs=2):
    """The fast pipeline's first image in ``runs`` processes one after the other, with one cache folder: each one's
    image, dynamo's tracing seconds, and its CUDA-graph trees' roots."""
    results = []
    for run in range(runs):
        out = subprocess.run([sys.executable, '-c', NEW_PROCESS, model_dir, device, str(tmp_path / f'{run}.npy')],
                             env=new_process_env(tmp_path, run), capture_output=True, text=True, timeout=600)
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


def every_kind_of_call():
    """(prompt, options) of each kind of call with a graph of its own: AND, CFG cutoff, clip_skip, hires, a batch."""
    from diffusers.callbacks import SDCFGCutoffCallback
    return [('a cat AND a dog :0.5', {}),
            ('a cat', {'callback_on_step_end': SDCFGCutoffCallback(cutoff_step_ratio=0.5)}),
            ('a cat', {'clip_skip': 1}), ('a cat', {'hr_scale': 1.5}), (['a cat', 'a dog'], {})]


EVERY_KIND = '''
import logging, sys, numpy as np
sys.path.insert(0, sys.argv[3])
from modelscope_sd import StableDiffusionText2ImagePipeline
from test_precompile import every_kind_of_call
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format='LOG %(name)s %(message)s')
pipe = StableDiffusionText2ImagePipeline(sys.argv[1], device='cpu', progress_bar=False, fast=True, precompile=True)
np.savez(sys.argv[2], *[pipe(prompt, num_inference_steps=4, seed=0, **kw)['output_imgs'][0]
                        for prompt, kw in every_kind_of_call()])
'''


@pytest.mark.slow
def test_and_prompts_cfg_cutoff_clip_skip_hires_and_batches_precompile_or_fall_back_once(tiny_model_dir, sd_pipe,
                                                                                          tmp_path):
    """Every kind of fast call in two processes (a few minutes): the pictures of the plain path; what cannot be
    precompiled (CLIP's hidden states for clip_skip, in transformers 5.25) is said once, in the first process."""
    runs = []
    for run in range(2):
        out = subprocess.run([sys.executable, '-c', EVERY_KIND, tiny_model_dir, str(tmp_path / f'{run}.npz'),
                              os.path.dirname(__file__)], env=new_process_env(tmp_path, run), capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        with np.load(tmp_path / f'{run}.npz') as images:
            runs.append(([images[key].astype(int) for key in sorted(images.files)],
                         [line for line in out.stdout.splitlines() if line.startswith('LOG modelscope_sd')]))
    for (prompt, kw), first, second in zip(every_kind_of_call(), runs[0][0], runs[1][0]):
        plain = sd_pipe(prompt, num_inference_steps=4, seed=0, **kw)['output_imgs'][0].astype(int)
        assert np.abs(first - plain).max() <= 1 and np.array_equal(first, second), (prompt, kw)
    assert all('cannot be precompiled' in line for line in runs[0][1]) and runs[1][1] == []
