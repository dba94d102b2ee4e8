"""Write the kohya/A1111 version of an adapter trained here.

    python -m finetune.export_kohya sd-lora                    # → sd-lora/pytorch_lora_weights_kohya.safetensors
    python -m finetune.export_kohya sd-lora/pytorch_lora_weights.safetensors my_lora.safetensors
"""

import argparse
import os

from finetune.models import KOHYA_WEIGHT_NAME, export_kohya_lora
from modelscope_sd.constants import LORA_WEIGHT_NAME


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('adapter', help=f'training output_dir or its {LORA_WEIGHT_NAME}')
    parser.add_argument('output', nargs='?', default=None, help=f'default: {KOHYA_WEIGHT_NAME} beside the input')
    args = parser.parse_args(argv)
    source = os.path.join(args.adapter, LORA_WEIGHT_NAME) if os.path.isdir(args.adapter) else args.adapter
    if not os.path.isfile(source):
        parser.error(f'adapter={args.adapter!r}: no {LORA_WEIGHT_NAME} there.')
    if args.output is not None and os.path.exists(args.output):  # the default beside the input is this export's own
        parser.error(f'output={args.output!r} exists: name a new file.')
    target = args.output or os.path.join(os.path.dirname(source), KOHYA_WEIGHT_NAME)
    export_kohya_lora(source, target)
    print(target)
    return target


if __name__ == '__main__':
    main()
