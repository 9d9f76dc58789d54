"""`pipeline("sam3d-segmentation", model=...)`: a scan and clicks in, the mask in the scan's geometry out.

The pipeline wraps [`Sam3DPredictor`] (the scan is preprocessed once per call, each patch encoded once) and returns the
mask in the original geometry: the data's stored axis order, voxel for voxel, with the scan's affine, so
`nib.Nifti1Image(out["mask"], out["affine"])` lies exactly on the scan.

Coordinates. `points` index the original data's stored axes (NIfTI `(i, j, k)`, i.e.
`nib.load(path).get_fdata()[i, j, k]`), or are RAS world mm with `points_in="world"`, as for [`Sam3DProcessor`].

Importing `sam3d_hf` registers the task with transformers' `PIPELINE_REGISTRY`. For a Hub repo to serve
`pipeline("sam3d-segmentation", model=repo, trust_remote_code=True)` without this package installed, its `config.json`
names the task under `custom_pipelines` and the repo carries the code ([`remote_code_files`]): written by
`Sam3DSegmentationPipeline.save_pretrained` and `sam3d demo`, uploaded by `sam3d push`. transformers then asks for
`trust_remote_code=True` even where this package is installed (or pass `pipeline_class=Sam3DSegmentationPipeline`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from transformers import AutoModel, Pipeline
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.pipelines import PIPELINE_REGISTRY

from .files import atomic_write
from .image_processing_sam3d import load_volume
from .processing_sam3d import Sam3DProcessor

__all__ = ["Sam3DSegmentationPipeline", "remote_code_files"]

TASK = "sam3d-segmentation"


class Sam3DSegmentationPipeline(Pipeline):
    """Point-prompted 3D segmentation of one scan.

    Example:
    ```python
    import sam3d_hf  # registers the task
    from transformers import pipeline

    segmenter = pipeline("sam3d-segmentation", model="path/to/model")  # folder with processor_config.json
    out = segmenter("ct.nii.gz", points=[[120, 85, 40]])  # NIfTI (i, j, k) voxel indices
    nib.save(nib.Nifti1Image(out["mask"], out["affine"]), "mask.nii.gz")
    ```

    Call arguments:
        inputs: a NIfTI path, a nibabel image, or a numpy array with `spacing`/`affine` (see `load_volume`).
        points: `(N, 3)` clicks, stored voxel indices `(i, j, k)` (fractional allowed) or RAS mm with
            `points_in="world"`.
        labels: `(N,)` 1 positive / 0 negative (default all positive; negatives need a model with
            `prompt_encoder_config.use_point_labels=True`).
        points_in: `"voxel"` (default) or `"world"`.
        threshold: foreground probability threshold, strictly between 0 and 1 (default 0.5).
        spacing, affine: geometry of array inputs.

    Returns:
        `dict` with `mask` (uint8 `np.ndarray` of the scan's stored shape), `affine` (`(4, 4)` voxel -> RAS mm, the
        scan's), `scores` (`list[float]`, one per click cluster: mean foreground probability inside its mask) and
        `probabilities` (float32, the scan's stored shape).
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, model, processor: Sam3DProcessor | None = None, **kwargs):
        if processor is None:
            source = getattr(model, "name_or_path", None)
            if not source or not os.path.isfile(os.path.join(source, "processor_config.json")):
                raise ValueError(
                    f"the model {source!r} has no processor_config.json: pass processor=Sam3DProcessor(...) "
                    "(e.g. Sam3DProcessor.from_preset('kits21')) to pipeline(...)"
                )
            processor = Sam3DProcessor.from_pretrained(source)
        if not isinstance(processor, Sam3DProcessor):
            raise TypeError(f"`processor` must be a Sam3DProcessor, got {type(processor).__name__}")
        super().__init__(model=model, **kwargs)
        from .inference import Sam3DPredictor  # MONAI, imported on first use rather than with the package

        self.sam3d_processor = processor
        self.predictor = Sam3DPredictor(self.model, processor)

    def _sanitize_parameters(self, points=None, labels=None, points_in=None, threshold=None, spacing=None, affine=None):
        preprocess = {k: v for k, v in (("spacing", spacing), ("affine", affine)) if v is not None}
        forward = {"points": points, "labels": labels}
        forward.update({k: v for k, v in (("points_in", points_in), ("threshold", threshold)) if v is not None})
        return preprocess, forward, {}

    def preprocess(self, inputs: Any, spacing=None, affine=None) -> dict[str, Any]:
        volume = load_volume(inputs, spacing=spacing, affine=affine)
        # The image processor reads the already validated volume again through nibabel/arrays; an array keeps the
        # affine it was given.
        image = volume.nifti if volume.nifti is not None else volume.data
        self.predictor.set_image(image, affine=None if volume.nifti is not None else volume.affine)
        return {"affine": volume.affine}

    def _forward(self, model_inputs: dict[str, Any], points=None, labels=None, points_in="voxel", threshold=0.5):
        if points is None:
            raise ValueError("give the clicks: segmenter(scan, points=[[i, j, k], ...]) (stored voxel indices)")
        prediction = self.predictor.predict(points, labels, points_in=points_in, threshold=threshold)
        return {"prediction": prediction, "affine": model_inputs["affine"]}

    def postprocess(self, model_outputs: dict[str, Any]) -> dict[str, Any]:
        prediction = model_outputs["prediction"]
        return {
            "mask": prediction.mask.numpy().astype(np.uint8),
            "affine": np.asarray(model_outputs["affine"], dtype=np.float64),
            "scores": [float(s) for s in prediction.scores],
            "probabilities": prediction.probabilities.numpy().astype(np.float32),
        }

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        """Model, processor and this pipeline's code; `config.json` gets `custom_pipelines` for `trust_remote_code`."""
        super().save_pretrained(save_directory, **kwargs)
        self.sam3d_processor.save_pretrained(save_directory)


def remote_code_files(config: Mapping[str, Any]) -> dict[str, bytes | Path]:
    """The files that make a model folder, or its Hub repo, serve `pipeline("sam3d-segmentation", model=...,
    trust_remote_code=True)` without this package installed; what `Sam3DSegmentationPipeline.save_pretrained`
    writes, without loading or saving the model (`sam3d push` uploads them, `sam3d demo` writes them).

    Args:
        config: the folder's `config.json` content (with the `auto_map` that `save_pretrained` writes).

    Returns:
        `{file name: content}`: `config.json` (the given config with the task under `custom_pipelines`, the entry
        transformers' `Pipeline.save_pretrained` records) as bytes, and this module with every module it imports
        relatively (transformers' `get_relative_import_files`, the files `custom_object_save` copies) as paths of the
        installed source.
    """
    registered = Sam3DSegmentationPipeline._registered_impl[TASK]
    entry = {
        **registered,
        "impl": f"{registered['impl'].__module__.split('.')[-1]}.{registered['impl'].__name__}",
        "pt": [model_class.__name__ for model_class in registered["pt"]],
    }
    custom_pipelines = {**(config.get("custom_pipelines") or {}), TASK: entry}
    text = json.dumps({**config, "custom_pipelines": custom_pipelines}, indent=2, sort_keys=True) + "\n"
    code = [Path(__file__), *map(Path, get_relative_import_files(__file__))]
    return {"config.json": text.encode("utf-8"), **{path.name: path for path in code}}


def write_remote_code(folder: str | os.PathLike) -> None:
    """Make a saved model folder serve `pipeline("sam3d-segmentation", model=folder, trust_remote_code=True)` where
    sam3d-hf is not installed: write [`remote_code_files`] into it (atomically, file by file). transformers then asks
    for `trust_remote_code=True` for the folder in every case, which is the one instruction a user needs; with the
    package installed, `pipeline_class=Sam3DSegmentationPipeline` runs the installed code instead."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    for name, source in remote_code_files(config).items():
        content = source if isinstance(source, bytes) else Path(source).read_bytes()
        atomic_write(folder / name, lambda temporary, data=content: Path(temporary).write_bytes(data))


# Here, not in registration.py: this module's copy in a saved folder registers itself too (remote code).
PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=Sam3DSegmentationPipeline, pt_model=AutoModel, type="image")
