"""Evaluation the way the 3DSAM-adapter paper reports it: Dice and normalized surface Dice (NSD) per scan and per
lesion, a seeded click simulator for the paper's prompting protocols, and Table-1 style summaries.

Geometry. Everything here works in the **original geometry of a scan**: arrays in the scan's stored axis order (NIfTI
i, j, k; what `nib.load(path).shape`, `Sam3DVolume.data` and `Sam3DProcessor.post_process_masks` give) together with
`spacing`, the voxel size in mm along each stored axis (the column norms of the voxel-to-world affine,
`Sam3DVolume.spacing`). Clicks come back as stored voxel indices, ready for
`Sam3DProcessor(images=..., input_points=points, input_labels=labels, points_in="voxel")`.

Metrics.
* Dice `2|P ∩ G| / (|P| + |G|)` from exact voxel counts, in float64.
* NSD at `tolerance_mm` (5 mm by default, as the official evaluation `test.py` calls DeepMind's `surface_distance`
  with `tolerance=5`): the fraction of the two surfaces' area lying within the tolerance of the other surface.
  Computed by MONAI `compute_surface_dice(..., spacing=spacing, use_subvoxels=True)`, which is DeepMind's definition:
  surface elements are the marching-cubes faces of each 2x2x2 voxel neighbourhood, weighted by their area in mm²,
  and distances are in mm. MONAI's default `use_subvoxels=False` counts boundary voxels instead and is biased low.
* Empty masks. Both empty: Dice 1 and NSD 1 (nothing to find, nothing found). Exactly one empty: Dice 0, NSD 0.
  MONAI gives the same with `compute_dice(ignore_empty=False)`, but NaN for the NSD of two empty masks (as does
  DeepMind's `compute_surface_dice_at_tolerance`, 0/0). The paper does not discuss empty cases (it evaluates
  tumour scans); the official evaluation's Dice (`1 - monai.losses.DiceLoss`, smoothed) gives 1 for two empty masks.
* Lesions are the connected components of the ground truth with full 26-connectivity (`scipy.ndimage.label` with a
  3x3x3 structure). The per-lesion score of lesion `l` compares `l` alone with its *neighbourhood prediction*: the
  union of the 26-connected prediction components that have a voxel within `lesion_margin_mm` (Euclidean, in mm) of
  a voxel of `l`. Other lesions are not part of `l`'s reference, so a prediction component that spans two lesions
  counts as partly false positive for each; prediction components far from every lesion lower the case score only.
  (MONAI's `compute_dice(per_component=True)` instead splits space into Voronoi regions of the lesions.)

Click protocols (`simulate_clicks`; all positive clicks, label 1; `numpy.random.default_rng(seed)` only, so the same
seed gives the same clicks and the global NumPy state is never read or changed):
* `"uniform"`: `num_clicks` voxels drawn uniformly, with replacement, from all target voxels -- the official
  evaluation's `np.random.choice(np.arange(l), num_prompts, replace=True)` (drawn there on its resampled grid, here
  on the original one); the paper reports 1, 3 and 10 clicks.
* `"per_lesion"`: for scans with several lesions. With `num_clicks >= number of lesions`, one click uniformly inside
  each lesion, the remaining `num_clicks - lesions` uniformly over all target voxels; with fewer clicks than lesions,
  one click in each of the `num_clicks` largest lesions.
* `"center"`, `"surrounding"`, `"marginal"`: the paper's ablation on where the click lies in the tumour. In the
  largest lesion, let `d` be each voxel's Euclidean distance in mm to the nearest voxel outside the lesion
  (`scipy.ndimage.distance_transform_edt` with `sampling=spacing`; outside the array counts as outside) and
  `r = d / max(d)`. Centre: `r >= 2/3`; surrounding: `1/3 <= r < 2/3`; marginal: `r < 1/3`. Clicks are uniform,
  with replacement, among the lesion voxels of that region.

Correction (`correction_click`, for models with `use_point_labels=True`): the largest error component -- the
26-connected components of the false positives and of the false negatives, the one with the most voxels (the same
ranking as mm³ within a scan; a tie goes to the miss) -- gets one click at its voxel farthest from the component's
boundary (distance transform in mm; first such voxel in C order): label 1 in a miss, label 0 in a false positive.
With `avoid` (the clicks so far), a region whose click would fall on an earlier click's voxel is passed over for the
next in size: a model that ignored a click is not given the same click again.

Interactive curves (`summarize_interactive`, `curve_auc`): Dice and NSD after the first click and after each
correction, their area under the curve by the trapezoid rule with x = round (0..R, so at most R), as the CVPR 2025
challenge "Foundation Models for Interactive 3D Biomedical Image Segmentation" scores (`CVPR25_iter_eval.py`: scipy
`cumulative_trapezoid` of its 5 click rounds against x = 0..4, at most 4; NSD at 2 mm there, set to 0 when Dice <=
0.2, which is not done here: the NSD reported is the real one).

Reports. `evaluate_case` returns one record per scan; add `dataset`, `method`, `protocol`, `num_clicks`, `round` to
it, then `summarize` the records and print `markdown_table(summary)` (rows: method / protocol / clicks / correction
rounds, columns: Dice and NSD per dataset, as in the paper's Table 1).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy import ndimage

CLICK_PROTOCOLS = ("uniform", "per_lesion", "center", "surrounding", "marginal")
# Rows of a summary: the click protocols, then "automatic" (sliding window without clicks, `predict_automatic`).
# official: test.py's placement and crop; interactive: the first click at the largest lesion's centre, then corrections.
SUMMARY_PROTOCOLS = ("official", *CLICK_PROTOCOLS, "interactive", "automatic")
# Full 26-connectivity: voxels that share only an edge or a corner belong to the same lesion / error region.
CONNECTIVITY_26 = np.ones((3, 3, 3), dtype=bool)

__all__ = [
    "CLICK_PROTOCOLS",
    "SUMMARY_PROTOCOLS",
    "correction_click",
    "curve_auc",
    "dice_score",
    "evaluate_case",
    "markdown_interactive",
    "markdown_table",
    "normalized_surface_dice",
    "repeats_click",
    "simulate_clicks",
    "summarize",
    "summarize_interactive",
]


# ----------------------------------------------------------------------------------------------------------- inputs
def _as_mask(value: Any, name: str) -> np.ndarray:
    """A 3D boolean array from a bool / 0-1 numpy array or torch tensor (any other value is an error)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except Exception as err:
        raise TypeError(f"`{name}` must be a 3D numpy array or torch tensor, got {type(value).__name__}.") from err
    if array.dtype == object or not (array.dtype == bool or np.issubdtype(array.dtype, np.number)):
        raise TypeError(f"`{name}` must be a numeric or boolean 3D array, got dtype {array.dtype}.")
    if array.ndim != 3:
        raise ValueError(
            f"`{name}` must be a 3D mask in the scan's stored axis order, got shape {array.shape}; drop batch and "
            "channel axes first (e.g. `mask[0, 0]`)."
        )
    if array.dtype == bool:
        return array
    bad = (array != 0) & (array != 1)
    if bad.any():
        values = np.unique(array[bad])[:5].tolist()
        raise ValueError(
            f"`{name}` must be binary (0/1 or bool), but it holds other values such as {values}. For a multi-class "
            f"label map pass the tumour class only, e.g. `{name} == 2` for KiTS tumours."
        )
    return array == 1


def _as_pair(prediction: Any, label: Any) -> tuple[np.ndarray, np.ndarray]:
    prediction, label = _as_mask(prediction, "prediction"), _as_mask(label, "label")
    if prediction.shape != label.shape:
        raise ValueError(
            f"`prediction` {prediction.shape} and `label` {label.shape} must have the same shape: both on the "
            "scan's original grid in its stored axis order (see `Sam3DProcessor.post_process_masks`)."
        )
    return prediction, label


def _as_spacing(spacing: Any) -> tuple[float, float, float]:
    try:
        values = np.asarray(spacing, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`spacing` must be 3 numbers (mm per stored axis), got {spacing!r}.") from err
    if values.shape != (3,):
        raise ValueError(
            f"`spacing` must be 3 voxel sizes in mm, one per stored axis (`Sam3DVolume.spacing`, i.e. "
            f"`np.linalg.norm(affine[:3, :3], axis=0)`), got {spacing!r}; for isotropic voxels pass (s, s, s)."
        )
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError(f"`spacing` must be finite and > 0 mm on every axis, got {values.tolist()}.")
    return tuple(float(v) for v in values)


def _as_positive_mm(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"`{name}` must be a number of millimetres, got {type(value).__name__}.")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number of mm >= 0, got {value}.")
    return float(value)


def _label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    labels, count = ndimage.label(mask, structure=CONNECTIVITY_26)
    return labels, int(count)


def _voxels_of(mask: np.ndarray, box: tuple[slice, ...]) -> np.ndarray:
    """`(N, 3)` full-volume indices of the voxels of `mask`, a crop of the volume at `box`."""
    return np.argwhere(mask) + [s.start for s in box]


# ---------------------------------------------------------------------------------------------------------- metrics
def dice_score(prediction: Any, label: Any) -> float:
    """Dice `2|P ∩ G| / (|P| + |G|)` of two binary 3D masks of the same shape.

    Args:
        prediction: binary mask (bool or 0/1, numpy or torch), shape `(X, Y, Z)` in the scan's stored axis order.
        label: ground-truth mask, same shape.

    Returns:
        Dice in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    prediction, label = _as_pair(prediction, label)
    # Same value and empty-mask convention as MONAI's `compute_dice(ignore_empty=False)`, which returns float32.
    total = int(np.count_nonzero(prediction)) + int(np.count_nonzero(label))
    return 2 * int(np.count_nonzero(prediction & label)) / total if total else 1.0


def normalized_surface_dice(prediction: Any, label: Any, spacing: Sequence[float], tolerance_mm: float = 5.0) -> float:
    """Normalized surface Dice (DeepMind's definition) of two binary 3D masks at a tolerance in mm.

    Args:
        prediction: binary mask (bool or 0/1, numpy or torch), shape `(X, Y, Z)` in the scan's stored axis order.
        label: ground-truth mask, same shape.
        spacing: voxel size in mm along each stored axis (`Sam3DVolume.spacing`).
        tolerance_mm: a surface element counts as correct when the other surface is at most this far (mm).

    Returns:
        NSD in [0, 1]; 1.0 when both masks are empty, 0.0 when exactly one is.
    """
    prediction, label = _as_pair(prediction, label)
    spacing = _as_spacing(spacing)
    tolerance_mm = _as_positive_mm(tolerance_mm, "tolerance_mm")
    return _nsd(prediction, label, spacing, tolerance_mm)


def _nsd(prediction: np.ndarray, label: np.ndarray, spacing: tuple[float, ...], tolerance_mm: float) -> float:
    has_pred, has_label = bool(prediction.any()), bool(label.any())
    if not (has_pred and has_label):  # decided here: MONAI warns and gives NaN for two empty masks
        return float(has_pred == has_label)
    from monai.metrics import compute_surface_dice  # here: importing monai.metrics costs seconds at package import

    # Crop to the union's bounding box first: MONAI crops the same way (padding a background margin), but its crop of
    # a whole CT volume costs more than the metric itself.
    box = ndimage.find_objects((prediction | label).astype(np.int8))[0]
    prediction, label = prediction[box], label[box]
    with warnings.catch_warnings():
        # MONAI 1.6 passes its own deprecated `always_return_as_numpy` internally; nothing for the user to change.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
        nsd = compute_surface_dice(
            torch.from_numpy(prediction)[None, None],
            torch.from_numpy(label)[None, None],
            class_thresholds=[tolerance_mm],
            include_background=True,  # the single channel is the tumour
            spacing=spacing,  # a 3-tuple: MONAI crashes on a scalar spacing with use_subvoxels=True
            use_subvoxels=True,
        )
    return float(nsd.item())


def evaluate_case(
    prediction: Any,
    label: Any,
    spacing: Sequence[float],
    tolerance_mm: float = 5.0,
    lesion_margin_mm: float = 5.0,
) -> dict[str, Any]:
    """Dice and NSD of one scan, overall and per lesion.

    Args:
        prediction: binary predicted mask (bool or 0/1, numpy or torch) on the scan's original grid, shape `(X, Y, Z)`
            in its stored axis order (what `Sam3DProcessor.post_process_masks` returns).
        label: ground-truth tumour mask, same shape (for multi-class label maps pass `label == tumour_class`).
        spacing: voxel size in mm along each stored axis (`Sam3DVolume.spacing`, the column norms of the affine).
        tolerance_mm: NSD tolerance in mm (the paper: 5 mm).
        lesion_margin_mm: a prediction component belongs to a lesion's neighbourhood prediction when one of its voxels
            is within this distance (mm) of the lesion (see the module docstring).

    Returns:
        `{"dice", "nsd", "voxels", "volume_mm3", "lesions"}` where `lesions` lists, per ground-truth lesion
        (26-connected component, in `scipy.ndimage.label` order), `{"lesion", "voxels", "volume_mm3", "detected",
        "dice", "nsd"}` (`lesion` is the 1-based component index; `detected`: some prediction component lies in its
        neighbourhood). Empty ground truth gives an empty `lesions` list.
    """
    prediction, label = _as_pair(prediction, label)
    spacing = _as_spacing(spacing)
    tolerance_mm = _as_positive_mm(tolerance_mm, "tolerance_mm")
    lesion_margin_mm = _as_positive_mm(lesion_margin_mm, "lesion_margin_mm")
    voxel_mm3 = float(np.prod(spacing))
    record: dict[str, Any] = {
        "dice": dice_score(prediction, label),
        "nsd": _nsd(prediction, label, spacing, tolerance_mm),
        "voxels": int(label.sum()),
        "volume_mm3": float(label.sum()) * voxel_mm3,
        "lesions": [],
    }
    lesion_labels, num_lesions = _label_components(label)
    if num_lesions == 0:
        return record
    pred_labels, _ = _label_components(prediction)
    pred_boxes = ndimage.find_objects(pred_labels)
    margin_vox = [math.ceil(lesion_margin_mm / s) for s in spacing]
    for index, lesion_box in enumerate(ndimage.find_objects(lesion_labels), start=1):
        # Neighbourhood of the lesion: its bounding box grown by the margin, voxels within `lesion_margin_mm` of it.
        near = tuple(
            slice(max(b.start - m, 0), min(b.stop + m, n)) for b, m, n in zip(lesion_box, margin_vox, label.shape)
        )
        lesion_near = lesion_labels[near] == index
        within = ndimage.distance_transform_edt(~lesion_near, sampling=spacing) <= lesion_margin_mm
        touching = np.unique(pred_labels[near][within])
        touching = touching[touching > 0]
        # Crop to the lesion and the whole of every touching component (components may reach beyond `near`).
        box = list(lesion_box)
        for comp in touching:
            box = [slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box, pred_boxes[comp - 1])]
        box = tuple(box)
        lesion = lesion_labels[box] == index
        neighbourhood_pred = np.isin(pred_labels[box], touching)
        voxels = int(lesion.sum())
        record["lesions"].append(
            {
                "lesion": index,
                "voxels": voxels,
                "volume_mm3": voxels * voxel_mm3,
                "detected": bool(len(touching)),
                "dice": dice_score(neighbourhood_pred, lesion),
                "nsd": _nsd(neighbourhood_pred, lesion, spacing, tolerance_mm),
            }
        )
    return record


# ----------------------------------------------------------------------------------------------------------- clicks
def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise TypeError(f"`seed` must be an int >= 0 (clicks are reproducible per seed), got {seed!r}.")
    return int(seed)


def _inside_distance_mm(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Per voxel of `mask`, the Euclidean distance in mm to the nearest voxel outside it (outside the array counts).

    Exact on a crop that contains the whole mask: the zero padding stands for everything outside the crop.
    """
    padded = np.pad(mask, 1)  # so that a mask touching the array border gets a boundary there
    return ndimage.distance_transform_edt(padded, sampling=spacing)[1:-1, 1:-1, 1:-1]


def simulate_clicks(
    label: Any,
    protocol: str = "uniform",
    num_clicks: int = 1,
    seed: int = 0,
    spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulated positive clicks on a ground-truth mask, following one of the paper's protocols.

    Kept apart from inference: feed the result to
    `Sam3DProcessor(images=..., input_points=points, input_labels=labels, points_in="voxel")`.

    Args:
        label: ground-truth tumour mask (bool or 0/1, numpy or torch), shape `(X, Y, Z)` in the scan's stored order.
        protocol: one of `CLICK_PROTOCOLS` -- `"uniform"`, `"per_lesion"`, `"center"`, `"surrounding"`,
            `"marginal"` (definitions in the module docstring).
        num_clicks: clicks to return (the paper: 1, 3 or 10).
        seed: seed of `numpy.random.default_rng`; the same seed gives the same clicks.
        spacing: voxel size in mm along each stored axis; required by the position protocols (distances in mm).

    Returns:
        `(points, labels)`: `points` `(num_clicks, 3)` float64 voxel indices `(i, j, k)` of the stored data (whole
        numbers: voxel centres), `labels` `(num_clicks,)` int64, all 1 (positive clicks).
    """
    label = _as_mask(label, "label")
    if protocol not in CLICK_PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {CLICK_PROTOCOLS}, got {protocol!r}.")
    if isinstance(num_clicks, bool) or not isinstance(num_clicks, (int, np.integer)) or num_clicks < 1:
        raise ValueError(f"`num_clicks` must be an int >= 1 (the paper uses 1, 3, 10), got {num_clicks!r}.")
    rng = np.random.default_rng(_check_seed(seed))
    if not label.any():
        raise ValueError("`label` is empty: there is no target to click on; leave scans without a tumour out.")

    if protocol == "uniform":
        candidates = np.argwhere(label)
        points = candidates[rng.integers(len(candidates), size=num_clicks)]
    elif protocol == "per_lesion":
        lesion_labels, num_lesions = _label_components(label)
        sizes = np.bincount(lesion_labels.ravel(), minlength=num_lesions + 1)[1:]
        # Lesion ids by decreasing size; a stable sort keeps scipy's order among equal sizes.
        order = np.argsort(-sizes, kind="stable") + 1
        chosen = np.sort(order[: min(num_clicks, num_lesions)])
        boxes = ndimage.find_objects(lesion_labels)
        points = [rng.choice(_voxels_of(lesion_labels[boxes[i - 1]] == i, boxes[i - 1])) for i in chosen]
        if num_clicks > num_lesions:
            candidates = np.argwhere(label)
            points.extend(candidates[rng.integers(len(candidates), size=num_clicks - num_lesions)])
        points = np.stack(points)
    else:
        if spacing is None:
            raise ValueError(f"protocol {protocol!r} measures distances in mm: pass `spacing` (mm per stored axis).")
        spacing = _as_spacing(spacing)
        lesion_labels, _ = _label_components(label)
        largest = int(np.argmax(np.bincount(lesion_labels.ravel())[1:])) + 1
        box = ndimage.find_objects(lesion_labels)[largest - 1]
        lesion = lesion_labels[box] == largest  # cropping is exact: the padding stands for everything outside
        distance = _inside_distance_mm(lesion, spacing)
        ratio = distance / distance.max()
        region = {
            "center": ratio >= 2 / 3,
            "surrounding": (ratio >= 1 / 3) & (ratio < 2 / 3),
            "marginal": ratio < 1 / 3,
        }[protocol] & lesion
        if not region.any():
            raise ValueError(
                f"The {protocol!r} region of the largest lesion ({int(lesion.sum())} voxels, deepest voxel "
                f"{distance.max():.2f} mm from its boundary) is empty: the lesion is too small to split into three "
                "depth bands at this spacing; use protocol 'uniform' for this scan."
            )
        candidates = _voxels_of(region, box)
        points = candidates[rng.integers(len(candidates), size=num_clicks)]
    return points.astype(np.float64), np.ones(num_clicks, dtype=np.int64)


def correction_click(
    label: Any, prediction: Any, spacing: Sequence[float], avoid: Any = None
) -> tuple[np.ndarray, int] | None:
    """One corrective click at the centre of the largest error region of a prediction.

    The error regions are the 26-connected components of the misses (`label & ~prediction`) and of the false
    positives (`prediction & ~label`); the one with the most voxels wins (a tie goes to the miss). The click is its
    voxel farthest (Euclidean, mm) from the component's boundary. With `avoid` (the clicks given so far), a region
    whose click falls on the voxel of one of them (`repeats_click`) is passed over for the next in size (all regions
    of both kinds ranked by voxels, a tie to the miss, then to the first in `scipy.ndimage.label` order).

    Args:
        label: ground-truth tumour mask (bool or 0/1, numpy or torch), shape `(X, Y, Z)` in the scan's stored order.
        prediction: current binary prediction, same shape.
        spacing: voxel size in mm along each stored axis (`Sam3DVolume.spacing`).
        avoid: `None` or `(N, 3)` stored voxel indices of earlier clicks that the next click must not repeat.

    Returns:
        `(point, click_label)` -- `point` `(3,)` float64 stored voxel indices `(i, j, k)`, `click_label` 1 (positive,
        inside a miss) or 0 (negative, inside a false positive) -- or `None` when the prediction equals the label (or,
        with `avoid`, when every error region's click repeats an earlier one). Append them to the previous clicks for
        the next round (`input_points`, `input_labels`, `points_in="voxel"`).
    """
    prediction, label = _as_pair(prediction, label)
    spacing = _as_spacing(spacing)
    avoid = np.zeros((0, 3)) if avoid is None else _as_clicks(avoid, "avoid")
    regions = []  # (-voxels, 0 for a miss / 1 for a false positive, component index, click label, components, box)
    for kind, (click_label, errors) in enumerate(((1, label & ~prediction), (0, prediction & ~label))):
        components, count = _label_components(errors)
        sizes = np.bincount(components.ravel(), minlength=count + 1)[1:]
        boxes = ndimage.find_objects(components)
        regions.extend((-int(sizes[i]), kind, i, click_label, components, boxes[i]) for i in range(count))
    for _, _, index, click_label, components, box in sorted(regions, key=lambda region: region[:3]):
        distance = _inside_distance_mm(components[box] == index + 1, spacing)  # exact on the crop
        point = np.array(np.unravel_index(int(np.argmax(distance)), distance.shape)) + [s.start for s in box]
        if not repeats_click(point, avoid):
            return point.astype(np.float64), click_label
    return None


def repeats_click(point: Any, clicks: Any) -> bool:
    """Whether `point` (3 stored voxel indices) falls on the voxel of one of `clicks` (`(N, 3)`), both rounded to the
    nearest voxel: a corrective click there would repeat a click the model was already given."""
    point = _as_clicks(np.reshape(point, (1, -1)), "point")[0]
    clicks = _as_clicks(clicks, "clicks")
    return bool((np.rint(clicks) == np.rint(point)).all(axis=1).any())


def _as_clicks(value: Any, name: str) -> np.ndarray:
    try:
        clicks = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"`{name}` must be (N, 3) stored voxel indices, got {type(value).__name__}.") from err
    if clicks.size == 0:
        return clicks.reshape(0, 3)
    if clicks.ndim != 2 or clicks.shape[1] != 3 or not np.isfinite(clicks).all():
        raise ValueError(
            f"`{name}` must be (N, 3) finite stored voxel indices (i, j, k), one row per click, got an array of shape "
            f"{clicks.shape}; pass the clicks as they were given, e.g. `points` of the earlier rounds."
        )
    return clicks


# ---------------------------------------------------------------------------------------------------------- reports
_GROUP_DEFAULTS = {"method": "3DSAM-adapter", "dataset": "all", "protocol": "uniform", "round": 0}


def _row_name(method: str, protocol: str, num_clicks: int, rounds: int) -> str:
    if protocol == "automatic":
        return f"{method}, automatic (sliding window)"
    name = f"{method}, {num_clicks} click{'s' if num_clicks != 1 else ''} ({protocol})"
    if rounds:
        name += f" + {rounds} correction{'s' if rounds != 1 else ''}"
    return name


def _mean_std(values: list[float]) -> tuple[float, float]:
    # Sample standard deviation (ddof=1); undefined (NaN) for a single case.
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return float(np.mean(values)), std


def summarize(records: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, standard deviation and count of Dice and NSD per row (method, protocol, clicks, round) and dataset.

    Args:
        records: one mapping per evaluated scan: `evaluate_case(...)` plus `num_clicks` (required) and optionally
            `method` (default "3DSAM-adapter"), `dataset` (default "all"), `protocol` (one of `SUMMARY_PROTOCOLS`,
            default "uniform"; `"automatic"` for sliding-window predictions, `num_clicks` 0) and `round` (corrections
            applied so far, default 0).

    Returns:
        `{row: {dataset: {"dice_mean", "dice_std", "nsd_mean", "nsd_std", "n", "lesion_dice_mean",
        "lesion_nsd_mean", "n_lesions"}}}` (JSON-serialisable). Rows read like
        `"3DSAM-adapter, 3 clicks (uniform) + 2 corrections"` (`"3DSAM-adapter, automatic (sliding window)"`) and are
        ordered by method, protocol (in `SUMMARY_PROTOCOLS` order), clicks and round; datasets keep the order they
        first appear in. Standard deviations are sample ones (ddof=1, NaN for one case); lesion means pool all lesions
        of the group (NaN when none).
    """
    if isinstance(records, Mapping) or not isinstance(records, Sequence) or not records:
        raise ValueError("`records` must be a non-empty list of per-scan dicts (from `evaluate_case`).")
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    datasets: list[str] = []
    for position, record in enumerate(records):
        missing = [key for key in ("dice", "nsd", "num_clicks") if key not in record]
        if missing:
            raise ValueError(
                f"record {position} lacks {missing}: each record is `evaluate_case(...)` plus `num_clicks` "
                "(and optionally method, dataset, protocol, round)."
            )
        meta = {key: record.get(key, default) for key, default in _GROUP_DEFAULTS.items()}
        if meta["protocol"] not in SUMMARY_PROTOCOLS:
            raise ValueError(
                f"record {position} has protocol {meta['protocol']!r}; expected one of {SUMMARY_PROTOCOLS}."
            )
        dataset = str(meta["dataset"])
        key = (str(meta["method"]), SUMMARY_PROTOCOLS.index(meta["protocol"]), int(record["num_clicks"]))
        key = (*key, int(meta["round"]), dataset)
        if dataset not in datasets:
            datasets.append(dataset)
        groups.setdefault(key, []).append(record)

    summary: dict[str, dict[str, dict[str, float]]] = {}
    for key in sorted(groups, key=lambda k: (k[:4], datasets.index(k[4]))):
        method, protocol_index, num_clicks, rounds, dataset = key
        cases = groups[key]
        dice_mean, dice_std = _mean_std([float(r["dice"]) for r in cases])
        nsd_mean, nsd_std = _mean_std([float(r["nsd"]) for r in cases])
        lesions = [lesion for r in cases for lesion in r.get("lesions", [])]
        summary.setdefault(_row_name(method, SUMMARY_PROTOCOLS[protocol_index], num_clicks, rounds), {})[dataset] = {
            "dice_mean": dice_mean,
            "dice_std": dice_std,
            "nsd_mean": nsd_mean,
            "nsd_std": nsd_std,
            "n": len(cases),
            "lesion_dice_mean": float(np.mean([x["dice"] for x in lesions])) if lesions else float("nan"),
            "lesion_nsd_mean": float(np.mean([x["nsd"] for x in lesions])) if lesions else float("nan"),
            "n_lesions": len(lesions),
        }
    return summary


def markdown_table(summary: Mapping[str, Mapping[str, Mapping[str, float]]], digits: int = 2) -> str:
    """A Markdown table in the shape of the paper's Table 1: one row per method/protocol/clicks/round, Dice and NSD
    (in %, mean ± sample std) per dataset, then the number of cases per dataset.

    Args:
        summary: the output of `summarize`.
        digits: decimals of the percentages.
    """
    if not isinstance(summary, Mapping) or not summary:
        raise ValueError("`summary` must be the non-empty dict returned by `summarize(records)`.")
    datasets: list[str] = []
    for row in summary.values():
        datasets.extend(d for d in row if d not in datasets)

    def cell(stats: Mapping[str, float] | None, metric: str) -> str:
        if stats is None:
            return "–"
        mean, std = 100 * stats[f"{metric}_mean"], 100 * stats[f"{metric}_std"]
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if math.isfinite(std) else "")

    header = ["Method"]
    for dataset in datasets:
        prefix = "" if datasets == ["all"] else f"{dataset} "
        header += [f"{prefix}Dice (%)", f"{prefix}NSD (%)"]
    header.append("n")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + [":---:"] * (len(header) - 1)) + "|"]
    for name, row in summary.items():
        cells = [name]
        for dataset in datasets:
            cells += [cell(row.get(dataset), "dice"), cell(row.get(dataset), "nsd")]
        cells.append("/".join(str(row[d]["n"]) if d in row else "0" for d in datasets))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ interactive
INTERACTIVE_METRICS = ("dice", "nsd", "nsd_2mm")


def curve_auc(values: Sequence[float]) -> float:
    """Area under a per-round curve (Dice or NSD after rounds 0, 1, ..., R) by the trapezoid rule with x = round, so
    at most R for values in [0, 1]. The CVPR 2025 interactive challenge integrates its 5 click rounds the same way
    (`scipy.integrate.cumulative_trapezoid(values, np.arange(5))[-1]`, at most 4)."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or len(values) < 2:
        raise ValueError(
            f"`values` must be one score per round, rounds 0..R with R >= 1 (first click and corrections), got shape "
            f"{values.shape}."
        )
    return float(np.sum(values[1:] + values[:-1]) / 2)


def summarize_interactive(
    records: Sequence[Mapping[str, Any]], tolerance_mm: float, challenge_tolerance_mm: float = 2.0
) -> dict[str, Any]:
    """Mean curves, areas under them and the ignored corrections of an interactive evaluation.

    Args:
        records: one mapping per scan: `"dice"`, `"nsd"`, `"nsd_2mm"` (one score per round 0..R: the first click,
            then R corrections; every scan the same R), `"corrections"` (rounds in which the prediction had an error
            to correct) and `"repeated_corrections"` (of those, the rounds whose click would have repeated an earlier
            click: the model ignored it, see `correction_click(avoid=...)`).
        tolerance_mm: the NSD tolerance of `"nsd"` (the paper: 5 mm); challenge_tolerance_mm: that of `"nsd_2mm"`.

    Returns:
        `{"rounds", "n_cases", "dice_per_round", "nsd_per_round", "nsd_2mm_per_round" (means over scans), "auc_max"
        (R), "dice_auc_mean", "dice_auc_std", "dice_final_mean", "dice_final_std" (and the same for nsd, nsd_2mm;
        `curve_auc` per scan, then mean and sample std), "corrections", "repeated_corrections" (summed),
        "nsd_tolerance_mm", "nsd_2mm_tolerance_mm"}`.
    """
    if isinstance(records, Mapping) or not isinstance(records, Sequence) or not records:
        raise ValueError("`records` must be a non-empty list of per-scan dicts (dice, nsd, nsd_2mm per round).")
    lengths = {len(record.get(metric, ())) for record in records for metric in INTERACTIVE_METRICS}
    if len(lengths) != 1 or min(lengths) < 2:
        raise ValueError(
            f"every record needs {INTERACTIVE_METRICS}, each one score per round 0..R with the same R >= 1 for all "
            f"scans; got lengths {sorted(lengths)}."
        )
    rounds = lengths.pop() - 1
    block: dict[str, Any] = {"rounds": rounds, "n_cases": len(records), "auc_max": rounds}
    for metric in INTERACTIVE_METRICS:
        curves = np.asarray([record[metric] for record in records], dtype=np.float64)  # (cases, rounds + 1)
        block[f"{metric}_per_round"] = curves.mean(0).tolist()
        block[f"{metric}_auc_mean"], block[f"{metric}_auc_std"] = _mean_std([curve_auc(c) for c in curves])
        block[f"{metric}_final_mean"], block[f"{metric}_final_std"] = _mean_std(curves[:, -1].tolist())
    block["corrections"] = sum(int(record["corrections"]) for record in records)
    block["repeated_corrections"] = sum(int(record["repeated_corrections"]) for record in records)
    block["nsd_tolerance_mm"], block["nsd_2mm_tolerance_mm"] = float(tolerance_mm), float(challenge_tolerance_mm)
    return block


def markdown_interactive(block: Mapping[str, Any], digits: int = 2) -> str:
    """A short Markdown section for `summarize_interactive`'s output: the mean curve per round (in %), the areas
    under it and how many corrections the model ignored."""
    tolerances = (block["nsd_tolerance_mm"], block["nsd_2mm_tolerance_mm"])
    lines = [
        f"### Interactive: first click at the centre of the largest lesion, then {block['rounds']} corrections",
        "",
        f"| round | Dice (%) | NSD {tolerances[0]:g} mm (%) | NSD {tolerances[1]:g} mm (%) |",
        "|---|:---:|:---:|:---:|",
    ]
    for round_ in range(block["rounds"] + 1):
        cells = [f"{100 * block[f'{m}_per_round'][round_]:.{digits}f}" for m in INTERACTIVE_METRICS]
        lines.append(f"| {round_ if round_ else '0 (first click)'} | " + " | ".join(cells) + " |")
    areas = ", ".join(
        f"{name} {block[f'{metric}_auc_mean']:.{digits + 1}f}"
        for name, metric in zip(("Dice", f"NSD {tolerances[0]:g} mm", f"NSD {tolerances[1]:g} mm"), INTERACTIVE_METRICS)
    )
    lines += [
        "",
        f"Area under the curve (trapezoid over rounds 0..{block['rounds']}, at most {block['auc_max']}), mean over "
        f"{block['n_cases']} cases: {areas}. Corrections that would have repeated an earlier click (the model ignored "
        f"it; the next largest error was clicked instead): {block['repeated_corrections']} of {block['corrections']}.",
    ]
    return "\n".join(lines) + "\n"
