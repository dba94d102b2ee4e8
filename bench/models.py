"""Models for benchmarks: SD1.5's exact architecture with random weights (same compute as the real
weights, which cannot be downloaded here), or the tiny test model for a CPU dry run."""

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'tests'))

# SD1.5's published component configs (runwayml/stable-diffusion-v1-5): the numbers that set the compute.
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                 down_block_types=('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',),
                 up_block_types=('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3, norm_num_groups=32)
SD15_VAE = dict(sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                block_out_channels=(128, 256, 512, 512), down_block_types=('DownEncoderBlock2D',) * 4,
                up_block_types=('UpDecoderBlock2D',) * 4, norm_num_groups=32)
SD15_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=77, hidden_act='quick_gelu', projection_dim=768,
                 bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)


def build_components(tiny: bool, device: str, seed: int = 0):
    """unet, vae, text_encoder, tokenizer, scheduler (PNDM) as a dict, weights created on ``device``."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from tiny_sd import SD15_SCHEDULER_CONFIG, tiny_components, tiny_tokenizer
    if tiny:
        with tempfile.TemporaryDirectory(prefix='bench_tok_') as workdir:  # the tokenizer reads its files once
            parts = tiny_components(workdir, seed=seed, safety_checker=False)
        return {k: v for k, v in parts.items() if v is not None}
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    # byte-level tokenizer: CLIP's 49k vocabulary is not available offline; ids stay inside the embedding
    with tempfile.TemporaryDirectory(prefix='bench_tok_') as workdir:
        tokenizer = tiny_tokenizer(workdir)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                scheduler=PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG))


def environment() -> dict:
    import diffusers
    info = {'torch': torch.__version__, 'diffusers': diffusers.__version__}
    if torch.cuda.is_available():
        info['device'] = torch.cuda.get_device_name(0)
    else:
        info['device'] = 'cpu'
    return info
