"""Registration with ModelScope's pipeline registry.

The hub repo's configuration.json names ModelScope's built-in type ``diffusers-stable-diffusion``, whose
module imports torchvision and uses LoRA APIs diffusers removed. ``build_from_cfg`` first imports the
module that ModelScope's lazy-import index names for a (registry, task, type) key, then looks the type
up in the registry; so both the registry entry and the index entry must name our class, for our own
name and for the built-in one. The built-in module is then never imported.

Before it builds the pipeline, ``pipeline()`` downloads the whole hub repo (``normalize_model_input``), which
for SD1.5 means its original checkpoints and every weight file four times over. For repos whose
configuration.json names one of our types, the download leaves out what loading never reads, as our own
hub loading does, unless the caller passes ``ignore_file_pattern``.
"""

from modelscope.pipelines import builder
from modelscope.pipelines.builder import PIPELINES
from modelscope.utils.constant import Tasks
from modelscope.utils.import_utils import LazyImportModule

from .constants import BUILTIN_PIPELINE_NAME, PIPELINE_NAME
from .loading import hub_ignore_patterns, is_hub_id
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
    if not getattr(builder.normalize_model_input, 'skips_unread_files', False):
        builder.normalize_model_input = _download_what_loading_reads(builder.normalize_model_input)


def _download_what_loading_reads(normalize_model_input):
    def wrapper(model, model_revision, third_party=None, ignore_file_pattern=None):
        if ignore_file_pattern is None and isinstance(model, str) and is_hub_id(model) \
                and _pipeline_type(model, model_revision) in PIPELINE_TYPES:
            ignore_file_pattern = hub_ignore_patterns(model, model_revision)
        return normalize_model_input(model, model_revision, third_party=third_party,
                                     ignore_file_pattern=ignore_file_pattern)

    wrapper.skips_unread_files = True
    return wrapper


def _pipeline_type(model: str, revision) -> str:
    """The pipeline type in a hub repo's configuration.json (``pipeline()`` has just fetched it)."""
    from modelscope.utils.hub import read_config
    try:
        return read_config(model, revision=revision).safe_get('pipeline', {}).get('type')
    except Exception:  # noqa: BLE001 (no config or no hub: ModelScope's own download then decides)
        return None
