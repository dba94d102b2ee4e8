"""Peak memory of one full-UNet DreamBooth step, counted on the CPU: will it fit a 12 GiB card?

    python bench/estimate_training_memory.py --optimizer adamw8bit     # SD1.5 UNet, 512x512, batch 1
    python bench/estimate_training_memory.py --optimizer vanilla       # diffusers' example: foreach AdamW
    python bench/estimate_training_memory.py --fused_backward_pass     # ours, stepping in backward
    python bench/estimate_training_memory.py --full_bf16               # ours, bf16 weights, stochastic rounding
    python bench/estimate_training_memory.py --tiny                    # dry run on the tiny model

The step is our trainer's (bf16 autocast over fp32 weights, loss, backward, gradient clipping, the optimizer
from `finetune.training.make_optimizer`), run on the CPU under torch's MemTracker, which counts every tensor
it allocates by kind: parameters, gradients, activations, temporaries, optimizer state. That is what
`torch.cuda.max_memory_allocated` reports on a GPU, less the allocator's rounding and cuDNN workspaces, so it
is an estimate, not a measurement. The frozen VAE and text encoder (bf16 on the card) are added from their
sizes. A first untracked step creates the optimizer state, so the tracked step is a steady-state one.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from typing import Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from bench.models import build_components  # noqa: E402

OPTIMIZERS = ('vanilla', 'adamw', 'adafactor', 'adamw8bit')


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--optimizer', choices=OPTIMIZERS, default='adamw',
                        help="vanilla: torch's AdamW as diffusers' example runs it (foreach on a GPU); adamw: "
                             'ours (fused); adafactor; adamw8bit: --use_8bit_adam')
    parser.add_argument('--gradient_checkpointing', action='store_true')
    parser.add_argument('--fused_backward_pass', action='store_true',
                        help='the optimizer steps in groups during backward (finetune/fused_backward.py)')
    parser.add_argument('--full_bf16', action='store_true',
                        help='bf16 weights and gradients, stepped by finetune/stochastic_adamw.py (--optimizer adamw)')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--tiny', action='store_true')
    return parser.parse_args(argv)


def make_step(parts, optimizer, batch: int, in_backward=None, autocast_cache: bool = True):
    """One step as train_loop runs it with cached latents and embeddings: the trainer's own loss, backward,
    gradient clipping, optimizer step (``in_backward``: a `finetune.fused_backward.OptimizerInBackward` that
    clips and steps during backward instead)."""
    from diffusers import DDPMScheduler

    from finetune.diffusion import denoising_loss
    unet = parts['unet']
    params = [p for p in unet.parameters() if p.requires_grad]
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')
    size = unet.config.sample_size

    def step():
        cached = {'latent_params': torch.randn(batch, 2 * unet.config.in_channels, size, size),
                  'encoder_hidden_states': torch.randn(batch, 77, unet.config.cross_attention_dim)}
        with torch.autocast('cpu', dtype=torch.bfloat16, cache_enabled=autocast_cache):
            loss = denoising_loss(unet, parts['text_encoder'], parts['vae'], scheduler, cached).mean()
        loss.backward()
        if in_backward is not None:
            in_backward.flush()
            return
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def make_optimizer_for(name: str, params, full_bf16: bool = False):
    if name == 'vanilla':  # on a GPU torch's AdamW defaults to foreach; on the CPU to a per-tensor loop
        return torch.optim.AdamW(params, lr=1e-6, foreach=True)
    from finetune.config import DreamBoothConfig
    from finetune.training import make_optimizer
    with tempfile.TemporaryDirectory(prefix='estimate_') as folder:  # the config checks that the folders exist
        config = DreamBoothConfig(pretrained_model_name_or_path=folder, output_dir=f'{folder}-out',
                                  instance_data_dir=folder,
                                  instance_prompt='a photo of sks thing', optimizer='adafactor' if name == 'adafactor'
                                  else 'adamw', use_8bit_adam=name == 'adamw8bit', full_bf16=full_bf16)
    # the device only decides fused AdamW, which is what the trainer runs on a GPU
    return make_optimizer(config, params, torch.device('cuda' if name == 'adamw' else 'cpu'), 1e-6)


def estimate(optimizer: str, gradient_checkpointing: bool = False, batch: int = 1, tiny: bool = False,
             fused_backward_pass: bool = False, group_bytes: Optional[int] = None,
             autocast_cache: Optional[bool] = None, full_bf16: bool = False) -> dict:
    """``group_bytes``: with ``fused_backward_pass``, the gradients per optimizer call (default: the trainer's);
    ``autocast_cache``: autocast's cache of cast weights (default: the trainer's, off with gradient checkpointing)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from finetune.fused_backward import OptimizerInBackward
    parts = build_components(tiny, 'cpu')
    unet = parts['unet'].train().requires_grad_(True)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if full_bf16:
        torch.nn.Module.to(unet, dtype=torch.bfloat16)  # not diffusers' to(), which warns
    frozen = sum(p.numel() * 2 for name in ('vae', 'text_encoder') for p in parts[name].parameters())
    opt = make_optimizer_for(optimizer, list(unet.parameters()), full_bf16)
    in_backward = (OptimizerInBackward(opt, unet.parameters(), 1.0, group_bytes) if fused_backward_pass
                   else contextlib.nullcontext())
    start = time.perf_counter()
    with in_backward:
        # the trainer turns autocast's weight cache off with gradient checkpointing (finetune.training.make_accelerator)
        step = make_step(parts, opt, batch, in_backward if fused_backward_pass else None,
                         autocast_cache=not gradient_checkpointing if autocast_cache is None else autocast_cache)
        step()
        tracker = MemTracker()
        tracker.track_external(unet, opt)
        with tracker, warnings.catch_warnings():
            # its gradient hook runs after ours, which may have stepped and freed the gradient: it warns of the None,
            # and that gradient's bytes count under the kind they were allocated as
            warnings.filterwarnings('ignore', 'Expected a tensor or a traceable wrapper-subclass')
            step()
    peak = tracker.get_tracker_snapshot('peak')[torch.device('cpu')]
    by_kind = {str(kind).split('.')[-1].lower(): round(nbytes / 2**30, 4) for kind, nbytes in peak.items()
               if nbytes and str(kind) != 'Total'}
    return {'optimizer': optimizer, 'gradient_checkpointing': gradient_checkpointing, 'batch': batch,
            'fused_backward_pass': fused_backward_pass, 'full_bf16': full_bf16,
            'group_mib': in_backward.group_bytes / 2**20 if fused_backward_pass else None,
            'model': 'tiny' if tiny else 'SD1.5 UNet, 512x512', 'step_peak_gib_by_kind': by_kind,
            'frozen_vae_text_encoder_gib': round(frozen / 2**30, 3),
            'estimated_peak_gib': round((peak['Total'] + frozen) / 2**30, 2),
            'cpu_s': round(time.perf_counter() - start, 1)}


def main(argv=None):
    args = parse_args(argv)
    row = estimate(args.optimizer, args.gradient_checkpointing, args.batch, args.tiny, args.fused_backward_pass,
                   full_bf16=args.full_bf16)
    print(json.dumps(row), flush=True)
    return row


if __name__ == '__main__':
    main()
