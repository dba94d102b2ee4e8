"""Timing a call on a device, and where its device time goes: wall time against the time the device was busy
(the rest is launch and host overhead), that busy time by kernel family, and the kernels that take most of it."""

import re
import time

import torch

# Kernel families by name, first match wins: cuDNN convolution kernels also say "gemm", fused attention says "mha".
KERNEL_KINDS = (('attention', r'flash|fmha|mha|attention|sdpa'), ('convolution', r'conv|fprop|dgrad|wgrad'),
                ('matmul', r'gemm|matmul|\bmm\b|addmm|nvjet|cutlass|linear'), ('normalization', r'norm'),
                ('memory copy', r'memcpy|memset|copy_|to_copy'))


def sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def timed(fn, device: str):
    """(seconds, result) of ``fn()``, with the device's queued work finished on both sides."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def device_profile(name: str, call, device: str) -> dict:
    """Profile ``call()`` once (run it once before, so one-time work stays out). A profiler failure (CUPTI and
    CUDA graphs do not always agree) becomes the row's 'error': the benchmark's timings around it stay."""
    try:
        return {'name': f'profile {name}', **_summary(call, device)}
    except Exception as err:  # noqa: BLE001 - reported in the results, not swallowed
        return {'name': f'profile {name}', 'error': repr(err)[:400]}


def _summary(call, device: str) -> dict:
    from torch.profiler import ProfilerActivity, profile
    cuda = device.startswith('cuda')
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        wall_ms = timed(call, device)[0] * 1e3
    # on the GPU the kernels are the device work; on the CPU the aten ops' own time stands in for it
    events = [e for e in prof.key_averages() if e.self_device_time_total > 0] if cuda else \
        [e for e in prof.key_averages() if e.key.startswith('aten::') and e.self_cpu_time_total > 0]
    busy = {e.key: ((e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3, e.count) for e in events}
    by_kind = {}
    for key, (ms, _) in busy.items():
        kind = next((k for k, pattern in KERNEL_KINDS if re.search(pattern, key, re.IGNORECASE)), 'other')
        by_kind[kind] = round(by_kind.get(kind, 0.0) + ms, 2)
    total = sum(ms for ms, _ in busy.values())
    top = sorted(busy.items(), key=lambda item: -item[1][0])[:10]
    return {'wall_ms': round(wall_ms, 2), 'device_busy_ms': round(total, 2),
            'busy_fraction': round(total / wall_ms, 3),
            'busy_ms_by_kind': dict(sorted(by_kind.items(), key=lambda item: -item[1])),
            'top': [[key[:90], round(ms, 2), count] for key, (ms, count) in top]}
