"""One original-layout checkpoint from a diffusers model, checked on SD1.5's real block layout."""

import os

import pytest
import torch


@pytest.mark.slow
def test_sd15_layout_round_trips_through_diffusers_single_file_reader(tmp_path):
    """SD1.5's exact architecture (4 UNet levels of 2 layers, mid block, 4 VAE levels, 12 CLIP layers; random
    weights): diffusers' own LDM reader gives back every tensor unchanged (about 1 minute, 10 GB of memory)."""
    from diffusers import StableDiffusionPipeline

    from bench.models import build_components
    from modelscope_sd.single_file import save_single_file
    pipe = StableDiffusionPipeline(**build_components(tiny=False, device='cpu'), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    configs = tmp_path / 'configs'  # what from_single_file reads beside the weights: configs and tokenizer only
    pipe.save_config(configs)
    for name in ('unet', 'vae', 'scheduler'):
        getattr(pipe, name).save_config(configs / name)
    pipe.text_encoder.config.save_pretrained(configs / 'text_encoder')
    pipe.tokenizer.save_pretrained(configs / 'tokenizer')
    path = save_single_file(pipe, str(tmp_path / 'sd15.safetensors'), dtype=torch.float32)
    assert os.path.getsize(path) > 4.2e9  # 1.07 G parameters in fp32
    loaded = StableDiffusionPipeline.from_single_file(path, config=str(configs), local_files_only=True,
                                                      safety_checker=None, requires_safety_checker=False)
    for name in ('unet', 'vae', 'text_encoder'):
        ours, back = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == back.keys(), name
        assert all(torch.equal(ours[k], back[k]) for k in ours), name
