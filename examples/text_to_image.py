"""Generate images with the registered ModelScope pipeline and write PNGs that carry their settings.

    python examples/text_to_image.py --prompt '飞流直下三千尺,油画' --num_images 2 --seed 42
    python examples/text_to_image.py --prompt 'a photo of sks dog' --lora_dir work_dir/output

Each PNG is named by its seed and holds A1111-style "parameters"; `modelscope-sd generate --from_png`
re-creates it. The `modelscope-sd` command has every option; this script shows the Python API.
"""

import argparse
import os

import modelscope_sd  # noqa: F401  (registers the pipeline)
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks
from modelscope_sd import metadata


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f'{value} must be >= 1')
    return number


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--prompt', required=True)
    parser.add_argument('--model', default=modelscope_sd.DEFAULT_MODEL_ID)
    parser.add_argument('--model_revision', default=None, help='hub revision (default: v1.0.0 for the default model)')
    parser.add_argument('--num_inference_steps', type=positive_int, default=50)
    parser.add_argument('--num_images', type=positive_int, default=1)
    parser.add_argument('--seed', type=int, default=None)
    parser.add_argument('--scheduler', default=None, help="e.g. 'ddim', 'euler_a', 'dpm++_2m_karras'")
    parser.add_argument('--lora_dir', default=None)
    parser.add_argument('--device', default='gpu')
    parser.add_argument('--output_dir', default='outputs')
    args = parser.parse_args(argv)

    extra = {'lora_dir': args.lora_dir} if args.lora_dir else {}
    revision = args.model_revision or (modelscope_sd.DEFAULT_MODEL_REVISION
                                       if args.model == modelscope_sd.DEFAULT_MODEL_ID else None)
    call = {'text': args.prompt, 'seed': args.seed, 'num_inference_steps': args.num_inference_steps,
            'scheduler': args.scheduler, 'num_images_per_prompt': args.num_images}
    try:  # the pipeline's errors name the option and the fix: print them without a traceback
        pipe = pipeline(task=Tasks.text_to_image_synthesis, model=args.model, model_revision=revision,
                        device=args.device, pipeline_name=modelscope_sd.PIPELINE_NAME, **extra)
        output = pipe(call)
    except (ValueError, FileNotFoundError, ConnectionError) as err:
        parser.exit(2, f'{parser.prog}: error: {err}\n')

    os.makedirs(args.output_dir, exist_ok=True)
    loras = [(args.lora_dir, 1.0)] if args.lora_dir else []
    texts = metadata.describe_outputs(pipe, call, output, args.model, loras)
    paths = [metadata.save_png(os.path.join(args.output_dir, f'{seed}.png'), image, text)
             for image, seed, text in zip(output['output_imgs'], output['seeds'], texts)]
    print('\n'.join(paths))
    return paths


if __name__ == '__main__':
    main()
