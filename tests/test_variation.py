"""A1111's variation seeds (subseed, subseed_strength): the start noise turned from the seed's towards a subseed's."""

import math

import numpy as np
import pytest
import torch

from modelscope_sd import metadata
from modelscope_sd.variation import slerp

ARGS = dict(num_inference_steps=3, scheduler='euler', seed=7)


def _images(pipe, prompt='a red house', **kwargs):
    return [image.astype(int) for image in pipe(prompt, **{**ARGS, **kwargs})['output_imgs']]


def test_slerp_turns_along_the_great_circle_per_column():
    low = torch.tensor([[[1.0], [0.0]]])  # (C=1, H=2, W=1): one column, unit length
    high = torch.tensor([[[0.0], [1.0]]])
    half = slerp(0.5, low, high)
    torch.testing.assert_close(half, torch.tensor([[[math.sqrt(0.5)], [math.sqrt(0.5)]]]))
    a, b = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(4, 8, 8)
    torch.testing.assert_close(slerp(0.0, a, b), a)
    torch.testing.assert_close(slerp(1.0, a, b), b, rtol=1e-4, atol=1e-4)


def test_strength_zero_is_the_seeds_image_and_one_is_the_subseeds_noise(sd_pipe):
    """Euler draws no noise after the start: strength 1 is the image of seed = subseed; a stochastic sampler still
    draws its later noise from the seed, as A1111's does."""
    plain = _images(sd_pipe)[0]
    assert np.array_equal(_images(sd_pipe, subseed=99, subseed_strength=0.0)[0], plain)
    # the seed's own noise as the subseed's: the seed's image, so the variation drew from the generators as the
    # plain path draws (an ancestral sampler's later noise included)
    same = dict(subseed=ARGS['seed'], subseed_strength=0.5, scheduler='euler_a')
    assert np.abs(_images(sd_pipe, **same)[0] - _images(sd_pipe, scheduler='euler_a')[0]).max() <= 1
    assert np.abs(_images(sd_pipe, subseed=99, subseed_strength=1.0)[0] - _images(sd_pipe, seed=99)[0]).max() <= 1
    slight, far = (_images(sd_pipe, subseed=99, subseed_strength=s)[0] for s in (0.1, 0.6))
    assert 0 < np.abs(slight - plain).mean() < np.abs(far - plain).mean()
    ancestral = dict(scheduler='euler_a')
    assert np.abs(_images(sd_pipe, subseed=99, subseed_strength=1.0, **ancestral)[0]
                  - _images(sd_pipe, seed=99, **ancestral)[0]).max() > 1


def test_each_image_of_a_batch_is_the_one_its_seed_and_subseed_make_alone(sd_pipe):
    options = dict(subseed=50, subseed_strength=0.3, num_images_per_prompt=2)
    out = sd_pipe(['a red house', 'a tree'], **{**ARGS, **options})
    assert out['seeds'] == [7, 8, 9, 10] and out['subseeds'] == [50, 51, 52, 53]
    alone = _images(sd_pipe, 'a tree', seed=10, subseed=53, subseed_strength=0.3)[0]
    assert np.abs(out['output_imgs'][3].astype(int) - alone).max() <= 1
    split = sd_pipe(['a red house', 'a tree'], batch_size=3, **{**ARGS, **options})
    assert split['subseeds'] == out['subseeds']
    assert np.abs(split['output_imgs'][3].astype(int) - alone).max() <= 1
    drawn = sd_pipe('a cat', subseed_strength=0.2, num_images_per_prompt=2, **ARGS)['subseeds']  # no subseed: drawn
    assert drawn[1] == drawn[0] + 1


def test_the_fast_loop_takes_the_variation(fast_pipe, sd_pipe):
    variation = dict(subseed=5, subseed_strength=0.4, scheduler='euler_a')
    assert np.abs(_images(fast_pipe, **variation)[0] - _images(sd_pipe, **variation)[0]).max() <= 1


@pytest.mark.parametrize('path', ['diffusers', 'fast'])
@pytest.mark.parametrize('kind', ['image-to-image', 'hires fix'])
def test_image_to_image_and_the_hires_second_pass_turn_the_noise_they_add(sd_pipe, fast_pipe, path, kind):
    """As A1111 does, the noise put on the image (or on the hires fix's upscaled latents) turns towards the
    subseed's too. In the hires fix Euler draws no other noise, so strength 1 is the image of seed = subseed in both
    passes (image-to-image also samples the image's latents from the seed, before its noise)."""
    pipe = fast_pipe if path == 'fast' else sd_pipe
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    task = dict(image=image, strength=0.6) if kind == 'image-to-image' else dict(hr_scale=1.5)
    plain = _images(pipe, **task)[0]
    if kind == 'hires fix':
        assert np.abs(_images(pipe, subseed=99, subseed_strength=1.0, **task)[0]
                      - _images(pipe, seed=99, **task)[0]).max() <= 1
        # the seed's own noise as the subseed's gives the plain image: the noise is drawn as without a variation
        assert np.abs(_images(pipe, subseed=ARGS['seed'], subseed_strength=0.5, **task)[0] - plain).max() <= 1
    slight, far = (_images(pipe, subseed=99, subseed_strength=s, **task)[0] for s in (0.1, 0.6))
    assert 0 < np.abs(slight - plain).mean() < np.abs(far - plain).mean()
    assert np.abs(_images(pipe, subseed=99, subseed_strength=0.6, **task)[0]
                  - _images(sd_pipe, subseed=99, subseed_strength=0.6, **task)[0]).max() <= 1


@pytest.mark.parametrize('options, error, words', [
    (dict(subseed_strength=1.5), ValueError, ['subseed_strength=1.5', 'between 0']),
    (dict(subseed=-2, subseed_strength=0.5), ValueError, ['subseed=-2']),
    (dict(subseed='3', subseed_strength=0.5), TypeError, ['subseed', 'str']),
    (dict(subseed_strength=0.5, latents=torch.zeros(1, 4, 16, 16)), ValueError, ['subseed_strength', 'latents=']),
    (dict(subseed_strength=0.5, image=np.zeros((32, 32, 3), np.uint8), mask_image=np.zeros((32, 32, 3), np.uint8)),
     ValueError, ['subseed_strength', 'mask_image=']),
])
def test_bad_variation_options_are_refused_by_name(sd_pipe, options, error, words):
    with pytest.raises(error) as info:
        sd_pipe('a cat', num_inference_steps=2, **options)
    assert all(word in str(info.value) for word in words), str(info.value)


def test_variation_seeds_go_through_a_png_as_a1111_writes_them(tiny_model_dir, tmp_path):
    from PIL import Image

    from modelscope_sd.cli import main
    paths = main(['generate', '--prompt', 'a red house', '--model', tiny_model_dir, '--num_inference_steps', '3',
                  '--num_images', '2', '--seed', '7', '--subseed', '50', '--subseed_strength', '0.3',
                  '--device', 'cpu', '--output_dir', str(tmp_path / 'first')])
    saved = metadata.read_png(paths[1])
    assert (saved['call']['subseed'], saved['call']['subseed_strength'], saved['not_applied']) == (51, 0.3, [])
    assert 'Variation seed: 51, Variation seed strength: 0.3' in Image.open(paths[1]).text['parameters']
    again = main(['generate', '--from_png', paths[1], '--device', 'cpu', '--output_dir', str(tmp_path / 'again')])
    first, second = (np.asarray(Image.open(p)).astype(int) for p in (paths[1], again[0]))
    assert np.abs(first - second).max() <= 1
    a1111 = 'a\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Variation seed: 9, ' \
        'Variation seed strength: 0.25, Seed resize from: 768x768'
    parsed = metadata.parse_parameters(a1111)
    assert (parsed['call']['subseed'], parsed['call']['subseed_strength']) == (9, 0.25)
    assert parsed['not_applied'] == ['Seed resize from']
