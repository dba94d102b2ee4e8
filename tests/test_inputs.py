"""Every bad input gets one error naming the argument, the value and what is allowed."""

import pytest


@pytest.mark.parametrize('call, error, words', [
    (lambda p: p(), ValueError, ['prompt is missing']),
    (lambda p: p({'num_inference_steps': 2}), ValueError, ['prompt is missing']),
    (lambda p: p(123), TypeError, ['text', 'int']),
    (lambda p: p([]), TypeError, ['text', 'non-empty list']),
    (lambda p: p(['a', 3]), TypeError, ['text']),
    (lambda p: p({'text': 'a', 'prompt': 'b'}), ValueError, ["'text'", "'prompt'"]),
    (lambda p: p('a', height=30), ValueError, ['height=30', 'multiple of 8']),
    (lambda p: p('a', width=0), ValueError, ['width=0', 'positive']),
    (lambda p: p('a', width=-64), ValueError, ['width=-64']),
    (lambda p: p('a', height='512'), TypeError, ['height', 'int']),
    (lambda p: p('a', height=512.0), TypeError, ['height', 'float']),
    (lambda p: p('a', num_inference_steps=0), ValueError, ['num_inference_steps=0', '>= 1']),
    (lambda p: p('a', num_inference_steps=2.5), TypeError, ['num_inference_steps', 'int']),
    (lambda p: p('a', num_inference_steps=True), TypeError, ['num_inference_steps', 'bool']),
    (lambda p: p('a', guidance_scale=-1), ValueError, ['guidance_scale=-1', '>= 0']),
    (lambda p: p('a', guidance_scale='high'), TypeError, ['guidance_scale', 'number']),
    (lambda p: p('a', guidance_rescale=1.5), ValueError, ['guidance_rescale=1.5', 'between 0', '1']),
    (lambda p: p('a', guidance_rescale=-0.1), ValueError, ['guidance_rescale=-0.1', '>= 0']),
    (lambda p: p('a', guidance_rescale=0.7, image=__import__('numpy').zeros((32, 32, 3), 'uint8')), ValueError,
     ['guidance_rescale', 'text-to-image only']),
    (lambda p: p('a', num_images_per_prompt=0), ValueError, ['num_images_per_prompt=0']),
    (lambda p: p('a', batch_size=0), ValueError, ['batch_size=0', '>= 1']),
    (lambda p: p('a', batch_size=2.0), TypeError, ['batch_size', 'int']),
    (lambda p: p('a', eta=-0.5), ValueError, ['eta=-0.5']),
    (lambda p: p('a', seed=-2), ValueError, ['seed=-2', '-1 for a random seed']),
    (lambda p: p('a', seed='42'), TypeError, ['seed', 'str']),
    (lambda p: p('a', seed=1, generator=__import__('torch').Generator()), ValueError, ['seed or generator']),
    (lambda p: p('a', generator=5), TypeError, ['generator']),
    (lambda p: p('a', scheduler='eular'), ValueError, ["scheduler='eular'", "did you mean 'euler'", 'ddim']),
    (lambda p: p('a', scheduler=3), TypeError, ['scheduler']),
    (lambda p: p({'text': 'a', 'num_inference_step': 2}), ValueError,
     ["'num_inference_step'", "did you mean 'num_inference_steps'"]),
    (lambda p: p('a', guidence_scale=2), ValueError, ["'guidence_scale'", 'guidance_scale']),
    # what diffusers' pipeline (or ModelScope's own SD pipeline) takes and this one does not: what to do instead
    (lambda p: p({'text': 'a', 'output_type': 'pil'}), ValueError, ["'output_type'", 'BGR uint8', 'leave it out']),
    (lambda p: p('a', callback=print, callback_steps=1), ValueError, ["'callback'", 'callback_on_step_end=']),
    (lambda p: p(prompt_embeds=__import__('torch').zeros(1, 77, 32)), ValueError,
     ["'prompt_embeds'", 'pipe.sd(prompt_embeds=']),
    (lambda p: p('a', cross_attention_kwargs={'scale': 0.5}), ValueError, ['cross_attention_kwargs', 'lora_scale=']),
    (lambda p: p('a', timesteps=[999, 500]), ValueError, ["'timesteps'", '*_karras']),
    (lambda p: p('a', ip_adapter_image=None), ValueError, ['ip_adapter_image', 'load_ip_adapter']),
    (lambda p: p('a', negative_prompt=3), TypeError, ['negative_prompt']),
    (lambda p: p(['a', 'b'], negative_prompt=['x']), ValueError, ['negative_prompt', 'one str per prompt']),
    (lambda p: p('a', clip_skip=5), ValueError, ['clip_skip=5']),
    (lambda p: p('a', lora_scale=0.5), ValueError, ['lora_scale', 'no LoRA is loaded']),
    (lambda p: p('a', progress_bar='no'), TypeError, ['progress_bar']),
    (lambda p: p({'text': 'a', 'seed': 1}, seed=2), ValueError, ["'seed'", 'both']),
    (lambda p: p('a', guidance_scale=float('nan')), ValueError, ['guidance_scale=nan', 'finite']),
    (lambda p: p('a', eta=float('inf')), ValueError, ['eta=inf', 'finite']),
    # diffusers passes eta only to a scheduler whose step takes it (DDIM), and drops it for the others
    (lambda p: p('a', eta=0.5), ValueError, ['eta=0.5', "DDIM's", "'pndm' scheduler", "scheduler='ddim'"]),
    (lambda p: p('a', eta=0.5, hr_scale=2, hr_scheduler='euler_a'), ValueError,
     ["'pndm' and 'euler_ancestral' schedulers"]),
    (lambda p: p('a', num_images_per_prompt=2, generator=[__import__('torch').Generator()]), ValueError,
     ['generator is a list of 1', '2 images']),
    (lambda p: p('a', latents=__import__('torch').randn(4, 16, 16)), ValueError, ['latents', '4-d', '(4, 16, 16)']),
    (lambda p: p('a', latents=__import__('torch').full((1, 4, 16, 16), float('nan'))), ValueError,
     ['latents hold nan or inf', 'finite']),
    (lambda p: p(['a', 'b'], latents=__import__('torch').randn(1, 4, 16, 16)), ValueError,
     ['latents has shape (1, 4, 16, 16)', 'needs (2, 4, 16, 16)']),
    (lambda p: p('a', height=64, latents=__import__('torch').randn(1, 4, 16, 16)), ValueError,
     ['needs (1, 4, 32, 16)', 'height=64']),
    (lambda p: p('a', callback_on_step_end='print'), TypeError, ['callback_on_step_end', 'callable', 'str']),
    (lambda p: p('a', emphasis='strong'), ValueError, ["emphasis='strong'", 'No norm']),
    (lambda p: p('a AND b', guidance_scale=1.0), ValueError, ["A1111's AND", 'guidance_scale=1.0']),
    (lambda p: p('a', callback_on_step_end_tensor_inputs=['latents']), ValueError,
     ['callback_on_step_end_tensor_inputs', 'pass callback_on_step_end too']),
    (lambda p: p('a', callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=['noise_pred']),
     ValueError, ["callback_on_step_end_tensor_inputs=['noise_pred']", "'latents', 'prompt_embeds'"]),
    # diffusers would start 501 steps at timestep 501 (noise drawn as if half denoised), fail at 1000
    (lambda p: p('a', num_inference_steps=501), ValueError,
     ['num_inference_steps=501', "PNDMScheduler spaces its steps 'leading'", 'at timestep 501', 'at most 500',
      "scheduler='euler'"]),
    (lambda p: p('a', num_inference_steps=1000, scheduler='ddim'), ValueError, ['DDIMScheduler', 'at timestep 1000']),
    (lambda p: p('a', hr_scale=2, hr_second_pass_steps=600), ValueError,
     ['hr_second_pass_steps=600', 'at timestep 600']),
])
def test_bad_call_input(sd_pipe, call, error, words):
    with pytest.raises(error) as info:
        call(sd_pipe)
    message = str(info.value).lower()
    for word in words:
        assert word.lower() in message, f'{word!r} not in {message!r}'


def test_eta_is_taken_where_one_of_the_calls_schedulers_is_ddim(sd_pipe):
    steps = dict(num_inference_steps=2, seed=0, height=32, width=32)
    sd_pipe('a', eta=0.5, scheduler='ddim', **steps)
    out = sd_pipe('a', eta=0.5, hr_scale=1.5, hr_scheduler='ddim', **steps)  # the hires fix's second pass
    assert out['output_imgs'][0].shape == (48, 48, 3)


def test_unknown_pipeline_argument_is_refused(tiny_model_dir):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    with pytest.raises(ValueError, match="'lora_scal'.*lora_scale"):
        StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', lora_scal=0.5)


@pytest.mark.parametrize('torch_dtype', ['float8', __import__('torch').int8, __import__('torch').float8_e4m3fn])
def test_bad_torch_dtype_is_refused(tiny_model_dir, torch_dtype):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    with pytest.raises(ValueError, match=f"torch_dtype={torch_dtype!r} is not supported"):
        StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', torch_dtype=torch_dtype)


@pytest.mark.parametrize('device', ['tpu', 'gpu:abc', 'cuda:1:2'])
def test_bad_device_is_refused(tiny_model_dir, device):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    with pytest.raises(ValueError, match=f"device='{device}' is not valid: use 'gpu', 'gpu:N'"):
        StableDiffusionText2ImagePipeline(tiny_model_dir, device=device)


def test_a_gpu_number_past_the_machines_gpus_is_refused(monkeypatch):
    import torch
    from modelscope_sd.loading import resolve_device
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert resolve_device('gpu:1') == torch.device('cuda:1')
    with pytest.raises(ValueError, match="device='gpu:2': this machine has 2 CUDA device.*'gpu:0' to 'gpu:1'"):
        resolve_device('gpu:2')


def test_lora_scale_without_an_adapter_is_refused(tiny_model_dir):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    with pytest.raises(ValueError, match="lora_scale=0.5 was given without lora_dir"):
        StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', lora_scale=0.5)


def test_bad_compile_mode_is_refused(tiny_model_dir):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    with pytest.raises(ValueError, match="compile_mode='fastest' is not one of reduce-overhead, max-autotune"):
        StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', fast=True, compile_mode='fastest')


def test_step_counts_that_span_the_schedule_pass():
    from diffusers import PNDMScheduler
    from modelscope_sd.checks import check_step_spacing
    from modelscope_sd.schedulers import make_scheduler
    from tiny_sd import SD15_SCHEDULER_CONFIG
    sd15 = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)  # SD1.5's file names no spacing: PNDM's own, 'leading'
    check_step_spacing(sd15, 500, 'num_inference_steps')  # every second timestep, from 999
    for name in ('euler', 'dpm++_2m', 'unipc'):  # their own spacing: any count starts near 999
        check_step_spacing(make_scheduler(name, sd15.config), 1000, 'num_inference_steps')
