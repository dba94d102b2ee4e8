"""A1111's hires fix (hr_scale): diffusers' two passes, seeds per image, clear errors, reproducible PNGs."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

STEPS = dict(num_inference_steps=3)
A1111_LATENT = {'latent': ('bilinear', False), 'latent (antialiased)': ('bilinear', True),
                'latent (bicubic)': ('bicubic', False), 'latent (bicubic antialiased)': ('bicubic', True),
                'latent (nearest)': ('nearest', False), 'latent (nearest-exact)': ('nearest-exact', False)}


def _two_passes_in_diffusers(vanilla_pipe, prompt, seed, scale, upscaler, strength, second_steps=3,
                             second_prompt=None, second_negative=None, second_scheduler=None):
    """What hr_scale does, written with diffusers' own pipelines: text-to-image latents, upscaled, then
    image-to-image at the larger size, each pass drawing its noise from the seed (as A1111's hires pass does)."""
    from diffusers import StableDiffusionImg2ImgPipeline
    latents = vanilla_pipe(prompt, generator=[torch.Generator('cpu').manual_seed(seed)], output_type='latent',
                           **STEPS).images
    size = (int(32 * scale) // 8 * 8, int(32 * scale) // 8 * 8)
    factor = vanilla_pipe.vae_scale_factor
    if upscaler in A1111_LATENT:  # A1111's shared.latent_upscale_modes
        mode, antialias = A1111_LATENT[upscaler]
        image = F.interpolate(latents, size=(size[0] // factor, size[1] // factor), mode=mode, antialias=antialias)
    else:
        with torch.no_grad():
            decoded = vanilla_pipe.vae.decode(latents / vanilla_pipe.vae.config.scaling_factor, return_dict=False)[0]
        image = [i.resize(size[::-1], Image.LANCZOS if upscaler == 'lanczos' else Image.NEAREST)
                 for i in vanilla_pipe.image_processor.postprocess(decoded, output_type='pil')]
    second = StableDiffusionImg2ImgPipeline(**vanilla_pipe.components)
    if second_scheduler is not None:
        second.scheduler = second_scheduler.from_config(vanilla_pipe.scheduler.config)
    second.set_progress_bar_config(disable=True)
    images = second(second_prompt or prompt, negative_prompt=second_negative, image=image, strength=strength,
                    output_type='np',
                    generator=[torch.Generator('cpu').manual_seed(seed)], num_inference_steps=second_steps).images
    return (images[0] * 255).round().astype(int)[..., ::-1]


@pytest.mark.parametrize('upscaler, scale, strength', [
    ('latent', 2, None), ('lanczos', 1.5, 0.5), ('Latent (nearest-exact)', 2, None),
    ('latent (bicubic antialiased)', 1.5, None), ('latent (nearest)', 1.5, 0.6), ('Nearest', 1.5, 0.5)])
def test_hires_fix_equals_diffusers_two_passes(sd_pipe, vanilla_pipe, upscaler, scale, strength):
    out = sd_pipe('a cat', seed=0, hr_scale=scale, hr_upscaler=upscaler, strength=strength, **STEPS)
    got = out['output_imgs'][0].astype(int)
    assert got.shape == (int(32 * scale), int(32 * scale), 3)
    expected = _two_passes_in_diffusers(vanilla_pipe, 'a cat', 0, scale, upscaler.lower(),
                                        0.7 if strength is None else strength)
    assert np.abs(got - expected).max() <= 1
    # the second pass is no plain resize of the first
    first = sd_pipe('a cat', seed=0, **STEPS)['output_imgs'][0]
    resized = np.asarray(Image.fromarray(first).resize(got.shape[1::-1], Image.LANCZOS)).astype(int)
    assert np.abs(got - resized).mean() > 1


def test_second_pass_steps_and_seeds_per_image(sd_pipe, vanilla_pipe):
    args = dict(hr_scale=1.5, hr_second_pass_steps=5, **STEPS)
    batch = sd_pipe(['a cat', 'a dog'], seed=3, **args)
    alone = sd_pipe('a dog', seed=4, **args)['output_imgs'][0]
    assert np.abs(batch['output_imgs'][1].astype(int) - alone.astype(int)).max() <= 1
    expected = _two_passes_in_diffusers(vanilla_pipe, 'a dog', 4, 1.5, 'latent', 0.7, second_steps=5)
    assert np.abs(alone.astype(int) - expected).max() <= 1


def test_edited_prompt_reads_a1111s_hires_schedule_in_the_second_pass(sd_pipe, vanilla_pipe):
    """[a:b:1.0]: the first pass reads a to its end; in the second pass a fraction counts from 1, so it reads b."""
    got = sd_pipe('[a cat:a dog:1.0]', seed=0, hr_scale=2, **STEPS)['output_imgs'][0].astype(int)
    expected = _two_passes_in_diffusers(vanilla_pipe, 'a cat', 0, 2, 'latent', 0.7, second_prompt='a dog')
    assert np.abs(got - expected).max() <= 1


def test_hires_prompts_are_the_second_pass_prompts(sd_pipe, vanilla_pipe):
    """A1111's Hires prompt and Hires negative prompt: the first pass reads the prompt, the second theirs."""
    got = sd_pipe('a cat', seed=0, hr_scale=2, hr_prompt='a dog', hr_negative_prompt='blurry',
                  **STEPS)['output_imgs'][0].astype(int)
    expected = _two_passes_in_diffusers(vanilla_pipe, 'a cat', 0, 2, 'latent', 0.7, second_prompt='a dog',
                                        second_negative='blurry')
    assert np.abs(got - expected).max() <= 1
    plain = sd_pipe('a cat', seed=0, hr_scale=2, **STEPS)['output_imgs'][0].astype(int)
    assert np.abs(got - plain).max() > 2


def test_hr_scheduler_is_the_second_passs_sampler(sd_pipe, vanilla_pipe):
    """A1111's Hires sampler: the first pass keeps the call's scheduler, the second runs this one."""
    from diffusers import EulerDiscreteScheduler
    got = sd_pipe('a cat', seed=0, hr_scale=2, hr_scheduler='euler', **STEPS)['output_imgs'][0].astype(int)
    expected = _two_passes_in_diffusers(vanilla_pipe, 'a cat', 0, 2, 'latent', 0.7,
                                        second_scheduler=EulerDiscreteScheduler)
    assert np.abs(got - expected).max() <= 1
    plain = sd_pipe('a cat', seed=0, hr_scale=2, **STEPS)['output_imgs'][0].astype(int)
    assert np.abs(got - plain).max() > 2
    # DPM++ SDE's Brownian noise in the second pass comes from the seed too: the image is made again exactly
    sde = [sd_pipe('a cat', seed=0, hr_scale=1.5, hr_scheduler='dpm++_sde', **STEPS)['output_imgs'][0]
           for _ in range(2)]
    assert np.array_equal(*sde)


def test_hires_prompts_in_a_batch_are_each_prompts_own(sd_pipe):
    args = dict(hr_scale=1.5, num_images_per_prompt=2, **STEPS)
    batch = sd_pipe(['a cat', 'a dog'], seed=3, hr_prompt=['a red cat', 'a blue dog'], negative_prompt='dark',
                    batch_size=3, **args)['output_imgs']
    alone = sd_pipe('a dog', seed=5, hr_prompt='a blue dog', negative_prompt='dark', **args)['output_imgs']
    for made, again in zip(batch[2:], alone):  # the third and fourth images: 'a dog' at seeds 5 and 6
        assert np.abs(made.astype(int) - again.astype(int)).max() <= 1
    # one hires prompt for all prompts, beside a negative prompt per prompt
    shared = sd_pipe(['a cat', 'a dog'], seed=3, hr_prompt='a bird', negative_prompt=['dark', 'flat'], hr_scale=1.5,
                     **STEPS)['output_imgs'][1]
    alone = sd_pipe('a dog', seed=4, hr_prompt='a bird', negative_prompt='flat', hr_scale=1.5, **STEPS)['output_imgs']
    assert np.abs(shared.astype(int) - alone[0].astype(int)).max() <= 1


def test_hires_prompts_lora_tags_must_be_the_prompts(tiny_model_dir, tmp_path):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    from train_helpers import make_random_lora
    make_random_lora(tiny_model_dir, str(tmp_path / 'style'))
    pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', lora_dir=str(tmp_path / 'style'),
                                             progress_bar=False)
    tagged = pipe('a cat <lora:style:0.5>', seed=0, hr_scale=1.5, hr_prompt='a dog <lora:style:0.5>', **STEPS)
    untagged = pipe('a cat', seed=0, hr_scale=1.5, hr_prompt='a dog', lora_scale=0.5, **STEPS)
    assert np.array_equal(tagged['output_imgs'][0], untagged['output_imgs'][0])
    for hr_prompt, shown in (('a dog', '(none)'), ('a dog <lora:style:0.8>', "{'style': 0.8}")):
        with pytest.raises(ValueError, match=re.escape(f"hr_prompt: its <lora:…> tags {shown} differ from the "
                                                       "prompt's {'style': 0.5}")):
            pipe('a cat <lora:style:0.5>', seed=0, hr_scale=1.5, hr_prompt=hr_prompt, **STEPS)


def test_start_latents_set_the_first_pass_size(sd_pipe):
    latents = torch.randn((1, 4, 24, 16), generator=torch.Generator().manual_seed(0))  # 48x32 on the tiny VAE
    out = sd_pipe('a cat', seed=0, latents=latents, hr_scale=2, **STEPS)['output_imgs'][0]
    assert out.shape == (96, 64, 3)


@pytest.mark.parametrize('kwargs, message', [
    (dict(hr_upscaler='latent'), 'hr_upscaler is an option of the hires fix, which hr_scale turns on'),
    (dict(hr_second_pass_steps=10), 'hr_second_pass_steps is an option of the hires fix'),
    (dict(hr_scale=0.5), 'hr_scale=0.5 must be >= 1.0'),
    (dict(hr_prompt='a dog'), 'hr_prompt is an option of the hires fix, which hr_scale turns on'),
    (dict(hr_negative_prompt='blurry'), 'hr_negative_prompt is an option of the hires fix'),
    (dict(hr_scheduler='euler'), 'hr_scheduler is an option of the hires fix'),
    (dict(hr_scale=2, hr_scheduler='eulr'), "hr_scheduler='eulr' is not known. Did you mean 'euler'?"),
    (dict(hr_scale=2, hr_prompt=['a', 'b']), r'hr_prompt as a list needs one str per prompt \(1\)'),
    (dict(hr_scale=2, hr_negative_prompt=['a', 3]), r'hr_negative_prompt as a list needs one str per prompt'),
    (dict(hr_scale=2, hr_prompt='a dog AND a cat', guidance_scale=1), 'AND'),
    (dict(hr_scale=8), 'hr_scale=8 must be between 1 and 4'),
    (dict(hr_scale=2, hr_upscaler='R-ESRGAN 4x+'),
     "hr_upscaler='R-ESRGAN 4x\\+' is not one of \\('latent', 'latent \\(antialiased\\)'"),
    (dict(hr_scale=2, hr_second_pass_steps=0), 'hr_second_pass_steps=0 is out of range'),
    (dict(hr_scale=2, image=np.zeros((32, 32, 3), np.uint8)), 'hr_scale is the hires fix of text-to-image'),
    (dict(hr_scale=2, guidance_rescale=0.7), 'guidance_rescale cannot go with hr_scale'),
    (dict(strength=0.5), "strength applies to image-to-image.*and to the hires fix's second pass"),
    (dict(hr_scale=1.5, hr_second_pass_steps=1, scheduler='euler'),  # int(0.7 × 1) = 0 steps
     r'strength=0.7 with hr_second_pass_steps=1 runs no denoising step.*hr_second_pass_steps to 2 or more'),
])
def test_bad_hires_options(sd_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        sd_pipe('a cat', seed=0, **STEPS, **kwargs)


def test_generate_writes_a1111_hires_parameters_and_from_png_remakes_the_image(tiny_model_dir, tmp_path):
    from modelscope_sd import metadata
    from modelscope_sd.cli import main
    paths = main(['generate', '--prompt', 'a cat', '--model', tiny_model_dir, '--num_inference_steps', '3',
                  '--seed', '5', '--hr_scale', '2', '--hr_upscaler', 'lanczos', '--device', 'cpu',
                  '--output_dir', str(tmp_path / 'first')])
    text = Image.open(paths[0]).text['parameters']
    assert 'Size: 32x32' in text and 'Denoising strength: 0.7' in text  # A1111 writes the first pass's size
    assert 'Hires upscale: 2.0' in text and 'Hires upscaler: Lanczos' in text
    assert metadata.read_png(paths[0])['not_applied'] == []
    assert 'Hires prompt' not in text  # A1111 writes the hires prompts only where they differ
    again = main(['generate', '--from_png', paths[0], '--device', 'cpu', '--output_dir', str(tmp_path / 'again')])
    first, second = (np.asarray(Image.open(p)).astype(int) for p in (paths[0], again[0]))
    assert first.shape == (64, 64, 3) and np.abs(first - second).max() <= 1


def test_hires_prompts_go_into_the_png_and_back(tiny_model_dir, tmp_path):
    from modelscope_sd import metadata
    from modelscope_sd.cli import main
    paths = main(['generate', '--prompt', 'a cat', '--negative_prompt', 'dark', '--model', tiny_model_dir,
                  '--num_inference_steps', '3', '--seed', '5', '--hr_scale', '1.5', '--hr_prompt',
                  'a cat, sharp: detailed', '--hr_negative_prompt', 'dark, blurry', '--hr_scheduler',
                  'DPM++ 2M SDE Exponential', '--device', 'cpu', '--output_dir', str(tmp_path / 'first')])
    text = Image.open(paths[0]).text['parameters']
    assert 'Hires prompt: "a cat, sharp: detailed", Hires negative prompt: "dark, blurry"' in text  # A1111's quoting
    assert 'Hires sampler: DPM++ 2M SDE, Hires schedule type: Exponential' in text
    saved = metadata.read_png(paths[0])
    assert (saved['call']['hr_prompt'], saved['call']['hr_negative_prompt'], saved['call']['hr_scheduler'],
            saved['not_applied']) == ('a cat, sharp: detailed', 'dark, blurry', 'dpm++_2m_sde_exponential', [])
    again = main(['generate', '--from_png', paths[0], '--device', 'cpu', '--output_dir', str(tmp_path / 'again')])
    first, second = (np.asarray(Image.open(p)).astype(int) for p in (paths[0], again[0]))
    assert np.abs(first - second).max() <= 1


@pytest.mark.parametrize('keys, expected, not_applied', [
    ('Hires sampler: Euler a', 'euler_ancestral', []),
    ('Hires sampler: DPM++ 2M, Hires schedule type: Karras', 'dpm++_2m_karras', []),
    ('Hires schedule type: Karras', 'dpm++_2m_karras', []),  # the first pass's sampler, another schedule
    ('Hires sampler: Euler, Hires schedule type: SGM Uniform', 'euler', ['Hires schedule type SGM Uniform']),
])
def test_a1111_hires_sampler_keys_read_as_hr_scheduler(keys, expected, not_applied):
    from modelscope_sd import metadata
    saved = metadata.parse_parameters(f'a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Uniform, CFG scale: 7, '
                                      f'Seed: 1, Size: 512x512, Denoising strength: 0.5, Hires upscale: 2, {keys}')
    assert (saved['call']['hr_scheduler'], saved['not_applied']) == (expected, not_applied)


@pytest.mark.parametrize('resize, scale, size', [
    ('1024x1536', 2.0, (1536, 1024)), ('1000x0', 1.953125, (1496, 1000)),  # A1111: 1000x1500, latents of 187 rows
    ('0x1200', 1.5625, (1200, 800)), ('1000x1500', 1.953125, (1496, 1000))])
def test_a1111_hires_resize_reads_as_the_scale_it_is(resize, scale, size):
    from modelscope_sd import metadata
    from modelscope_sd.hires import target_size
    saved = metadata.parse_parameters('a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x768, '
                                      f'Denoising strength: 0.5, Hires upscaler: Latent, Hires resize: {resize}')
    assert (saved['call']['hr_scale'], saved['call']['strength'], saved['not_applied']) == (scale, 0.5, [])
    assert target_size(768, 512, saved['call']['hr_scale']) == size


def test_a1111_hires_resize_whose_quotient_rounds_below_a_pixel_still_gives_a1111s_size():
    """264x352 to 360 wide: A1111's height is 360 * 352 // 264 = 480, while 352 * (360 / 264) is 479.99…."""
    from modelscope_sd import metadata
    from modelscope_sd.hires import target_size
    saved = metadata.parse_parameters('a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 264x352, '
                                      'Denoising strength: 0.5, Hires upscaler: Latent, Hires resize: 360x0')
    assert target_size(352, 264, saved['call']['hr_scale']) == (480, 360)


def test_a1111_hires_resize_to_another_aspect_is_named_not_applied():
    from modelscope_sd import metadata
    saved = metadata.parse_parameters('a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x768, '
                                      'Denoising strength: 0.5, Hires upscaler: Latent, Hires resize: 1024x1024')
    assert 'hr_scale' not in saved['call'] and 'strength' not in saved['call']
    assert saved['not_applied'] == ['Hires upscaler', "Hires resize 1024x1024 (not the first pass's size scaled: "
                                    'A1111 crops to it)', 'Denoising strength']
