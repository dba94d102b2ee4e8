"""Stable Diffusion v1.5 for ModelScope. Importing this package registers the pipeline for
``Tasks.text_to_image_synthesis``, under our own name and in place of ModelScope's built-in one."""

from .constants import DEFAULT_MODEL_ID, DEFAULT_MODEL_REVISION, PIPELINE_NAME
from .loading import write_configuration
from .pipeline import StableDiffusionText2ImagePipeline
from .registry import register_pipeline

__version__ = '0.1.0'
__all__ = ['StableDiffusionText2ImagePipeline', 'PIPELINE_NAME', 'DEFAULT_MODEL_ID', 'DEFAULT_MODEL_REVISION',
           'register_pipeline', 'write_configuration']

register_pipeline()
