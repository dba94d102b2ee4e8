"""Timing a call on a device, and where its device time goes: wall time against the time the device was busy
(the rest is launch and host overhead), that busy time by kernel family, and the kernels that take most of it."""

import os
import re
import time

import torch

# Kernel families by name, first match wins: cuDNN convolution kernels also say "gemm", fused attention says "mha".
KERNEL_KINDS = (('attention', r'flash|fmha|mha|attention|sdpa'), ('convolution', r'conv|fprop|dgrad|wgrad'),
                ('matmul', r'gemm|matmul|\bmm\b|addmm|nvjet|cutlass|linear'), ('normalization', r'norm'),
                ('memory copy', r'memcpy|memset|copy_|to_copy'))
# Where the host waits for the device: CUDA runtime syncs (an .item() or a .cpu() of a GPU tensor is one); on the CPU
# the reads of a tensor's value stand in for them
HOST_WAITS = {True: r'^cuda(Stream|Device|Event)Synchronize$', False: r'^aten::_local_scalar_dense$'}


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


def device_profile(name: str, call, device: str, baseline=None, steps: int = 1, trace: str = None) -> dict:
    """Profile ``call()`` once (run it once before, so one-time work stays out). With ``baseline`` (the same work
    with ``steps`` fewer steps, e.g. a whole training run that is shorter), the row is one step's share,
    (call - baseline) / steps, so setup that both runs do cancels. A profiler failure (CUPTI and CUDA graphs do not
    always agree) becomes the row's 'error': the benchmark's timings around it stay. ``trace``: also write
    ``call()``'s timeline there (Chrome trace format; gzipped if the name ends in .gz) to find the device's idle gaps."""
    try:
        wall_ms, busy, waits = _trace(call, device, trace)
        if baseline is not None:
            base_ms, base, base_waits = _trace(baseline, device)
            wall_ms, waits = (wall_ms - base_ms) / steps, (waits - base_waits) / steps
            busy = {key: ((ms - base.get(key, (0.0, 0))[0]) / steps, (count - base.get(key, (0.0, 0))[1]) / steps)
                    for key, (ms, count) in busy.items()}
        return {'name': f'profile {name}' + (', per step' if baseline is not None else ''), **_summary(wall_ms, busy),
                'host_waits': round(waits, 2)}
    except Exception as err:  # noqa: BLE001 - reported in the results, not swallowed
        return {'name': f'profile {name}', 'error': repr(err)[:400]}


def trace_path(folder, name):
    """A file in ``folder`` for ``name``'s trace (made of letters, digits and '-'), or None without a folder."""
    if not folder:
        return None
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-') + '.json.gz')


def _trace(call, device: str, trace: str = None):
    """(wall ms, {event: (busy ms, count)}, times the host waited for the device) of one profiled ``call()``."""
    from torch.profiler import ProfilerActivity, profile
    cuda = device.startswith('cuda')
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        wall_ms = timed(call, device)[0] * 1e3
    if trace:
        prof.export_chrome_trace(trace)
    averages = prof.key_averages()
    # on the GPU the kernels are the device work; on the CPU the aten ops' own time stands in for it
    events = [e for e in averages if e.self_device_time_total > 0] if cuda else \
        [e for e in averages if e.key.startswith('aten::') and e.self_cpu_time_total > 0]
    # less the two synchronizations of timed() itself
    waits = sum(e.count for e in averages if re.search(HOST_WAITS[cuda], e.key)) - (2 if cuda else 0)
    return wall_ms, {e.key: ((e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3, e.count)
                     for e in events}, waits


def _summary(wall_ms: float, busy: dict) -> dict:
    # '## Call CompiledFxGraph … ##' marks a compiled graph's call (a CUDA graph replay under reduce-overhead). The
    # profiler gives it the device time of the kernels it ran, and in the H200 run of 2026-11-27 listed many of those
    # kernels on their own as well (busy time above the wall time): such marks are a total of their own, not busy time.
    graphs = {key: value for key, value in busy.items() if key.startswith('## ')}
    busy = {key: value for key, value in busy.items() if key not in graphs}
    by_kind = {}
    for key, (ms, _) in busy.items():
        kind = next((k for k, pattern in KERNEL_KINDS if re.search(pattern, key, re.IGNORECASE)), 'other')
        by_kind[kind] = round(by_kind.get(kind, 0.0) + ms, 2)
    total = sum(ms for ms, _ in busy.values())
    top = sorted(busy.items(), key=lambda item: -item[1][0])[:10]
    row = {'wall_ms': round(wall_ms, 2), 'device_busy_ms': round(total, 2),
           'busy_fraction': round(total / wall_ms, 3) if wall_ms > 0 else None,
           'busy_ms_by_kind': dict(sorted(by_kind.items(), key=lambda item: -item[1])),
           'top': [[key[:90], round(ms, 2), round(count, 2)] for key, (ms, count) in top]}
    if graphs:
        row['compiled_graph_calls_ms'] = round(sum(ms for ms, _ in graphs.values()), 2)
        row['compiled_graph_calls'] = round(sum(count for _, count in graphs.values()), 2)
    return row
