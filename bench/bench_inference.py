"""Inference benchmark: our pipeline (plain and fast=True) against vanilla diffusers, in one run on one card.

    python bench/bench_inference.py                       # SD1.5 architecture, fp16, 512x512, 50 PNDM steps, CFG 7.5
    python bench/bench_inference.py --device cpu --tiny   # dry run of the script on the tiny model

Prints one JSON line per measurement and a table; batch-1 latency is the median of --repeats calls.
"""

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from bench.models import build_components, environment  # noqa: E402
from bench.profiling import device_profile, timed, trace_path  # noqa: E402

PROMPT = 'a photo of an astronaut riding a horse on mars'


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--tiny', action='store_true', help='tiny random model (CPU dry run)')
    parser.add_argument('--steps', type=int, default=50)
    parser.add_argument('--batch', type=int, default=4, help='images per call for the throughput number')
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--compile_mode', default='reduce-overhead')
    parser.add_argument('--sdpa_backend', choices=('default', 'cudnn', 'flash', 'efficient'), default='default',
                        help='attention kernel tried first in the fast runs (default: the one SDPA picks)')
    parser.add_argument('--static_shapes', action='store_true',
                        help="torch._dynamo.config.automatic_dynamic_shapes=False: the batch-4 call compiles kernels for "
                             "its own shapes, not shape-generic ones (the H200 run of 2026-11-27 ran shape-generic)")
    parser.add_argument('--cudnn_benchmark', action='store_true',
                        help='torch.backends.cudnn.benchmark=True for the fast runs: cuDNN times its convolution '
                             'algorithms at the first call of each shape instead of picking by heuristics')
    parser.add_argument('--cfg_cutoff', type=float, default=None,
                        help="also time fast=True with diffusers' SDCFGCutoffCallback(cutoff_step_ratio=this) (lossy: "
                             'no guidance after that share of the steps) and compare its image with the guided one')
    parser.add_argument('--skip_fast', action='store_true')
    parser.add_argument('--skip_plain', action='store_true', help='skip our plain (uncompiled) pipeline')
    parser.add_argument('--compare_loops', action='store_true',
                        help="also time fast=True through diffusers' loop over the compiled UNet (compiles again)")
    parser.add_argument('--second_start', action='store_true',
                        help='also time a fresh process to its first fast image with the warm compile cache')
    parser.add_argument('--precompile', action='store_true',
                        help='fast=True with precompile=True (compiled functions kept whole on disk), the second start '
                             'too: it then loads them instead of tracing the model again')
    parser.add_argument('--profile', action='store_true',
                        help='also profile one batch-1 call of vanilla and of fast: where the device time goes')
    parser.add_argument('--profile_steps', type=int, default=10, help='denoising steps in the profiled calls')
    parser.add_argument('--trace_dir', default=None,
                        help="also write each profiled call's timeline to this folder (gzipped Chrome traces)")
    parser.add_argument('--out', default=None, help='also append the JSON lines to this file')
    return parser.parse_args(argv)


def measure(name, run, args, results, batched=True):
    """First call (warm-up/compile), then the median of batch-1 calls, then (``batched``) one batched call."""
    if args.device.startswith('cuda'):
        torch.cuda.reset_peak_memory_stats()
    warmup, first = timed(lambda: run(1, 0), args.device)
    latencies = [timed(lambda: run(1, 0), args.device)[0] for _ in range(args.repeats)]
    row = {'name': name, 'first_call_s': round(warmup, 3), 's_per_image_batch1': round(statistics.median(latencies), 4),
           'it_per_s_batch1': round(args.steps / statistics.median(latencies), 2)}
    row.update(throughput(run, args) if batched else peak_memory(args))
    emit(row, args, results)
    return first


def throughput(run, args):
    """One batched call to warm up (a new batch size compiles again on the fast path), then one timed."""
    batch_warmup, _ = timed(lambda: run(args.batch, 1), args.device)
    batch_time, _ = timed(lambda: run(args.batch, 1), args.device)
    return {'batch': args.batch, 'batch_first_call_s': round(batch_warmup, 3),
            'images_per_s_batched': round(args.batch / batch_time, 3), **peak_memory(args)}


def peak_memory(args):
    """The device's peak allocation so far, on CUDA."""
    if not args.device.startswith('cuda'):
        return {}
    return {'peak_mem_gib': round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def emit(row, args, results):
    results.append(row)
    line = json.dumps(row)
    print(line, flush=True)
    if args.out:
        with open(args.out, 'a') as f:
            f.write(line + '\n')


def compare(reference, image):
    diff = np.abs(reference.astype(np.float64) - image.astype(np.float64))
    mse = float((diff ** 2).mean())
    return {'max_abs_pixel_diff_0_255': float(diff.max()), 'mean_abs_pixel_diff_0_255': round(float(diff.mean()), 4),
            'psnr_db': round(10 * np.log10(255 ** 2 / mse), 2) if mse else float('inf')}


def main(argv=None):
    args = parse_args(argv)
    from diffusers import StableDiffusionPipeline
    from diffusers.image_processor import VaeImageProcessor

    from modelscope_sd import StableDiffusionText2ImagePipeline
    results = []
    emit({'name': 'environment', **environment(), 'steps': args.steps, 'tiny': args.tiny}, args, results)
    dtype = torch.float16 if args.device.startswith('cuda') else torch.float32
    components = build_components(args.tiny, args.device)
    vanilla = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).to(args.device, dtype)
    vanilla.set_progress_bar_config(disable=True)

    def run_vanilla(n, seed):
        gens = [torch.Generator('cpu').manual_seed(seed + i) for i in range(n)]
        images = vanilla([PROMPT] * n, num_inference_steps=args.steps, generator=gens, output_type='np').images
        # diffusers' own host path, as its users get pictures (its numpy_to_pil), in OpenCV's channel order
        return [np.ascontiguousarray(np.asarray(image)[..., ::-1]) for image in VaeImageProcessor.numpy_to_pil(images)]

    reference = measure('vanilla diffusers', run_vanilla, args, results)[0]
    if args.profile:
        emit(profile('vanilla diffusers', vanilla, args), args, results)

    # ours, plain: the registered pipeline class over the same weights
    ours = StableDiffusionText2ImagePipeline(vanilla, device=args.device, torch_dtype=dtype, progress_bar=False)

    def run_ours(n, seed):
        return ours([PROMPT] * n, num_inference_steps=args.steps, seed=seed)['output_imgs']

    if not args.skip_plain:
        plain = measure('ours', run_ours, args, results)[0]
        emit({'name': 'ours vs vanilla, same seed', **compare(reference, plain)}, args, results)
    if args.static_shapes:
        torch._dynamo.config.automatic_dynamic_shapes = False
    torch.backends.cudnn.benchmark = args.cudnn_benchmark  # vanilla has run by now, with the default
    if not args.skip_fast:
        # fast=True changes the modules in place (fused QKV, compiled forward): vanilla is done by now
        fast = StableDiffusionText2ImagePipeline(vanilla, device=args.device, torch_dtype=dtype, progress_bar=False,
                                                 fast=True, compile_mode=args.compile_mode, precompile=args.precompile)

        def run_fast(n, seed):
            with attention_backend(args.sdpa_backend):
                return fast([PROMPT] * n, num_inference_steps=args.steps, seed=seed)['output_imgs']

        label = (f'ours fast=True ({args.compile_mode}' + (', static shapes' if args.static_shapes else '')
                 + (', precompile=True' if args.precompile else '')
                 + (', cuDNN benchmark' if args.cudnn_benchmark else '')
                 + (f', SDPA {args.sdpa_backend} first)' if args.sdpa_backend != 'default' else ')'))
        # batch 1 first, its batched call last: that call compiles again (over a minute on an H200), and a GPU
        # session's time limit must not cut the second start and the cutoff rows, which reuse batch 1's graphs
        try:
            image = measure(label, run_fast, args, results, batched=False)[0]
        except Exception as error:  # one GPU session per task: keep the error, then time the UNet-only fallback
            emit({'name': label, 'error': f'{type(error).__name__}: {error}'[-2000:]}, args, results)
            if args.compare_loops:
                raise
            fast.denoiser = None
            label = "ours fast=True, diffusers' loop over the compiled UNet (whole-step loop failed)"
            image = measure(label, run_fast, args, results, batched=False)[0]
        emit({'name': 'ours fast vs vanilla, same seed', **compare(reference, image)}, args, results)
        if args.profile:
            with attention_backend(args.sdpa_backend):
                emit(profile(label, fast, args), args, results)
        for scheduler in ('dpm++_2m_karras', 'euler_a'):
            with attention_backend(args.sdpa_backend):
                seconds, _ = timed(lambda: fast(PROMPT, num_inference_steps=args.steps, seed=0, scheduler=scheduler),
                                   args.device)
            emit({'name': f'ours fast, scheduler {scheduler}, call after switching', 's': round(seconds, 3)},
                 args, results)
        if args.second_start:
            emit(second_start(args), args, results)
        if args.cfg_cutoff is not None:
            from diffusers.callbacks import SDCFGCutoffCallback
            cutoff = SDCFGCutoffCallback(cutoff_step_ratio=args.cfg_cutoff)

            def run_cutoff(n, seed):
                with attention_backend(args.sdpa_backend):
                    return fast([PROMPT] * n, num_inference_steps=args.steps, seed=seed,
                                callback_on_step_end=cutoff)['output_imgs']

            # batch 1 only: a batched call would compile its unguided step too
            cut = measure(f'ours fast=True + SDCFGCutoffCallback({args.cfg_cutoff}), lossy', run_cutoff, args, results,
                          batched=False)
            emit({'name': f'cutoff {args.cfg_cutoff} vs guided fast, same seed (a difference, not a quality score)',
                  **compare(image, cut[0])}, args, results)
        emit({'name': label, **throughput(run_fast, args)}, args, results)
        if args.compare_loops and fast.denoiser is not None:
            # the same compiled UNet without the whole-step loop: scheduler and CFG math outside the graph
            fast.denoiser = None
            image = measure("ours fast=True, diffusers' loop over the compiled UNet", run_fast, args, results)[0]
            emit({'name': "ours fast (diffusers' loop) vs vanilla, same seed", **compare(reference, image)},
                 args, results)
    print_table(results)
    return results


def attention_backend(name):
    """SDPA tries ``name``'s kernel first, the others after it where that one does not take a shape."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    if name == 'default':
        return contextlib.nullcontext()
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    first = {'cudnn': SDPBackend.CUDNN_ATTENTION, 'flash': SDPBackend.FLASH_ATTENTION,
             'efficient': SDPBackend.EFFICIENT_ATTENTION}[name]
    return sdpa_kernel([first] + [b for b in order if b != first], set_priority=True)


def profile(name, pipe, args):
    """One batch-1 call of ``pipe`` (vanilla or ours) with --profile_steps steps, profiled."""
    if hasattr(pipe, 'denoiser'):
        def call():
            return pipe(PROMPT, num_inference_steps=args.profile_steps, seed=0)
    else:
        def call():
            return pipe(PROMPT, num_inference_steps=args.profile_steps, output_type='np')
    call()  # the step count may be new to this pipeline: keep its one-time work out of the profile
    return {**device_profile(name, call, args.device, trace=trace_path(args.trace_dir, name)),
            'steps': args.profile_steps}


SECOND_START = '''
import json, time
clock = [('python', time.time())]
import torch, sys
clock.append(('import torch', time.time()))
start = time.perf_counter()
sys.path.insert(0, {root!r})
from bench.models import build_components
from diffusers import StableDiffusionPipeline
from modelscope_sd import StableDiffusionText2ImagePipeline
clock.append(('import diffusers, modelscope_sd', time.time()))
parts = build_components({tiny}, {device!r})
pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
clock.append(('build the weights', time.time()))
fast = StableDiffusionText2ImagePipeline(pipe, device={device!r}, torch_dtype=torch.{dtype}, progress_bar=False,
                                         fast=True, compile_mode={mode!r}, precompile={precompile})
clock.append(('fast=True pipeline', time.time()))
fast({prompt!r}, num_inference_steps={steps}, seed=0)
clock.append(('first call', time.time()))
print('SECOND_START', time.perf_counter() - start, time.time())
# seconds per phase, and dynamo's and inductor's own time inside the first call (tracing, cache loads, compiling)
phases = {{name: round(t - clock[i][1], 2) for i, (name, t) in enumerate(clock[1:])}}
compile_s = {{key: round(sum(times), 2) for key, times in torch._dynamo.utils.compilation_time_metrics.items()}}
print('PHASES', json.dumps({{'phases_s': phases, 'compile_s': compile_s}}))
'''


def second_start(args):
    """A new process, same compile cache: seconds from interpreter start to the first fast image."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
    dtype = 'float16' if args.device.startswith('cuda') else 'float32'
    code = SECOND_START.format(root=root, tiny=args.tiny, device=args.device, mode=args.compile_mode, dtype=dtype,
                               prompt=PROMPT, steps=args.steps, precompile=args.precompile)
    started, start = time.time(), time.perf_counter()
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=400)
    total = time.perf_counter() - start
    inner = [line.split() for line in out.stdout.splitlines() if line.startswith('SECOND_START')]
    phases = [json.loads(line[len('PHASES '):]) for line in out.stdout.splitlines() if line.startswith('PHASES ')]
    name = 'second start, warm compile cache' + (', precompile=True' if args.precompile else '')
    return {'name': name, 'process_s': round(total, 2),
            # from the process's start to its first image (the wall clock, same machine), its exit left out
            'first_image_s': round(float(inner[0][2]) - started, 2) if inner else None,
            'script_s': round(float(inner[0][1]), 2) if inner else None, **(phases[0] if phases else {}),
            'ok': out.returncode == 0, 'stderr_tail': out.stderr[-400:] if out.returncode else ''}


def print_table(results):
    print('\n| run | first call s | s/image (batch 1) | it/s | images/s (batched) | peak GiB |')
    print('|---|---|---|---|---|---|')
    for row in results:
        if 's_per_image_batch1' in row or 'images_per_s_batched' in row:
            batched = f"{row['images_per_s_batched']} (batch {row['batch']})" if 'batch' in row else '-'
            print(f"| {row['name']} | {row.get('first_call_s', '-')} | {row.get('s_per_image_batch1', '-')} | "
                  f"{row.get('it_per_s_batch1', '-')} | {batched} | {row.get('peak_mem_gib', '-')} |")
    for row in results:
        if {'psnr_db', 'process_s', 'busy_ms_by_kind', 'error'} & row.keys():
            print(row)


if __name__ == '__main__':
    main()
