"""Tiny random Stable Diffusion models in diffusers' layout, built in well under a second.

Same architecture family as SD1.5 (UNet with cross-attention, KL VAE, CLIP text encoder, PNDM, safety
checker), small enough to run 50 steps on a CPU in about a second. The tokenizer is byte-level: no merges,
so every prompt, Chinese included, tokenizes without a downloaded vocabulary.
"""

import json
import os

import torch

# SD1.5's scheduler_config.json, word for word: DDIM and DDPM built from it keep clip_sample off
SD15_SCHEDULER_CONFIG = {'_class_name': 'PNDMScheduler', 'beta_end': 0.012, 'beta_schedule': 'scaled_linear',
                         'beta_start': 0.00085, 'clip_sample': False, 'num_train_timesteps': 1000,
                         'set_alpha_to_one': False, 'skip_prk_steps': True, 'steps_offset': 1, 'trained_betas': None}


def _bytes_to_unicode():
    bs = list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1)) + list(range(ord('®'), ord('ÿ') + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def tiny_tokenizer(workdir: str):
    from transformers import CLIPTokenizer
    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + '</w>': i + 256 for i, c in enumerate(chars)})
    vocab.update({'<|startoftext|>': 512, '<|endoftext|>': 513})
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, 'vocab.json'), 'w') as f:
        json.dump(vocab, f)
    with open(os.path.join(workdir, 'merges.txt'), 'w') as f:
        f.write('#version: 0.2\n')
    return CLIPTokenizer(os.path.join(workdir, 'vocab.json'), os.path.join(workdir, 'merges.txt'),
                         model_max_length=77)


def tiny_components(workdir: str, seed: int = 0, safety_checker: bool = True, in_channels: int = 4):
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=in_channels, out_channels=4,
        down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'), up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(
        block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32,
        down_block_types=['DownEncoderBlock2D', 'DownEncoderBlock2D'],
        up_block_types=['UpDecoderBlock2D', 'UpDecoderBlock2D'])
    text_config = dict(bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=32, intermediate_size=37,
                       num_attention_heads=4, num_hidden_layers=2, vocab_size=514, projection_dim=32)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    # a bias, as trained CLIP has: at zero, every token's output would average 0, while A1111's emphasis rescales
    # each window to its mean
    with torch.no_grad():
        getattr(text_encoder, 'text_model', text_encoder).final_layer_norm.bias.normal_()
    scheduler = PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG)
    components = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(workdir),
                      scheduler=scheduler, safety_checker=None, feature_extractor=None)
    if safety_checker:
        vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                      image_size=32, patch_size=8, projection_dim=32)
        config = CLIPConfig(text_config=text_config, vision_config=vision, projection_dim=32)
        components['safety_checker'] = StableDiffusionSafetyChecker(config)
        components['feature_extractor'] = CLIPImageProcessor(crop_size=32, size={'shortest_edge': 32})
    return components


def build_tiny_sd(path: str, seed: int = 0, safety_checker: bool = True, configuration: bool = True,
                  sd2: bool = False) -> str:
    """Write a complete diffusers folder (plus ModelScope's configuration.json) to ``path``. ``sd2``: SD 2.x's
    differences instead: v-prediction with DDIM, linear projections and per-block head counts in the UNet."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    components = tiny_components(os.path.join(path, '.tok'), seed=seed, safety_checker=safety_checker)
    if sd2:
        unet = components['unet']
        components['unet'] = UNet2DConditionModel(**{**unet.config, 'attention_head_dim': (2, 4),
                                                     'use_linear_projection': True})
        components['scheduler'] = DDIMScheduler.from_config({**SD15_SCHEDULER_CONFIG,
                                                             'prediction_type': 'v_prediction'})
    pipe = StableDiffusionPipeline(**components, requires_safety_checker=safety_checker)
    pipe.save_pretrained(path)
    if configuration:  # as the hub repo AI-ModelScope/stable-diffusion-v1-5 has it
        from modelscope_sd.loading import write_configuration
        write_configuration(path)
    return path
