"""Opt-in CUDA checks (`python -m pytest -m gpu`): fp16 default and the fast path on the tiny model."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')]


def test_gpu_defaults_to_fp16(tiny_model_dir):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    pipe = StableDiffusionText2ImagePipeline(tiny_model_dir, device='gpu', progress_bar=False)
    assert pipe.sd.unet.dtype == torch.float16 and pipe.device.type == 'cuda'


def test_fast_path_matches_the_plain_path_for_every_scheduler(tiny_model_dir):
    from modelscope_sd import StableDiffusionText2ImagePipeline
    plain = StableDiffusionText2ImagePipeline(tiny_model_dir, device='gpu', progress_bar=False)
    fast = StableDiffusionText2ImagePipeline(tiny_model_dir, device='gpu', progress_bar=False, fast=True)
    for scheduler in (None, 'dpm++_2m_karras', 'euler_a', 'unipc'):
        args = dict(num_inference_steps=4, seed=0, scheduler=scheduler)
        a = plain('a cat', **args)['output_imgs'][0].astype(int)
        b = fast('a cat', **args)['output_imgs'][0].astype(int)
        assert np.abs(a - b).max() <= 3, scheduler
