"""vae=: another VAE in place of the model's own, from a single file, a folder or the hub, as A1111's VAE setting."""

import os

import numpy as np
import pytest
import torch

from modelscope_sd import StableDiffusionText2ImagePipeline

ARGS = dict(num_inference_steps=3, seed=4)


@pytest.fixture(scope='module')
def other_vae(tiny_model_dir, tmp_path_factory):
    """A VAE of the tiny model's shape with other weights: as a diffusers folder and as a standalone file in the
    original layout (the keys of vae-ft-mse-840000-ema-pruned.safetensors, without a first_stage_model. prefix)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from modelscope_sd.single_file import vae_to_ldm
    base = AutoencoderKL.from_pretrained(tiny_model_dir, subfolder='vae')
    torch.manual_seed(1)
    vae = AutoencoderKL.from_config(base.config)
    folder = tmp_path_factory.mktemp('vae')
    vae.save_pretrained(folder / 'diffusers')
    state = {k.removeprefix('first_stage_model.'): v.contiguous() for k, v in
             vae_to_ldm(vae.state_dict(), vae.config).items()}
    save_file(state, folder / 'other-vae.safetensors')
    torch.save(state, folder / 'other-vae.pt')
    return vae, folder


def _image(pipe, **kwargs):
    return pipe('a red house', **ARGS, **kwargs)['output_imgs'][0].astype(int)


def test_a_vae_file_or_folder_gives_diffusers_images_with_that_vae(tiny_model_dir, other_vae, vanilla_pipe, sd_pipe):
    vae, folder = other_vae
    base = vanilla_pipe.vae
    vanilla_pipe.vae = vae
    try:
        expected = vanilla_pipe('a red house', num_inference_steps=3, output_type='np',
                                generator=[torch.Generator().manual_seed(4)]).images[0]
    finally:
        vanilla_pipe.vae = base
    expected = (expected * 255).round().astype(int)[..., ::-1]
    for source in (folder / 'other-vae.safetensors', folder / 'diffusers', str(folder / 'diffusers')):
        pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False, vae=source)
        assert np.abs(_image(pipe) - expected).max() <= 1, source
    assert np.abs(_image(sd_pipe) - expected).max() > 10  # the model's own VAE gives another image
    # image-to-image encodes with it too
    image = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    assert pipe._variant('img2img').vae is pipe.sd.vae is not base
    assert np.abs(_image(pipe, image=image, strength=0.5) - _image(sd_pipe, image=image, strength=0.5)).max() > 10


def test_a_whole_model_gives_its_vae_from_a_folder_or_the_hub(tiny_model_dir, cached_model, fake_hub, sd_pipe):
    """Another model's VAE by its hub id or folder (here the same model's: the same image)."""
    for source in (tiny_model_dir, 'AI-ModelScope/stable-diffusion-v1-5'):
        pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False, vae=source,
                                                 local_files_only=True)
        assert np.abs(_image(pipe) - _image(sd_pipe)).max() <= 1


def test_a_pickle_vae_loads_only_when_the_caller_opts_in(tiny_model_dir, other_vae):
    _, folder = other_vae
    with pytest.raises(ValueError, match='pickle file.*allow_pickle=True'):
        StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', vae=folder / 'other-vae.pt')
    pickled = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False,
                                                vae=folder / 'other-vae.pt', allow_pickle=True)
    safe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', progress_bar=False,
                                             vae=folder / 'other-vae.safetensors')
    assert np.array_equal(_image(pickled), _image(safe))


def test_what_is_not_a_vae_for_this_model_is_refused_by_name(tiny_model_dir, tiny_single_file, tmp_path):
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file
    save_file({'lora_unet_down_blocks_0.lora_down.weight': torch.zeros(4, 4)}, tmp_path / 'lora.safetensors')
    (tmp_path / 'empty').mkdir()
    wide = AutoencoderKL.from_config({**AutoencoderKL.load_config(tiny_model_dir, subfolder='vae'),
                                      'latent_channels': 16})
    cases = [(tmp_path / 'lora.safetensors', ValueError, 'holds no VAE weights'),
             (tmp_path / 'empty', ValueError, 'neither a VAE file nor a diffusers VAE folder'),
             (tmp_path / 'vae.bin.txt', FileNotFoundError, 'no such file or folder'),
             (os.path.join(tiny_model_dir, 'unet'), ValueError,
              r"unet' holds a UNet2DConditionModel \(its config.json\), not an AutoencoderKL: pass the model folder"),
             (os.path.join(tiny_model_dir, 'text_encoder'), ValueError, 'holds a CLIPTextModel'),
             (wide, ValueError, '16-channel latents; this model\'s UNet takes 4'),
             (3, TypeError, 'vae must be a path')]
    for vae, error, words in cases:
        with pytest.raises(error, match=words):
            StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', vae=vae)
    # a whole original-layout checkpoint holds a VAE: that one is taken
    StableDiffusionText2ImagePipeline(tiny_model_dir, device='cpu', vae=tiny_single_file)


def test_generate_writes_the_vae_to_the_png_and_from_png_loads_it_again(tiny_model_dir, other_vae, tmp_path,
                                                                        caplog):
    from PIL import Image

    from modelscope_sd import metadata
    from modelscope_sd.cli import main
    vae = str(other_vae[1] / 'other-vae.safetensors')
    args = ['generate', '--prompt', 'a red house', '--model', tiny_model_dir, '--num_inference_steps', '3',
            '--seed', '4', '--device', 'cpu']
    first = main([*args, '--vae', vae, '--output_dir', str(tmp_path / 'first')])[0]
    saved = metadata.read_png(first)
    assert saved['vae'] == vae and saved['not_applied'] == []
    again = main(['generate', '--from_png', first, '--device', 'cpu', '--output_dir', str(tmp_path / 'again')])[0]
    own = main([*args, '--output_dir', str(tmp_path / 'own')])[0]
    first, again, own = (np.asarray(Image.open(p)).astype(int) for p in (first, again, own))
    assert np.abs(first - again).max() <= 1 and np.abs(first - own).max() > 10
    # an A1111 PNG names a VAE file that is not here: the model's own VAE runs, and the warning says what to pass
    a1111 = metadata.save_png(str(tmp_path / 'a1111.png'), np.zeros((8, 8, 3), np.uint8),
                              'a red house\nSteps: 3, Sampler: Euler, CFG scale: 7, Seed: 4, Size: 32x32, '
                              'VAE: vae-ft-mse-840000-ema-pruned.safetensors, VAE hash: 735e4c3a44')
    with caplog.at_level('WARNING', logger='modelscope_sd.cli'):
        main(['generate', '--from_png', a1111, '--model', tiny_model_dir, '--device', 'cpu',
              '--output_dir', str(tmp_path / 'a1111')])
    assert 'VAE vae-ft-mse-840000-ema-pruned.safetensors (not found here: pass --vae PATH)' in caplog.text
