"""A native VLM family's own processor, also where its video processor cannot be built.

In transformers 5.24 the processors of `qwen2_vl`, `qwen2_5_vl`, `llava_onevision` and `smolvlm`
have a video slot. `AutoProcessor` fills it through `AutoVideoProcessor`, which needs torchvision,
even for a checkpoint used with images only; and without torchvision `ProcessorMixin.__init__`
cannot even type-check a video processor (`VideoProcessorMixin` is then not exported), so the
class takes neither `None` nor any object there. PyPI's torchvision does not load beside the CPU
torch wheel, so without it `load_processor` builds the family's class the way
`ProcessorMixin.from_pretrained` does (processor config and chat template from the folder, the
image processor from `AutoImageProcessor`, which falls back to its PIL backend, the tokenizer from
`AutoTokenizer`) with an inert stand-in in the video slot, accepted by a subclass that changes
only that type check. Images, text, the chat template and the image-token expansion are then the
family's own code, unchanged; a video raises.

SmolVLM's processor also imports `num2words` (for video prompts only) and refuses to build
without it: `pip install num2words`.

Mistral 3's processor (`PixtralProcessor`) has no video slot, but its module imports a size helper
from Pixtral's torchvision image processor, so without torchvision transformers hands out a
placeholder class. `load_processor` then imports the real module with the PIL image processor's
module (which has the same helper) standing in for the torchvision one, only while it imports.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available
from transformers.video_processing_utils import VideoProcessorMixin


class VideosNeedTorchvision(VideoProcessorMixin):
    """Fills a processor's video slot when torchvision is missing. `fps` and `num_frames` are
    read by SmolVLM's `apply_chat_template` for every conversation; left unset they only
    affect video frame sampling."""

    fps = None
    num_frames = None

    def preprocess(self, videos, **kwargs):
        raise ImportError(
            "Videos need torchvision, which this environment lacks; this processor handles images and text only."
        )


def load_processor(folder: str | Path) -> ProcessorMixin:
    """The processor `AutoProcessor.from_pretrained(folder)` gives, without needing torchvision
    for families whose processor has a video slot."""
    processor_class = PROCESSOR_MAPPING[type(AutoConfig.from_pretrained(folder))]
    if is_torchvision_available():
        _check_torchvision_imports()
        return AutoProcessor.from_pretrained(folder)
    if _is_placeholder(processor_class):
        processor_class = import_without_torchvision(processor_class.__name__)
        if "video_processor" not in processor_class.get_attributes():
            return processor_class.from_pretrained(folder)
    if "video_processor" not in processor_class.get_attributes():
        return AutoProcessor.from_pretrained(folder)
    return build_without_video(processor_class, folder)


def _is_placeholder(processor_class: type) -> bool:
    """transformers' stand-in for a class whose module needs a backend that is missing."""
    from transformers.utils.import_utils import DummyObject

    return isinstance(processor_class, DummyObject)


def import_without_torchvision(class_name: str) -> type[ProcessorMixin]:
    """The processor class `class_name`, its module imported with each torchvision image processor
    module it reads replaced by the PIL one of the same model (`image_processing_pil_<model>`)."""
    import importlib
    import importlib.util
    import sys
    import types

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    for model_type, name in PROCESSOR_MAPPING_NAMES.items():
        package = f"transformers.models.{model_type_to_module_name(model_type)}"
        module_name = f"{package}.processing_{model_type_to_module_name(model_type)}"
        if name != class_name or importlib.util.find_spec(module_name) is None:
            continue
        torchvision_module = f"{package}.image_processing_{model_type_to_module_name(model_type)}"
        pil = importlib.import_module(f"{package}.image_processing_pil_{model_type_to_module_name(model_type)}")
        stand_in = types.ModuleType(torchvision_module)
        stand_in.__dict__.update({key: value for key, value in vars(pil).items() if not key.startswith("__")})
        previous = sys.modules.get(torchvision_module)
        sys.modules[torchvision_module] = stand_in
        try:
            return getattr(importlib.import_module(module_name), class_name)
        finally:
            if previous is None:
                del sys.modules[torchvision_module]
            else:
                sys.modules[torchvision_module] = previous
    raise ImportError(f"{class_name} needs torchvision, which this environment lacks")


def build_without_video(processor_class: type[ProcessorMixin], folder: str | Path) -> ProcessorMixin:
    """`processor_class.from_pretrained(folder)` with `VideosNeedTorchvision` in the video slot."""
    processor_class = accepting_video_stand_in(processor_class)
    processor_dict, init_kwargs = processor_class.get_processor_dict(folder)
    parts = {
        "image_processor": AutoImageProcessor.from_pretrained(folder),
        "tokenizer": AutoTokenizer.from_pretrained(folder),
        "video_processor": VideosNeedTorchvision(),
    }
    args = [parts[name] for name in processor_class.get_attributes()]
    return processor_class.from_args_and_dict(args, processor_dict, **init_kwargs)


@cache
def accepting_video_stand_in(processor_class: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """`processor_class`, except that its video slot accepts `VideosNeedTorchvision`."""

    def check_argument_for_proper_class(self, argument_name, argument):
        if isinstance(argument, VideosNeedTorchvision):
            return VideosNeedTorchvision
        return processor_class.check_argument_for_proper_class(self, argument_name, argument)

    namespace = {"check_argument_for_proper_class": check_argument_for_proper_class, "__module__": __name__}
    return type(processor_class.__name__, (processor_class,), namespace)


def _check_torchvision_imports() -> None:
    """transformers takes an installed torchvision as usable, and then reads images with it; one
    built for another torch fails deep inside. Say so in one line instead."""
    try:
        import torchvision  # noqa: F401
    except Exception as error:  # a broken build raises RuntimeError or ImportError from its C extension
        import torch

        raise ImportError(
            f"torchvision is installed but does not load beside torch {torch.__version__} "
            f"({type(error).__name__}: {' '.join(str(error).split())[:120]}); install the torchvision built for "
            "this torch, or uninstall it (hae reads images without it)"
        ) from None
