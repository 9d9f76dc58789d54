"""sam3d-hf: 3DSAM-adapter (SAM adapted to 3D point-promptable segmentation) for the Hugging Face ecosystem."""

from .configuration_sam3d import Sam3DConfig, Sam3DMaskDecoderConfig, Sam3DPromptEncoderConfig, Sam3DVisionConfig

__version__ = "0.1.0.dev0"
