"""Attention kernels at SD1.5's shapes: which SDPA backend is fastest on this card, and what one UNet step's
attention costs with each. Seconds of device time, no compilation: it says whether a Hopper attention
kernel (cuDNN) would pay before anyone spends a compile on it.

    python bench/bench_attention.py                      # fp16 on the GPU, CFG batch 2
    python bench/bench_attention.py --device cpu         # dry run

One UNet step of SD1.5 at 512x512 runs 16 transformer blocks, each with a self-attention over the latent
pixels and a cross-attention over the 77 text tokens (8 heads; head size 40/80/160 at 64/32/16 pixels a side).
Each backend's output is compared with the math backend in fp32; 'default' is what SDPA picks by itself.
"""

import argparse
import contextlib
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from bench.models import environment  # noqa: E402

HEADS, TEXT_TOKENS = 8, 77
# (latent side, channels, transformer blocks at that size in one UNet call): down 2+2+2, mid 1, up 3+3+3
LEVELS = ((64, 320, 5), (32, 640, 5), (16, 1280, 5), (8, 1280, 1))
BACKENDS = {'default': None, 'flash': SDPBackend.FLASH_ATTENTION, 'efficient': SDPBackend.EFFICIENT_ATTENTION,
            'cudnn': SDPBackend.CUDNN_ATTENTION, 'math': SDPBackend.MATH}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--batch', type=int, default=2, help='UNet batch: 2 for one image with CFG')
    parser.add_argument('--repeats', type=int, default=50)
    parser.add_argument('--out', default=None)
    return parser.parse_args(argv)


def shapes(batch):
    """(name, q shape, kv shape, calls per UNet step)."""
    for side, channels, blocks in LEVELS:
        tokens, head = side * side, channels // HEADS
        yield f'self {side}x{side} d{head}', (batch, HEADS, tokens, head), (batch, HEADS, tokens, head), blocks
        yield f'cross {side}x{side} d{head}', (batch, HEADS, tokens, head), (batch, HEADS, TEXT_TOKENS, head), blocks


def time_call(fn, device, repeats):
    fn()
    if device.startswith('cuda'):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) * 1e3 / repeats


def main(argv=None):
    args = parse_args(argv)
    dtype = torch.float16 if args.device.startswith('cuda') else torch.float32
    rows = [{'name': 'environment', **environment(), 'dtype': str(dtype), 'batch': args.batch}]
    per_step = {name: 0.0 for name in BACKENDS}
    generator = torch.Generator(args.device).manual_seed(0)
    for label, q_shape, kv_shape, calls in shapes(args.batch):
        q = torch.randn(q_shape, device=args.device, dtype=dtype, generator=generator)
        k, v = (torch.randn(kv_shape, device=args.device, dtype=dtype, generator=generator) for _ in range(2))
        with sdpa_kernel(SDPBackend.MATH):
            reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        row = {'name': label, 'calls_per_unet_step': calls}
        for name, backend in BACKENDS.items():
            try:
                with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
                    out = F.scaled_dot_product_attention(q, k, v)
                    ms = time_call(lambda: F.scaled_dot_product_attention(q, k, v), args.device, args.repeats)
            except RuntimeError as err:  # this backend does not take this shape, dtype or card
                row[name] = f'unavailable: {str(err).splitlines()[0][:80]}'
                per_step[name] = None
                continue
            row[name] = {'ms': round(ms, 4), 'max_abs_err': round(float((out.float() - reference).abs().max()), 5)}
            if per_step[name] is not None:
                per_step[name] += ms * calls
        rows.append(row)
    rows.append({'name': 'attention ms per UNet step (sum over its 32 calls)',
                 **{k: (round(v, 3) if v is not None else 'unavailable for some shape') for k, v in per_step.items()}})
    for row in rows:
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, 'a') as f:
                f.write(json.dumps(row) + '\n')
    return rows


if __name__ == '__main__':
    main()
