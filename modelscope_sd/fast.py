"""Opt-in fast inference on CUDA: fused QKV projections, channels_last, SDPA attention, and the UNet and
VAE decoder compiled by torch.compile with CUDA graphs; inductor's caches kept on disk so a second start
reuses the compiled kernels."""

import logging
import os

import torch

logger = logging.getLogger(__name__)

COMPILE_MODES = ('reduce-overhead', 'max-autotune', 'max-autotune-no-cudagraphs', 'default')


def _configure_inductor(cache_dir: str) -> None:
    # 1x1 convolutions as matmuls (diffusers' torch.compile guide). Its coordinate-descent kernel tuning is
    # left off: on an H200 it kept the first SD1.5 compile running past 5 minutes.
    import torch._inductor.config as inductor
    inductor.conv_1x1_as_mm = True
    inductor.fx_graph_cache = True
    os.environ.setdefault('TORCHINDUCTOR_CACHE_DIR', cache_dir)
    os.environ.setdefault('TORCHINDUCTOR_FX_GRAPH_CACHE', '1')
    os.environ.setdefault('TORCHINDUCTOR_AUTOGRAD_CACHE', '1')


def _compile_keeping_outputs(module: torch.nn.Module, mode: str) -> None:
    """Compile ``module.forward`` in place. With CUDA graphs an output lives in memory the next replay
    overwrites; multistep schedulers (PNDM, DPM++, UniPC) keep earlier outputs, so each one is copied out
    (a few hundred KB per step)."""
    compiled = torch.compile(module.forward, mode=mode, fullgraph=True)

    def forward(sample, timestep, *args, **kwargs):
        # schedulers hand over int64 (PNDM, DDIM, DPM++) or float32 (Euler, LMS) timesteps; the UNet turns
        # them into float32 anyway, so one dtype means one compiled graph for every scheduler
        if torch.is_tensor(timestep):
            timestep = timestep.to(torch.float32)
        out = compiled(sample, timestep, *args, **kwargs)
        if isinstance(out, tuple):
            return tuple(o.clone() if torch.is_tensor(o) else o for o in out)
        if hasattr(out, 'sample'):
            out.sample = out.sample.clone()
        return out

    module.forward = forward


def enable_fast_inference(pipe, compile_mode: str = 'reduce-overhead', cache_dir: str = None):
    """Apply the fast path to a diffusers ``StableDiffusionPipeline`` on CUDA, in place."""
    if pipe.device.type != 'cuda':
        raise ValueError(f'fast=True needs a CUDA device; this pipeline is on {pipe.device}. '
                         "Pass device='gpu' on a machine with CUDA, or leave fast off.")
    if compile_mode not in COMPILE_MODES:
        raise ValueError(f'compile_mode={compile_mode!r} is not one of {COMPILE_MODES}.')
    _configure_inductor(cache_dir or os.path.join(os.path.expanduser('~'), '.cache', 'modelscope_sd', 'inductor'))
    pipe.fuse_qkv_projections()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    _compile_keeping_outputs(pipe.unet, compile_mode)
    pipe.vae.decoder.forward = torch.compile(pipe.vae.decoder.forward, mode=compile_mode, fullgraph=True)
    logger.info('Fast path on: fused QKV, channels_last, torch.compile(mode=%r) of UNet and VAE decoder. '
                'The first call per image size and batch compiles (a minute or more).', compile_mode)
    return pipe
