"""Black (NaN) images: an fp16 VAE that overflows decodes again in fp32, as A1111 does; NaN latents are said."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from modelscope_sd import StableDiffusionText2ImagePipeline
from train_helpers import break_weights, make_random_lora

ARGS = dict(num_inference_steps=3, seed=1)
FP16_WARNING = 'decoding in fp32 from now on'


def _overflowing_in_fp16(pipe):
    """The VAE's decoder overflows in fp16, as some VAEs do: its first convolution's fp16 output turns NaN (CPU
    kernels differ in how an overflow goes on: torch 2.13's gave NaN for weights scaled past fp16's range, 2.11's a
    finite picture). The fp32 copy the fallback makes carries no hook, as a real VAE decodes in fp32."""
    pipe.sd.vae.decoder.conv_in.register_forward_hook(
        lambda module, args, output: output.new_full(output.shape, float('nan'))
        if output.dtype == torch.float16 else output)
    return pipe


def test_an_fp16_vae_that_overflows_decodes_in_fp32_from_then_on(tiny_model_dir, caplog):
    fp16 = _overflowing_in_fp16(StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', torch_dtype='fp16',
                                                                  progress_bar=False))
    fine = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', torch_dtype='fp16', progress_bar=False)
    expected = fine('a red house', **ARGS)['output_imgs'][0].astype(int)  # the same fp16 UNet, a VAE that does not
    first = fp16('a red house', **ARGS)['output_imgs'][0].astype(int)  # overflow: the decode's rounding apart
    assert np.abs(first - expected).max() <= 2  # not black (0 everywhere before)
    second = fp16('a red house', **ARGS)['output_imgs'][0].astype(int)
    np.testing.assert_array_equal(second, first)
    assert caplog.text.count(FP16_WARNING) == 1
    assert 'came out NaN' not in caplog.text


def test_a_vae_that_decodes_finite_images_is_left_as_it_is(sd_pipe, caplog):
    sd_pipe('a red house', **ARGS)
    assert sd_pipe.sd.vae.decode.fp32 is None
    assert 'NaN' not in caplog.text


def test_nan_latents_from_an_adapter_weighed_past_fp32s_range_are_said_by_count(tiny_model_dir, tmp_path, caplog):
    """No VAE mends NaN latents: the images are black, and the warning says why."""
    path = make_random_lora(tiny_model_dir, str(tmp_path / 'lora'))
    pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False,
                                             lora_dir=os.path.dirname(path), lora_scale=1e38)
    images = pipe(['a red house', 'a blue car'], **ARGS)['output_imgs']
    assert all(image.max() == 0 for image in images)  # black
    assert ('2 of the 2 image(s) came out NaN (black): their latents were NaN or inf after denoising in float32 '
            '(an adapter or embedding holds NaN, or weights that large: check them).') in caplog.text
    assert FP16_WARNING not in caplog.text


def test_an_adapter_or_embedding_holding_nan_is_refused_as_it_loads(tiny_model_dir, tmp_path):
    """A diverged training's adapter made every image black, with no word of why."""
    path = break_weights(make_random_lora(tiny_model_dir, str(tmp_path / 'lora')))
    with pytest.raises(ValueError, match=r"lora_dir='.*lora' holds NaN or inf in 1 of its \d+ weights \(e\.g\. "
                                         r'.*lora_A\.weight\): the training that wrote it diverged'):
        StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', lora_dir=os.path.dirname(path))
    embedding = str(tmp_path / 'broken.safetensors')
    save_file({'emb_params': torch.full((2, 32), float('nan'))}, embedding)
    with pytest.raises(ValueError, match='broken.safetensors\' holds NaN or inf: the training that wrote it'):
        StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', textual_inversion=embedding)


@pytest.mark.parametrize('return_dict', [True, False])
def test_the_checked_decode_keeps_diffusers_signature(sd_pipe, return_dict):
    z = torch.randn(2, 4, 16, 16)
    out = sd_pipe.sd.vae.decode(z, return_dict=return_dict)
    images = out.sample if return_dict else out[0]
    assert images.shape == (2, 3, 32, 32)
