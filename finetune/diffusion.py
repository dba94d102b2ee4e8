"""The denoising objective both trainers optimise: noise, timesteps, target, min-SNR weighting."""

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr

from modelscope_sd.prompts import clip_states


def encode_latents(vae, pixel_values: torch.Tensor) -> torch.Tensor:
    latents = vae.encode(pixel_values.to(vae.dtype)).latent_dist.sample()
    return latents * vae.config.scaling_factor


def sample_noise(latents: torch.Tensor, noise_offset: float) -> torch.Tensor:
    noise = torch.randn_like(latents)
    if noise_offset:
        # https://www.crosslabs.org/blog/diffusion-with-offset-noise: lets the model change mean brightness
        noise = noise + noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=latents.device,
                                                   dtype=latents.dtype)
    return noise


def training_target(scheduler, latents, noise, timesteps) -> torch.Tensor:
    prediction_type = scheduler.config.prediction_type
    if prediction_type == 'epsilon':
        return noise
    if prediction_type == 'v_prediction':
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f'Unsupported prediction_type {prediction_type!r}: use epsilon or v_prediction.')


def per_sample_loss(model_pred, target, timesteps, scheduler, snr_gamma=None) -> torch.Tensor:
    """MSE per sample; with ``snr_gamma``, min-SNR-γ weights (Hang et al. 2023)."""
    loss = F.mse_loss(model_pred.float(), target.float(), reduction='none').mean(dim=(1, 2, 3))
    if snr_gamma is None:
        return loss
    snr = compute_snr(scheduler, timesteps)
    weights = torch.minimum(snr, torch.full_like(snr, snr_gamma))
    if scheduler.config.prediction_type == 'v_prediction':
        weights = weights / (snr + 1)
    else:
        weights = weights / snr
    return loss * weights


def pipeline_clip_skip(clip_skip: Optional[int]) -> Optional[int]:
    """The trainers' --clip_skip (A1111's and kohya's count, 1: the last layer) as the pipeline's (diffusers' count,
    the layers skipped)."""
    return None if clip_skip is None or clip_skip <= 1 else clip_skip - 1


def encode_prompt_ids(text_encoder, input_ids: torch.Tensor, clip_skip: Optional[int] = None) -> torch.Tensor:
    """(B, windows × 77) token ids → (B, windows × 77, hidden): each 77-token window through CLIP on its own and
    the results side by side, as the pipeline encodes long prompts. One window is the usual encoding. ``clip_skip``
    (A1111's and kohya's count; 2: the second-to-last layer, through the final layer norm, as kohya and the
    pipeline's ``clip_skip=1`` read it)."""
    batch, length = input_ids.shape
    window = text_encoder.config.max_position_embeddings
    windows = input_ids.reshape(batch * (length // window), window)
    hidden = clip_states(text_encoder, windows, pipeline_clip_skip(clip_skip))
    return hidden.reshape(batch, length, hidden.shape[-1])


def denoising_loss(unet, text_encoder, vae, scheduler, batch, noise_offset=0.0, snr_gamma=None,
                   clip_skip=None) -> torch.Tensor:
    """One forward pass of the training objective; returns the loss of each sample in the batch. A batch
    holds images (``pixel_values``) or cached VAE posteriors (``latent_params``), and token ids
    (``input_ids``) or cached prompt embeddings (``encoder_hidden_states``)."""
    if 'latent_params' in batch:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        latents = DiagonalGaussianDistribution(batch['latent_params']).sample() * vae.config.scaling_factor
    else:
        latents = encode_latents(vae, batch['pixel_values'])
    noise = sample_noise(latents, noise_offset)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy_latents = scheduler.add_noise(latents, noise, timesteps)
    encoder_hidden_states = batch.get('encoder_hidden_states')
    if encoder_hidden_states is None:
        encoder_hidden_states = encode_prompt_ids(text_encoder, batch['input_ids'], clip_skip)
    model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
    return per_sample_loss(model_pred, training_target(scheduler, latents, noise, timesteps), timesteps,
                           scheduler, snr_gamma)
