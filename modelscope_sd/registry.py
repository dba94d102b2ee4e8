"""Registration with ModelScope's pipeline registry.

The hub repo's configuration.json names ModelScope's built-in type ``diffusers-stable-diffusion``, whose
module imports torchvision and uses LoRA APIs diffusers removed. ``build_from_cfg`` first imports the
module that ModelScope's lazy-import index names for a (registry, task, type) key, then looks the type
up in the registry; so both the registry entry and the index entry must name our class, for our own
name and for the built-in one. The built-in module is then never imported.
"""

from modelscope.pipelines.builder import PIPELINES
from modelscope.utils.constant import Tasks
from modelscope.utils.import_utils import LazyImportModule

from .constants import BUILTIN_PIPELINE_NAME, PIPELINE_NAME
from .pipeline import StableDiffusionText2ImagePipeline

PIPELINE_TYPES = (PIPELINE_NAME, BUILTIN_PIPELINE_NAME)


def register_pipeline(cls=StableDiffusionText2ImagePipeline) -> None:
    index = LazyImportModule.get_ast_index()['index']
    for name in PIPELINE_TYPES:
        PIPELINES.register_module(Tasks.text_to_image_synthesis, module_name=name, module_cls=cls, force=True)
        index[('PIPELINES', Tasks.text_to_image_synthesis, name)] = {
            'filepath': __import__(cls.__module__, fromlist=['_']).__file__,
            'imports': [],
            'module': cls.__module__,
        }
