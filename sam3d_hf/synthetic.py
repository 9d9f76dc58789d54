"""Seeded synthetic CT-like volumes with small lesions, in the Medical Segmentation Decathlon layout.

The data of the demo and of the tests: a body outline with subcutaneous fat, soft tissue, a spine, one organ and zero
to three small irregular low-contrast lesions, in Hounsfield units, with noise, anisotropic spacing (in-plane
0.6-1.0 mm, slices 1-5 mm) and varied orientations (RAS, LPS, permuted axes, slightly oblique). Labels follow the
MSD/KiTS convention: 0 background, 1 organ, 2 tumour (lesion).

How the geometry is made correct by construction: the phantom is defined in **world coordinates** (RAS+ mm, the
NIfTI convention `world = affine @ [i, j, k, 1]`) and evaluated at the world position of every voxel centre of the
stored grid. Whatever the orientation, the affine written to the file therefore describes the data exactly, and the
world centre of a lesion stated by [`generate_case`] (`return_lesions=True`) is where the label map puts it.

Same seed -> byte-identical arrays (everything comes from one `numpy.random.Generator`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from .files import atomic_write, write_json

__all__ = [
    "ORIENTATIONS",
    "SYNTHETIC_LABELS",
    "SYNTHETIC_PROCESSOR_KWARGS",
    "case_seed",
    "generate_case",
    "generate_dataset",
]

ORIENTATIONS = ("RAS", "LPS", "permuted", "oblique")
SYNTHETIC_LABELS = {"background": 0, "organ": 1, "tumour": 2}

# Processor settings for this data (there is no "synthetic" entry in SAM3D_PRESETS): the window spans fat-free soft
# tissue to the brightest organ/lesion values; mean/std are the foreground (organ + lesion) statistics of
# `generate_dataset(num_cases=20, seed=0)` rounded (checked by tests/test_synthetic.py). Use them as
# `Sam3DImageProcessor(**SYNTHETIC_PROCESSOR_KWARGS)` or `Sam3DProcessor.from_preset("kits21", **SYNTHETIC_...)`.
SYNTHETIC_PROCESSOR_KWARGS: dict[str, Any] = {
    "window": (-60.0, 240.0),
    "intensity_mean": 120.0,
    "intensity_std": 25.0,
    "target_label": 2,
    "preset": "synthetic",
}

# Hounsfield units of the tissues (typical CT values).
AIR_HU = -1000.0
FAT_HU = -100.0
MUSCLE_HU = 40.0
BONE_HU = 500.0


def _direction_matrix(orientation: str, rng: np.random.Generator) -> np.ndarray:
    """`(3, 3)` matrix whose column `a` is the world (RAS) unit direction of stored axis `a`."""
    if orientation == "RAS":
        return np.eye(3)
    if orientation == "LPS":
        return np.diag([-1.0, -1.0, 1.0])
    if orientation == "permuted":
        perms = [(0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]  # every non-identity axis order
        perm = perms[int(rng.integers(len(perms)))]
        signs = rng.choice([-1.0, 1.0], size=3)
        m = np.zeros((3, 3))
        for stored, world in enumerate(perm):
            m[world, stored] = signs[stored]
        return m
    if orientation == "oblique":
        base = np.eye(3) if rng.random() < 0.5 else np.diag([-1.0, -1.0, 1.0])
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        angle = np.deg2rad(rng.uniform(5.0, 15.0))
        k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
        rotation = np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k  # Rodrigues
        return rotation @ base
    raise ValueError(f"`orientation` must be one of {ORIENTATIONS} or None (random), got {orientation!r}.")


def _blob_radius(u: np.ndarray, waves: list[tuple[np.ndarray, float, float]]) -> np.ndarray:
    """Relative radius `1 + sum amp * cos(freq * (u . v) + phase)` of a star-shaped blob along unit directions `u`."""
    r = np.ones(u.shape[:-1], np.float32)
    for direction, amp, phase in waves:
        r += amp * np.cos(3.0 * (u @ direction) + phase)
    return r


def _random_waves(rng: np.random.Generator, count: int, amplitude: float) -> list[tuple[np.ndarray, float, float]]:
    waves = []
    for _ in range(count):
        v = rng.normal(size=3)
        amp, phase = float(rng.uniform(0, amplitude)), float(rng.uniform(0, 6.3))
        waves.append(((v / np.linalg.norm(v)).astype(np.float32), amp, phase))
    return waves


def generate_case(
    seed: int,
    orientation: str | None = None,
    num_lesions: int | None = None,
    in_plane_spacing: tuple[float, float] = (0.6, 1.0),
    slice_spacing: tuple[float, float] = (1.0, 5.0),
    lesion_diameter: tuple[float, float] = (6.0, 25.0),
    lesion_contrast: tuple[float, float] = (20.0, 50.0),
    noise_std: tuple[float, float] = (8.0, 15.0),
    lesion_irregularity: float = 0.1,
    return_lesions: bool = False,
) -> tuple[nib.Nifti1Image, nib.Nifti1Image] | tuple[nib.Nifti1Image, nib.Nifti1Image, list[dict[str, Any]]]:
    """Generate one synthetic CT-like case.

    The body is about 80-96 mm across (R-L), the field of view about 100-110 mm in-plane and 56-64 mm (at least 16
    slices) along S, so a scan has ~100-185 voxels in-plane and 16-64 slices, and ~100 x 100 x 60 voxels at 1 mm.

    Args:
        seed: seed of the case (same seed -> byte-identical arrays and affine).
        orientation: `"RAS"` (stored axes grow towards R, A, S), `"LPS"`, `"permuted"` (a random non-identity order of
            the stored axes with random signs), `"oblique"` (RAS or LPS rotated by 5-15 degrees about a random axis),
            or `None` to draw one of them from the seed.
        num_lesions: number of lesions (0-3), or `None` to draw it (0: 20 %, 1: 45 %, 2: 25 %, 3: 10 %).
        in_plane_spacing: `(min, max)` mm of the two in-plane axes (R-L and A-P); one value is drawn.
        slice_spacing: `(min, max)` mm of the slice axis (S-I).
        lesion_diameter: `(min, max)` mean lesion diameter in mm.
        lesion_contrast: `(min, max)` HU difference to the organ; 70 % of lesions are darker, 30 % brighter.
        noise_std: `(min, max)` HU standard deviation of the Gaussian noise.
        lesion_irregularity: amplitude bound of the three waves that make a lesion's outline irregular (relative to
            its radius); 0 gives balls.
        return_lesions: also return the lesions as dicts `{"center_world": (3,) RAS mm, "diameter_mm", "hu",
            "organ_hu"}`.

    Returns:
        `(image, label)` NIfTI images (int16 HU and uint8 labels 0/1/2, same shape and affine, qform/sform code 1),
        plus the lesion list when `return_lesions`.
    """
    rng = np.random.default_rng(seed)
    if orientation is None:
        orientation = ORIENTATIONS[int(rng.integers(len(ORIENTATIONS)))]
    direction = _direction_matrix(orientation, rng)
    if num_lesions is None:
        num_lesions = int(rng.choice(4, p=[0.2, 0.45, 0.25, 0.1]))
    if not 0 <= num_lesions <= 3:
        raise ValueError(f"`num_lesions` must be 0-3 (they must fit in the organ), got {num_lesions}.")

    # Geometry: spacing and field of view per world axis (R, A, S), then per stored axis.
    s_in, s_slice = rng.uniform(*in_plane_spacing), rng.uniform(*slice_spacing)
    fov_in, fov_s = rng.uniform(100.0, 110.0), rng.uniform(56.0, 64.0)
    world_spacing = np.array([s_in, s_in, s_slice])
    world_size = np.array([round(fov_in / s_in), round(fov_in / s_in), max(16, round(fov_s / s_slice))])
    world_of_stored = np.argmax(np.abs(direction), axis=0)  # the world axis each stored axis is closest to
    spacing = world_spacing[world_of_stored]
    shape = tuple(int(n) for n in world_size[world_of_stored])
    centre = rng.uniform(-30.0, 30.0, size=3)  # world position of the phantom's (and the volume's) centre
    linear = direction * spacing  # column a = direction of stored axis a times its spacing
    affine = np.eye(4)
    affine[:3, :3] = linear
    affine[:3, 3] = centre - linear @ ((np.asarray(shape) - 1) / 2)

    # World coordinates of every voxel centre, relative to the phantom centre: (X, Y, Z, 3) in mm.
    idx = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij"), axis=-1)
    rel = idx @ linear.T.astype(np.float32) + (affine[:3, 3] - centre).astype(np.float32)
    x, y = rel[..., 0], rel[..., 1]

    # Body: an elliptic cylinder along S with a wavy outline, a fat layer under the skin, a spine at the back.
    half_width, half_depth = rng.uniform(40.0, 48.0), rng.uniform(30.0, 37.0)
    angle = np.arctan2(y / half_depth, x / half_width)
    outline = 1 + 0.04 * np.sin(2 * angle + rng.uniform(0, 6.3)) + 0.03 * np.sin(3 * angle + rng.uniform(0, 6.3))
    body_r = np.sqrt((x / half_width) ** 2 + (y / half_depth) ** 2) / outline
    fat_thickness = rng.uniform(4.0, 8.0)
    image = np.full(shape, AIR_HU, np.float32)
    body = body_r <= 1
    image[body] = FAT_HU
    inner = body_r <= 1 - fat_thickness / half_depth
    image[inner] = MUSCLE_HU
    spine_y = -half_depth + fat_thickness + 10.0
    image[(x**2 + (y - spine_y) ** 2 <= 8.0**2) & inner] = BONE_HU

    # Organ: a wavy ellipsoid beside the spine.
    organ_axes = np.array([rng.uniform(18.0, 24.0), rng.uniform(14.0, 18.0), rng.uniform(18.0, 24.0)])
    side = rng.choice([-1.0, 1.0])
    organ_centre = np.array([side * rng.uniform(12.0, 16.0), rng.uniform(-4.0, 4.0), rng.uniform(-3.0, 3.0)])
    organ_hu = float(rng.uniform(100.0, 150.0))
    q = (rel - organ_centre.astype(np.float32)) / organ_axes.astype(np.float32)
    q_norm = np.linalg.norm(q, axis=-1)
    organ = (q_norm <= _blob_radius(q / np.maximum(q_norm, 1e-6)[..., None], _random_waves(rng, 2, 0.06))) & inner
    image[organ] = organ_hu
    label = organ.astype(np.uint8)

    # Lesions: irregular blobs well inside the organ (not overlapping each other), some darker, some brighter.
    lesions: list[dict[str, Any]] = []
    for _ in range(num_lesions):
        for _attempt in range(100):
            diameter = float(rng.uniform(*lesion_diameter))
            radius = diameter / 2
            direction_in = rng.normal(size=3)
            direction_in /= np.linalg.norm(direction_in)
            # Keep the blob (radius x 1.3 for its waves) inside the organ's inner ellipsoid (scaled by 0.88).
            room = 0.88 - 1.3 * radius / organ_axes.min()
            if room <= 0:
                continue
            lesion_centre = organ_centre + direction_in * organ_axes * rng.uniform(0, room)
            if all(
                np.linalg.norm(lesion_centre - (np.asarray(o["center_world"]) - centre))
                > 1.3 * (radius + o["diameter_mm"] / 2) + 2.0
                for o in lesions
            ):
                break
        else:
            continue  # the organ has no room left for another lesion
        contrast = rng.uniform(*lesion_contrast) * (-1.0 if rng.random() < 0.7 else 1.0)
        d = rel - lesion_centre.astype(np.float32)
        d_norm = np.linalg.norm(d, axis=-1)
        waves = _random_waves(rng, 3, lesion_irregularity)
        blob = d_norm <= radius * _blob_radius(d / np.maximum(d_norm, 1e-6)[..., None], waves)
        blob &= organ
        image[blob] = organ_hu + contrast
        label[blob] = 2
        lesions.append(
            {
                "center_world": (lesion_centre + centre).tolist(),
                "diameter_mm": diameter,
                "hu": organ_hu + contrast,
                "organ_hu": organ_hu,
            }
        )

    # Scanner blur (about 0.7 mm) and noise.
    image = gaussian_filter(image, sigma=0.7 / spacing, mode="nearest")
    image += rng.normal(0.0, rng.uniform(*noise_std), size=shape).astype(np.float32)
    image = np.clip(np.rint(image), -1024, 3071).astype(np.int16)

    image_nii = nib.Nifti1Image(image, affine)
    label_nii = nib.Nifti1Image(label, affine)
    for img in (image_nii, label_nii):
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
    image_nii.header["descrip"] = f"sam3d-hf synthetic seed={seed} {orientation}".encode()[:79]
    if return_lesions:
        return image_nii, label_nii, lesions
    return image_nii, label_nii


def case_seed(seed: int, index: int) -> int:
    """Seed of case `index` of the dataset generated with `seed` (independent streams for every pair)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def generate_dataset(
    root: str | os.PathLike,
    num_cases: int = 20,
    seed: int = 0,
    name: str = "Synthetic",
    prefix: str = "synthetic",
    **case_kwargs: Any,
) -> Path:
    """Write `num_cases` synthetic cases as a Medical Segmentation Decathlon task folder.

    Layout: `root/dataset.json`, `root/imagesTr/{prefix}_{i:03d}.nii.gz` (int16 HU),
    `root/labelsTr/{prefix}_{i:03d}.nii.gz` (uint8: 0 background, 1 organ, 2 tumour). `dataset.json` is MSD style
    (`name`, `labels`, `modality`, `numTraining`, `training` list of `{"image", "label"}` relative paths). Each
    file is written atomically; existing files of the same names are replaced.

    Args:
        root: destination folder (created).
        num_cases: number of cases (> 0).
        seed: dataset seed; case `i` uses the seed `case_seed(seed, i)`, so a case does not depend on `num_cases`.
        name: the task name written to `dataset.json`.
        prefix: file-name prefix of the cases.
        case_kwargs: passed to [`generate_case`] (e.g. `orientation="RAS"`, `num_lesions=1`).

    Returns:
        `root` as a `Path`.
    """
    if int(num_cases) <= 0:
        raise ValueError(f"`num_cases` must be > 0, got {num_cases}.")
    if "return_lesions" in case_kwargs:
        raise TypeError("`return_lesions` is not an option of generate_dataset; call generate_case for lesion data.")
    root = Path(root)
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    training = []
    for i in range(int(num_cases)):
        image, label = generate_case(case_seed(seed, i), **case_kwargs)
        file_name = f"{prefix}_{i:03d}.nii.gz"
        atomic_write(root / "imagesTr" / file_name, lambda p, img=image: nib.save(img, p), suffix=".nii.gz")
        atomic_write(root / "labelsTr" / file_name, lambda p, img=label: nib.save(img, p), suffix=".nii.gz")
        training.append({"image": f"./imagesTr/{file_name}", "label": f"./labelsTr/{file_name}"})
    meta = {
        "name": name,
        "description": f"sam3d-hf synthetic CT-like volumes (seed {seed}); label 2 is the lesion (tumour).",
        "reference": "generated by sam3d_hf.synthetic.generate_dataset",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(v): k for k, v in SYNTHETIC_LABELS.items()},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    write_json(root / "dataset.json", meta)
    return root
