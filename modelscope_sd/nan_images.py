"""Black (NaN) images, handled as A1111 handles them. Some VAEs overflow in fp16 (NovelAI's, baked into many anime
models), and diffusers then returns black images with no more than numpy's "invalid value encountered in cast". A
decode that gives NaN runs again in fp32, and later ones go there directly: A1111's "Automatically revert VAE to
32-bit floats". NaN latents (the UNet overflowed, or an adapter holds NaN) no VAE mends: a warning says how many
images they made and what to change."""

import logging

import torch

logger = logging.getLogger(__name__)


class CheckedDecode:
    """``vae.decode`` that checks its images. Every decode goes through it: diffusers' loop, the fast path and the
    hires fix's pixel upscalers all call ``vae.decode``."""

    def __init__(self, vae):
        self.vae, self.decode, self.fp32 = vae, vae.decode, None

    def __call__(self, z: torch.Tensor, return_dict: bool = True, generator=None):
        images = self._decode(z, generator)
        finite = _finite(images)
        if not bool(finite.all()):  # one host sync, as the images are read back anyway
            from_vae = ~finite & _finite(z)
            if self.fp32 is None and self.vae.dtype == torch.float16 and bool(from_vae.any()):
                logger.warning('The VAE decoded NaN (black) images in fp16, as some VAEs do (NovelAI\'s, and models '
                               'that carry it): decoding in fp32 from now on, as A1111 does. A VAE made for fp16 '
                               "(vae=...) or torch_dtype='bf16' keeps the faster decode.")
                self.fp32 = _fp32_copy(self.vae, z.device)  # z's: under model offload the VAE waits on the CPU
                images = self._decode(z, generator)
                finite = _finite(images)
                from_vae = ~finite & _finite(z)
            _warn(int((~finite & ~from_vae).sum()), int(from_vae.sum()), len(images), z.dtype)
            # black, as such images came out before, but on every platform (a NaN's cast to uint8 is undefined) and
            # without numpy's warning in the safety checker
            images = torch.nan_to_num(images, nan=-1.0, posinf=1.0, neginf=-1.0)
        if not return_dict:
            return (images,)
        from diffusers.models.autoencoders.vae import DecoderOutput
        return DecoderOutput(sample=images)

    def _decode(self, z: torch.Tensor, generator) -> torch.Tensor:
        if self.fp32 is None:
            return self.decode(z, return_dict=False, generator=generator)[0]
        self.fp32.use_slicing, self.fp32.use_tiling = self.vae.use_slicing, self.vae.use_tiling  # pipe.sd.vae's
        return self.fp32.decode(z.to(torch.float32), return_dict=False, generator=generator)[0].to(z.dtype)


def check_decodes(vae) -> None:
    """Route ``vae``'s decodes through `CheckedDecode` (once: a pipeline built again on the same VAE, as the
    trainers' validation does, keeps the one there is)."""
    if not isinstance(vae.decode, CheckedDecode):
        vae.decode = CheckedDecode(vae)


def _fp32_copy(vae, device: torch.device):
    """An eager fp32 copy of ``vae`` on ``device`` for decoding (the fast path compiles the fp16 VAE's decoder in
    place)."""
    copy = type(vae).from_config(vae.config)
    copy.load_state_dict(vae.state_dict())
    return torch.nn.Module.to(copy, device, torch.float32).eval()  # torch's to(): diffusers' warns on casts


def _finite(batch: torch.Tensor) -> torch.Tensor:
    """Per item of ``batch``: whether all its values are finite."""
    return torch.isfinite(batch).flatten(1).all(1)


def _warn(from_latents: int, from_vae: int, count: int, dtype: torch.dtype) -> None:
    dtype = str(dtype).replace('torch.', '')
    if from_latents:
        fix = ("the UNet overflowed, or an adapter or embedding holds NaN. Load the pipeline with torch_dtype='bf16' "
               "(fp32's range) or 'fp32', or check the adapters" if dtype == 'float16' else
               'an adapter or embedding holds NaN, or weights that large: check them')
        logger.warning('%d of the %d image(s) came out NaN (black): their latents were NaN or inf after denoising in '
                       '%s (%s).', from_latents, count, dtype, fix)
    if from_vae:
        logger.warning('%d of the %d image(s) came out NaN (black) from finite latents: the VAE gave NaN in %s (its '
                       'weights may hold NaN). Try another VAE with vae=....', from_vae, count, dtype)
