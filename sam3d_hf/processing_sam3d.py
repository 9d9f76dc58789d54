"""Processor for Sam3D: point prompts, patch cropping around clicks, and mapping predictions back to the scan.

See `image_processing_sam3d` for the coordinate conventions (stored voxel indices, RAS world mm, canonical `(D, H, W)`
axes, resampled grid).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import nibabel as nib
import numpy as np
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.models.auto.processing_auto import AutoProcessor
from transformers.processing_utils import ProcessorMixin

from .configuration_sam3d import Sam3DConfig
from .files import atomic_write
from .image_processing_sam3d import (
    Sam3DImageProcessor,
    _get_preset,
    canonical_to_original_matrix,
    from_canonical,
    load_volume,
    resampled_to_canonical_matrix,
)

__all__ = ["MODEL_INPUT_KEYS", "Sam3DProcessor", "cluster_points", "save_mask_nifti"]

logger = logging.getLogger(__name__)

# Keys of the processor's output that the model's forward takes; the others describe the geometry for inversion.
MODEL_INPUT_KEYS = ("pixel_values", "input_points", "input_labels")


def cluster_points(points: np.ndarray, max_extent: Sequence[float]) -> list[list[int]]:
    """Group points so that each group's bounding box fits in `max_extent` on every axis.

    Agglomerative single-pass: start with one cluster per point and repeatedly merge the two clusters whose bounding
    box centres are closest among the pairs whose merged box still fits. Deterministic; clusters are ordered by their
    first point's index and list point indices in input order.

    Args:
        points: `(N, 3)` coordinates (any consistent unit; the processor uses resampled voxels).
        max_extent: `(3,)` largest allowed `max - min` per axis.
    """
    points = np.asarray(points, np.float64)
    max_extent = np.asarray(max_extent, np.float64)
    clusters = [[i] for i in range(len(points))]
    while True:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                merged = points[clusters[a] + clusters[b]]
                if np.any(merged.max(0) - merged.min(0) > max_extent):
                    continue
                centre_a = (points[clusters[a]].max(0) + points[clusters[a]].min(0)) / 2
                centre_b = (points[clusters[b]].max(0) + points[clusters[b]].min(0)) / 2
                dist = float(np.linalg.norm(centre_a - centre_b))
                if best is None or dist < best[0]:
                    best = (dist, a, b)
        if best is None:
            break
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters, key=lambda c: c[0])


class Sam3DProcessor(ProcessorMixin):
    r"""Prepares a CT volume and point prompts for [`Sam3DForPromptableSegmentation`] and maps predictions back.

    Wraps a [`Sam3DImageProcessor`] (geometry and intensity) and adds clicks: the volume is reoriented, resampled and
    normalised, the clicks are grouped into clusters that fit in one patch, and one `patch_size` patch is cropped per
    cluster (batch row). [`~Sam3DProcessor.post_process_masks`] pastes the predicted patches back and returns a mask
    aligned voxel for voxel with the original data; [`save_mask_nifti`] writes it next to the scan.

    Args:
        image_processor ([`Sam3DImageProcessor`], *optional*): defaults to `Sam3DImageProcessor()` (KiTS21's intensity
            settings, no `target_label`: label maps must then be binary); use [`~Sam3DProcessor.from_preset`] for a
            dataset's full preset.
        patch_size (`tuple[int, int, int]`, defaults to `(128, 128, 128)`): `(D, H, W)` patch in resampled voxels,
            each a multiple of 4 (the model's token stride).
        cluster_margin (`int`, defaults to 16): clicks are kept in one patch only if their bounding box leaves at least
            this many voxels of context to every patch face (box extent <= `patch_size - 2 * cluster_margin`).
    """

    attributes: ClassVar[list[str]] = ["image_processor"]

    def __init__(
        self,
        image_processor: Sam3DImageProcessor | None = None,
        patch_size: Sequence[int] = (128, 128, 128),
        cluster_margin: int = 16,
        **kwargs,
    ):
        if image_processor is None:
            image_processor = Sam3DImageProcessor()
        patch_size = tuple(int(p) for p in patch_size)
        if len(patch_size) != 3 or any(p <= 0 or p % 4 for p in patch_size):
            raise ValueError(
                f"`patch_size` must be 3 positive multiples of 4 (D, H, W), the model's token stride; got {patch_size}."
            )
        if not 0 <= int(cluster_margin) < min(patch_size) / 2:
            raise ValueError(f"`cluster_margin` must be in [0, {min(patch_size) / 2}) voxels, got {cluster_margin}.")
        self.patch_size = patch_size
        self.cluster_margin = int(cluster_margin)
        super().__init__(image_processor, **kwargs)

    def check_argument_for_proper_class(self, argument_name, argument):
        # The base check resolves `transformers.ImageProcessingMixin`, a Pillow-requiring dummy when Pillow is absent.
        if argument_name == "image_processor" and not isinstance(argument, BaseImageProcessor):
            raise TypeError(f"`image_processor` must be a Sam3DImageProcessor, got {type(argument).__name__}.")
        return type(argument)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> Sam3DProcessor:
        """Processor for one of [`SAM3D_PRESETS`]; `patch_size`/`cluster_margin` overrides go to the processor, the
        rest to [`Sam3DImageProcessor.from_preset`]."""
        preset = _get_preset(name)
        patch_size = overrides.pop("patch_size", preset.patch_size)
        cluster_margin = overrides.pop("cluster_margin", 16)
        image_processor = Sam3DImageProcessor.from_preset(name, **overrides)
        return cls(image_processor, patch_size=patch_size, cluster_margin=cluster_margin)

    def __call__(
        self,
        images: Any = None,
        input_points: Any = None,
        input_labels: Any = None,
        segmentation_maps: Any = None,
        spacing: Sequence[float] | None = None,
        affine: np.ndarray | None = None,
        points_in: str = "voxel",
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Preprocess one volume and its clicks into model-ready patches.

        Coordinates of `input_points`:
            * `points_in="voxel"` (default): voxel indices of the **original data in its stored axis order** -- for a
              NIfTI/NRRD file or a nibabel image the `(i, j, k)` indices ITK-SNAP/3D Slicer show as IJK (i.e.
              `img.get_fdata()[i, j, k]`); for a DICOM folder `(column, row, slice)`; for a numpy/torch array the
              array's axes in order (`array[p0, p1, p2]`). Fractional values are allowed.
            * `points_in="world"`: world coordinates in mm, RAS+ (nibabel/NIfTI convention, `affine @ [i, j, k, 1]`).
              3D Slicer shows RAS; tools that report LPS (DICOM, ITK) need their first two values negated.

            Example: a click on voxel `(120, 85, 40)` of `ct.nii.gz`, negative click at `(100, 85, 40)` (a model with
            `config.use_point_labels=True`):

            ```python
            inputs = processor(images="ct.nii.gz", input_points=[[120, 85, 40], [100, 85, 40]], input_labels=[1, 0])
            out = model(**{k: inputs[k] for k in ("pixel_values", "input_points", "input_labels")})
            mask = processor.post_process_masks(out.logits, inputs)  # same shape as nib.load("ct.nii.gz").shape
            ```

        Every point must lie within the volume's voxel extent `[-0.5, size - 0.5]` on each stored axis.

        Positive clicks are grouped (see [`cluster_points`]) so that each group fits in one patch with `cluster_margin`
        voxels of context; each group gets one patch (one batch row) centred on the group's bounding box, shifted to
        stay inside the volume when the volume is at least as large as the patch, and padded with the normalised window
        lower bound (air, `image_processor.pad_value`) where it is not. Each row carries every click (positive or
        negative) that falls inside its patch, padded with label -1.

        Negative clicks (label 0) never open a patch of their own: one goes with the patch(es) of the positive clicks
        it falls in, and one that falls in none is not used (its `point_cluster` is -1 and a warning names it).
        Negative clicks only mean something to a model trained with them (`config.use_point_labels=True`); a model
        without point labels treats every click as positive.

        Args:
            images: one volume (path, nibabel image, numpy/torch array), see [`load_volume`].
            input_points: `(N, 3)` clicks (list of triples, array or tensor; `(1, N, 3)` is accepted).
            input_labels: `(N,)` 1 (positive) / 0 (negative); defaults to all positive. At least one must be 1.
                Negative clicks need a model with `config.use_point_labels=True`.
            segmentation_maps: optional integer label map voxel-aligned with the image (same stored shape); returned
                as `labels`: binarised to `image_processor.target_label` (a map with values other than 0/1 needs one),
                resampled the nnU-Net way (linear interpolation of the binary map, nearest through thick slices,
                threshold 0.5) and cropped like the image.
            spacing, affine: geometry for array inputs (spacing per array axis, affine 4x4 voxel-to-RAS mm).
            points_in: `"voxel"` or `"world"`.
            return_tensors: `"pt"` (default), `"np"` or `None`.

        Returns:
            [`BatchFeature`] with, for `B` clusters of positive clicks and `N` points per row:
            - `pixel_values` `(B, 1, D, H, W)` float32, `input_points` `(B, N, 3)` float32 patch voxel `(d, h, w)`,
              `input_labels` `(B, N)` int64 (-1 = padding), `labels` `(B, D, H, W)` int64 (with `segmentation_maps`);
            - geometry: `patch_origins` `(B, 3)` int64 (resampled voxel of patch voxel `(0, 0, 0)`; may be negative),
              `patch_affines` `(B, 4, 4)` (patch voxel `(d, h, w)` -> RAS mm), `point_cluster` `(N,)` (row of each
              input click: a positive click's own patch, a negative click's first patch containing it, -1 if none),
              and the image processor's `original_size`, `original_affine`, `canonical_axes`, `canonical_flips`,
              `canonical_size`, `resampled_size`, `resampled_spacing`, `resampled_affine`.
            Pass only `pixel_values`, `input_points`, `input_labels` to the model.
        """
        if kwargs:
            raise TypeError(f"Unexpected arguments {sorted(kwargs)}; see Sam3DProcessor.__call__'s docstring.")
        if images is None:
            raise ValueError("`images` is required (a path, a nibabel image or a numpy/torch array).")
        if points_in not in ("voxel", "world"):
            raise ValueError(f"`points_in` must be 'voxel' or 'world', got {points_in!r}.")
        if isinstance(images, (list, tuple)):
            if len(images) != 1:
                raise ValueError(f"Pass one volume per call (clicks are per volume), got a list of {len(images)}.")
            images = images[0]
        volume = load_volume(images, spacing=spacing, affine=affine)
        # Bad clicks are reported before the whole-volume resampling (seconds on a large scan), not after it.
        validate_points(input_points, input_labels, volume.data.shape, volume.affine, points_in)
        preprocessed = self.image_processor.preprocess(
            volume.data, segmentation_maps=segmentation_maps, affine=volume.affine, return_tensors=None
        )
        return self.prepare_prompts(preprocessed, input_points, input_labels, points_in, return_tensors)

    def prepare_prompts(
        self,
        preprocessed: BatchFeature | dict,
        input_points: Any,
        input_labels: Any = None,
        points_in: str = "voxel",
        return_tensors: str | None = "pt",
        patch_origins: Sequence[Sequence[int]] | None = None,
    ) -> BatchFeature:
        """The click part of [`~Sam3DProcessor.__call__`]: clicks -> resampled voxels -> clusters -> patch crops.

        `__call__` is `image_processor.preprocess` followed by this method; call the two yourself to preprocess a
        volume once and prompt it many times (as [`sam3d_hf.inference.Sam3DPredictor`] does): this method only maps
        the clicks and crops patches from the already resampled, normalised volume.

        Args:
            preprocessed: the output of `self.image_processor.preprocess(...)` for one volume (numpy arrays or
                tensors): `pixel_values` `(1, 1, D, H, W)` on the resampled canonical grid, the geometry entries
                (`original_size`, `original_affine`, `canonical_*`, `resampled_*`) and, optionally, `labels`
                `(1, D, H, W)`, which are then cropped like the image.
            input_points, input_labels, points_in, return_tensors: as in [`~Sam3DProcessor.__call__`] (points index
                the original data's stored axes, NIfTI `(i, j, k)`, or are RAS world mm with `points_in="world"`).
            patch_origins: optional patches to reuse, as `(3,)` resampled voxels of their corner (the `patch_origins`
                of an earlier output). A cluster whose clicks all lie at least `cluster_margin` voxels (or up to the
                volume's edge) inside one of them (the first that fits, in the given order) gets that patch instead
                of one centred on it, so that a click added near earlier ones keeps an already encoded patch.

        Returns:
            The same [`BatchFeature`] as [`~Sam3DProcessor.__call__`].
        """
        if points_in not in ("voxel", "world"):
            raise ValueError(f"`points_in` must be 'voxel' or 'world', got {points_in!r}.")
        missing = [key for key in ("pixel_values", *_GEOMETRY_KEYS) if key not in preprocessed]
        if missing:
            raise ValueError(
                f"`preprocessed` lacks {missing}: pass the output of `processor.image_processor.preprocess(...)`."
            )
        geometry = {key: _as_numpy(preprocessed[key]) for key in _GEOMETRY_KEYS}
        data = _as_numpy(preprocessed["pixel_values"])[0, 0]
        label_map = _as_numpy(preprocessed["labels"])[0] if preprocessed.get("labels") is not None else None
        points, labels_in, points_given = validate_points(
            input_points, input_labels, geometry["original_size"], geometry["original_affine"], points_in
        )
        resampled_size = geometry["resampled_size"]
        # stored voxel -> resampled voxel
        to_original = canonical_to_original_matrix(
            geometry["original_size"], geometry["canonical_axes"], geometry["canonical_flips"]
        )
        to_canonical = resampled_to_canonical_matrix(geometry["resampling_scale"])
        resampled_to_original = to_original @ to_canonical
        homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
        points_r = (np.linalg.inv(resampled_to_original) @ homogeneous.T).T[:, :3]
        points_r = np.clip(points_r, 0, resampled_size - 1)  # points at the outer half voxel

        patch = np.asarray(self.patch_size)
        # Only positive clicks open patches: a negative click says where the object is not, so a patch around it
        # alone would segment whatever lies there.
        positive = np.nonzero(labels_in == 1)[0]
        clusters = [
            positive[c].tolist() for c in cluster_points(points_r[positive], patch - 1 - 2 * self.cluster_margin)
        ]
        reusable = [np.asarray(o, np.int64).reshape(3) for o in (patch_origins if patch_origins is not None else ())]
        origins = []
        for members in clusters:
            box = points_r[members]
            # The context a reused patch must give, clipped to the volume (there is no context beyond it).
            low = np.maximum(box.min(0) - self.cluster_margin, 0)
            high = np.minimum(box.max(0) + self.cluster_margin, resampled_size - 1)
            known = [o for o in reusable if np.all(low >= o) and np.all(high <= o + patch - 1)]
            if known:
                origins.append(known[0])
                continue
            centre = (box.max(0) + box.min(0)) / 2
            origin = np.rint(centre - (patch - 1) / 2).astype(np.int64)
            fits = resampled_size >= patch
            origin = np.where(fits, np.clip(origin, 0, np.maximum(resampled_size - patch, 0)), origin)
            origins.append(origin)
        origins = np.stack(origins)

        rows_points, rows_labels, pixel_values, label_patches, patch_affines = [], [], [], [], []
        point_cluster = np.full(len(points), -1, np.int64)
        for b, (members, origin) in enumerate(zip(clusters, origins)):
            local = points_r - origin
            inside = np.all((local >= 0) & (local <= patch - 1), axis=1)
            inside[members] = True
            point_cluster[members] = b
            point_cluster[inside & (labels_in == 0) & (point_cluster < 0)] = b  # a negative click: its first patch
            rows_points.append(local[inside])
            rows_labels.append(labels_in[inside])
            pixel_values.append(_crop(data, origin, patch, self.image_processor.pad_value))
            if label_map is not None:
                label_patches.append(_crop(label_map, origin, patch, 0))
            shift = np.eye(4)
            shift[:3, 3] = origin
            patch_affines.append(geometry["resampled_affine"] @ shift)

        unused = np.nonzero(point_cluster < 0)[0]
        if unused.size:
            logger.warning(
                "Negative click(s) %s (input coordinates %s) fall in no patch of a positive click and are not used; "
                "point_cluster is -1 for them.",
                unused.tolist(),
                [points_given[i].round(3).tolist() for i in unused],
            )
        num_points = max(len(p) for p in rows_points)
        input_points = np.zeros((len(clusters), num_points, 3), np.float32)
        input_labels_arr = np.full((len(clusters), num_points), -1, np.int64)
        for b, (pts, lbl) in enumerate(zip(rows_points, rows_labels)):
            input_points[b, : len(pts)] = pts
            input_labels_arr[b, : len(lbl)] = lbl

        out = {
            "pixel_values": np.stack(pixel_values)[:, None].astype(np.float32),
            "input_points": input_points,
            "input_labels": input_labels_arr,
        }
        if label_map is not None:
            out["labels"] = np.stack(label_patches).astype(np.int64)
        out.update(
            patch_origins=origins,
            patch_affines=np.stack(patch_affines),
            point_cluster=point_cluster,
            **geometry,
        )
        return BatchFeature(out, tensor_type=return_tensors)

    def post_process_masks(
        self,
        logits: torch.Tensor | np.ndarray,
        inputs: BatchFeature | dict,
        threshold: float = 0.5,
        return_probabilities: bool = False,
    ) -> torch.Tensor:
        """Turn per-patch logits into a mask aligned voxel for voxel with the original data.

        Steps: foreground probability per patch (`softmax(logits, 1)[:, 1]`, or `sigmoid` for one channel) -> paste
        the patches into the resampled canonical grid (max where patches overlap, 0 outside every patch) -> trilinear
        resampling back to the original grid (voxel-centre aligned) -> threshold -> undo the reorientation.

        Args:
            logits: `(B, 2, D, H, W)` (or `(B, 1, D, H, W)`) model output for the rows of `inputs`.
            inputs: the [`BatchFeature`] returned by this processor's `__call__` for the same volume.
            threshold: foreground probability threshold (`prob >= threshold`), strictly between 0 and 1.
            return_probabilities: return float32 probabilities instead of the thresholded mask.

        Returns:
            `torch.Tensor` of exactly `inputs["original_size"]`, in the data's stored axis order (same as
            `nib.load(path).shape` / the input array), dtype `uint8` (0/1), or float32 probabilities.
        """
        if not 0.0 < threshold < 1.0:  # 0 or below marks every voxel, 1 or above (almost) none
            raise ValueError(f"`threshold` is a probability and must lie strictly between 0 and 1, got {threshold}.")
        logits = torch.as_tensor(logits).detach().float().cpu()
        origins = _as_numpy(inputs["patch_origins"]).astype(np.int64)
        patch = np.asarray(self.patch_size)
        if logits.ndim != 5 or logits.shape[0] != len(origins) or tuple(logits.shape[2:]) != tuple(patch):
            raise ValueError(
                f"`logits` must have shape ({len(origins)}, 2, {', '.join(map(str, patch))}) for these inputs "
                f"(one row per patch), got {tuple(logits.shape)}."
            )
        if logits.shape[1] == 2:
            probs = torch.softmax(logits, dim=1)[:, 1]
        elif logits.shape[1] == 1:
            probs = torch.sigmoid(logits[:, 0])
        else:
            raise ValueError(f"`logits` must have 1 or 2 channels, got {logits.shape[1]}.")
        n_bad = int(logits.numel() - torch.isfinite(logits).sum())
        if n_bad:
            raise ValueError(
                f"`logits` has {n_bad} non-finite values (NaN/inf) out of {logits.numel()}: the model's output is "
                "broken (check the input for NaN, or bf16/fp16 overflow); no mask can be made from it."
            )

        resampled_size = _as_numpy(inputs["resampled_size"]).astype(np.int64)
        canvas = torch.zeros(tuple(resampled_size.tolist()))
        for prob, origin in zip(probs, origins):
            lo = np.maximum(origin, 0)
            hi = np.minimum(origin + patch, resampled_size)
            if np.any(hi <= lo):
                continue
            src = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))
            dst = tuple(slice(a, b) for a, b in zip(lo, hi))
            canvas[dst] = torch.maximum(canvas[dst], prob[src])

        canonical_size = tuple(_as_numpy(inputs["canonical_size"]).astype(np.int64).tolist())
        # Resampled voxel r lies at canonical (r + 0.5) * scale - 0.5: each canonical voxel reads 1 / scale of a step.
        steps = 1.0 / _as_numpy(inputs["resampling_scale"]) if "resampling_scale" in inputs else None
        back = _resize_nonzero_box(canvas, canonical_size, steps)
        axes = _as_numpy(inputs["canonical_axes"]).astype(np.int64).tolist()
        flips = _as_numpy(inputs["canonical_flips"]).astype(bool).tolist()
        out = np.ascontiguousarray(from_canonical(back.numpy(), axes, flips))
        expected = tuple(_as_numpy(inputs["original_size"]).astype(np.int64).tolist())
        assert out.shape == expected, (out.shape, expected)  # internal invariant, not user input
        if return_probabilities:
            return torch.from_numpy(out.astype(np.float32))
        return torch.from_numpy((out >= threshold).astype(np.uint8))


# Geometry entries of `Sam3DImageProcessor.preprocess` that `prepare_prompts` needs and passes on.
_GEOMETRY_KEYS = (
    "original_size",
    "original_affine",
    "canonical_axes",
    "canonical_flips",
    "canonical_size",
    "resampled_size",
    "resampling_scale",
    "resampled_spacing",
    "resampled_affine",
)


def validate_points(input_points, input_labels, original_size, original_affine, points_in: str = "voxel"):
    """Check clicks against a scan's header (shape and affine) before anything heavy runs; return `(N, 3)` float64
    stored-voxel points, `(N,)` int64 labels and the points as given, or raise a `ValueError` that names each bad
    click. Points are stored voxel indices (NIfTI `i, j, k`) or, with `points_in="world"`, RAS mm; labels 1 / 0."""
    if input_points is None:
        raise ValueError("`input_points` is required: at least one click [[p0, p1, p2], ...].")
    if isinstance(input_points, torch.Tensor):
        input_points = input_points.detach().cpu().numpy()
    try:
        points = np.asarray(input_points, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`input_points` must be a list of [p0, p1, p2] triples ({err}).") from err
    if points.size == 0:
        raise ValueError("`input_points` is empty: give at least one click [[p0, p1, p2], ...].")
    if points.ndim == 3 and points.shape[0] == 1:
        points = points[0]
    if points.ndim == 1 and points.shape == (3,):
        points = points[None]
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"`input_points` must have shape (N, 3), got {points.shape}.")
    if not np.all(np.isfinite(points)):
        raise ValueError(f"`input_points` has non-finite values: {points.tolist()}.")
    if input_labels is None:
        labels = np.ones(len(points), np.int64)
    else:
        if isinstance(input_labels, torch.Tensor):
            input_labels = input_labels.detach().cpu().numpy()
        labels = np.asarray(input_labels).reshape(-1)
        if labels.shape != (len(points),):
            raise ValueError(f"`input_labels` must have {len(points)} values (one per point), got {labels.shape}.")
        if not np.all(np.isin(labels, (0, 1))):
            raise ValueError(f"`input_labels` must be 1 (positive) or 0 (negative), got {labels.tolist()}.")
        labels = labels.astype(np.int64)
        if not np.any(labels == 1):
            raise ValueError(
                f"`input_labels` {labels.tolist()} has no positive click (1): patches are placed around positive "
                "clicks and negative clicks (0) only refine them. Add at least one click on the object."
            )

    if points_in == "world":
        homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
        voxels = (np.linalg.inv(original_affine) @ homogeneous.T).T[:, :3]
    else:
        voxels = points
    size = np.asarray(original_size)
    outside = np.any((voxels < -0.5) | (voxels > size - 0.5), axis=1)
    if outside.any():
        lines = []
        for idx in np.nonzero(outside)[0]:
            where = f"point {idx}: {points[idx].round(3).tolist()}"
            if points_in == "world":
                where += f" (world RAS mm) = voxel {voxels[idx].round(3).tolist()}"
            lines.append(where)
        raise ValueError(
            f"{int(outside.sum())} of {len(points)} points lie outside the volume ({points_in} coordinates; "
            f"stored-voxel range [-0.5, size - 0.5] with size {size.tolist()}, in the data's stored axis order "
            f"(NIfTI i, j, k / array axes)): " + "; ".join(lines)
        )
    return voxels, labels, points


def _linear_resize_matrix(
    in_size: int, out_size: int, lo: int, hi: int, step: float | None = None
) -> tuple[slice, torch.Tensor]:
    """The rows of 1D linear resizing `in_size -> out_size` (`align_corners=False`, PyTorch's source index
    `max((i + 0.5) * step - 0.5, 0)` with `step = in / out` unless given, the upper tap clamped to the last sample)
    that read samples `lo .. hi - 1`, restricted to those columns: `(output rows, (rows, hi - lo) weights)`."""
    step = in_size / out_size if step is None else step
    source = ((torch.arange(out_size, dtype=torch.float64) + 0.5) * step - 0.5).clamp(min=0)
    low = source.floor().long().clamp(max=in_size - 1)
    high = (low + 1).clamp(max=in_size - 1)
    reads = ((low >= lo) & (low < hi)) | ((high >= lo) & (high < hi))
    rows = reads.nonzero().flatten()
    first, last = int(rows[0]), int(rows[-1]) + 1
    weights = torch.zeros(last - first, hi - lo, dtype=torch.float64)
    index = torch.arange(first, last)
    fraction = source[first:last] - low[first:last]
    for taps, weight in ((low[first:last], 1 - fraction), (high[first:last], fraction)):
        inside = (taps >= lo) & (taps < hi)
        weights.index_put_((index[inside] - first, taps[inside] - lo), weight[inside], accumulate=True)
    return slice(first, last), weights.float()


def _resize_nonzero_box(
    canvas: torch.Tensor, size: tuple[int, int, int], steps: Sequence[float] | None = None
) -> torch.Tensor:
    """`F.interpolate(canvas, size, mode="trilinear", align_corners=False)` computed only where it can be non-zero:
    the output voxels whose taps read the bounding box of the canvas's non-zero voxels (the pasted patches). One 128³
    patch pasted back onto a 512 x 512 x 300 scan took 8 s on the whole grid. `steps` (canvas voxels per output voxel
    along each axis) replace `in / out`: the exact inverse of a resampling by `scale_factor` (whose sizes were
    floored)."""
    out = torch.zeros(size)
    nonzero = canvas.nonzero()
    if not len(nonzero):
        return out
    lo, hi = nonzero.min(0).values.tolist(), (nonzero.max(0).values + 1).tolist()
    box = canvas[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    rows = []
    for axis in range(3):  # separable: one small interpolation matrix per axis
        step = None if steps is None else float(steps[axis])
        where, weights = _linear_resize_matrix(canvas.shape[axis], size[axis], lo[axis], hi[axis], step)
        box = torch.tensordot(weights, box.movedim(axis, 0), dims=1).movedim(0, axis)
        rows.append(where)
    out[tuple(rows)] = box
    return out


def _as_numpy(value) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def _crop(array: np.ndarray, origin: np.ndarray, size: np.ndarray, pad_value: float) -> np.ndarray:
    """Crop `array[origin : origin + size]`, filling with `pad_value` where the window leaves the array."""
    out = np.full(tuple(size), pad_value, dtype=array.dtype)
    lo = np.maximum(origin, 0)
    hi = np.minimum(origin + size, array.shape)
    if np.all(hi > lo):
        src = tuple(slice(a, b) for a, b in zip(lo, hi))
        dst = tuple(slice(a - o, b - o) for a, b, o in zip(lo, hi, origin))
        out[dst] = array[src]
    return out


def save_mask_nifti(
    mask: torch.Tensor | np.ndarray,
    reference: Any,
    path: str | os.PathLike,
    dtype: str | None = None,
) -> str:
    """Write a mask as NIfTI in the reference scan's geometry, atomically (temporary file, then `os.replace`).

    The file gets the mode of any new file of the user (`0o666` minus the umask).

    Args:
        mask: array of the reference's stored shape (the data's stored axis order, NIfTI `(i, j, k)`), e.g. from
            [`Sam3DProcessor.post_process_masks`].
        reference: the original scan, as a NIfTI path or nibabel image (its affine and header -- qform/sform codes,
            units, description -- are reused), or the processor's output (`original_affine` is used; for NRRD/DICOM
            or array inputs).
        path: destination ending in `.nii` or `.nii.gz`.
        dtype: `None` (default) writes integer labels in the smallest unsigned type that holds them (`uint8` up to
            255, `uint16` up to 65535); the mask must then hold whole, non-negative numbers (booleans included).
            `"float32"` writes the values as they are, e.g. probabilities from
            `post_process_masks(..., return_probabilities=True)`.

    Returns:
        The written path.

    Raises:
        ValueError: a bad suffix or `dtype`, a shape other than the reference's, non-finite values, or (integer
            labels) fractional, negative or too large values.
    """
    path = os.fspath(path)
    if not path.lower().endswith((".nii", ".nii.gz")):
        raise ValueError(f"`path` must end with .nii or .nii.gz, got {path!r}.")
    if dtype not in (None, "float32"):
        raise ValueError(f"`dtype` must be None (integer labels) or 'float32' (e.g. probabilities), got {dtype!r}.")
    mask = _as_numpy(mask)
    if isinstance(reference, (BatchFeature, dict)):
        affine = _as_numpy(reference["original_affine"]).astype(np.float64)
        expected = tuple(_as_numpy(reference["original_size"]).astype(np.int64).tolist())
        header = None
    else:
        ref = load_volume(reference) if not isinstance(reference, nib.spatialimages.SpatialImage) else None
        ref_img = reference if ref is None else ref.nifti
        if ref_img is None:
            raise ValueError(
                f"`reference` {reference!r} is not NIfTI; pass the processor's output (it holds `original_affine`)."
            )
        affine = np.asarray(ref_img.affine, np.float64)
        expected = tuple(ref_img.shape[:3])
        header = ref_img.header.copy() if isinstance(ref_img.header, nib.Nifti1Header) else None
    if mask.shape != expected:
        raise ValueError(f"`mask` has shape {mask.shape} but the reference scan has shape {expected}.")
    data = _mask_to_storable(mask, dtype)

    image = nib.Nifti1Image(data, affine, header=header)
    image.header.set_data_dtype(data.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    if header is not None:  # keep the scan's qform/sform codes (the constructor may reset them)
        image.set_qform(affine, int(header["qform_code"]))
        image.set_sform(affine, int(header["sform_code"]))
    suffix = ".nii.gz" if path.lower().endswith(".nii.gz") else ".nii"  # nibabel compresses by extension
    atomic_write(path, lambda temporary: nib.save(image, temporary), suffix=suffix)
    return path


def _mask_to_storable(mask: np.ndarray, dtype: str | None) -> np.ndarray:
    """The mask as float32 (`dtype="float32"`) or as uint8/uint16 labels, refusing values a cast would corrupt."""
    if mask.dtype == bool:
        return mask.astype(np.uint8)
    if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)):
        raise ValueError(f"`mask` must hold real numbers or booleans, got dtype {mask.dtype}.")
    if np.issubdtype(mask.dtype, np.floating) and not np.all(np.isfinite(mask)):
        raise ValueError("`mask` has non-finite values (NaN/inf); a mask must be finite.")
    if dtype == "float32":
        return mask.astype(np.float32)
    if np.issubdtype(mask.dtype, np.floating) and np.any(mask != np.rint(mask)):
        fractional = np.unique(mask[mask != np.rint(mask)])
        raise ValueError(
            f"`mask` holds non-integer values {fractional[:5].tolist()} (probabilities?); integer labels were "
            "expected. Threshold it first (`post_process_masks` without `return_probabilities`), or pass "
            "`dtype='float32'` to write the values as a float image."
        )
    low, high = (mask.min(), mask.max()) if mask.size else (0, 0)
    if low < 0:
        raise ValueError(f"`mask` holds negative values (minimum {low}); labels must be >= 0.")
    if high > np.iinfo(np.uint16).max:
        raise ValueError(
            f"`mask` holds values up to {high}, beyond uint16 (65535); labels must fit in 0..65535 "
            "(or pass `dtype='float32'`)."
        )
    return mask.astype(np.uint8 if high <= np.iinfo(np.uint8).max else np.uint16)


# Here, not in registration.py: this module's copy in a saved folder registers itself too (remote code).
AutoProcessor.register(Sam3DConfig, Sam3DProcessor, exist_ok=True)
