"""Image-to-image and inpainting through the same registered pipeline."""

import numpy as np
import pytest
from PIL import Image

STEPS = dict(num_inference_steps=3, seed=0)


@pytest.fixture
def photo(tmp_path):
    rng = np.random.default_rng(0)
    bgr = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)  # OpenCV order, 40 high, 48 wide
    path = tmp_path / 'photo.png'
    Image.fromarray(bgr[..., ::-1]).save(path)
    return bgr, str(path)


@pytest.fixture
def mask():
    array = np.zeros((40, 48), np.uint8)
    array[8:24, 16:40] = 255
    return array


def test_strength_zero_returns_the_input(sd_pipe, photo):
    bgr, path = photo
    out = sd_pipe({'text': 'a cat', 'image': path, 'strength': 0.0, **STEPS})['output_imgs'][0]
    assert np.array_equal(out, bgr)


def test_img2img_and_inpainting_through_modelscope_pipeline(tiny_model_dir, photo, mask):
    import modelscope_sd  # noqa: F401
    from modelscope.pipelines import pipeline
    from modelscope.utils.constant import Tasks
    pipe = pipeline(task=Tasks.text_to_image_synthesis, model=tiny_model_dir, device='cpu', progress_bar=False)
    bgr, path = photo
    out = pipe({'text': 'a cat', 'image': path, 'strength': 0.6, **STEPS})['output_imgs'][0]
    assert out.shape == bgr.shape and np.abs(out.astype(int) - bgr.astype(int)).mean() > 1
    # a lower strength stays closer to the input
    light = pipe({'text': 'a cat', 'image': path, 'strength': 0.2, **STEPS})['output_imgs'][0]
    assert np.abs(light.astype(int) - bgr.astype(int)).mean() < np.abs(out.astype(int) - bgr.astype(int)).mean()
    painted = pipe({'text': 'a cat', 'image': path, 'mask_image': mask, **STEPS})['output_imgs'][0].astype(int)
    assert np.abs(painted[mask == 0] - bgr[mask == 0].astype(int)).max() <= 1


def test_path_array_and_pil_inputs_agree(sd_pipe, photo):
    bgr, path = photo
    results = [sd_pipe({'text': 'a cat', 'image': image, 'strength': 0.5, **STEPS})['output_imgs'][0]
               for image in (path, bgr, Image.open(path))]
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


def test_image_and_mask_urls(sd_pipe, photo, mask, tmp_path):
    """ModelScope's image pipelines take URLs; a local HTTP server stands in for the web."""
    import functools
    import http.server
    import threading
    bgr, path = photo
    Image.fromarray(mask).save(tmp_path / 'mask.png')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f'http://127.0.0.1:{server.server_address[1]}'
    try:
        by_url = sd_pipe({'text': 'a cat', 'image': f'{base}/photo.png', 'mask_image': f'{base}/mask.png', **STEPS})
        by_path = sd_pipe({'text': 'a cat', 'image': path, 'mask_image': str(tmp_path / 'mask.png'), **STEPS})
        assert np.array_equal(by_url['output_imgs'][0], by_path['output_imgs'][0])
        with pytest.raises(FileNotFoundError, match=r"image='http://127.*/missing.png' could not be downloaded"):
            sd_pipe({'text': 'a cat', 'image': f'{base}/missing.png', **STEPS})
    finally:
        server.shutdown()


def test_inpainting_with_the_standard_unet_keeps_unmasked_pixels(sd_pipe, photo, mask):
    bgr, path = photo
    out = sd_pipe({'text': 'a cat', 'image': bgr, 'mask_image': mask, **STEPS})['output_imgs'][0].astype(int)
    outside = mask == 0
    assert np.abs(out[outside] - bgr[outside].astype(int)).max() <= 1
    assert np.abs(out[mask == 255] - bgr[mask == 255].astype(int)).mean() > 5


def _each_image_is_its_seeds_alone(pipe, bgr, mask):
    """diffusers' inpainting encodes the image once per batch, from the first generator: the other images drew
    other noise than their seeds alone until each image got its copy."""
    batch = pipe(['a cat', 'a dog'], image=bgr, mask_image=mask, num_images_per_prompt=2, **STEPS)['output_imgs']
    for i, prompt in ((1, 'a cat'), (2, 'a dog')):
        alone = pipe(prompt, image=bgr, mask_image=mask, **dict(STEPS, seed=STEPS['seed'] + i))['output_imgs'][0]
        assert np.abs(batch[i].astype(int) - alone.astype(int)).max() <= 1


def test_inpainting_in_a_batch_gives_each_image_its_seeds_picture(sd_pipe, photo, mask):
    _each_image_is_its_seeds_alone(sd_pipe, photo[0], mask)


def test_inpainting_model_with_nine_channel_unet(tmp_path, photo, mask):
    from diffusers import StableDiffusionPipeline

    from modelscope_sd import StableDiffusionText2ImagePipeline
    from tiny_sd import tiny_components
    parts = tiny_components(str(tmp_path / 'tok'), safety_checker=False, in_channels=9)
    StableDiffusionPipeline(**parts, requires_safety_checker=False).save_pretrained(tmp_path / 'inpaint-model')
    pipe = StableDiffusionText2ImagePipeline(str(tmp_path / 'inpaint-model'), device='cpu', progress_bar=False)
    bgr, _ = photo
    out = pipe({'text': 'a cat', 'image': bgr, 'mask_image': mask, **STEPS})['output_imgs'][0].astype(int)
    assert np.abs(out[mask == 0] - bgr[mask == 0].astype(int)).max() <= 1
    with pytest.raises(ValueError, match='inpainting model.*mask_image'):
        pipe('a cat', **STEPS)
    _each_image_is_its_seeds_alone(pipe, bgr, mask)


@pytest.mark.parametrize('options, error, message', [
    (dict(strength=1.5), ValueError, 'strength=1.5 must be between 0 and 1'),
    (dict(strength=-0.1), ValueError, 'strength=-0.1'),
    (dict(mask_image=np.zeros((10, 10), np.uint8)), ValueError, 'mask_image is 10x10 but image is 48x40'),
    (dict(image=None, mask_image=np.zeros((40, 48), np.uint8)), ValueError, 'mask_image needs image'),
    (dict(image=None, strength=0.5), ValueError, 'strength applies to image-to-image'),
    (dict(strength=0.1, scheduler='euler'), ValueError,  # diffusers would fail on an empty batch in the UNet
     r'strength=0.1 with num_inference_steps=3 runs no denoising step .*num_inference_steps to 10 or more, or '
     r'strength to 0.34 or more'),
    (dict(image='/no/such.png'), FileNotFoundError, "image='/no/such.png': no such file"),
    (dict(image=3), TypeError, 'image must be a file path or URL, a BGR numpy array or a PIL image'),
    (dict(image=__file__), ValueError, r"image=.*test_image_to_image.py' is not an image \(PNG, JPEG"),
    (dict(image=np.zeros((4, 4, 3), np.float32)), ValueError, 'image as an array must be uint8'),
])
def test_bad_image_inputs(sd_pipe, photo, options, error, message):
    bgr, _ = photo
    with pytest.raises(error, match=message):
        sd_pipe({'text': 'a cat', 'image': bgr, **STEPS, **options})


def test_image_to_image_keeps_the_pipelines_dtype(tiny_model_dir, photo, mask):
    """The image-to-image and inpainting pipelines share our modules; diffusers' from_pipe cast them to fp32, so
    after one such call every later call ran in fp32 (twice the memory on a GPU, and slower)."""
    import torch

    from modelscope_sd import StableDiffusionText2ImagePipeline
    pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', torch_dtype='bf16', progress_bar=False)
    _, path = photo
    pipe({'text': 'a cat', 'image': path, **STEPS})
    pipe({'text': 'a cat', 'image': path, 'mask_image': mask, **STEPS})
    assert {pipe.sd.unet.dtype, pipe.sd.vae.dtype, pipe.sd.text_encoder.dtype} == {torch.bfloat16}
