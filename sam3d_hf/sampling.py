"""Training patches for Sam3D: random crops of the cached volumes, augmentations, click prompts, batches.

[`Sam3DTrainingDataset`] (a torch `Dataset` of augmented patches with click prompts, drawn from the
`sam3d_hf.data.PreprocessedCache` of each case, the way a `sam3d_hf.recipes.Sam3DRecipe` says) -> `DataLoader(...,
collate_fn=sam3d_collate)`; [`official_clicks`] and [`sample_points`] place the clicks in a patch; [`validation_patch`]
cuts the official validation patch of a scan.

The official recipe (`train.py`, `dataset/base_dataset.py`), step by step on the cached volume (z-scored, so every
HU value below is divided by the preset's std): a +-20 HU intensity shift with probability 0.5; the crop to the body
(voxels above the window's lower bound); the dataset's augmentation branch (`rotate_zoom`: a rotation of up to 30°
with probability 0.3, then an in-plane zoom 0.9-1.1 with probability 0.3; `zoom`: a zoom 0.85-1.25 with probability
0.8; labels interpolated linearly, then `> 0.5`); zero padding (the mean) to 1.2 x the patch and a crop of that size
centred on a tumour voxel with probability 2/3, on another voxel with 1/3; a random patch inside it; flips along each
axis with probability 0.5 and quarter turns in the `(D, H)` plane with probability 0.5 (a half turn when `D != H`, so
that the patch keeps its shape); then 10 tumour voxels and 20 voxels of the whole patch as clicks.

Conventions: volumes and patches are `(D, H, W)` on the processor's resampled canonical grid; points are **patch voxel
indices `(z, y, x)` = `(d, h, w)`** float32, the model-level convention; point labels are 1 (positive), 0 (negative)
and -1 (padding).
"""

from __future__ import annotations

import math
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
from .image_processing_sam3d import SAM3D_PRESETS
from .recipes import RECIPES, Sam3DRecipe

__all__ = ["Sam3DTrainingDataset", "official_clicks", "sam3d_collate", "sample_points", "validation_patch"]

# The official code's augmentation values (dataset/base_dataset.py), which the official recipe uses.
OFFICIAL_INTENSITY_SHIFT_HU = 20.0  # RandShiftIntensityd(offsets=20, prob=0.5), in HU, before normalisation
OFFICIAL_ROTATION = math.radians(30)  # RandRotated(range_x=30 deg, prob=0.3, keep_size=False): pancreas, colon
AUGMENTATION_BRANCHES = ("zoom", "rotate_zoom")


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


def official_clicks(
    labels: np.ndarray,
    rng: np.random.Generator,
    num_positive_points: int = 10,
    num_patch_points: int = 20,
    labelled: bool = False,
    num_negative_points: int = 0,
    negative_ring_width: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The official training clicks (`train.py`): `num_positive_points` tumour voxels drawn uniformly with replacement
    (when the patch holds tumour), then `num_patch_points` voxels drawn uniformly with replacement from the whole patch
    (tumour included). Unlabelled: every label is 1, as the official prompt encoder has no notion of negative clicks.

    With `labelled` (the `interactive` recipe's `labelled` clicks), each patch voxel carries its truth (1 in the tumour,
    0 outside) and `num_negative_points` background voxels within `negative_ring_width` voxels of the tumour are added
    as 0; a patch without tumour keeps its patch voxels positive (a row needs a positive click: "look here").

    Returns:
        `points` `(N, 3)` float32 patch voxels `(z, y, x)` and `labels` `(N,)` int64.
    """
    foreground = labels > 0
    fg_index = np.argwhere(foreground)
    parts, part_labels = [], []
    if len(fg_index):
        parts.append(fg_index[rng.integers(len(fg_index), size=num_positive_points)])
        part_labels.append(np.ones(num_positive_points, np.int64))
    flat = rng.integers(labels.size, size=num_patch_points)
    patch_points = np.stack(np.unravel_index(flat, labels.shape), axis=1)
    parts.append(patch_points)
    truth = foreground.reshape(-1)[flat].astype(np.int64)
    part_labels.append(truth if labelled and len(fg_index) else np.ones(num_patch_points, np.int64))
    if labelled and len(fg_index) and num_negative_points > 0:
        ring = _ring(foreground, negative_ring_width)
        if len(ring):
            parts.append(ring[rng.choice(len(ring), size=min(num_negative_points, len(ring)), replace=False)])
            part_labels.append(np.zeros(len(parts[-1]), np.int64))
    return np.concatenate(parts).astype(np.float32), np.concatenate(part_labels)


class _Above:
    """`select_fn` of the body crop: voxels above the window's lower bound (a class, so DataLoader workers that spawn
    can pickle it)."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def __call__(self, values):
        return values > self.threshold


# ----------------------------------------------------------------------------------------------------------------------
# Training dataset
# ----------------------------------------------------------------------------------------------------------------------
class Sam3DTrainingDataset(torch.utils.data.Dataset):
    """Augmented training patches with click prompts, from preprocessed (cached) volumes, as a recipe says.

    Samplers (`recipe.sampler`):
        * `"official"`: the official crop sequence of the module docstring (body crop, padding to `crop_scale` x
          patch, a `crop_pos : crop_neg` tumour : other centred crop, a random patch inside).
        * `"legacy"`: pad to the crop size with air, `RandCropByPosNegLabeld` 1:1 (background centres inside the
          body), and with augmentation a crop of `ceil(D / 0.9) x S x S` (`S = ceil(max(H, W) / 0.9)`), zoomed and
          turned, then its centre patch.
    Augmentations (`recipe.augmentation`): `"official"` (the official code's, with `augmentation_branch`), `"table4"`
    (the paper's Table 4: zoom 0.9-1.1 at p 0.3, quarter turns in the axial `(H, W)` plane at p 0.5, flips at p 0.5,
    an intensity offset of 0.1 at p 0.5) or `"none"`. Clicks (`recipe.clicks`): [`official_clicks`] (`"official"`,
    `"labelled"`) or [`sample_points`] (`"legacy"`).

    Randomness comes from `(seed, epoch, index)` only (`numpy.random.SeedSequence`), never from the global RNG state:
    the same seed, epoch and index give the same sample in any process, so DataLoader workers are deterministic and a
    resumed run sees the samples it would have seen. Call [`set_epoch`] before each epoch; with DataLoader workers,
    create the iterator after `set_epoch` and do not use `persistent_workers=True`.

    Args:
        dataset: rows with `case_id`, `image`, `label` (a `datasets.Dataset` from `index_dataset`, or dicts).
        processor: `Sam3DProcessor` or `Sam3DImageProcessor` with `target_label` set.
        recipe: a [`~sam3d_hf.recipes.Sam3DRecipe`] (default: `official`): patch size, sampler, augmentation, clicks.
        augmentation_branch: the official augmentation branch, `"zoom"` or `"rotate_zoom"`; default: the
            processor's preset's (`Sam3DDatasetPreset.augmentation`), `"zoom"` for a processor without a preset.
        cache_dir: folder of the `PreprocessedCache` (default `~/.cache/sam3d-hf/preprocessed`).
        seed: base seed of every random choice.
        samples_per_volume: patches per case per epoch (`len = num_cases * samples_per_volume`).

    Items: `{"pixel_values": float32 (1, D, H, W), "labels": int64 (D, H, W) 0/1, "input_points": float32 (N, 3)
    patch voxels (z, y, x), "input_labels": int64 (N,) 1/0/-1}`, N the largest click count of the recipe (-1 pads).
    """

    def __init__(
        self,
        dataset: datasets.Dataset | Iterable[Mapping[str, Any]],
        processor: Any,
        recipe: Sam3DRecipe | None = None,
        augmentation_branch: str | None = None,
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
        self.recipe = recipe = RECIPES["official"] if recipe is None else recipe
        self.patch_size = tuple(int(p) for p in recipe.patch_size)
        if len(self.patch_size) != 3 or min(self.patch_size) <= 0:
            raise ValueError(f"`patch_size` must be 3 positive ints (D, H, W), got {tuple(recipe.patch_size)}.")
        least = 1 if recipe.clicks == "legacy" else 0  # a legacy row's only positive clicks are its tumour ones
        counts = (recipe.num_positive_points, recipe.num_patch_points, recipe.num_negative_points)
        if recipe.use_prompt_encoder and (counts[0] < least or counts[1] < 1 or counts[2] < 0):
            raise ValueError(
                f"Need num_positive_points >= {least}, num_patch_points >= 1 (the clicks of a patch without tumour) "
                f"and num_negative_points >= 0 (every row needs a positive click); got {counts}."
            )
        if samples_per_volume < 1:
            raise ValueError(f"`samples_per_volume` must be >= 1, got {samples_per_volume}.")
        if augmentation_branch is None:
            preset = SAM3D_PRESETS.get(self.image_processor.preset or "")
            augmentation_branch = preset.augmentation if preset is not None else "zoom"
        if augmentation_branch not in AUGMENTATION_BRANCHES:
            raise ValueError(
                f"`augmentation_branch` must be one of {AUGMENTATION_BRANCHES}, got {augmentation_branch!r}"
            )
        self.augmentation_branch = augmentation_branch
        self.negative_ring_width = float(negative_ring_width)
        if not recipe.use_prompt_encoder:
            self.num_points = 0
        elif recipe.clicks == "legacy":
            self.num_points = max(recipe.num_positive_points + recipe.num_negative_points, recipe.num_patch_points)
        else:
            negatives = recipe.num_negative_points if recipe.clicks == "labelled" else 0
            self.num_points = recipe.num_positive_points + recipe.num_patch_points + negatives
        self.seed = int(seed)
        self.samples_per_volume = int(samples_per_volume)
        self.epoch = 0
        self.cache = PreprocessedCache(self.image_processor, cache_dir)
        self._last: tuple[int, dict[str, Any]] | None = None  # consecutive samples of one case load it once
        if recipe.sampler == "official":
            self.before_crop, self.after_crop = self._official_transforms()
        else:
            self.before_crop, self.after_crop = self._legacy_transforms()

    # ------------------------------------------------------------------------------------------------- transforms
    def _official_transforms(self) -> tuple[mt.Compose, mt.Compose]:
        """(shift, body crop, augmentation, binarisation, padding; centred crop, patch, flips, turns)."""
        ip, recipe, keys = self.image_processor, self.recipe, ["image", "label"]
        air = ip.air_value  # the window's lower bound after normalisation: the body is above it
        augment = recipe.augmentation == "official"
        before: list[Any] = []
        if augment:
            before.append(mt.RandShiftIntensityd(keys="image", offsets=OFFICIAL_INTENSITY_SHIFT_HU / ip.intensity_std,
                                                 prob=0.5))  # fmt: skip
        before.append(mt.CropForegroundd(keys=keys, source_key="image", select_fn=_Above(air)))
        if augment and self.augmentation_branch == "rotate_zoom":
            before += [
                mt.RandRotated(keys=keys, prob=0.3, range_x=OFFICIAL_ROTATION, keep_size=False),
                mt.RandZoomd(
                    keys=keys, prob=0.3, min_zoom=[1, 0.9, 0.9], max_zoom=[1, 1.1, 1.1], mode=["trilinear", "trilinear"]
                ),
            ]
        elif augment:
            before.append(mt.RandZoomd(keys=keys, prob=0.8, min_zoom=0.85, max_zoom=1.25, mode=["trilinear"] * 2))
        crop = [round(p * recipe.crop_scale) for p in self.patch_size]
        before.append(mt.SpatialPadd(keys=keys, spatial_size=crop))  # zeros: the mean, after normalisation
        after: list[Any] = [
            mt.RandCropByPosNegLabeld(
                keys=keys,
                label_key="label",
                spatial_size=crop,
                pos=recipe.crop_pos,
                neg=recipe.crop_neg,
                num_samples=1,
                fg_indices_key="fg_indices",
                bg_indices_key="bg_indices",
            ),
            mt.RandSpatialCropd(keys=keys, roi_size=self.patch_size, random_size=False),
        ]
        if augment:
            after += [mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
            if self.patch_size[0] == self.patch_size[1]:
                after.append(mt.RandRotate90d(keys=keys, prob=0.5, max_k=3))  # MONAI's default plane: (D, H)
            else:  # a quarter turn would swap D and H: a half turn keeps the shape
                after.append(mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=(0, 1)))
        return mt.Compose(before), mt.Compose(after)

    def _legacy_transforms(self) -> tuple[mt.Compose, mt.Compose]:
        """(padding to the crop size; 1:1 crop + Table 4 augmentations + centre patch)."""
        patch, keys = self.patch_size, ["image", "label"]
        augment = self.recipe.augmentation != "none"
        crop = patch
        if augment:  # room to zoom out by 0.9 without padding, and a square (H, W) plane for the quarter turns
            side = max(patch[1:])
            crop = tuple(int(np.ceil(c / 0.9)) for c in (patch[0], side, side))
        pad_value = self.image_processor.pad_value
        before = mt.Compose(
            [
                mt.SpatialPadd(keys="image", spatial_size=crop, value=pad_value),
                mt.SpatialPadd(keys="label", spatial_size=crop, value=0),
            ]
        )
        after: list[Any] = [
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
        if augment:
            after += [self._table4_zoom(keys), mt.RandRotate90d(keys=keys, prob=0.5, max_k=3, spatial_axes=(1, 2)),
                      mt.CenterSpatialCropd(keys=keys, roi_size=patch), *self._table4_rest(keys)]  # fmt: skip
        return before, mt.Compose(after)

    @staticmethod
    def _table4_zoom(keys):
        return mt.RandZoomd(keys=keys, prob=0.3, min_zoom=0.9, max_zoom=1.1, mode=("trilinear", "nearest"),
                            keep_size=False)  # fmt: skip

    @staticmethod
    def _table4_rest(keys):
        return [*(mt.RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)),
                mt.RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5)]  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose samples `__getitem__` returns (part of every sample's seed)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.rows) * self.samples_per_volume

    def _volume(self, case_index: int) -> dict[str, Any]:
        if self._last is None or self._last[0] != case_index:
            volume = self.cache._get(self.rows[case_index])
            self._last = (case_index, {"image": volume["pixel_values"], "label": volume["labels"][None]})
        return self._last[1]

    def _crop_centre_indices(self, volume: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """Flat indices of candidate crop centres: every foreground voxel, and background voxels.

        Background candidates are voxels drawn uniformly (4096 draws) and kept when they are background (and, for
        the legacy sampler, above the air value: inside the body), a uniform draw from the same set MONAI would list,
        without listing every background voxel of a large volume per sample. All are listed only when no draw lands.
        """
        label = np.asarray(volume["label"]).reshape(-1)
        image = np.asarray(volume["image"]).reshape(-1)
        fg_indices = np.flatnonzero(label)
        draws = rng.integers(0, label.size, size=4096)
        keep = label[draws] == 0
        if self.recipe.sampler == "legacy":  # background centres in the body, not in air or padding
            keep &= image[draws] > self.image_processor.pad_value + 1e-3
        bg_indices = draws[keep]
        if len(bg_indices) == 0:
            everywhere = label == 0
            if self.recipe.sampler == "legacy":
                everywhere &= image > self.image_processor.pad_value + 1e-3
            bg_indices = np.flatnonzero(everywhere)
        if len(bg_indices) == 0 and len(fg_indices) == 0:  # nothing but air: any centre
            bg_indices = draws
        return fg_indices, bg_indices

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"Index {index} out of range for {len(self)} samples.")
        volume = self._volume(index // self.samples_per_volume)
        seeds = np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(4)
        self.before_crop.set_random_state(seed=int(seeds[0]))
        data = self.before_crop(dict(volume))
        if self.recipe.sampler == "official":  # BinarizeLabeld(threshold 0.5) after the interpolating transforms
            data["label"] = (torch.as_tensor(data["label"]) > 0.5).to(torch.float32)
        fg_indices, bg_indices = self._crop_centre_indices(data, np.random.default_rng(seeds[1]))
        self.after_crop.set_random_state(seed=int(seeds[2]))
        with warnings.catch_warnings():
            # a case without the target value: MONAI warns that it can only sample background centres
            warnings.filterwarnings("ignore", message="Num foregrounds 0")
            out = self.after_crop({**data, "fg_indices": fg_indices, "bg_indices": bg_indices})
        out = out[0] if isinstance(out, list) else out
        image = torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float().contiguous()
        labels = torch.as_tensor(out["label"]).as_subclass(torch.Tensor)[0].round().long().contiguous()
        item = {"pixel_values": image, "labels": labels}
        if self.num_points:
            points, point_labels = self._clicks(labels.numpy(), np.random.default_rng(seeds[3]))
            item["input_points"] = torch.zeros(self.num_points, 3)
            item["input_labels"] = torch.full((self.num_points,), -1, dtype=torch.long)
            item["input_points"][: len(points)] = torch.from_numpy(points)
            item["input_labels"][: len(points)] = torch.from_numpy(point_labels)
        return item

    def _clicks(self, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        recipe = self.recipe
        if recipe.clicks == "legacy":
            return sample_points(labels, rng, recipe.num_positive_points, recipe.num_patch_points,
                                 recipe.num_negative_points, True, self.negative_ring_width)  # fmt: skip
        return official_clicks(labels, rng, recipe.num_positive_points, recipe.num_patch_points,
                               recipe.clicks == "labelled", recipe.num_negative_points,
                               self.negative_ring_width)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Validation patches (the official validation)
# ----------------------------------------------------------------------------------------------------------------------
def validation_patch(
    volume: Mapping[str, Any],
    image_processor: Any,
    patch_size: Sequence[int],
    rng: np.random.Generator,
    num_points: int = 10,
) -> dict[str, torch.Tensor]:
    """The official validation patch of a preprocessed scan (`dataset/base_dataset.py`, split "val"; `train.py`):
    padded to the patch size with 0 HU (the official code pads before normalising), a patch centred on a random tumour
    voxel (`RandCropByPosNegLabeld(pos=1, neg=0)`), and `num_points` tumour voxels as clicks (random patch voxels when
    the patch holds no tumour).

    Args:
        volume: `{"pixel_values": (1, D, H, W), "labels": (D, H, W)}` of `PreprocessedCache.get`.
        image_processor: the processor the volume was made with (its statistics give the padding value).
        patch_size: `(D, H, W)`; rng: the random generator (seed it per scan and epoch).

    Returns:
        `{"pixel_values": (1, 1, D, H, W), "labels": (1, D, H, W), "input_points": (1, N, 3), "input_labels": (1, N)}`.
    """
    zero_hu = (0.0 - image_processor.intensity_mean) / image_processor.intensity_std
    keys = ["image", "label"]
    data = {"image": np.asarray(volume["pixel_values"], np.float32), "label": np.asarray(volume["labels"])[None]}
    data["image"] = np.asarray(mt.SpatialPad(patch_size, value=zero_hu)(data["image"]))
    data["label"] = np.asarray(mt.SpatialPad(patch_size)(data["label"]))
    label = data["label"].reshape(-1)
    fg = np.flatnonzero(label)
    crop = mt.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=patch_size, pos=1.0, neg=0.0,
                                     num_samples=1, fg_indices_key="fg", bg_indices_key="bg")  # fmt: skip
    crop.set_random_state(seed=int(rng.integers(2**31)))
    with warnings.catch_warnings():  # MONAI says when it has no background (or no tumour) centre to draw: known
        warnings.filterwarnings("ignore", message="Num foregrounds")
        bg = np.flatnonzero(label == 0) if len(fg) == 0 else np.zeros(0, np.int64)
        out = crop({**data, "fg": fg, "bg": bg})[0]
    labels = torch.as_tensor(out["label"]).as_subclass(torch.Tensor)[0].round().long()
    tumour = np.argwhere(labels.numpy() > 0)
    if len(tumour):
        points = tumour[rng.integers(len(tumour), size=num_points)]
    else:
        points = np.stack(np.unravel_index(rng.integers(labels.numel(), size=num_points), labels.shape), axis=1)
    return {
        "pixel_values": torch.as_tensor(out["image"]).as_subclass(torch.Tensor).float()[None],
        "labels": labels[None],
        "input_points": torch.from_numpy(points.astype(np.float32))[None],
        "input_labels": torch.ones(1, num_points, dtype=torch.long),
    }


def sam3d_collate(batch: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch; points are padded to the longest row with `(0, 0, 0)` and label -1.

    Returns:
        `pixel_values` `(B, 1, D, H, W)`, `labels` `(B, D, H, W)`, `input_points` `(B, N, 3)` float32 patch voxels
        `(z, y, x)`, `input_labels` `(B, N)` int64 (no points for the prompt-free model's items, which have none);
        other keys (e.g. strings) as lists.
    """
    if not batch:
        raise ValueError("`batch` is empty.")
    if "input_points" not in batch[0]:  # the prompt-free model's patches
        return {key: torch.stack([torch.as_tensor(item[key]) for item in batch]) for key in batch[0]}
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
