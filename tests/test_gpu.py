"""Opt-in CUDA checks (`python -m pytest -m gpu`): fp16 default and the fast path on the tiny model."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]

SCHEDULERS = (None, 'dpm++_2m_karras', 'euler_a', 'unipc', 'heun', 'dpm2_a', 'dpm++_sde_karras')


@pytest.fixture(scope='module')
def gpu_pipes(tiny_model_dir, tmp_path_factory):
    """The plain path and the fast path, both with the same LoRA (fused on the fast path)."""
    from modelscope_sd import StableDiffusionText2ImagePipeline
    from train_helpers import make_random_lora
    lora = make_random_lora(tiny_model_dir, str(tmp_path_factory.mktemp('lora')))
    plain = StableDiffusionText2ImagePipeline(tiny_model_dir, device='gpu', progress_bar=False, lora_dir=lora)
    fast = StableDiffusionText2ImagePipeline(tiny_model_dir, device='gpu', progress_bar=False, fast=True,
                                             lora_dir=lora)
    return plain, fast


def test_gpu_defaults_to_fp16(gpu_pipes):
    plain, _ = gpu_pipes
    assert plain.sd.unet.dtype == torch.float16 and plain.device.type == 'cuda'


@pytest.mark.parametrize('scheduler', [None, 'euler_a', 'dpm++_sde_karras'])
def test_a_seed_gives_the_cpus_picture_on_the_gpu(tiny_model_dir, scheduler):
    """Start latents and stochastic noise come from CPU generators, DPM++ SDE's Brownian tree included."""
    from modelscope_sd import StableDiffusionText2ImagePipeline
    images = [StableDiffusionText2ImagePipeline(tiny_model_dir, device=device, torch_dtype=torch.float32,
                                                progress_bar=False)('a cat', num_inference_steps=4, seed=3,
                                                                    scheduler=scheduler)['output_imgs'][0]
              for device in ('cpu', 'gpu')]
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 2


def test_fast_path_matches_the_plain_path_for_every_scheduler_without_recompiling(gpu_pipes):
    plain, fast = gpu_pipes
    fast('a cat', num_inference_steps=4, seed=0)  # compiles the step and the decoder
    with torch._dynamo.config.patch(error_on_recompile=True):
        for scheduler in SCHEDULERS:
            args = dict(num_inference_steps=4, seed=0, scheduler=scheduler)
            a = plain('a cat', **args)['output_imgs'][0].astype(int)
            b = fast('a cat', **args)['output_imgs'][0].astype(int)
            assert np.abs(a - b).max() <= 3, scheduler


def test_edited_prompts_switch_embeddings_in_the_compiled_loop_without_recompiling(gpu_pipes):
    """Prompt editing hands each CUDA-graph replay the embeddings of its call: same shapes, so no new graph."""
    plain, fast = gpu_pipes
    fast('a cat', num_inference_steps=4, seed=0)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt in ('[a cat:a dog:0.5]', 'a [red|blue] cat'):
            args = dict(num_inference_steps=4, seed=0, negative_prompt='[blurry::2]')
            a = plain(prompt, **args)['output_imgs'][0].astype(int)
            b = fast(prompt, **args)['output_imgs'][0].astype(int)
            assert np.abs(a - b).max() <= 3, prompt


def test_and_prompts_run_in_the_compiled_loop(gpu_pipes):
    """A1111's AND: more UNet rows than images, so a graph of its own; the plain path runs the same loop eagerly."""
    plain, fast = gpu_pipes
    args = dict(num_inference_steps=4, seed=0, num_images_per_prompt=2)
    a = plain(['a cat AND a dog:0.5', 'a tree'], **args)['output_imgs']
    b = fast(['a cat AND a dog:0.5', 'a tree'], **args)['output_imgs']
    assert max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(a, b)) <= 3


def test_cfg_cutoff_runs_in_the_compiled_loop_with_one_graph_more(gpu_pipes):
    """diffusers' SDCFGCutoffCallback: the unguided calls are a second graph, compiled once."""
    from diffusers.callbacks import SDCFGCutoffCallback
    plain, fast = gpu_pipes
    args = dict(num_inference_steps=4, seed=0, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    fast('a cat', **args)  # compiles the unguided step
    with torch._dynamo.config.patch(error_on_recompile=True):
        b = fast('a cat', **args)['output_imgs'][0].astype(int)
    a = plain('a cat', **args)['output_imgs'][0].astype(int)
    assert np.abs(a - b).max() <= 3


def test_fast_denoising_loop_never_waits_for_the_gpu(gpu_pipes):
    """No host sync between steps: the CPU queues all steps' graph replays ahead of the GPU."""
    _, fast = gpu_pipes
    denoiser, config = fast.denoiser, fast.sd.unet.config
    plan = denoiser.plan(fast.sd.scheduler, 4, 0.0)

    class Bar:
        def update(self):
            pass

    # the pipeline's shapes, under inference_mode as the pipeline calls it: the compiled step, not a new one (a
    # new grad mode or latent size compiled the step again: longer than the 150 s this test had on the H200)
    with torch.inference_mode(), torch._dynamo.config.patch(error_on_recompile=True):
        latents = torch.randn((1, config.in_channels, config.sample_size, config.sample_size), device='cuda',
                              dtype=torch.float16)
        embeds = torch.randn((2, 77, config.cross_attention_dim), device='cuda', dtype=torch.float16)
        fast('a cat', num_inference_steps=4, seed=0)  # compiled and recorded, if no test before did it
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode('error')
        try:
            denoiser.denoise(plan, latents, embeds, 7.5, None, Bar())
        finally:
            torch.cuda.set_sync_debug_mode('default')


def test_an_fp16_vae_that_overflows_decodes_in_fp32_on_both_paths(gpu_pipes):
    """The compiled decoder's NaN images are decoded again by an eager fp32 copy, as the plain path's are."""
    pipes = gpu_pipes
    try:
        for pipe in pipes:
            with torch.no_grad():  # past fp16's 65504 after the decoder's first convolutions
                pipe.sd.vae.post_quant_conv.weight.mul_(1e5)
                pipe.sd.vae.post_quant_conv.bias.mul_(1e5)
        plain, fast = (pipe('a cat', num_inference_steps=4, seed=0)['output_imgs'][0].astype(int) for pipe in pipes)
        assert all(pipe.sd.vae.decode.fp32 is not None for pipe in pipes)
    finally:
        for pipe in pipes:
            with torch.no_grad():
                pipe.sd.vae.post_quant_conv.weight.div_(1e5)
                pipe.sd.vae.post_quant_conv.bias.div_(1e5)
            pipe.sd.vae.decode.fp32 = None
    assert plain.std() > 10 and np.abs(plain - fast).max() <= 3


def test_model_cpu_offload_on_pipe_sd_keeps_the_images(tiny_model_dir):
    """README's memory saver for small GPUs: models move to the GPU while they run, weighted prompts included."""
    from modelscope_sd import StableDiffusionText2ImagePipeline
    pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='gpu', progress_bar=False)
    args = dict(num_inference_steps=4, seed=0)
    before = [pipe(text, **args)['output_imgs'][0].astype(int) for text in ('a cat', 'a (red:1.3) cat')]
    pipe.sd.enable_model_cpu_offload()
    after = [pipe(text, **args)['output_imgs'][0].astype(int) for text in ('a cat', 'a (red:1.3) cat')]
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(before, after))


def test_precompiled_functions_load_in_a_new_process_as_cuda_graphs(tiny_model_dir, tmp_path):
    """precompile=True on CUDA: the second process traces nothing, replays CUDA graphs (the mode's option applied as
    the files load), and draws the first one's image, which is the plain path's within fp16 noise."""
    from modelscope_sd import StableDiffusionText2ImagePipeline
    from test_precompile import run_in_new_processes
    first, second = run_in_new_processes(tiny_model_dir, 'gpu', tmp_path)
    assert first['traced_s'] > 0 and second['traced_s'] == 0
    assert first['cuda_graphs'] > 0 and second['cuda_graphs'] > 0
    assert np.abs(first['image'] - second['image']).max() <= 1
    plain = StableDiffusionText2ImagePipeline(tiny_model_dir, device='gpu', progress_bar=False)
    image = plain('a cat', num_inference_steps=4, seed=0)['output_imgs'][0].astype(int)
    assert np.abs(image - first['image']).max() <= 3


def test_lora_training_under_reduce_overhead_replays_cuda_graphs_and_learns_what_eager_learns(tiny_model_dir,
                                                                                              tmp_path):
    """--torch_compile --torch_compile_mode reduce-overhead: the UNet's forward and backward are recorded as CUDA
    graphs in the first steps and replayed after (6 steps record no more graphs than 2), none is skipped, and the
    adapter is eager's. In fp32: Adam's first steps move each weight by about the learning rate whatever the size of
    its gradient, so bf16's rounding alone moved the learned weights by 8% on the CPU (fp32: 0.0007%)."""
    from safetensors.torch import load_file
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    from test_train_lora import _config, _train
    from train_helpers import make_modelscope_csv_dataset
    data = make_modelscope_csv_dataset(str(tmp_path / 'data'))

    def train(out, steps, **kwargs):
        return load_file(_train(_config(tiny_model_dir, data, tmp_path / out, max_train_steps=steps,
                                        checkpointing_steps=None, mixed_precision='no', cache_latents=True, **kwargs)))

    def recorded_graphs():
        manager = cudagraph_trees.get_manager(0, create_if_none_exists=False)
        return 0 if manager is None else sum(1 + node.num_descendants() for node in manager.get_roots())

    eager = train('eager', 6)
    counts = []
    for steps in (2, 6):
        torch._dynamo.reset()  # and the CUDA-graph trees
        counters.clear()
        compiled = train(f'compiled{steps}', steps, torch_compile=True, torch_compile_mode='reduce-overhead')
        counts.append(recorded_graphs())
        assert counters['inductor']['cudagraph_skips'] == 0
    assert counts[0] >= 2 and counts[1] == counts[0], counts  # forward and backward, then replays only
    assert set(compiled) == set(eager)
    learned = [k for k in eager if '.lora_B.' in k]  # zero at the start: what the steps learned
    difference = torch.cat([(compiled[k].float() - eager[k].float()).flatten() for k in learned]).norm()
    size = torch.cat([eager[k].float().flatten() for k in learned]).norm()
    assert difference <= 0.02 * size, (difference, size)


def test_full_bf16_optimizer_on_cuda_keeps_small_updates_and_is_adamw_on_fp32_weights():
    """--full_bf16's AdamW with CUDA tensors and a CUDA generator for its random bits (test_stochastic_adamw.py
    checks the same on the CPU)."""
    from finetune.stochastic_adamw import StochasticAdamW
    from test_stochastic_adamw import keeps_updates_that_rounding_to_nearest_drops
    keeps_updates_that_rounding_to_nearest_drops('cuda')
    ours = torch.nn.Parameter(torch.randn(1000, 37, device='cuda'))
    theirs = torch.nn.Parameter(ours.detach().clone())
    ours_optimizer, theirs_optimizer = StochasticAdamW([ours], lr=1e-2), torch.optim.AdamW([theirs], lr=1e-2)
    for _ in range(5):
        gradient = torch.randn_like(ours)
        ours.grad, theirs.grad = gradient.clone(), gradient.clone()
        ours_optimizer.step()
        theirs_optimizer.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
