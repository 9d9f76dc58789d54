"""Training patches for Sam3D: random crops of the cached volumes, augmentations, click prompts, batches.

[`Sam3DTrainingDataset`] (a torch `Dataset` of augmented patches with click prompts, drawn from the
`sam3d_hf.data.PreprocessedCache` of each case) -> `DataLoader(..., collate_fn=sam3d_collate)`; [`sample_points`]
places the clicks in a patch.

Conventions: volumes and patches are `(D, H, W)` on the processor's resampled canonical grid (default: depth towards
Superior, height towards Anterior, width towards Right, 1 mm); points are **patch voxel indices `(z, y, x)` =
`(d, h, w)`** float32, the model-level convention; point labels are 1 (positive), 0 (negative) and -1 (padding).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import datasets
import numpy as np
import torch
from monai import transforms as mt
from scipy import ndimage

from .data import PreprocessedCache, _image_processor, _rows

__all__ = ["Sam3DTrainingDataset", "sam3d_collate", "sample_points"]


# ----------------------------------------------------------------------------------------------------------------------
# Click sampling
# ----------------------------------------------------------------------------------------------------------------------
def sample_points(
    labels: np.ndarray,
    rng: np.random.Generator,
    num_positive_points: int = 40,
    num_background_points: int = 10,
    num_negative_points: int = 3,
    use_point_labels: bool = True,
    negative_ring_width: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Sample the click prompts of one training patch, as the paper does, plus negative clicks near the target.

    * Patch with foreground: `num_positive_points` random foreground voxels (with replacement when the target has
      fewer voxels), label 1; with `use_point_labels`, also `num_negative_points` background voxels within
      `negative_ring_width` voxels (Euclidean) outside the target's boundary, label 0, so that correction clicks next
      to a lesion carry meaning.
    * Patch without foreground: `num_background_points` random voxels of the patch, **label 1**. This is the paper's
      behaviour ("a click means: look here; the answer may be empty"), and the model needs at least one label-1 point
      per row. It teaches the model that a click on something that is not a tumour yields an empty mask; with
      `use_point_labels=True` they could have been label 0, but then the row would have no positive click.

    Args:
        labels: `(D, H, W)` binary patch labels.
        rng: the random generator (seeded per sample by the caller).

    Returns:
        `points` `(N, 3)` float32 patch voxel indices `(z, y, x)` and `labels` `(N,)` int64 (1/0), N as sampled
        (positive rows: `num_positive_points` + up to `num_negative_points`; empty rows: `num_background_points`).
    """
    foreground = labels > 0
    fg_index = np.argwhere(foreground)
    if len(fg_index) == 0:
        flat = rng.choice(labels.size, size=num_background_points, replace=labels.size < num_background_points)
        points = np.stack(np.unravel_index(flat, labels.shape), axis=1)
        return points.astype(np.float32), np.ones(len(points), np.int64)
    chosen = rng.choice(len(fg_index), size=num_positive_points, replace=len(fg_index) < num_positive_points)
    points, point_labels = [fg_index[chosen]], [np.ones(num_positive_points, np.int64)]
    if use_point_labels and num_negative_points > 0:
        ring = _ring(foreground, negative_ring_width)
        if len(ring):
            picked = rng.choice(len(ring), size=min(num_negative_points, len(ring)), replace=False)
            points.append(ring[picked])
            point_labels.append(np.zeros(len(picked), np.int64))
    return np.concatenate(points).astype(np.float32), np.concatenate(point_labels)


def _ring(foreground: np.ndarray, width: float) -> np.ndarray:
    """`(M, 3)` indices of background voxels within `width` voxels (Euclidean) of the foreground."""
    margin = int(np.ceil(width)) + 1
    lo = np.maximum(np.argwhere(foreground).min(0) - margin, 0)
    hi = np.minimum(np.argwhere(foreground).max(0) + margin + 1, foreground.shape)
    box = foreground[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    distance = ndimage.distance_transform_edt(~box)
    return np.argwhere((distance > 0) & (distance <= width)) + lo


# ----------------------------------------------------------------------------------------------------------------------
# Training dataset
# ----------------------------------------------------------------------------------------------------------------------
class Sam3DTrainingDataset(torch.utils.data.Dataset):
    """Augmented training patches with click prompts, from preprocessed (cached) volumes.

    Each item: the case's cached volume ([`PreprocessedCache`]) -> pad to the crop size (image with the air value
    `image_processor.pad_value`, labels with 0) -> `RandCropByPosNegLabeld` with foreground : background centres 1 : 1
    (background centres only inside the body, i.e. above the air value) -> with `augment`, the paper's Table 4:
    `RandZoomd` [0.9, 1.1] p=0.3, `RandRotate90d` p=0.5 (1 to 3 quarter turns) in the axial `(H, W)` plane,
    `RandFlipd` on each axis p=0.5, `RandShiftIntensityd` offsets 0.1 p=0.5 (in z-score units) -> clicks from
    [`sample_points`]. With `augment` the crop is `ceil(D / 0.9) x S x S` with `S = ceil(max(H, W) / 0.9)`, zoomed
    and turned, then centre-cropped to the patch: zooming out never pads, and the quarter turn works for every patch
    shape (a non-square `H != W` patch is cut from the turned square plane). A case without the target value gives
    background patches only.

    Randomness comes from `(seed, epoch, index)` only (`numpy.random.SeedSequence`), never from the global RNG state:
    the same seed, epoch and index give the same sample in any process, so DataLoader workers are deterministic and a
    resumed run sees the samples it would have seen. Call [`set_epoch`] before each epoch; with DataLoader workers,
    create the iterator after `set_epoch` and do not use `persistent_workers=True` (workers hold a copy of the
    dataset made when the iterator starts).

    Args:
        dataset: rows with `case_id`, `image`, `label` (a `datasets.Dataset` from [`index_dataset`], or dicts).
        processor: `Sam3DProcessor` or `Sam3DImageProcessor` with `target_label` set.
        patch_size: `(D, H, W)` patch in resampled voxels.
        num_positive_points, num_background_points, num_negative_points, use_point_labels: see [`sample_points`].
        augment: apply the Table 4 augmentations (the crop is always random).
        cache_dir: folder of the [`PreprocessedCache`] (default `~/.cache/sam3d-hf/preprocessed`).
        seed: base seed of every random choice.
        samples_per_volume: patches per case per epoch (`len = num_cases * samples_per_volume`).
        negative_ring_width: how far outside the target negative clicks may lie, in voxels.

    Items: `{"pixel_values": float32 (1, D, H, W), "labels": int64 (D, H, W) 0/1, "input_points": float32 (N, 3)
    patch voxels (z, y, x), "input_labels": int64 (N,) 1/0/-1}` with `N = max(num_positive_points +
    num_negative_points (when use_point_labels), num_background_points)` for every item (-1 pads).
    """

    def __init__(
        self,
        dataset: datasets.Dataset | Iterable[Mapping[str, Any]],
        processor: Any,
        patch_size: Sequence[int] = (128, 128, 128),
        num_positive_points: int = 40,
        num_background_points: int = 10,
        num_negative_points: int = 3,
        use_point_labels: bool = True,
        augment: bool = True,
        cache_dir: str | os.PathLike | None = None,
        seed: int = 0,
        samples_per_volume: int = 1,
        negative_ring_width: float = 3.0,
    ):
        self.rows = _rows(dataset)
        if not self.rows:
            raise ValueError("The training dataset is empty: no case to sample patches from.")
        for row in self.rows:
            if row["label"] is None:
                raise ValueError(f"Case {row['case_id']!r} has no label file; every training case needs one.")
        self.image_processor = _image_processor(processor)
        self.patch_size = tuple(int(p) for p in patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) <= 0:
            raise ValueError(f"`patch_size` must be 3 positive ints (D, H, W), got {tuple(patch_size)}.")
        if num_positive_points < 1 or num_background_points < 1 or num_negative_points < 0:
            raise ValueError(
                "Need num_positive_points >= 1, num_background_points >= 1 and num_negative_points >= 0 (every row "
                f"needs a positive click); got {num_positive_points}, {num_background_points}, {num_negative_points}."
            )
        if samples_per_volume < 1:
            raise ValueError(f"`samples_per_volume` must be >= 1, got {samples_per_volume}.")
        self.num_positive_points = int(num_positive_points)
        self.num_background_points = int(num_background_points)
        self.num_negative_points = int(num_negative_points)
        self.use_point_labels = bool(use_point_labels)
        self.negative_ring_width = float(negative_ring_width)
        self.num_points = max(
            self.num_positive_points + (self.num_negative_points if self.use_point_labels else 0),
            self.num_background_points,
        )
        self.augment = bool(augment)
        self.seed = int(seed)
        self.samples_per_volume = int(samples_per_volume)
        self.epoch = 0
        self.cache = PreprocessedCache(self.image_processor, cache_dir)
        self.pad, self.transform = self._build_transforms()
        self._last: tuple[int, dict[str, Any]] | None = None  # consecutive samples of one case load it once

    def _build_transforms(self) -> tuple[mt.Compose, mt.Compose]:
        """(padding to the crop size, random crop + augmentations)."""
        patch = self.patch_size
        crop = patch
        if self.augment:  # room to zoom out by 0.9 without padding, and a square (H, W) plane for the quarter turns
            side = max(patch[1:])
            crop = tuple(int(np.ceil(c / 0.9)) for c in (patch[0], side, side))
        pad_value = self.image_processor.pad_value
        keys = ["image", "label"]
        pad = mt.Compose(
            [
                mt.SpatialPadd(keys="image", spatial_size=crop, value=pad_value),
                mt.SpatialPadd(keys="label", spatial_size=crop, value=0),
            ]
        )
        steps: list[Any] = [
            # centres from indices computed in __getitem__ (see _crop_centre_indices), 1 : 1 foreground : background
            mt.RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=crop,
                pos=1.0,
                neg=1.0,
                num_samples=1,
                fg_indices_key="fg_indices",
                bg_indices_key="bg_indices",
            ),
        ]
        if self.augment:
            steps += [
                mt.RandZoomd(
                    keys=keys, prob=0.3, min_zoom=0.9, max_zoom=1.1, mode=("trilinear", "nearest"), keep_size=False
                ),
                mt.RandRotate90d(keys=keys, prob=0.5, max_k=3, spatial_axes=(1, 2)),
                mt.CenterSpatialCropd(keys=keys, roi_size=patch),
                mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
                mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
                mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=2),
                mt.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
            ]
        return pad, mt.Compose(steps)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples `__getitem__` returns (part of every sample's seed)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows) * self.samples_per_volume

    def _volume(self, case_index: int) -> dict[str, Any]:
        if self._last is None or self._last[0] != case_index:
            volume = self.cache._get(self.rows[case_index])
            padded = self.pad({"image": volume["pixel_values"], "label": volume["labels"][None]})
            self._last = (case_index, {k: np.asarray(torch.as_tensor(padded[k])) for k in ("image", "label")})
        return self._last[1]

    def _crop_centre_indices(self, volume: dict[str, np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """Flat indices of candidate crop centres: every foreground voxel, and background voxels in the body.

        Background candidates are voxels drawn uniformly (4096 draws) and kept when they are background and above
        the air value, which is a uniform draw from the same set MONAI's `image_threshold` would give, without
        listing every background voxel of a large volume per sample. All of them are listed only when no draw
        lands in the body.
        """
        label, image = volume["label"].reshape(-1), volume["image"].reshape(-1)
        threshold = self.image_processor.pad_value + 1e-3  # background centres in the body, not in air or padding
        fg_indices = np.flatnonzero(label)
        draws = rng.integers(0, label.size, size=4096)
        bg_indices = draws[(label[draws] == 0) & (image[draws] > threshold)]
        if len(bg_indices) == 0:
            bg_indices = np.flatnonzero((label == 0) & (image > threshold))
        if len(bg_indices) == 0 and len(fg_indices) == 0:  # nothing but air: any centre
            bg_indices = draws
        return fg_indices, bg_indices

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"Index {index} out of range for {len(self)} samples.")
        volume = self._volume(index // self.samples_per_volume)
        transform_seed, centre_seed, click_seed = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(
            3
        )
        fg_indices, bg_indices = self._crop_centre_indices(volume, np.random.default_rng(centre_seed))
        self.transform.set_random_state(seed=int(transform_seed))
        with warnings.catch_warnings():
            # a case without the target value: MONAI warns that it can only sample background centres
            warnings.filterwarnings("ignore", message="Num foregrounds 0")
            out = self.transform({**volume, "fg_indices": fg_indices, "bg_indices": bg_indices})
        out = out[0] if isinstance(out, list) else out
        image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float().contiguous()
        labels = torch.as_tensor(out["label"]).as_subclass(torch.Tensor)[0].round().long().contiguous()
        points, point_labels = sample_points(
            labels.numpy(),
            np.random.default_rng(click_seed),
            self.num_positive_points,
            self.num_background_points,
            self.num_negative_points,
            self.use_point_labels,
            self.negative_ring_width,
        )
        input_points = torch.zeros(self.num_points, 3)
        input_labels = torch.full((self.num_points,), -1, dtype=torch.long)
        input_points[: len(points)] = torch.from_numpy(points)
        input_labels[: len(points)] = torch.from_numpy(point_labels)
        return {"pixel_values": image, "labels": labels, "input_points": input_points, "input_labels": input_labels}


def sam3d_collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch; points are padded to the longest row with `(0, 0, 0)` and label -1.

    Returns:
        `pixel_values` `(B, 1, D, H, W)`, `labels` `(B, D, H, W)`, `input_points` `(B, N, 3)` float32 patch voxels
        `(z, y, x)`, `input_labels` `(B, N)` int64; other keys (e.g. strings) as lists.
    """
    if not batch:
        raise ValueError("`batch` is empty.")
    num_points = max(len(item["input_points"]) for item in batch)
    points = torch.zeros(len(batch), num_points, 3)
    point_labels = torch.full((len(batch), num_points), -1, dtype=torch.long)
    for b, item in enumerate(batch):
        n = len(item["input_points"])
        points[b, :n] = torch.as_tensor(item["input_points"], dtype=torch.float32)
        point_labels[b, :n] = torch.as_tensor(item["input_labels"], dtype=torch.long)
    out: dict[str, Any] = {"input_points": points, "input_labels": point_labels}
    for key in batch[0]:
        if key in out:
            continue
        values = [item[key] for item in batch]
        out[key] = torch.stack([torch.as_tensor(v) for v in values]) if torch.is_tensor(values[0]) else values
    return out
