"""The work of one SD1.5 generation step, by kind of kernel: what a GPU profile's milliseconds are divided into.

    python bench/count_flops.py                # SD1.5's UNet per CFG step at batch 1, 4, 16, and the VAE decoder
    python bench/count_flops.py --tiny         # the tiny test model

Counted with torch's FlopCounterMode on the meta device: shapes only, no weights, no GPU, about a second. Attention
is SDPA's math (its two matmuls), the same FLOPs as the fused kernels.
"""

import argparse
import json
import os
import sys
import tempfile
from collections import defaultdict
from typing import Dict

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from bench.models import SD15_UNET, SD15_VAE  # noqa: E402

KINDS = {'convolution': 'convolution', 'addmm': 'matmul', 'mm': 'matmul', 'bmm': 'attention',
         '_scaled_dot_product_flash_attention': 'attention', '_scaled_dot_product_efficient_attention': 'attention',
         '_scaled_dot_product_cudnn_attention': 'attention'}


def _by_kind(counter: FlopCounterMode) -> Dict[str, float]:
    tflop = defaultdict(float)
    for op, flops in counter.get_flop_counts()['Global'].items():
        tflop[KINDS.get(str(op).split('.')[-1], str(op))] += flops / 1e12  # str(op): 'aten.convolution'
    return dict(sorted(tflop.items()))


def count(tiny: bool = False, batches=(1, 4, 16)) -> list:
    """One row per UNet call (a CFG step: 2 × batch rows) and one for the decoder of one image."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from tiny_sd import tiny_components
    if tiny:
        with tempfile.TemporaryDirectory(prefix='bench_tok_') as workdir:
            parts = tiny_components(workdir, safety_checker=False)
        unet_config, vae_config = dict(parts['unet'].config), dict(parts['vae'].config)
    else:
        unet_config, vae_config = SD15_UNET, SD15_VAE
    with torch.device('meta'):
        unet = UNet2DConditionModel(**unet_config).half()
        vae = AutoencoderKL(**vae_config).half()
    size, context = unet.config.sample_size, unet.config.cross_attention_dim
    rows = []
    for batch in batches:
        latents = torch.empty(2 * batch, unet.config.in_channels, size, size, device='meta', dtype=torch.half)
        text = torch.empty(2 * batch, 77, context, device='meta', dtype=torch.half)
        with FlopCounterMode(display=False) as counter:
            unet(latents, torch.full((2 * batch,), 500, device='meta'), text)
        rows.append({'name': f'UNet, one CFG step at batch {batch}', 'tflop': counter.get_total_flops() / 1e12,
                     'tflop_by_kind': _by_kind(counter)})
    with FlopCounterMode(display=False) as counter:
        vae.decode(torch.empty(1, vae.config.latent_channels, size, size, device='meta', dtype=torch.half))
    rows.append({'name': 'VAE decoder, one image', 'tflop': counter.get_total_flops() / 1e12,
                 'tflop_by_kind': _by_kind(counter)})
    return rows


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tiny', action='store_true')
    args = parser.parse_args(argv)
    rows = count(args.tiny)
    for row in rows:
        print(json.dumps({**row, 'tflop': round(row['tflop'], 4),
                          'tflop_by_kind': {k: round(v, 4) for k, v in row['tflop_by_kind'].items()}}))
    return rows


if __name__ == '__main__':
    main()
