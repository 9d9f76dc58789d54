"""sam3d-hf: 3DSAM-adapter (SAM adapted to 3D point-promptable segmentation) for the Hugging Face ecosystem."""

import importlib

from transformers import AutoConfig, AutoModel, AutoModelForMaskGeneration

# Imported here because importing them registers Sam3D with transformers (Auto classes, the pipeline task).
from .configuration_sam3d import Sam3DConfig, Sam3DMaskDecoderConfig, Sam3DPromptEncoderConfig, Sam3DVisionConfig
from .image_processing_sam3d import (
    SAM3D_PRESETS,
    Sam3DDatasetPreset,
    Sam3DImageProcessor,
    Sam3DVolume,
    compute_intensity_statistics,
    load_volume,
)
from .modeling_sam3d import (
    PROCESSOR_GEOMETRY_KEYS,
    Sam3DForPromptableSegmentation,
    Sam3DImageEmbeddings,
    Sam3DPreTrainedModel,
    Sam3DSegmentationOutput,
    Sam3DVisionModel,
    Sam3DVisionModelOutput,
)
from .pipeline import Sam3DSegmentationPipeline
from .processing_sam3d import MODEL_INPUT_KEYS, Sam3DProcessor, cluster_points, save_mask_nifti
from .version import __version__ as __version__

AutoConfig.register(Sam3DConfig.model_type, Sam3DConfig, exist_ok=True)
AutoConfig.register(Sam3DVisionConfig.model_type, Sam3DVisionConfig, exist_ok=True)
AutoModel.register(Sam3DConfig, Sam3DForPromptableSegmentation, exist_ok=True)
AutoModel.register(Sam3DVisionConfig, Sam3DVisionModel, exist_ok=True)
AutoModelForMaskGeneration.register(Sam3DConfig, Sam3DForPromptableSegmentation, exist_ok=True)
# Saved folders carry the code and an `auto_map`, so they also load with `trust_remote_code=True` without this package.
Sam3DConfig.register_for_auto_class()
Sam3DForPromptableSegmentation.register_for_auto_class("AutoModel")

# The rest is imported on first use (PEP 562), so `import sam3d_hf` costs only what the registration needs (no
# MONAI, peft, datasets, scipy metrics or Hub client code).
_LAZY = {
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
