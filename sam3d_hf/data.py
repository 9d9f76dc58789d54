"""Datasets on disk for Sam3D: index them, split them, check them, cache their preprocessed volumes.

Pipeline: [`index_dataset`] (a `datasets.Dataset` of `case_id`, `image` path, `label` path) -> [`load_or_create_split`]
(70/10/20 by seed, kept in a JSON file) -> [`validate_dataset`] (bad data stops before the first training step) ->
[`PreprocessedCache`]; how training patches and clicks are drawn from the cached volumes is `sam3d_hf.sampling`.

Preprocessing is the image processor's own (`Sam3DImageProcessor.preprocess`: reorientation to the canonical
`(D, H, W)` axes, windowing, resampling, z-scoring), so training and inference see the same voxels.
[`PreprocessedCache`] stores its output once per (file contents, processor configuration) as safetensors, so an
epoch does not resample every scan again.

Conventions: volumes are `(D, H, W)` on the processor's resampled canonical grid (default: depth towards Superior,
height towards Anterior, width towards Right, 1 mm); points are **patch voxel indices `(z, y, x)` = `(d, h, w)`**
float32, the model-level convention; point labels are 1 (positive), 0 (negative) and -1 (padding).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import datasets
import nibabel as nib
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from .files import atomic_write, write_json
from .image_processing_sam3d import NIFTI_SUFFIXES, NRRD_SUFFIXES, Sam3DImageProcessor, load_volume

__all__ = [
    "LAYOUTS",
    "PreprocessedCache",
    "default_cache_dir",
    "index_dataset",
    "load_or_create_split",
    "official_split",
    "resolve_split",
    "validate_dataset",
]

logger = logging.getLogger(__name__)

LAYOUTS = ("auto", "msd", "kits21", "lits17", "folder")
SPLITS = ("train", "validation", "test")
IMAGE_SUFFIXES = NIFTI_SUFFIXES + NRRD_SUFFIXES
CACHE_FORMAT = "sam3d-hf-preprocessed-v2"  # v2: the geometry records resampling_scale
_LAYOUT_HELP = (
    "Expected one of: an MSD task folder (dataset.json, imagesTr/, labelsTr/), KiTS21 (case_XXXXX/imaging.nii.gz and "
    "aggregated_MAJ_seg.nii.gz, under the root or root/data), LiTS17 (volume-N.nii and segmentation-N.nii), or a "
    "folder with images/ and labels/ holding files of matching names."
)


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------------
def _strip_suffix(name: str) -> str | None:
    """File name without its image suffix, or None when it is not an image file we read."""
    lower = name.lower()
    for suffix in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _image_files(folder: Path) -> dict[str, Path]:
    """`{case_id: path}` of the image files in `folder` (hidden files such as macOS `._x.nii.gz` skipped).

    nnU-Net's channel suffix `_0000` is dropped from the case id; files of other channels (`_0001`, ...) are skipped.
    """
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        stem = _strip_suffix(path.name)
        if stem is None or path.name.startswith(".") or not path.is_file():
            continue
        channel = re.fullmatch(r"(.+)_(\d{4})", stem)
        if channel:
            if channel.group(2) != "0000":
                continue
            stem = channel.group(1)
        files[stem] = path
    return files


def _image_processor(processor: Any) -> Sam3DImageProcessor:
    ip = getattr(processor, "image_processor", processor)
    if not isinstance(ip, Sam3DImageProcessor):
        raise TypeError(f"`processor` must be a Sam3DProcessor or Sam3DImageProcessor, got {type(processor).__name__}.")
    if ip.target_label is None:
        raise ValueError(
            "The processor's `target_label` is None, but training and evaluation need a binary target: set it to the "
            "label value of "
            "the structure to segment, e.g. Sam3DImageProcessor.from_preset('kits21') (tumour = 2) or "
            "Sam3DImageProcessor(..., target_label=2)."
        )
    return ip


def _rows(dataset: datasets.Dataset | Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    rows = [dict(row) for row in dataset]
    for row in rows:
        missing = {"case_id", "image", "label"} - set(row)
        if missing:
            raise ValueError(
                f"Each row needs the keys case_id, image and label (as index_dataset returns); a row lacks "
                f"{sorted(missing)}: {row}."
            )
        for key in ("image", "label"):
            if row[key] is not None and not isinstance(row[key], (str, os.PathLike)):
                raise TypeError(
                    f"Case {row['case_id']!r}: `{key}` must be a file path (str), got {type(row[key]).__name__}. "
                    "Keep index_dataset's string columns (do not cast them to datasets.Nifti before training)."
                )
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Indexing
# ----------------------------------------------------------------------------------------------------------------------
def _index_msd(root: Path) -> list[dict[str, Any]]:
    meta_path = root / "dataset.json"
    if meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            entries = meta["training"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{meta_path} is not an MSD dataset.json with a 'training' list ({err!r}).") from err
        rows = []
        for entry in entries:
            if not isinstance(entry, Mapping) or "image" not in entry:
                raise ValueError(f"{meta_path}: each 'training' entry needs 'image' and 'label', got {entry!r}.")
            image = root / entry["image"]
            label = entry.get("label")
            # dataset.json names one file per case; nnU-Net-converted folders hold it as NAME_0000.nii.gz
            if not image.exists():
                stem = _strip_suffix(image.name)
                alternative = image.with_name(f"{stem}_0000{image.name[len(stem) :]}") if stem else image
                image = alternative if alternative.exists() else image
            case_id = _strip_suffix(Path(entry["image"]).name) or Path(entry["image"]).name
            rows.append(
                {"case_id": case_id, "image": str(image), "label": None if label is None else str(root / label)}
            )
        return rows
    images, labels = _image_files(root / "imagesTr"), _image_files(root / "labelsTr")
    return [
        {"case_id": cid, "image": str(path), "label": str(labels[cid]) if cid in labels else None}
        for cid, path in images.items()
    ]


def _index_kits21(root: Path) -> list[dict[str, Any]]:
    base = root / "data" if not any(root.glob("case_*")) and (root / "data").is_dir() else root
    rows = []
    for case in sorted(p for p in base.glob("case_*") if p.is_dir()):
        image = case / "imaging.nii.gz"
        if not image.exists():
            continue
        # KiTS21 majority-vote labels; KiTS19/KiTS23 call the file segmentation.nii.gz
        label = next(
            (case / n for n in ("aggregated_MAJ_seg.nii.gz", "segmentation.nii.gz") if (case / n).exists()), None
        )
        rows.append({"case_id": case.name, "image": str(image), "label": None if label is None else str(label)})
    return rows


def _lits_files(root: Path, prefix: str) -> dict[int, Path]:
    found = {}
    for path in sorted(root.rglob(f"{prefix}-*")):
        match = re.fullmatch(rf"{prefix}-(\d+)\.nii(\.gz)?", path.name)
        if match and path.is_file():
            found[int(match.group(1))] = path
    return found


def _index_lits17(root: Path) -> list[dict[str, Any]]:
    volumes, segmentations = _lits_files(root, "volume"), _lits_files(root, "segmentation")
    return [
        {
            "case_id": f"volume-{n}",
            "image": str(path),
            "label": str(segmentations[n]) if n in segmentations else None,
        }
        for n, path in sorted(volumes.items())
    ]


def _index_folder(root: Path) -> list[dict[str, Any]]:
    if not (root / "images").is_dir():
        raise ValueError(f"The 'folder' layout needs {root / 'images'} (and labels/ for training); it does not exist.")
    images = _image_files(root / "images")
    labels = _image_files(root / "labels") if (root / "labels").is_dir() else {}
    orphans = sorted(set(labels) - set(images))
    if orphans:
        logger.warning("%d label files in %s match no image: %s", len(orphans), root / "labels", orphans[:10])
    return [
        {"case_id": cid, "image": str(path), "label": str(labels[cid]) if cid in labels else None}
        for cid, path in images.items()
    ]


def _detect_layout(root: Path) -> str:
    if (root / "dataset.json").exists() or (root / "imagesTr").is_dir():
        return "msd"
    if any(root.glob("case_*/imaging.nii.gz")) or any(root.glob("data/case_*/imaging.nii.gz")):
        return "kits21"
    if any(root.glob("volume-*.nii*")) or any(root.glob("*/volume-*.nii*")):
        return "lits17"
    if (root / "images").is_dir():
        return "folder"
    raise ValueError(f"Could not recognise the dataset layout of {root}. {_LAYOUT_HELP}")


def index_dataset(root: str | os.PathLike, layout: str = "auto", labelled_only: bool = False) -> datasets.Dataset:
    """Index a dataset folder as a `datasets.Dataset` of file paths, one row per case.

    Layouts:
        * `"msd"`: Medical Segmentation Decathlon task folder: `dataset.json`'s `training` list (`image`/`label`
          relative paths); without `dataset.json`, `imagesTr/` and `labelsTr/` matched by name (nnU-Net's `_0000`
          channel suffix understood). Case id: the file name without suffix (`pancreas_001`).
        * `"kits21"`: `case_XXXXX/imaging.nii.gz` with `aggregated_MAJ_seg.nii.gz` (or `segmentation.nii.gz`), under
          `root` or `root/data` (the KiTS21 repository). Case id: the folder name.
        * `"lits17"`: `volume-N.nii[.gz]` and `segmentation-N.nii[.gz]` anywhere under `root` (e.g. both "Training
          Batch" folders). Case id: `volume-N`.
        * `"folder"`: `root/images/` and `root/labels/` with files of the same name (NIfTI or NRRD). Case id: the
          file name without suffix.
        * `"auto"` (default): the first of these that matches.

    Args:
        root: the dataset folder.
        layout: one of the layouts above.
        labelled_only: leave out the cases without a label file (e.g. KiTS19's or a folder's unlabelled test scans),
            with a warning naming them, as training and evaluation do: a split made from labelled cases only is the
            same in both. A label file that is named (by `dataset.json`) but missing is not left out:
            [`validate_dataset`] reports it.

    Returns:
        `datasets.Dataset` with string columns `case_id`, `image` (path) and `label` (path, or None when the case has
        no label file), sorted by case id (numerically for LiTS). The paths are plain strings: to look at the scans,
        `ds.cast_column("image", datasets.Nifti())` decodes them lazily as nibabel images. Missing or malformed files
        are reported by [`validate_dataset`].

    Raises:
        ValueError: unknown layout, unrecognised folder, no case found, or (`labelled_only`) no case with a label.
    """
    root = Path(root)
    if layout not in LAYOUTS:
        raise ValueError(f"`layout` must be one of {LAYOUTS}, got {layout!r}.")
    if not root.is_dir():
        raise ValueError(f"Dataset root {str(root)!r} is not a folder. {_LAYOUT_HELP}")
    if layout == "auto":
        layout = _detect_layout(root)
    rows = {"msd": _index_msd, "kits21": _index_kits21, "lits17": _index_lits17, "folder": _index_folder}[layout](root)
    if not rows:
        raise ValueError(f"No case found in {root} with the {layout!r} layout. {_LAYOUT_HELP}")
    if labelled_only:
        unlabelled = [r["case_id"] for r in rows if r["label"] is None]
        rows = [r for r in rows if r["label"] is not None]
        if not rows:
            raise ValueError(
                f"None of the {len(unlabelled)} cases in {root} ({layout!r} layout) has a label file. {_LAYOUT_HELP}"
            )
        if unlabelled:
            logger.warning(
                "%d case(s) of %s have no label file and are left out: %s%s",
                len(unlabelled), root, unlabelled[:10], " ..." if len(unlabelled) > 10 else "",
            )  # fmt: skip
    ids = [r["case_id"] for r in rows]
    duplicates = sorted({c for c in ids if ids.count(c) > 1})
    if duplicates:
        raise ValueError(f"Case ids must be unique; {root} has several files for {duplicates[:10]}.")
    features = datasets.Features(
        {"case_id": datasets.Value("string"), "image": datasets.Value("string"), "label": datasets.Value("string")}
    )
    columns = {key: [r[key] for r in rows] for key in ("case_id", "image", "label")}
    return datasets.Dataset.from_dict(columns, features=features)


# ----------------------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------------------
def load_or_create_split(
    case_ids: Sequence[str],
    split_file: str | os.PathLike | None,
    seed: int = 0,
    fractions: Sequence[float] = (0.7, 0.1, 0.2),
) -> dict[str, list[str]]:
    """Read the train/validation/test split from `split_file`, or make a deterministic one and write it there.

    A new split shuffles the sorted `case_ids` with `numpy.random.default_rng(seed)` and cuts them into
    `round(n * fractions[0])` training and `round(n * fractions[1])` validation cases, the rest for testing; it is then
    written atomically to `split_file` (JSON: `train`, `validation`, `test`, `seed`, `fractions`) so that later runs
    reuse it. An existing file is authoritative (its seed is not re-applied): it is checked against `case_ids`.

    Args:
        case_ids: ids of every available case (e.g. `index_dataset(root)["case_id"]`).
        split_file: JSON path to read or create; `None` makes a split without writing it.
        seed: shuffle seed of a new split.
        fractions: `(train, validation, test)` fractions summing to 1.

    Returns:
        `{"train": [...], "validation": [...], "test": [...]}`.

    Raises:
        ValueError: duplicated ids, bad fractions, or a split file that is malformed, names a case twice, or names
            cases that are not in `case_ids` (the message lists them).
    """
    case_ids = [str(c) for c in case_ids]
    duplicates = sorted({c for c in case_ids if case_ids.count(c) > 1})
    if duplicates:
        raise ValueError(f"`case_ids` must be unique; repeated: {duplicates[:10]}.")
    if split_file is not None and Path(split_file).exists():
        return _read_split(Path(split_file), case_ids)

    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6 or fractions[0] <= 0:
        raise ValueError(f"`fractions` must be 3 values >= 0 summing to 1 with train > 0, got {fractions}.")
    if not case_ids:
        raise ValueError("`case_ids` is empty: there is nothing to split (check the dataset folder).")
    order = np.random.default_rng(seed).permutation(len(case_ids))
    shuffled = [sorted(case_ids)[i] for i in order]
    n_train = max(1, round(len(shuffled) * fractions[0]))
    n_val = min(round(len(shuffled) * fractions[1]), len(shuffled) - n_train)
    split = {
        "train": sorted(shuffled[:n_train]),
        "validation": sorted(shuffled[n_train : n_train + n_val]),
        "test": sorted(shuffled[n_train + n_val :]),
    }
    if split_file is not None:
        write_json(split_file, {**split, "seed": seed, "fractions": list(fractions)}, make_parents=True)
    return split


OFFICIAL_SPLITS_DIR = Path(__file__).resolve().parent / "official_splits"
OFFICIAL_DATASETS = ("kits", "pancreas", "lits", "colon")
# The official split's dataset of each processor preset (the paper's and the official code's presets).
PRESET_DATASETS = {
    "kits21": "kits", "official_kits": "kits", "msd_pancreas": "pancreas", "official_pancreas": "pancreas",
    "lits17": "lits", "lits17_code": "lits", "official_lits": "lits", "msd_colon": "colon", "official_colon": "colon",
}  # fmt: skip


def official_split(
    case_ids: Sequence[str], source: str | os.PathLike = "official", fold: int = 0, dataset: str | None = None
) -> tuple[dict[str, list[str]], str]:
    """A fold of the official code's split (`datafile/<dataset>/split.pkl`: five folds of train / val / test; its
    scripts use fold 0), or of a JSON file in that format (`{"folds": [{"train": {case_id: [image, label]}, "val":
    ..., "test": ...}, ...]}`), matched to the case ids of your folder (KiTS21 `case_XXXXX`, MSD `pancreas_NNN` /
    `colon_NNN`, LiTS `volume-N`, as `index_dataset` names them).

    Args:
        case_ids: the cases `index_dataset` found.
        source: `"official"` (the split shipped with the package) or the path of such a JSON file.
        fold: the fold, 0-4.
        dataset: `kits`, `pancreas`, `lits` or `colon` for `"official"`; default: the one whose split names most of
            `case_ids`.

    Returns:
        `({"train", "validation", "test"}, description)`.

    Raises:
        ValueError: an unknown dataset or fold, or cases of the split that the folder lacks (all named).
    """
    ids = set(map(str, case_ids))
    if str(source) == "official":
        if dataset is None:  # the dataset whose fold 0 names most of the folder's cases
            overlap = {name: len(ids & _official_case_ids(_load_split_json(OFFICIAL_SPLITS_DIR / f"{name}.json")))
                       for name in OFFICIAL_DATASETS}  # fmt: skip
            dataset = max(overlap, key=overlap.get)
            if not overlap[dataset]:
                raise ValueError(
                    f"none of the {len(ids)} cases of the folder (e.g. {sorted(ids)[:3]}) is in an official split: "
                    "they are for KiTS21 (case_XXXXX), MSD pancreas and colon (pancreas_NNN, colon_NNN) and LiTS17 "
                    "(volume-N)"
                )
        if dataset not in OFFICIAL_DATASETS:
            raise ValueError(f"no official split for dataset {dataset!r}; expected one of {OFFICIAL_DATASETS}")
        path = OFFICIAL_SPLITS_DIR / f"{dataset}.json"
    else:
        path = Path(source)
    data = _load_split_json(path)
    folds = data["folds"]
    if not 0 <= fold < len(folds):
        raise ValueError(f"{path} has folds 0 to {len(folds) - 1}; got --fold {fold}")
    parts = {ours: sorted(map(str, folds[fold][theirs])) for ours, theirs in (("train", "train"), ("validation", "val"),
                                                                              ("test", "test"))}  # fmt: skip
    missing = sorted(c for part in parts.values() for c in part if c not in ids)
    if missing:
        raise ValueError(
            f"{len(missing)} case(s) of fold {fold} of {path.name} are not in the dataset folder: {missing}; add them, "
            "or use a split of your own (--split_file)"
        )
    return parts, f"{path.stem if str(source) == 'official' else path} fold {fold}"


def resolve_split(
    case_ids: Sequence[str],
    split_file: str | os.PathLike | None,
    seed: int = 0,
    fold: int = 0,
    dataset: str | None = None,
) -> tuple[dict[str, list[str]], str]:
    """The split training and evaluation use, and a line saying what it is: `split_file="official"` or an
    official-format JSON (with `folds`): [`official_split`]; another JSON file: [`load_or_create_split`] (made from
    `seed` and written there if missing); `None`: a seeded split that is not written."""
    if split_file is not None and (str(split_file) == "official" or _has_folds(Path(split_file))):
        return official_split(case_ids, split_file, fold, dataset)
    split = load_or_create_split(case_ids, split_file, seed=seed)
    return split, f"{Path(split_file).name}" if split_file is not None else f"seeded 70/10/20 split (seed {seed})"


def _has_folds(path: Path) -> bool:
    try:
        return isinstance(json.loads(path.read_text(encoding="utf-8")).get("folds"), list)
    except (OSError, ValueError, AttributeError):
        return False


def _load_split_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"could not read the split {path} ({err})") from err
    folds = data.get("folds") if isinstance(data, dict) else None
    if not isinstance(folds, list) or not all(
        isinstance(f, dict) and {"train", "val", "test"} <= set(f) for f in folds
    ):
        raise ValueError(f"{path} is not an official-format split: expected {{'folds': [{{'train', 'val', 'test'}}]}}")
    return data


def _official_case_ids(data: Mapping[str, Any]) -> set[str]:
    fold = data["folds"][0]
    return {str(c) for part in ("train", "val", "test") for c in fold[part]}


def _read_split(path: Path, case_ids: list[str]) -> dict[str, list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"Split file {path} is not valid JSON ({err}); fix or delete it to make a new split.") from err
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in SPLITS):
        raise ValueError(
            f"Split file {path} must be a JSON object with lists 'train', 'validation' and 'test'; got keys "
            f"{sorted(data) if isinstance(data, dict) else type(data).__name__}."
        )
    split = {k: [str(c) for c in data[k]] for k in SPLITS}
    named = [c for k in SPLITS for c in split[k]]
    repeated = sorted({c for c in named if named.count(c) > 1})
    if repeated:
        raise ValueError(f"Split file {path} names these cases more than once: {repeated[:10]}.")
    unknown = sorted(set(named) - set(case_ids))
    if unknown:
        raise ValueError(
            f"Split file {path} names {len(unknown)} case(s) that are not in the dataset: {unknown[:10]}. Restore "
            "those cases, point to the right dataset, or delete the split file to make a new split."
        )
    if not split["train"]:
        raise ValueError(f"Split file {path} has no training case.")
    unassigned = sorted(set(case_ids) - set(named))
    if unassigned:
        logger.warning("%d case(s) are in no split of %s and will not be used: %s", len(unassigned), path, unassigned)
    return split


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------
def _header(path: str, what: str, case_id: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of an image file (NIfTI: header only), or a ValueError naming the case."""
    if not os.path.exists(path):
        raise ValueError(f"Case {case_id!r}: the {what} file {path} does not exist.")
    try:
        if path.lower().endswith(NIFTI_SUFFIXES):
            img = nib.load(path)
            shape = tuple(int(n) for n in img.shape)
            while len(shape) > 3 and shape[-1] == 1:
                shape = shape[:-1]
            return shape, np.asarray(img.affine, np.float64)
        volume = load_volume(path)
        return volume.data.shape, volume.affine
    except Exception as err:  # every reader raises its own type; name the case
        raise ValueError(
            f"Case {case_id!r}: could not read the {what} file {path} ({type(err).__name__}: {err})."
        ) from err


def validate_dataset(
    dataset: datasets.Dataset | Iterable[Mapping[str, Any]],
    processor: Any,
    case_ids: Sequence[str] | None = None,
    target_label: int | None = None,
) -> None:
    """Check a training or test set before any work; raise `ValueError` naming the first bad case.

    Checks, per case: the image and label files exist and are readable; the label map has the image's shape and
    affine (within 1e-3, the processor's own tolerance); and over all cases: the set is not empty, `case_ids` are all
    in `dataset`, and at least one case holds the target label. A case without the target value is legitimate (it
    gives background patches) and only logged.

    Reads the NIfTI headers and the label maps (not the images' voxels: `PreprocessedCache.prepare` decodes those).

    Args:
        dataset: rows with `case_id`, `image`, `label` (e.g. from [`index_dataset`]).
        processor: a `Sam3DProcessor` or `Sam3DImageProcessor` with `target_label` set.
        case_ids: check only these cases (e.g. the training split); every id must be in `dataset`.
        target_label: the label value of the structure (default: the processor's `target_label`).
    """
    target = target_label if target_label is not None else _image_processor(processor).target_label
    rows = {r["case_id"]: r for r in _rows(dataset)}
    if case_ids is not None:
        case_ids = [str(c) for c in case_ids]
        unknown = [c for c in case_ids if c not in rows]
        if unknown:
            raise ValueError(
                f"{len(unknown)} case(s) of the split are not in the dataset: {unknown[:10]} (the split file may "
                "belong to another dataset, or the files were moved)."
            )
        selected = [rows[c] for c in case_ids]
    else:
        selected = list(rows.values())
    if not selected:
        raise ValueError("The dataset is empty: no case to train on (check the folder and the split file).")

    without_target = []
    for row in selected:
        cid = row["case_id"]
        if row["label"] is None:
            raise ValueError(f"Case {cid!r} has no label file (image {row['image']}); every training case needs one.")
        image_shape, image_affine = _header(str(row["image"]), "image", cid)
        label_shape, label_affine = _header(str(row["label"]), "label", cid)
        if len(image_shape) != 3:
            raise ValueError(f"Case {cid!r}: the image {row['image']} has shape {image_shape}; expected a 3D volume.")
        if label_shape != image_shape:
            raise ValueError(
                f"Case {cid!r}: the label map has shape {label_shape} but the image has {image_shape} "
                f"({row['label']} vs {row['image']}); they must be voxel-aligned."
            )
        if not np.allclose(label_affine, image_affine, atol=1e-3):
            raise ValueError(
                f"Case {cid!r}: the label map's affine differs from the image's ({label_affine.round(4).tolist()} vs "
                f"{image_affine.round(4).tolist()}); resample the label map onto the image grid ({row['label']})."
            )
        path = str(row["label"])
        try:
            labels = np.asanyarray(nib.load(path).dataobj) if path.lower().endswith(NIFTI_SUFFIXES) else None
            labels = load_volume(path).data if labels is None else labels
        except Exception as err:  # a truncated file ends in EOFError or zlib.error deep inside nibabel
            raise ValueError(
                f"Case {cid!r}: the label file {path} cannot be decoded ({type(err).__name__}: {err}); is it "
                "complete? Replace or re-download it."
            ) from err
        if not np.any(labels == target):
            without_target.append(cid)
            if len(without_target) == 1:
                found = np.unique(labels).tolist()[:10]
    if len(without_target) == len(selected):
        raise ValueError(
            f"No case holds the target label value {target} (checked {len(selected)} cases, e.g. "
            f"{without_target[:5]}): wrong `target_label` for this dataset (--target_label, or the processor's "
            f"target_label)? Its label maps hold other values, e.g. {found} in case {without_target[0]!r}."
        )
    if without_target:
        logger.info(
            "%d of %d cases have no voxel with label %d (they give background patches only): %s",
            len(without_target),
            len(selected),
            target,
            without_target,
        )


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessed cache
# ----------------------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """`$SAM3D_HF_CACHE`, else `$XDG_CACHE_HOME/sam3d-hf/preprocessed`, else `~/.cache/sam3d-hf/preprocessed`."""
    if os.environ.get("SAM3D_HF_CACHE"):
        return Path(os.environ["SAM3D_HF_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sam3d-hf" / "preprocessed"


class PreprocessedCache:
    """Disk cache of `Sam3DImageProcessor.preprocess` outputs, keyed by file contents and processor configuration.

    One safetensors file per (image bytes, label bytes, processor config) holds `pixel_values`, the label map (as
    uint8) and the geometry arrays; its metadata records the case id, the source paths and the processor config as
    JSON. Changing a scan or any processor setting (window, statistics, spacing, target label, ...) gives a new key,
    so stale entries are never read; they just take space until [`clear`] or `rm -r` of the folder. Entries are
    written atomically (temporary file + `os.replace`), so DataLoader workers may fill the cache concurrently.

    The SHA-256 of each file is remembered in `cache_dir/file-hashes/` with the file's size and modification time, so
    a file is read again only when it changed.

    Args:
        processor: a `Sam3DProcessor` or `Sam3DImageProcessor` with `target_label` set (labels are stored binary).
        cache_dir: folder of the cache; default [`default_cache_dir`] (`~/.cache/sam3d-hf/preprocessed`, or
            `$SAM3D_HF_CACHE`).
    """

    def __init__(self, processor: Any, cache_dir: str | os.PathLike | None = None):
        self.image_processor = _image_processor(processor)
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        config = self.image_processor.to_dict()
        self.config_json = json.dumps(config, sort_keys=True, default=list)
        self._hashes: dict[str, tuple[int, int, str]] = {}

    def file_hash(self, path: str | os.PathLike) -> str:
        """SHA-256 of a file's bytes, remembered per (path, size, mtime)."""
        path = os.path.abspath(path)
        stat = os.stat(path)
        memo = self._hashes.get(path)
        if memo is not None and memo[:2] == (stat.st_size, stat.st_mtime_ns):
            return memo[2]
        record_path = self.cache_dir / "file-hashes" / (hashlib.sha256(path.encode()).hexdigest()[:32] + ".json")
        try:
            record = json.loads(record_path.read_text(encoding="utf-8"))
            if (record["path"], record["size"], record["mtime_ns"]) == (path, stat.st_size, stat.st_mtime_ns):
                self._hashes[path] = (stat.st_size, stat.st_mtime_ns, record["sha256"])
                return record["sha256"]
        except (OSError, ValueError, KeyError):  # no record yet, or an unreadable one: hash again
            pass
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        sha = digest.hexdigest()
        write_json(
            record_path,
            {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha},
            make_parents=True,
        )
        self._hashes[path] = (stat.st_size, stat.st_mtime_ns, sha)
        return sha

    def entry_path(self, case: Mapping[str, Any]) -> Path:
        """Cache file of a case (`{case_id, image, label}` row): `<case_id>-<key>.safetensors`."""
        label = case.get("label")
        key_source = json.dumps(
            {
                "format": CACHE_FORMAT,
                "image": self.file_hash(case["image"]),
                "label": None if label is None else self.file_hash(label),
                "processor": self.config_json,
            },
            sort_keys=True,
        )
        key = hashlib.sha256(key_source.encode()).hexdigest()[:40]
        readable = re.sub(r"[^A-Za-z0-9_.-]", "_", str(case["case_id"]))[:64]
        return self.cache_dir / f"{readable}-{key}.safetensors"

    def get(self, case: Mapping[str, Any]) -> dict[str, Any]:
        """Preprocessed volume of a case, from the cache or computed (and stored) by the processor.

        Args:
            case: a row with `case_id`, `image` (path) and `label` (path or None).

        Returns:
            `{"case_id": str, "pixel_values": float32 (1, D, H, W), "labels": int64 (D, H, W) binary
            (label == target_label; absent when the case has no label), "geometry": {name: np.ndarray}}` on the
            processor's resampled canonical grid; `geometry` holds `original_size`, `original_affine`,
            `canonical_axes`, `canonical_flips`, `canonical_size`, `resampled_size`, `resampled_spacing`,
            `resampled_affine` (see `Sam3DImageProcessor.preprocess`).
        """
        out = self._get(case)
        if "labels" in out:
            out["labels"] = out["labels"].astype(np.int64)
        return out

    def _get(self, case: Mapping[str, Any]) -> dict[str, Any]:
        """[`get`] with the labels kept as stored (uint8: 8x less memory for whole volumes)."""
        path = self.entry_path(case)
        if path.exists():
            try:
                return self._read(path, str(case["case_id"]))
            except Exception as err:  # a damaged entry (disk full, foreign file): recompute it
                logger.warning("Cache entry %s is unreadable (%s); preprocessing again.", path, err)
        out = self.image_processor.preprocess(case["image"], segmentation_maps=case.get("label"), return_tensors="np")
        tensors = {"pixel_values": np.ascontiguousarray(out["pixel_values"][0], dtype=np.float32)}
        if "labels" in out:
            tensors["labels"] = np.ascontiguousarray(out["labels"][0], dtype=np.uint8)
        geometry_keys = [k for k in out if k not in ("pixel_values", "labels")]
        for key in geometry_keys:
            tensors[f"geometry.{key}"] = np.ascontiguousarray(out[key])
        metadata = {
            "format": CACHE_FORMAT,
            "case_id": str(case["case_id"]),
            "image": os.fspath(case["image"]),
            "label": "" if case.get("label") is None else os.fspath(case["label"]),
            "processor": self.config_json,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), suffix=path.suffix)
        return self._unpack(tensors, str(case["case_id"]))

    def _read(self, path: Path, case_id: str) -> dict[str, Any]:
        with safe_open(path, framework="np") as f:
            if (f.metadata() or {}).get("format") != CACHE_FORMAT:
                raise ValueError(f"not a {CACHE_FORMAT} file")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        return self._unpack(tensors, case_id)

    @staticmethod
    def _unpack(tensors: dict[str, np.ndarray], case_id: str) -> dict[str, Any]:
        out = {
            "case_id": case_id,
            "pixel_values": tensors["pixel_values"],
            "geometry": {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("geometry.")},
        }
        if "labels" in tensors:
            out["labels"] = tensors["labels"]
        return out

    def prepare(self, dataset: datasets.Dataset | Iterable[Mapping[str, Any]]) -> list[tuple[str, str]]:
        """Preprocess every case of `dataset` into the cache now (decoding every voxel of its files), so that a
        truncated or unreadable file is found before training starts rather than at the first batch that needs it;
        cases already cached cost a hash check. Returns `(case_id, reason)` for each case that failed (empty when all
        are usable); nothing is raised, so that each process of a distributed run can report its share."""
        problems = []
        for row in _rows(dataset):
            try:
                self._get(row)
            except Exception as error:  # every reader raises its own type; the message names the file
                problems.append((str(row["case_id"]), " ".join(f"{type(error).__name__}: {error}".split())))
        return problems

    def clear(self) -> int:
        """Delete this cache folder's entries and file-hash records (nothing else); return the number of entries."""
        removed = 0
        if self.cache_dir.is_dir():
            for path in self.cache_dir.glob("*.safetensors"):
                path.unlink(missing_ok=True)
                removed += 1
            hashes = self.cache_dir / "file-hashes"
            if hashes.is_dir():
                for path in hashes.glob("*.json"):
                    path.unlink(missing_ok=True)
                if not any(hashes.iterdir()):
                    hashes.rmdir()
        self._hashes.clear()
        return removed
