"""A diffusers SD1.x model → one checkpoint in the original (LDM) layout: the single file that A1111, ComfyUI,
kohya's scripts and ``from_single_file`` load, as ``v1-5-pruned-emaonly.safetensors`` is.

The reverse of what ``diffusers.loaders.single_file_utils`` does on load; written from the block layout in
the configs, so it works for SD1.5's shapes and for the tests' tiny model alike.
"""

import os
from typing import Dict, Optional

import torch

from .files import save_safetensors


def _unet_prefix_map(config):
    layers = config['layers_per_block']
    down_types, up_types = config['down_block_types'], config['up_block_types']
    pairs = [('time_embed.0.', 'time_embedding.linear_1.'), ('time_embed.2.', 'time_embedding.linear_2.'),
             ('input_blocks.0.0.', 'conv_in.'), ('out.0.', 'conv_norm_out.'), ('out.2.', 'conv_out.'),
             ('middle_block.1.', 'mid_block.attentions.0.'),
             ('middle_block.0.', 'mid_block.resnets.0.'), ('middle_block.2.', 'mid_block.resnets.1.')]
    for i, kind in enumerate(down_types):
        for j in range(layers):
            pairs.append((f'input_blocks.{(layers + 1) * i + j + 1}.0.', f'down_blocks.{i}.resnets.{j}.'))
            if 'CrossAttn' in kind:
                pairs.append((f'input_blocks.{(layers + 1) * i + j + 1}.1.', f'down_blocks.{i}.attentions.{j}.'))
        if i < len(down_types) - 1:
            pairs.append((f'input_blocks.{(layers + 1) * (i + 1)}.0.op.', f'down_blocks.{i}.downsamplers.0.conv.'))
    for i, kind in enumerate(up_types):
        for j in range(layers + 1):
            pairs.append((f'output_blocks.{(layers + 1) * i + j}.0.', f'up_blocks.{i}.resnets.{j}.'))
            if 'CrossAttn' in kind:
                pairs.append((f'output_blocks.{(layers + 1) * i + j}.1.', f'up_blocks.{i}.attentions.{j}.'))
        if i < len(up_types) - 1:
            slot = 2 if 'CrossAttn' in kind else 1
            pairs.append((f'output_blocks.{(layers + 1) * i + layers}.{slot}.', f'up_blocks.{i}.upsamplers.0.'))
    return pairs


_RESNET = [('in_layers.0.', 'norm1.'), ('in_layers.2.', 'conv1.'), ('out_layers.0.', 'norm2.'),
           ('out_layers.3.', 'conv2.'), ('emb_layers.1.', 'time_emb_proj.'), ('skip_connection.', 'conv_shortcut.')]


def unet_to_ldm(state_dict, config):
    out = {}
    pairs = sorted(_unet_prefix_map(config), key=lambda p: -len(p[1]))
    for key, value in state_dict.items():
        for ldm, hf in pairs:
            if key.startswith(hf):
                rest = key[len(hf):]
                if '.resnets.' in hf:
                    for ldm_r, hf_r in _RESNET:
                        rest = rest.replace(hf_r, ldm_r) if rest.startswith(hf_r) else rest
                out['model.diffusion_model.' + ldm + rest] = value
                break
        else:
            raise KeyError(f'unmapped UNet key {key}')
    return out


def vae_to_ldm(state_dict, config):
    n = len(config['block_out_channels'])
    layers = config['layers_per_block']
    pairs = [('encoder.mid.attn_1.', 'encoder.mid_block.attentions.0.'),
             ('decoder.mid.attn_1.', 'decoder.mid_block.attentions.0.')]
    for part in ('encoder', 'decoder'):
        pairs += [(f'{part}.mid.block_{i + 1}.', f'{part}.mid_block.resnets.{i}.') for i in range(2)]
        pairs.append((f'{part}.norm_out.', f'{part}.conv_norm_out.'))
    for i in range(n):
        for j in range(layers):
            pairs.append((f'encoder.down.{i}.block.{j}.', f'encoder.down_blocks.{i}.resnets.{j}.'))
        for j in range(layers + 1):
            pairs.append((f'decoder.up.{n - 1 - i}.block.{j}.', f'decoder.up_blocks.{i}.resnets.{j}.'))
        if i < n - 1:
            pairs.append((f'encoder.down.{i}.downsample.', f'encoder.down_blocks.{i}.downsamplers.0.'))
            pairs.append((f'decoder.up.{n - 1 - i}.upsample.', f'decoder.up_blocks.{i}.upsamplers.0.'))
    pairs.sort(key=lambda p: -len(p[1]))
    attn = [('norm.', 'group_norm.'), ('q.', 'to_q.'), ('k.', 'to_k.'), ('v.', 'to_v.'), ('proj_out.', 'to_out.0.')]
    out = {}
    for key, value in state_dict.items():
        new = key
        for ldm, hf in pairs:
            if key.startswith(hf):
                new = ldm + key[len(hf):]
                break
        new = new.replace('conv_shortcut.', 'nin_shortcut.')
        if '.attn_1.' in new:
            head, _, rest = new.partition('.attn_1.')
            for ldm_a, hf_a in attn:
                if rest.startswith(hf_a):
                    rest = ldm_a + rest[len(hf_a):]
                    break
            new = f'{head}.attn_1.{rest}'
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out['first_stage_model.' + new] = value
    return out


def pipeline_to_ldm(pipe, dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """A full SD1.x checkpoint in the original layout from a diffusers pipeline (UNet, VAE, text encoder)."""
    state = {}
    state.update(unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config))
    state.update(vae_to_ldm(pipe.vae.state_dict(), pipe.vae.config))
    # original checkpoints keep transformers' old `text_model.` level, which transformers >= 5.6 flattened
    state.update({'cond_stage_model.transformer.' + ('' if k.startswith('text_model.') else 'text_model.') + k: v
                  for k, v in pipe.text_encoder.state_dict().items()})
    return {k: v.detach().to('cpu', dtype).contiguous() for k, v in state.items()}


def check_output_path(path: str) -> None:
    if not str(path).endswith('.safetensors'):
        raise ValueError(f'{path!r}: the single-file checkpoint is written as .safetensors; name it *.safetensors.')


def save_single_file(pipe, path: str, dtype: torch.dtype = torch.float16,
                     metadata: Optional[Dict[str, str]] = None) -> str:
    """Write ``pipe`` as one ``.safetensors`` checkpoint (fp16 by default: 2 GB for SD1.5, as the usual
    ``-fp16`` files). Written under a temporary name and renamed, so a kill never leaves half a file."""
    check_output_path(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return save_safetensors(pipeline_to_ldm(pipe, dtype), path, metadata)
