"""The fast path's own denoising loop (scheduler as a coefficient table, one function per step), run eagerly on
the CPU against diffusers' loop: same latents for every scheduler, stochastic ones included."""

import os

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler

from modelscope_sd.fast import MIN_HISTORY, WholeStepDenoiser
from modelscope_sd.linear_steps import plan_scheduler
from modelscope_sd.schedulers import SCHEDULERS, DPMSolverSDEScheduler, make_scheduler

ARGS = dict(num_inference_steps=4, guidance_scale=7.5)


def _seeded(name, config, seeds):
    """The named scheduler; DPM++ SDE's Brownian noise then comes from ``seeds``, as the pipeline sets it per call."""
    scheduler = make_scheduler(name, config)
    if isinstance(scheduler, DPMSolverSDEScheduler):
        scheduler.image_seeds = seeds
    return scheduler


def _vanilla(vanilla_pipe, scheduler, seeds, **kwargs):
    base = vanilla_pipe.scheduler
    vanilla_pipe.scheduler = scheduler
    try:
        generators = [torch.Generator('cpu').manual_seed(s) for s in seeds]
        return vanilla_pipe(generator=generators, output_type='np', **kwargs).images
    finally:
        vanilla_pipe.scheduler = base


@pytest.mark.parametrize('name', sorted(SCHEDULERS) + [  # and samplers with A1111's other schedule types
    'dpm++_2m_sde_exponential', 'euler_karras', 'heun_beta', 'unipc_exponential', 'dpm2_ancestral_exponential',
    'dpm++_sde_beta'])
def test_every_offered_scheduler_has_a_table_that_matches_diffusers_loop(fast_pipe, vanilla_pipe, name):
    scheduler = _seeded(name, vanilla_pipe.scheduler.config, [3])
    plan = fast_pipe.denoiser.plan(scheduler, 4, 0.0)
    assert plan is not None and plan.capacity == MIN_HISTORY  # one compiled graph for all of them
    expected = _vanilla(vanilla_pipe, scheduler, [3], prompt='a red house', **ARGS)
    fast_pipe.sd.scheduler = scheduler
    got, _ = fast_pipe.denoiser.generate(fast_pipe.sd, {'prompt': 'a red house'}, 4, 7.5, 1, 0.0,
                                         [torch.Generator('cpu').manual_seed(3)])
    assert got.shape == expected.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(got, expected, atol=2e-4)


@pytest.mark.parametrize('name', ['pndm', 'euler_ancestral', 'dpm++_2m_karras'])
def test_guidance_rescale_in_the_step_matches_diffusers_loop(fast_pipe, vanilla_pipe, name):
    scheduler = make_scheduler(name, vanilla_pipe.scheduler.config)
    expected = _vanilla(vanilla_pipe, scheduler, [3, 4], prompt='a red house', guidance_rescale=0.7,
                        num_images_per_prompt=2, **ARGS)
    fast_pipe.sd.scheduler = scheduler
    got, _ = fast_pipe.denoiser.generate(fast_pipe.sd, {'prompt': 'a red house'}, 4, 7.5, 2, 0.0,
                                         [torch.Generator('cpu').manual_seed(s) for s in (3, 4)],
                                         guidance_rescale=0.7)
    np.testing.assert_allclose(got, expected, atol=2e-4)
    plain = _vanilla(vanilla_pipe, scheduler, [3, 4], prompt='a red house', num_images_per_prompt=2, **ARGS)
    assert np.abs(got - plain).max() > 1e-2  # the rescale did change the images


@pytest.mark.parametrize('name', ['pndm', 'euler_ancestral', 'heun', 'dpm++_2m_sde_karras', 'unipc', 'dpm++_sde'])
def test_image_to_image_tables_start_part_way_like_diffusers(fast_pipe, vanilla_pipe, name):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    scheduler = _seeded(name, vanilla_pipe.scheduler.config, [3])
    vanilla = StableDiffusionImg2ImgPipeline.from_pipe(vanilla_pipe, scheduler=scheduler)
    expected = vanilla('a red house', image=image, strength=0.6, num_inference_steps=5, output_type='np',
                       generator=[torch.Generator('cpu').manual_seed(3)]).images
    variant = fast_pipe._variant('img2img')
    variant.scheduler = _seeded(name, vanilla_pipe.scheduler.config, [3])
    got, _ = fast_pipe.denoiser.generate(variant, {'prompt': 'a red house'}, 5, 7.5, 1, 0.0,
                                         [torch.Generator('cpu').manual_seed(3)], image=image, strength=0.6)
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_pipeline_routes_text_to_image_through_the_table_loop(fast_pipe, sd_pipe, monkeypatch):
    calls = []
    monkeypatch.setattr(fast_pipe.denoiser, 'denoise', _spy(fast_pipe.denoiser.denoise, calls))
    options = dict(seed=5, num_images_per_prompt=2, negative_prompt='blurry', **ARGS)
    got = fast_pipe(['a (cat:1.3)', 'a dog'], **options)
    expected = sd_pipe(['a (cat:1.3)', 'a dog'], **options)
    assert len(calls) == 1 and got['seeds'] == expected['seeds'] == [5, 6, 7, 8]
    for a, b in zip(got['output_imgs'], expected['output_imgs']):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_the_table_loop_looks_the_device_up_once_per_call(fast_pipe, monkeypatch):
    """diffusers finds a pipeline's device by walking all its modules: each lookup is host time before the GPU has
    work, so the table loop does it once (it did three full lookups and one partial before)."""
    from diffusers import DiffusionPipeline
    looked_up = []
    for name in ('_execution_device', 'device'):  # the second: diffusers' execution device reads it too
        monkeypatch.setattr(DiffusionPipeline, name, property(
            lambda pipe, name=name, lookup=getattr(DiffusionPipeline, name).fget: looked_up.append(name) or lookup(pipe)))
    fast_pipe(['a cat', 'a dog'], seed=0, scheduler='euler_a', **ARGS)
    assert looked_up == ['_execution_device', 'device']


def test_a_step_end_callback_takes_diffusers_loop(fast_pipe, sd_pipe, monkeypatch):
    """The whole-step loop has no step boundary in Python to call back from: with a callback, diffusers' loop runs."""
    monkeypatch.setattr(fast_pipe.denoiser, 'denoise', _spy(fast_pipe.denoiser.denoise, calls := []))
    steps = []
    a = fast_pipe('a tree', seed=1, callback_on_step_end=lambda pipe, i, t, kw: steps.append(i) or {}, **ARGS)
    assert not calls and steps == list(range(len(steps))) and len(steps) >= ARGS['num_inference_steps']
    b = sd_pipe('a tree', seed=1, **ARGS)
    assert np.abs(a['output_imgs'][0].astype(int) - b['output_imgs'][0].astype(int)).max() <= 1


@pytest.mark.parametrize('name', sorted(SCHEDULERS))
def test_first_call_of_a_new_scheduler_matches_the_plain_path(sd_pipe, name):
    """A scheduler object that has not run yet: sigma schedulers scale the start noise by the largest sigma of
    the timesteps set last, so the loop sets this call's timesteps first, as diffusers does."""
    from modelscope_sd import StableDiffusionText2ImagePipeline
    fresh = StableDiffusionText2ImagePipeline(sd_pipe.sd, device='cpu', progress_bar=False)
    fresh.denoiser = WholeStepDenoiser(fresh.sd)
    args = dict(seed=3, scheduler=name, **ARGS)
    a = fresh('a tree', **args)['output_imgs'][0].astype(int)
    b = sd_pipe('a tree', **args)['output_imgs'][0].astype(int)
    assert np.abs(a - b).max() <= 1


def test_guidance_off_eta_latents_and_image_to_image_match_the_plain_path(fast_pipe, sd_pipe, monkeypatch):
    monkeypatch.setattr(fast_pipe.denoiser, 'denoise', _spy(fast_pipe.denoiser.denoise, calls := []))
    image = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    options_list = (dict(guidance_scale=1.0), dict(scheduler='ddim', eta=0.7),
                    dict(latents=torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))),
                    dict(image=image, strength=0.5), dict(image=image, scheduler='euler_a'))
    for options in options_list:
        args = {**ARGS, **options, 'seed': 2}
        a = fast_pipe('a tree', **args)['output_imgs'][0].astype(int)
        b = sd_pipe('a tree', **args)['output_imgs'][0].astype(int)
        assert np.abs(a - b).max() <= 1, options
    assert len(calls) == len(options_list)


@pytest.mark.parametrize('upscaler', ['latent', 'lanczos'])
def test_hires_fix_runs_both_passes_through_the_table_loop(fast_pipe, sd_pipe, monkeypatch, upscaler):
    monkeypatch.setattr(fast_pipe.denoiser, 'denoise', _spy(fast_pipe.denoiser.denoise, calls := []))
    args = dict(seed=3, hr_scale=1.5, hr_upscaler=upscaler, hr_second_pass_steps=3, scheduler='euler_a', **ARGS)
    a = fast_pipe('a tree', **args)['output_imgs'][0].astype(int)
    b = sd_pipe('a tree', **args)['output_imgs'][0].astype(int)
    assert len(calls) == 2 and a.shape == (48, 48, 3) and np.abs(a - b).max() <= 1


@pytest.mark.parametrize('name', ['pndm', 'euler_ancestral', 'heun', 'dpm++_2m_sde'])
@pytest.mark.parametrize('cutoff', [dict(cutoff_step_index=0), dict(cutoff_step_index=1), dict(cutoff_step_ratio=0.4)])
def test_cfg_cutoff_in_the_table_loop_matches_diffusers_callback(fast_pipe, vanilla_pipe, name, cutoff):
    """SDCFGCutoffCallback (guidance off after a step: fewer UNet rows, lossy, the caller's choice) in the table loop:
    diffusers' loop's latents with diffusers' own callback, the cutoff counted in UNet calls as diffusers counts it
    (PNDM's and Heun's extra calls too), guidance_rescale off with the guidance."""
    from diffusers.callbacks import SDCFGCutoffCallback

    def callback():
        return SDCFGCutoffCallback(**{'cutoff_step_ratio': None, **cutoff})

    scheduler = _seeded(name, vanilla_pipe.scheduler.config, [3])
    texts = dict(prompt='a red house', negative_prompt='a green dog')
    expected = _vanilla(vanilla_pipe, scheduler, [3], **texts, guidance_rescale=0.5, callback_on_step_end=callback(),
                        **ARGS)
    guided = _vanilla(vanilla_pipe, scheduler, [3], **texts, guidance_rescale=0.5, **ARGS)
    fast_pipe.sd.scheduler = scheduler
    got, _ = fast_pipe.denoiser.generate(fast_pipe.sd, texts, 4, 7.5, 1, 0.0, [torch.Generator('cpu').manual_seed(3)],
                                         guidance_rescale=0.5, cfg_cutoff=callback())
    np.testing.assert_allclose(got, expected, atol=2e-4)
    assert np.abs(got - guided).max() > 1e-3  # the cutoff changed the picture


def test_cfg_cutoff_guides_each_image_of_a_batch_by_its_own_prompt(fast_pipe, sd_pipe, monkeypatch):
    """diffusers' callback keeps one prompt row, and a batch then fails in its loop; here each image keeps its own
    prompt, in both loops."""
    from diffusers.callbacks import SDCFGCutoffCallback
    args = dict(ARGS, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_index=1, cutoff_step_ratio=None))
    step, steps = fast_pipe.denoiser.step, []
    monkeypatch.setattr(fast_pipe.denoiser, 'step', lambda *inputs: steps.append(inputs[6:8]) or step(*inputs))
    batch = fast_pipe(['a red cat', 'a blue house'], seed=3, **args)['output_imgs']  # steps: (embeddings, guidance)
    monkeypatch.undo()
    (guided, scale), (_, scale_1) = steps[:2]
    assert scale is not None and scale_1 is not None and len(steps) == ARGS['num_inference_steps'] + 1  # PNDM
    assert all(s is None and torch.equal(e, guided[2:]) for e, s in steps[2:])  # the prompts' rows, unguided
    alone = [fast_pipe(prompt, seed=3 + i, **args)['output_imgs'][0] for i, prompt in enumerate(['a red cat',
                                                                                              'a blue house'])]
    plain = sd_pipe(['a red cat', 'a blue house'], seed=3, **args)['output_imgs']  # diffusers' loop, our callback
    assert all(np.abs(x.astype(int) - y.astype(int)).max() <= 1 for x, y in zip(batch, alone))
    assert all(np.abs(x.astype(int) - y.astype(int)).max() <= 1 for x, y in zip(batch, plain))


def test_cfg_cutoff_among_several_callbacks_takes_a_batch_too(sd_pipe):
    from diffusers.callbacks import MultiPipelineCallbacks, SDCFGCutoffCallback
    seen = []

    class Steps(SDCFGCutoffCallback.__base__):  # a PipelineCallback that records the steps
        tensor_inputs = ['latents']

        def callback_fn(self, pipe, i, t, callback_kwargs):
            seen.append(i)
            return callback_kwargs

    def cutoff():
        return SDCFGCutoffCallback(cutoff_step_index=1, cutoff_step_ratio=None)

    args = dict(ARGS, seed=3, guidance_scale=30.0)
    both = sd_pipe(['a red cat', 'a blue house'], callback_on_step_end=MultiPipelineCallbacks([cutoff(), Steps()]),
                   **args)['output_imgs']
    alone = sd_pipe(['a red cat', 'a blue house'], callback_on_step_end=cutoff(), **args)['output_imgs']
    assert seen == list(range(len(seen))) and len(seen) >= ARGS['num_inference_steps']
    assert all(np.abs(x.astype(int) - y.astype(int)).max() <= 1 for x, y in zip(both, alone))


def test_cfg_cutoff_with_edited_prompts_matches_diffusers_loop(fast_pipe, sd_pipe):
    """A switch of embeddings after the cutoff brings the prompt rows alone, in both loops."""
    from diffusers.callbacks import SDCFGCutoffCallback
    args = dict(ARGS, num_inference_steps=6, seed=3, guidance_scale=30.0, negative_prompt='[blurry:sharp:4]',
                callback_on_step_end=SDCFGCutoffCallback(cutoff_step_index=1, cutoff_step_ratio=None))
    a = fast_pipe('a [red:blue:3] cat', **args)['output_imgs'][0].astype(int)
    b = sd_pipe('a [red:blue:3] cat', **args)['output_imgs'][0].astype(int)
    assert np.abs(a - b).max() <= 1


def test_cfg_cutoff_with_an_and_prompt_is_refused_by_name(sd_pipe):
    from diffusers.callbacks import SDCFGCutoffCallback
    with pytest.raises(ValueError, match='SDCFGCutoffCallback.*AND'):
        sd_pipe('a cat AND a dog', callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5), **ARGS)


def test_cfg_cutoff_in_both_hires_passes_matches_diffusers_loop(fast_pipe, sd_pipe, monkeypatch):
    from diffusers.callbacks import SDCFGCutoffCallback
    monkeypatch.setattr(fast_pipe.denoiser, 'denoise', _spy(fast_pipe.denoiser.denoise, calls := []))
    args = dict(ARGS, seed=3, hr_scale=1.5, hr_second_pass_steps=4, scheduler='euler_a',
                callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    a = fast_pipe('a tree', **args)['output_imgs'][0].astype(int)
    b = sd_pipe('a tree', **args)['output_imgs'][0].astype(int)
    assert len(calls) == 2 and np.abs(a - b).max() <= 1


def test_stochastic_table_draws_noise_in_the_schedulers_order():
    scheduler = make_scheduler('euler_a', EulerDiscreteScheduler().config)
    plan = plan_scheduler(scheduler, 6)
    assert len(plan.noise_dtypes) == 6 and plan.coefs.shape == (7, 1 + 6 + 6)
    # noise j enters the latents after step j has run (the last step adds none: its sigma_up is 0)
    noise = plan.coefs[:, 7:]
    assert torch.all(torch.triu(noise[:-1], diagonal=0) == 0)
    assert torch.all(noise[1:].diagonal()[:-1] != 0) and noise[-1, -1] == 0


class _Clamped(EulerDiscreteScheduler):
    def step(self, model_output, timestep, sample, **kwargs):
        return super().step(model_output.clamp(-0.5, 0.5), timestep, sample, **kwargs)


class _OwnRandom(EulerDiscreteScheduler):
    def step(self, model_output, timestep, sample, **kwargs):
        out = super().step(model_output, timestep, sample, **kwargs)
        return (out[0] + 0.1 * torch.randn_like(out[0]),)


@pytest.mark.parametrize('cls', [_Clamped, _OwnRandom])
def test_schedulers_that_are_not_linear_get_no_table(cls):
    assert plan_scheduler(cls(), 5) is None


def test_a_scheduler_without_a_table_keeps_diffusers_loop(fast_pipe, sd_pipe, monkeypatch):
    monkeypatch.setattr(fast_pipe.denoiser, 'denoise', _spy(None, calls := []))
    a = fast_pipe('a hill', scheduler=_Clamped.from_config(sd_pipe.sd.scheduler.config), seed=1, **ARGS)
    b = sd_pipe('a hill', scheduler=_Clamped.from_config(sd_pipe.sd.scheduler.config), seed=1, **ARGS)
    assert not calls and np.array_equal(a['output_imgs'][0], b['output_imgs'][0])


def _spy(function, calls):
    def wrapper(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)
    return wrapper


def _graph_count():
    """Compiled graphs so far: dynamo's, or with precompile=True the precompiled functions' files."""
    folder = os.path.join(os.environ['TORCHINDUCTOR_CACHE_DIR'], 'modelscope_sd_precompiled')
    return torch._dynamo.utils.counters['stats']['unique_graphs'], sorted(os.listdir(folder)) if os.path.isdir(
        folder) else []


@pytest.mark.slow
@pytest.mark.parametrize('precompile', [False, True])
def test_compiled_step_is_one_graph_for_every_scheduler_and_step_count(tiny_model_dir, sd_pipe, tmp_path, precompile,
                                                                       monkeypatch):
    """fast=True with a LoRA on the CPU (torch.compile without CUDA graphs, about 30 s; with precompile=True, its
    files): the first call compiles, then other schedulers, stochastic ones, other step counts and image-to-image
    reuse the graph."""
    from modelscope_sd import StableDiffusionText2ImagePipeline
    from train_helpers import make_random_lora
    monkeypatch.setenv('TORCHINDUCTOR_CACHE_DIR', str(tmp_path / 'cache'))
    lora = make_random_lora(tiny_model_dir, str(tmp_path / 'lora'))
    eager = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False, lora_dir=lora)
    eager.denoiser = WholeStepDenoiser(eager.sd)
    compiled = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False, fast=True,
                                                 lora_dir=lora, precompile=precompile)
    first = compiled('a cat', seed=0, **ARGS)['output_imgs'][0].astype(int)
    assert np.abs(first - sd_pipe('a cat', seed=0, **ARGS)['output_imgs'][0].astype(int)).max() > 5  # the LoRA acts
    image = np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    graphs = _graph_count()
    assert bool(graphs[1]) == precompile
    with torch._dynamo.config.patch(error_on_recompile=True):
        for scheduler, steps, extra in (('dpm++_2m_karras', 4, {}), ('euler_a', 6, {}), ('unipc', 9, {}),
                                        (None, 30, {}), ('heun', 5, {'image': image})):
            args = dict(num_inference_steps=steps, guidance_scale=7.5, seed=1, scheduler=scheduler, **extra)
            a = compiled('a cat', **args)['output_imgs'][0].astype(int)
            b = eager('a cat', **args)['output_imgs'][0].astype(int)
            assert np.abs(a - b).max() <= 1, scheduler
        # weighted and edited prompts: our encoding calls the compiled text encoder as diffusers' does
        for prompt in ('a (red:1.3) cat', '[a cat:a dog:0.5]'):
            a = compiled(prompt, seed=1, **ARGS)['output_imgs'][0].astype(int)
            b = eager(prompt, seed=1, **ARGS)['output_imgs'][0].astype(int)
            assert np.abs(a - b).max() <= 1, prompt
    assert _graph_count() == graphs  # no graph more in all of that
    # guidance_rescale compiles its own graph once; other values and schedulers reuse it
    compiled('a cat', seed=1, guidance_rescale=0.7, **ARGS)
    graphs = _graph_count()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for scheduler, rescale in (('euler_a', 0.5), ('dpm++_2m', 0.9)):
            args = dict(seed=2, scheduler=scheduler, guidance_rescale=rescale, **ARGS)
            a = compiled('a cat', **args)['output_imgs'][0].astype(int)
            b = eager('a cat', **args)['output_imgs'][0].astype(int)
            assert np.abs(a - b).max() <= 1, scheduler
    assert _graph_count() == graphs


def test_compiled_text_encoder_matches_eager_and_compiles_once_per_call_signature(tiny_model_dir):
    """fast=True compiles CLIP too (eager, its launches kept an H200 idle for 31 ms before the first step): the same
    states, clip_skip's hidden states included, and a new prompt of the same shape reuses the graph."""
    from diffusers import StableDiffusionPipeline

    from modelscope_sd.fast import enable_fast_inference
    from modelscope_sd.prompts import clip_states
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    encoder = pipe.text_encoder
    ids = [torch.randint(0, encoder.config.vocab_size, (1, 77), generator=torch.Generator().manual_seed(i))
           for i in range(2)]
    with torch.no_grad():
        expected = [(clip_states(encoder, x), clip_states(encoder, x, clip_skip=1)) for x in ids]
        enable_fast_inference(pipe, 'default')  # compiles lazily: only the encoder runs here
        frames = torch._dynamo.utils.counters['stats']['unique_graphs']
        assert torch.allclose(clip_states(encoder, ids[0]), expected[0][0], atol=1e-5)
        assert torch.allclose(clip_states(encoder, ids[0], clip_skip=1), expected[0][1], atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert torch.allclose(clip_states(encoder, ids[1]), expected[1][0], atol=1e-5)
            assert torch.allclose(clip_states(encoder, ids[1], clip_skip=1), expected[1][1], atol=1e-5)
            # diffusers' encode_prompt (plain prompts) calls it so: the graph of weighted prompts' calls, not a new one
            assert torch.allclose(encoder(ids[1], attention_mask=None)[0], expected[1][0], atol=1e-5)
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] > frames  # compiled, not the eager forward


def test_compiled_outputs_are_copied_out_of_the_graphs_memory():
    """The next CUDA-graph replay overwrites a compiled call's outputs: every tensor in them is copied, in the
    output classes of diffusers and transformers and in their tuples."""
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from modelscope_sd.fast import _owned
    a, b, c = torch.randn(2, 3), torch.randn(2, 3), torch.randn(2, 3)
    outputs = (BaseModelOutputWithPooling(last_hidden_state=a, hidden_states=(b, c)), UNet2DConditionOutput(sample=a),
               (a, [b]))
    owned = [_owned(out) for out in outputs]
    tensors = [owned[0].last_hidden_state, owned[0]['last_hidden_state'], *owned[0].hidden_states, owned[1].sample,
               owned[2][0], owned[2][1][0]]
    assert all(t.data_ptr() not in (a.data_ptr(), b.data_ptr(), c.data_ptr()) for t in tensors)
    assert all(torch.equal(t, ref) for t, ref in zip(tensors, (a, a, b, c, a, a, b)))


def test_transformers_output_capture_registry_is_put_in_key_order(monkeypatch):
    """CLIP's forward reads this registry and dynamo guards it by key position: its order must not depend on which
    model a process happened to build first (see sort_output_capture_registry)."""
    from transformers.utils import output_capturing

    from modelscope_sd.fast import sort_output_capture_registry
    registry = getattr(output_capturing, '_CanRecordRegistry', dict)()  # a plain dict in transformers 5.17
    for key, value in (("<class 'b.SafetyChecker'>", None), ("<class 'a.TextModel'>", {'hidden_states': 'layer'})):
        dict.__setitem__(registry, key, value)
    monkeypatch.setattr(output_capturing, '_CAN_RECORD_REGISTRY', registry)
    sort_output_capture_registry()
    assert list(dict.items(registry)) == [("<class 'a.TextModel'>", {'hidden_states': 'layer'}),
                                          ("<class 'b.SafetyChecker'>", None)]
