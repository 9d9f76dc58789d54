"""sam3d-hf: 3DSAM-adapter (SAM adapted to 3D point-promptable segmentation) for the Hugging Face ecosystem."""

import importlib

from . import registration
from .version import __version__ as __version__

# Nothing heavy is imported here: every name below is imported on first use (PEP 562), so `import sam3d_hf` costs
# no torch and no transformers (the CLI's --help and --version stay instant). Sam3D is registered with transformers'
# Auto classes and pipeline registry as soon as transformers' own modules for them are imported (registration.py).
registration.install()

_LAZY = {
    "configuration_sam3d": ("Sam3DConfig", "Sam3DMaskDecoderConfig", "Sam3DPromptEncoderConfig", "Sam3DVisionConfig"),
    "image_processing_sam3d": (
        "SAM3D_PRESETS",
        "Sam3DDatasetPreset",
        "Sam3DImageProcessor",
        "Sam3DVolume",
        "compute_intensity_statistics",
        "load_volume",
    ),
    "modeling_sam3d": (
        "PROCESSOR_GEOMETRY_KEYS",
        "Sam3DForPromptableSegmentation",
        "Sam3DImageEmbeddings",
        "Sam3DPreTrainedModel",
        "Sam3DSegmentationOutput",
        "Sam3DVisionModel",
        "Sam3DVisionModelOutput",
    ),
    "pipeline": ("Sam3DSegmentationPipeline",),
    "processing_sam3d": ("MODEL_INPUT_KEYS", "Sam3DProcessor", "cluster_points", "save_mask_nifti"),
    "hub": ("push_to_hub", "render_model_card"),
    "inference": ("Sam3DPrediction", "Sam3DPredictor"),
    "convert_sam3d": (
        "ConversionReport",
        "convert_official_checkpoint",
        "convert_official_state_dicts",
        "convert_sam_checkpoint",
        "convert_sam_state_dict",
        "load_official_checkpoint",
        "load_sam_checkpoint",
        "save_converted",
        "to_official_state_dicts",
    ),
    "metrics": (
        "CLICK_PROTOCOLS",
        "correction_click",
        "dice_score",
        "evaluate_case",
        "markdown_table",
        "normalized_surface_dice",
        "simulate_clicks",
        "summarize",
    ),
    "peft_sam3d": (
        "DEFAULT_LORA_MODULES_TO_SAVE",
        "DEFAULT_LORA_TARGET_MODULES",
        "Sam3DAdapterConfig",
        "Sam3DAdapterModel",
        "enable_full_finetuning",
        "get_adapter_model",
        "lora_config",
    ),
    "synthetic": ("SYNTHETIC_PROCESSOR_KWARGS", "generate_case", "generate_dataset"),
}
_LAZY_MODULE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name not in _LAZY_MODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY_MODULE[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_MODULE})


__all__ = [
    "CLICK_PROTOCOLS",
    "DEFAULT_LORA_MODULES_TO_SAVE",
    "DEFAULT_LORA_TARGET_MODULES",
    "MODEL_INPUT_KEYS",
    "PROCESSOR_GEOMETRY_KEYS",
    "SAM3D_PRESETS",
    "SYNTHETIC_PROCESSOR_KWARGS",
    "ConversionReport",
    "Sam3DAdapterConfig",
    "Sam3DAdapterModel",
    "Sam3DConfig",
    "Sam3DDatasetPreset",
    "Sam3DForPromptableSegmentation",
    "Sam3DImageEmbeddings",
    "Sam3DImageProcessor",
    "Sam3DMaskDecoderConfig",
    "Sam3DPreTrainedModel",
    "Sam3DPrediction",
    "Sam3DPredictor",
    "Sam3DProcessor",
    "Sam3DPromptEncoderConfig",
    "Sam3DSegmentationOutput",
    "Sam3DSegmentationPipeline",
    "Sam3DVisionConfig",
    "Sam3DVisionModel",
    "Sam3DVisionModelOutput",
    "Sam3DVolume",
    "cluster_points",
    "compute_intensity_statistics",
    "convert_official_checkpoint",
    "convert_official_state_dicts",
    "convert_sam_checkpoint",
    "convert_sam_state_dict",
    "correction_click",
    "dice_score",
    "enable_full_finetuning",
    "evaluate_case",
    "generate_case",
    "generate_dataset",
    "get_adapter_model",
    "load_official_checkpoint",
    "load_sam_checkpoint",
    "load_volume",
    "lora_config",
    "markdown_table",
    "normalized_surface_dice",
    "push_to_hub",
    "render_model_card",
    "save_converted",
    "save_mask_nifti",
    "simulate_clicks",
    "summarize",
    "to_official_state_dicts",
]
