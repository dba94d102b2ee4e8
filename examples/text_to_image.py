"""Generate images with the registered ModelScope pipeline and write them as PNGs.

    python examples/text_to_image.py --prompt '飞流直下三千尺,油画' --num_images 2 --seed 42
    python examples/text_to_image.py --prompt 'a photo of sks dog' --lora_dir work_dir/output
"""

import argparse
import os

import cv2

import modelscope_sd  # noqa: F401  (registers the pipeline)
from modelscope.pipelines import pipeline
from modelscope.utils.constant import Tasks


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--prompt', required=True)
    parser.add_argument('--negative_prompt', default=None)
    parser.add_argument('--model', default=modelscope_sd.DEFAULT_MODEL_ID,
                        help='ModelScope id, diffusers folder or .safetensors checkpoint')
    parser.add_argument('--model_revision', default=modelscope_sd.DEFAULT_MODEL_REVISION)
    parser.add_argument('--num_inference_steps', type=int, default=50)
    parser.add_argument('--guidance_scale', type=float, default=7.5)
    parser.add_argument('--height', type=int, default=None)
    parser.add_argument('--width', type=int, default=None)
    parser.add_argument('--seed', type=int, default=None)
    parser.add_argument('--scheduler', default=None, help="e.g. 'ddim', 'euler_a', 'dpm++_2m_karras'")
    parser.add_argument('--num_images', type=int, default=1)
    parser.add_argument('--lora_dir', default=None)
    parser.add_argument('--lora_scale', type=float, default=1.0)
    parser.add_argument('--device', default='gpu')
    parser.add_argument('--output_dir', default='outputs')
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    extra = {'pipeline_name': modelscope_sd.PIPELINE_NAME}  # also for plain folders and single files
    if args.lora_dir:
        extra.update(lora_dir=args.lora_dir, lora_scale=args.lora_scale)
    pipe = pipeline(task=Tasks.text_to_image_synthesis, model=args.model, model_revision=args.model_revision,
                    device=args.device, **extra)
    output = pipe({'text': args.prompt, 'negative_prompt': args.negative_prompt, 'seed': args.seed,
                   'num_inference_steps': args.num_inference_steps, 'guidance_scale': args.guidance_scale,
                   'height': args.height, 'width': args.width, 'scheduler': args.scheduler,
                   'num_images_per_prompt': args.num_images})
    os.makedirs(args.output_dir, exist_ok=True)
    paths = []
    for image, seed in zip(output['output_imgs'], output['seeds']):
        paths.append(os.path.join(args.output_dir, f'{seed}.png'))
        cv2.imwrite(paths[-1], image)
        print(paths[-1])
    return paths


if __name__ == '__main__':
    main()
