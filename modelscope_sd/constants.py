"""Names shared by the pipeline, the loaders and the trainers."""

# ModelScope task and registry names.
TASK = 'text-to-image-synthesis'  # == modelscope.utils.constant.Tasks.text_to_image_synthesis
PIPELINE_NAME = 'modelscope-sd-text-to-image'  # our own registered name, usable as pipeline_name=
BUILTIN_PIPELINE_NAME = 'diffusers-stable-diffusion'  # what the hub repo's configuration.json names
MODEL_TYPE = 'stable-diffusion'

# What ModelScope reads from a model folder's configuration.json to pick the pipeline (as the hub repo has it).
MODELSCOPE_CONFIGURATION = {
    'framework': 'pytorch',
    'task': TASK,
    'model': {'type': MODEL_TYPE},
    'pipeline': {'type': BUILTIN_PIPELINE_NAME},
}

# The model the model card starts from.
DEFAULT_MODEL_ID = 'AI-ModelScope/stable-diffusion-v1-5'
DEFAULT_MODEL_REVISION = 'v1.0.0'

# Files of a diffusers-format model folder.
MODEL_INDEX = 'model_index.json'
CONFIGURATION = 'configuration.json'

# Hub files we never need to run the diffusers-format model: original single-file checkpoints
# (several GB each), non-EMA copies and other frameworks' weights.
HUB_IGNORE_PATTERNS = ['*.ckpt', 'v1-5-pruned*', '*non_ema*', '*.msgpack', '*.h5', '*.onnx', '*.pb']
# Only the configs and the tokenizer: what single-file loading needs beside the checkpoint.
HUB_CONFIG_PATTERNS = ['*.json', '*.txt']

PICKLE_SUFFIXES = ('.ckpt', '.bin', '.pt', '.pth', '.pkl')

LORA_WEIGHT_NAME = 'pytorch_lora_weights.safetensors'
