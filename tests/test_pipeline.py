"""Generation on the tiny model: same pixels as vanilla diffusers, reproducible seeds, batch shapes."""

import numpy as np
import pytest
import torch
from modelscope.outputs import OutputKeys

FAST = dict(num_inference_steps=3, guidance_scale=7.5)


def _vanilla_bgr(vanilla_pipe, scheduler=None, seed=0, **kwargs):
    if scheduler is not None:
        vanilla_pipe.scheduler = scheduler
    images = vanilla_pipe(generator=[torch.Generator('cpu').manual_seed(seed)], output_type='np', **kwargs).images
    return (images[0] * 255).round().astype(np.uint8)[..., ::-1]


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16, torch.float32])
def test_output_images_are_diffusers_pictures_in_bgr_for_every_dtype(dtype):
    from diffusers.image_processor import VaeImageProcessor
    from modelscope_sd.pipeline import to_bgr_uint8
    images = torch.rand(2, 3, 40, 24, generator=torch.Generator().manual_seed(0)).to(dtype)
    expected = [np.asarray(pil)[..., ::-1] for pil in
                VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))]
    got = to_bgr_uint8(images)
    assert [img.shape for img in got] == [(40, 24, 3)] * 2 and all(img.flags.c_contiguous for img in got)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('scheduler', [None, 'euler', 'dpm++_2m_karras', 'ddim'])
def test_images_equal_vanilla_diffusers(sd_pipe, vanilla_pipe, scheduler):
    from modelscope_sd.schedulers import make_scheduler
    base = vanilla_pipe.scheduler
    vanilla_sched = make_scheduler(scheduler, base.config) if scheduler else None
    try:
        expected = _vanilla_bgr(vanilla_pipe, vanilla_sched, prompt='飞流直下三千尺,油画', **FAST)
    finally:
        vanilla_pipe.scheduler = base
    out = sd_pipe({'text': '飞流直下三千尺,油画', 'seed': 0, 'scheduler': scheduler, **FAST})
    got = out[OutputKeys.OUTPUT_IMGS][0]
    assert got.dtype == np.uint8 and got.shape == expected.shape == (32, 32, 3)
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1


def test_a_calls_scheduler_does_not_stay_on_pipe_sd(sd_pipe):
    """pipe.sd is the diffusers pipeline as built, after a call with another scheduler and after a failed one."""
    image = np.zeros((32, 32, 3), np.uint8)
    sd_pipe('a cat', seed=0, scheduler='euler', **FAST)
    with pytest.raises(ValueError, match='runs no denoising step'):
        sd_pipe('a cat', image=image, strength=0.1, scheduler='euler_a', **FAST)
    assert sd_pipe.sd.scheduler is sd_pipe.base_scheduler
    assert all(variant.scheduler is sd_pipe.base_scheduler for variant in sd_pipe._variants.values())


def _in_diffusers_and_ours(sd_pipe, vanilla_pipe, **call):
    from modelscope_sd.schedulers import make_scheduler
    base = vanilla_pipe.scheduler
    try:
        expected = _vanilla_bgr(vanilla_pipe, make_scheduler('euler', base.config), prompt='a cat', **FAST, **call)
    finally:
        vanilla_pipe.scheduler = base
    got = sd_pipe('a cat', seed=0, scheduler='euler', **FAST, **call)[OutputKeys.OUTPUT_IMGS][0]
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    return got


def test_step_end_callback_works_as_in_diffusers(sd_pipe, vanilla_pipe):
    seen = []

    def darken(pipe, step, timestep, kwargs):
        seen.append((step, tuple(kwargs)))
        return {'latents': kwargs['latents'] * 0.5} if step == 1 else {}

    got = _in_diffusers_and_ours(sd_pipe, vanilla_pipe, callback_on_step_end=darken)
    assert seen[-3:] == [(0, ('latents',)), (1, ('latents',)), (2, ('latents',))]
    plain = sd_pipe('a cat', seed=0, scheduler='euler', **FAST)[OutputKeys.OUTPUT_IMGS][0]
    assert np.abs(got.astype(int) - plain.astype(int)).max() > 10


def test_a_callback_stops_the_call_early_as_in_diffusers(sd_pipe, vanilla_pipe):
    seen = []

    def stop(pipe, step, timestep, kwargs):
        seen.append(step)
        pipe._interrupt = True
        return {}

    _in_diffusers_and_ours(sd_pipe, vanilla_pipe, callback_on_step_end=stop)
    assert seen == [0, 0]  # diffusers' call, then ours: one step each


def test_diffusers_pipeline_callbacks_bring_their_own_tensor_inputs(sd_pipe, vanilla_pipe):
    from diffusers.callbacks import SDCFGCutoffCallback  # turns guidance off after 40% of the steps
    _in_diffusers_and_ours(sd_pipe, vanilla_pipe, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.4))
    assert sd_pipe.sd.guidance_scale == 0.0  # it ran, on the prompt_embeds it asks for


def test_guidance_rescale_equals_vanilla_diffusers_and_changes_the_image(sd_pipe, vanilla_pipe):
    strong = {**FAST, 'guidance_scale': 15.0}  # where the rescale shows on the tiny model
    expected = _vanilla_bgr(vanilla_pipe, prompt='a cat', guidance_rescale=0.7, **strong)
    got = sd_pipe('a cat', seed=0, guidance_rescale=0.7, **strong)[OutputKeys.OUTPUT_IMGS][0]
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 1
    plain = sd_pipe('a cat', seed=0, **strong)[OutputKeys.OUTPUT_IMGS][0]
    assert np.abs(got.astype(int) - plain.astype(int)).max() > 1


def test_same_seed_same_pixels_other_seed_differs(sd_pipe):
    a = sd_pipe('a cat', seed=7, **FAST)[OutputKeys.OUTPUT_IMGS][0]
    b = sd_pipe('a cat', seed=7, **FAST)[OutputKeys.OUTPUT_IMGS][0]
    c = sd_pipe('a cat', seed=8, **FAST)[OutputKeys.OUTPUT_IMGS][0]
    assert np.array_equal(a, b)
    assert np.abs(a.astype(int) - c.astype(int)).max() > 5


def test_image_i_of_a_batch_is_seed_plus_i(sd_pipe):
    batch = sd_pipe(['a cat', 'a dog'], seed=3, num_images_per_prompt=2, **FAST)
    assert batch['seeds'] == [3, 4, 5, 6]
    assert len(batch[OutputKeys.OUTPUT_IMGS]) == 4
    # image 2 is the first image of 'a dog' with seed 5
    alone = sd_pipe('a dog', seed=5, **FAST)[OutputKeys.OUTPUT_IMGS][0]
    assert np.abs(batch[OutputKeys.OUTPUT_IMGS][2].astype(int) - alone.astype(int)).max() <= 1


def test_no_seed_draws_one_and_reports_it(sd_pipe):
    out = sd_pipe('a cat', **FAST)
    again = sd_pipe('a cat', seed=out['seeds'][0], **FAST)
    assert np.array_equal(out[OutputKeys.OUTPUT_IMGS][0], again[OutputKeys.OUTPUT_IMGS][0])


def test_a1111s_seed_of_minus_one_draws_one_and_reports_it(sd_pipe):
    out = sd_pipe('a cat', seed=-1, subseed=-1, subseed_strength=0.5, **FAST)
    assert out['seeds'][0] >= 0 and out['subseeds'][0] >= 0
    again = sd_pipe('a cat', seed=out['seeds'][0], subseed=out['subseeds'][0], subseed_strength=0.5, **FAST)
    assert np.array_equal(out[OutputKeys.OUTPUT_IMGS][0], again[OutputKeys.OUTPUT_IMGS][0])
    for other in (-2, -1.0, True):  # only A1111's -1 means random
        with pytest.raises((ValueError, TypeError), match='seed'):
            sd_pipe('a cat', seed=other, **FAST)


def test_options_in_dict_and_keywords_mean_the_same(sd_pipe):
    a = sd_pipe({'text': 'a cat', 'seed': 1, 'height': 48, 'width': 40, **FAST})
    b = sd_pipe('a cat', seed=1, height=48, width=40, **FAST)
    assert a[OutputKeys.OUTPUT_IMGS][0].shape == (48, 40, 3)
    assert np.array_equal(a[OutputKeys.OUTPUT_IMGS][0], b[OutputKeys.OUTPUT_IMGS][0])


def test_negative_prompt_changes_the_image(sd_pipe):
    plain = sd_pipe('a cat', seed=1, **FAST)[OutputKeys.OUTPUT_IMGS][0]
    negative = sd_pipe('a cat', seed=1, negative_prompt='blurry', **FAST)[OutputKeys.OUTPUT_IMGS][0]
    assert np.abs(plain.astype(int) - negative.astype(int)).max() > 0


def test_one_negative_prompt_for_a_list_of_prompts(sd_pipe):
    both = sd_pipe(['a cat', 'a dog'], negative_prompt='blurry', seed=1, **FAST)[OutputKeys.OUTPUT_IMGS]
    listed = sd_pipe(['a cat', 'a dog'], negative_prompt=['blurry'] * 2, seed=1, **FAST)[OutputKeys.OUTPUT_IMGS]
    alone = sd_pipe('a cat', negative_prompt=['blurry'], seed=1, **FAST)[OutputKeys.OUTPUT_IMGS][0]
    assert all(np.array_equal(a, b) for a, b in zip(both, listed))
    assert np.array_equal(both[0], alone)


def test_numpy_numbers_are_accepted(sd_pipe):
    plain = sd_pipe('a cat', seed=3, num_inference_steps=3, guidance_scale=7.5)
    numpy = sd_pipe('a cat', seed=np.int64(3), num_inference_steps=np.int64(3), guidance_scale=np.float32(7.5))
    assert numpy['seeds'] == [3] and type(numpy['seeds'][0]) is int
    assert np.array_equal(plain[OutputKeys.OUTPUT_IMGS][0], numpy[OutputKeys.OUTPUT_IMGS][0])


def test_latents_of_another_dtype_are_cast_and_set_the_size(sd_pipe):
    latents = torch.randn((1, 4, 24, 16), generator=torch.Generator().manual_seed(0)).half()
    # fp16 latents into the fp32 pipeline: diffusers alone fails in the UNet on the dtype mismatch
    half = sd_pipe('a cat', latents=latents, **FAST)[OutputKeys.OUTPUT_IMGS][0]
    full = sd_pipe('a cat', latents=latents.float(), **FAST)[OutputKeys.OUTPUT_IMGS][0]
    assert half.shape == (48, 32, 3)  # no height/width: the latents' size × the VAE's factor (2 here)
    assert np.array_equal(half, full)


def test_list_of_dicts_gives_list_of_outputs(sd_pipe):
    outs = sd_pipe([{'text': 'a cat', 'seed': 1}, {'text': 'a dog', 'seed': 2}], **FAST)
    assert isinstance(outs, list) and len(outs) == 2
    assert all(len(o[OutputKeys.OUTPUT_IMGS]) == 1 for o in outs)


def test_safety_checker_reports_nsfw_flags(sd_pipe):
    out = sd_pipe('a cat', seed=0, **FAST)
    assert out['nsfw_content_detected'] == [False]


def test_scheduler_choice_is_per_call(sd_pipe):
    before = sd_pipe('a cat', seed=2, **FAST)[OutputKeys.OUTPUT_IMGS][0]
    euler = sd_pipe('a cat', seed=2, scheduler='Euler a', **FAST)[OutputKeys.OUTPUT_IMGS][0]
    after = sd_pipe('a cat', seed=2, **FAST)[OutputKeys.OUTPUT_IMGS][0]
    assert np.array_equal(before, after)
    assert np.abs(before.astype(int) - euler.astype(int)).max() > 0


def test_a_named_scheduler_is_that_sampler_whatever_the_models_default(sd_pipe):
    """A model whose own scheduler is DPM++ 2M SDE Karras: 'euler' must not inherit its Karras sigmas, nor
    'dpm++_2m' its SDE algorithm."""
    from diffusers import DPMSolverMultistepScheduler

    from modelscope_sd.schedulers import make_scheduler
    base = DPMSolverMultistepScheduler.from_config(sd_pipe.base_scheduler.config, use_karras_sigmas=True,
                                                   algorithm_type='sde-dpmsolver++').config
    euler, plain, karras = (make_scheduler(name, base) for name in ('euler', 'dpm++_2m', 'dpm++_2m_karras'))
    assert not euler.config.use_karras_sigmas
    assert (plain.config.algorithm_type, plain.config.use_karras_sigmas) == ('dpmsolver++', False)
    assert (karras.config.algorithm_type, karras.config.use_karras_sigmas) == ('dpmsolver++', True)
    assert make_scheduler('pndm', base).config.steps_offset == base.steps_offset  # the model's own settings stay
    # one whose own is DPM++ 2M SDE Heun: 'dpm++_2m_sde' is the midpoint solver, and UniPC keeps its own kind
    heun = DPMSolverMultistepScheduler.from_config(base, solver_type='heun').config
    assert make_scheduler('dpm++_2m_sde', heun).config.solver_type == 'midpoint'
    assert make_scheduler('dpm++_2m_sde_heun', base).config.solver_type == 'heun'
    assert make_scheduler('unipc', heun).config.solver_type == 'bh2'


SDE = dict(scheduler='DPM++ SDE Karras', num_inference_steps=4, guidance_scale=7.5)


@pytest.mark.filterwarnings('ignore:Should have t')  # diffusers' own tree, asked an ulp past its end
def test_dpm_sde_noise_is_diffusers_brownian_tree_seeded_per_image(sd_pipe, vanilla_pipe):
    """DPM++ SDE's Brownian noise comes from each image's seed, as A1111 seeds it: the images are those of
    diffusers' scheduler given the same seeds, and the same call twice gives the same images (diffusers' own
    draws a new tree seed per call unless told one)."""
    from diffusers import DPMSolverSDEScheduler
    base = vanilla_pipe.scheduler
    vanilla_pipe.scheduler = DPMSolverSDEScheduler.from_config(base.config, use_karras_sigmas=True,
                                                               noise_sampler_seed=[7, 8])
    try:
        expected = vanilla_pipe(['a cat', 'a dog'], generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
                                output_type='np', num_inference_steps=4).images
    finally:
        vanilla_pipe.scheduler = base
    got = sd_pipe(['a cat', 'a dog'], seed=7, **SDE)[OutputKeys.OUTPUT_IMGS]
    for image, want in zip(got, expected, strict=True):
        assert np.abs(image[..., ::-1].astype(int) - (want * 255).round().astype(int)).max() <= 1
    again = sd_pipe('a dog', seed=8, **SDE)[OutputKeys.OUTPUT_IMGS][0]
    assert np.abs(again.astype(int) - got[1].astype(int)).max() <= 1  # alone, as in the batch


def test_dpm_sde_seed_decides_the_noise_not_only_the_start_latents(sd_pipe):
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    a, b = (sd_pipe('a cat', seed=seed, latents=latents, **SDE)[OutputKeys.OUTPUT_IMGS][0] for seed in (1, 2))
    assert np.abs(a.astype(int) - b.astype(int)).max() > 2
    ode = dict(SDE, scheduler='dpm++_2m_karras')  # a sampler without noise: the seed only made the latents
    c, d = (sd_pipe('a cat', seed=seed, latents=latents, **ode)[OutputKeys.OUTPUT_IMGS][0] for seed in (1, 2))
    assert np.array_equal(c, d)


def test_a_diffusers_dpm_sde_scheduler_object_gets_seeded_noise(sd_pipe):
    from diffusers import DPMSolverSDEScheduler
    scheduler = DPMSolverSDEScheduler.from_config(sd_pipe.base_scheduler.config, use_karras_sigmas=True)
    a, b = (sd_pipe('a cat', seed=3, **dict(SDE, scheduler=scheduler))[OutputKeys.OUTPUT_IMGS][0] for _ in 'ab')
    named = sd_pipe('a cat', seed=3, **SDE)[OutputKeys.OUTPUT_IMGS][0]
    assert np.array_equal(a, b) and np.array_equal(a, named)


def test_batch_size_makes_the_images_of_one_batch_in_smaller_batches(sd_pipe, monkeypatch):
    prompts, options = ['a red ball', 'a blue cube', 'a tree'], dict(negative_prompt=['x', 'y', 'z'],
                                                                       num_images_per_prompt=2, **FAST)
    whole = sd_pipe(prompts, seed=5, **options)
    batches = []
    real = sd_pipe._generate
    monkeypatch.setattr(sd_pipe, '_generate', lambda **kw: batches.append(kw['prompt']) or real(**kw))
    split = sd_pipe(prompts, seed=5, batch_size=4, **options)
    assert batches == [['a red ball', 'a red ball', 'a blue cube', 'a blue cube'], ['a tree', 'a tree']]
    assert split['seeds'] == whole['seeds'] == list(range(5, 11))
    assert len(split['nsfw_content_detected']) == 6
    for a, b in zip(split[OutputKeys.OUTPUT_IMGS], whole[OutputKeys.OUTPUT_IMGS], strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    # given latents and generators are split with the images
    latents = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(6)]  # noqa: E731
    a = sd_pipe(prompts, latents=latents, generator=generators(), batch_size=5, **options)[OutputKeys.OUTPUT_IMGS]
    b = sd_pipe(prompts, latents=latents, generator=generators(), **options)[OutputKeys.OUTPUT_IMGS]
    assert max(np.abs(x.astype(int) - y.astype(int)).max() for x, y in zip(a, b, strict=True)) <= 1


def test_out_of_memory_says_what_to_change_and_the_next_call_runs(sd_pipe, monkeypatch):
    from diffusers import StableDiffusionPipeline

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    real = StableDiffusionPipeline.__call__
    monkeypatch.setattr(StableDiffusionPipeline, '__call__', out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match=r'(?s)Tried to allocate 2.00 GiB.*making 8 image\(s\) at 64x64.*'
                                                     r'batch_size=4: the same images.*vae.enable_slicing.*'
                                                     r'enable_model_cpu_offload'):
        sd_pipe(['a cat', 'a dog'], num_images_per_prompt=4, height=64, width=64, **FAST)
    monkeypatch.setattr(StableDiffusionPipeline, '__call__', real)
    assert len(sd_pipe('a cat', seed=0, **FAST)[OutputKeys.OUTPUT_IMGS]) == 1  # nothing was left locked


def test_an_input_image_far_past_the_models_size_is_said_and_named_when_memory_runs_out(sd_pipe, monkeypatch,
                                                                                          caplog):
    """A phone photo sets image-to-image's size (46 times SD1.5's area): it was slow or out of memory with advice
    about batches and VAE slicing, never the size."""
    from diffusers import StableDiffusionImg2ImgPipeline
    photo = np.zeros((150, 200, 3), np.uint8)  # the tiny model's 32x32 is SD1.5's 512x512
    sd_pipe('a cat', image=photo, height=32, width=40, **FAST)
    assert 'times the' not in caplog.text  # a size was given

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')
    monkeypatch.setattr(StableDiffusionImg2ImgPipeline, '__call__', out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match=r'(?s)making 1 image\(s\) at 200x144\. That is 28 times the '
                                                     r'32x32 the model was trained at: pass a smaller height and width '
                                                     r'\(the input image is resized to them\)'):
        sd_pipe('a cat', image=photo, **FAST)
    assert ('image is 200x150, so this call runs at 200x144: 28 times the 32x32 the model was trained at (slow, much '
            'memory, and repeated subjects). Pass height and width to resize it, e.g. height=24, width=40.'
            ) in caplog.text


def test_diffusers_memory_savers_on_pipe_sd_keep_the_images(sd_pipe):
    before = sd_pipe(['a cat', 'a dog'], seed=0, **FAST)[OutputKeys.OUTPUT_IMGS]
    sd_pipe.sd.vae.enable_slicing()
    try:
        after = sd_pipe(['a cat', 'a dog'], seed=0, **FAST)[OutputKeys.OUTPUT_IMGS]
    finally:
        sd_pipe.sd.vae.disable_slicing()
    assert all(np.abs(a.astype(int) - b.astype(int)).max() <= 1 for a, b in zip(before, after))


def test_calls_from_several_threads_give_the_images_of_calls_one_by_one(sd_pipe):
    """A web server may call one pipeline from several threads; each call sets the shared scheduler's state."""
    from concurrent.futures import ThreadPoolExecutor
    jobs = [('a red ball', 1, None), ('a blue cube', 2, 'DPM++ 2M Karras'), ('a tree', 3, 'Euler a'), ('sky', 4, None)]

    def run(job):
        prompt, seed, scheduler = job
        return sd_pipe(prompt, seed=seed, scheduler=scheduler, num_inference_steps=8)[OutputKeys.OUTPUT_IMGS][0]

    one_by_one = [run(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(run, jobs))
    for a, b in zip(together, one_by_one):
        np.testing.assert_array_equal(a, b)


def test_progress_bar_can_be_switched_off(sd_pipe, capsys, monkeypatch):
    monkeypatch.delenv('TQDM_DISABLE', raising=False)
    sd_pipe('a cat', seed=0, progress_bar=True, **FAST)
    assert '3/3' in capsys.readouterr().err
    sd_pipe('a cat', seed=0, progress_bar=False, **FAST)
    assert '3/3' not in capsys.readouterr().err


def test_cpu_defaults_to_fp32(sd_pipe):
    assert sd_pipe.sd.unet.dtype == torch.float32
    assert sd_pipe.device == torch.device('cpu')
