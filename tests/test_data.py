"""Training data: layouts, splits, validation, the preprocessed cache, patch sampling, clicks and determinism."""

import itertools
import json
import logging
import os
import shutil

import datasets
import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import PATCH, TINY
from safetensors.numpy import load_file

from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation, Sam3DImageProcessor, Sam3DProcessor
from sam3d_hf.data import PreprocessedCache, default_cache_dir, index_dataset, load_or_create_split, validate_dataset
from sam3d_hf.recipes import get_recipe
from sam3d_hf.sampling import Sam3DTrainingDataset, sam3d_collate, sample_points
from sam3d_hf.synthetic import SYNTHETIC_PROCESSOR_KWARGS, generate_case, generate_dataset


@pytest.fixture(scope="module")
def msd_root(tmp_path_factory):
    """Three cases with one lesion each and one case without lesion, in the MSD layout."""
    root = generate_dataset(tmp_path_factory.mktemp("msd") / "Task99", num_cases=3, seed=1, num_lesions=1)
    image, label = generate_case(123, num_lesions=0)
    nib.save(image, root / "imagesTr" / "synthetic_003.nii.gz")
    nib.save(label, root / "labelsTr" / "synthetic_003.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append({"image": "./imagesTr/synthetic_003.nii.gz", "label": "./labelsTr/synthetic_003.nii.gz"})
    meta["numTraining"] = 4
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture
def processor():
    return Sam3DImageProcessor(**SYNTHETIC_PROCESSOR_KWARGS)


def _save(case_seed, image_path, label_path, **kwargs):
    image, label = generate_case(case_seed, **kwargs)
    image_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, image_path)
    if label_path is not None:
        label_path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(label, label_path)
    return image, label


# ----------------------------------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------------------------------
def test_index_msd_from_dataset_json(msd_root):
    for layout in ("auto", "msd"):
        ds = index_dataset(msd_root, layout=layout)
        assert isinstance(ds, datasets.Dataset)
        assert ds["case_id"] == [f"synthetic_{i:03d}" for i in range(4)]
        assert ds["image"][2] == str(msd_root / "./imagesTr/synthetic_002.nii.gz")
        assert all(os.path.exists(p) for p in list(ds["image"]) + list(ds["label"]))
    # the paths decode with the datasets Nifti feature (lazy nibabel images with their affine)
    decoded = ds.cast_column("image", datasets.Nifti())[0]["image"]
    assert decoded.shape == nib.load(ds["image"][0]).shape
    assert np.allclose(decoded.affine, nib.load(ds["image"][0]).affine)


def test_index_msd_without_json_and_nnunet_channel_suffix(tmp_path):
    _save(0, tmp_path / "imagesTr" / "liver_7_0000.nii.gz", tmp_path / "labelsTr" / "liver_7.nii.gz")
    _save(1, tmp_path / "imagesTr" / "liver_8_0000.nii.gz", None)
    (tmp_path / "imagesTr" / "._liver_7_0000.nii.gz").write_bytes(b"macOS resource fork")  # MSD tarballs have these
    (tmp_path / "imagesTr" / "liver_7_0001.nii.gz").write_bytes(b"second channel")
    ds = index_dataset(tmp_path)
    assert ds["case_id"] == ["liver_7", "liver_8"]
    assert ds["label"] == [str(tmp_path / "labelsTr" / "liver_7.nii.gz"), None]


def test_index_kits21_under_data_folder(tmp_path):
    for n in (3, 0):
        case = tmp_path / "data" / f"case_{n:05d}"
        _save(n, case / "imaging.nii.gz", case / "aggregated_MAJ_seg.nii.gz")
    _save(9, tmp_path / "data" / "case_00009" / "imaging.nii.gz", None)  # a test case without label
    for root in (tmp_path, tmp_path / "data"):
        for layout in ("auto", "kits21"):
            ds = index_dataset(root, layout=layout)
            assert ds["case_id"] == ["case_00000", "case_00003", "case_00009"]
            assert ds["label"][1] == str(tmp_path / "data" / "case_00003" / "aggregated_MAJ_seg.nii.gz")
            assert ds["label"][2] is None


def test_index_lits17_across_batches_sorted_numerically(tmp_path):
    _save(0, tmp_path / "Training Batch 1" / "volume-2.nii", tmp_path / "Training Batch 1" / "segmentation-2.nii")
    _save(1, tmp_path / "Training Batch 2" / "volume-10.nii", tmp_path / "Training Batch 2" / "segmentation-10.nii")
    for layout in ("auto", "lits17"):
        ds = index_dataset(tmp_path, layout=layout)
        assert ds["case_id"] == ["volume-2", "volume-10"]
        assert ds["label"][1] == str(tmp_path / "Training Batch 2" / "segmentation-10.nii")


def test_index_generic_folder_matched_by_name(tmp_path):
    _save(0, tmp_path / "images" / "b.nii.gz", tmp_path / "labels" / "b.nii.gz")
    _save(1, tmp_path / "images" / "a.nii", tmp_path / "labels" / "a.nii")
    _save(2, tmp_path / "images" / "c.nii.gz", None)
    for layout in ("auto", "folder"):
        ds = index_dataset(tmp_path, layout=layout)
        assert ds["case_id"] == ["a", "b", "c"]
        assert ds["label"] == [str(tmp_path / "labels" / "a.nii"), str(tmp_path / "labels" / "b.nii.gz"), None]


def test_labelled_only_leaves_out_the_cases_without_a_label_and_names_them(tmp_path, caplog):
    for name in ("b", "a"):
        _save(0, tmp_path / "images" / f"{name}.nii.gz", tmp_path / "labels" / f"{name}.nii.gz")
    _save(2, tmp_path / "images" / "unlabelled.nii.gz", None)
    with caplog.at_level(logging.WARNING, logger="sam3d_hf.data"):
        ds = index_dataset(tmp_path, labelled_only=True)
    assert ds["case_id"] == ["a", "b"] and None not in ds["label"]
    assert "1 case(s)" in caplog.text and "'unlabelled'" in caplog.text
    for name in ("a", "b"):
        (tmp_path / "labels" / f"{name}.nii.gz").unlink()
    assert index_dataset(tmp_path)["case_id"] == ["a", "b", "unlabelled"]
    with pytest.raises(ValueError, match=r"None of the 3 cases .* has a label file"):
        index_dataset(tmp_path, labelled_only=True)


def test_index_errors(tmp_path):
    with pytest.raises(ValueError, match="layout"):
        index_dataset(tmp_path, layout="nnunet")
    with pytest.raises(ValueError, match="Could not recognise the dataset layout"):
        index_dataset(tmp_path)
    with pytest.raises(ValueError, match="is not a folder"):
        index_dataset(tmp_path / "missing")
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="No case found"):
        index_dataset(tmp_path, layout="folder")


# ----------------------------------------------------------------------------------------------------------------------
# Splits
# ----------------------------------------------------------------------------------------------------------------------
def test_split_is_deterministic_partitions_and_is_reused(tmp_path):
    ids = [f"case_{i:02d}" for i in range(20)]
    split = load_or_create_split(ids, tmp_path / "split.json", seed=3)
    assert [len(split[k]) for k in ("train", "validation", "test")] == [14, 2, 4]
    assert sorted(split["train"] + split["validation"] + split["test"]) == ids
    assert split == load_or_create_split(list(reversed(ids)), None, seed=3)  # order of the input does not matter
    assert split != load_or_create_split(ids, None, seed=4)
    on_disk = json.loads((tmp_path / "split.json").read_text())
    assert {k: on_disk[k] for k in split} == split and on_disk["seed"] == 3
    assert (tmp_path / "split.json").stat().st_mode & 0o777 == 0o666 & ~_umask()
    # an existing file is authoritative: edited by hand, read back as is, whatever the seed argument
    on_disk["train"], on_disk["test"] = on_disk["test"], on_disk["train"]
    (tmp_path / "split.json").write_text(json.dumps(on_disk))
    reused = load_or_create_split(ids, tmp_path / "split.json", seed=99)
    assert reused["train"] == split["test"] and reused["test"] == split["train"]


def _umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_split_file_errors_name_the_cases(tmp_path):
    ids = ["a", "b", "c", "d"]
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["a", "ghost"], "validation": [], "test": ["c"]}))
    with pytest.raises(ValueError, match="not in the dataset: \\['ghost'\\]"):
        load_or_create_split(ids, path)
    path.write_text(json.dumps({"train": ["a", "b"], "validation": ["b"], "test": []}))
    with pytest.raises(ValueError, match="more than once: \\['b'\\]"):
        load_or_create_split(ids, path)
    path.write_text(json.dumps({"train": ["a"]}))
    with pytest.raises(ValueError, match="'train', 'validation' and 'test'"):
        load_or_create_split(ids, path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_or_create_split(ids, path)
    with pytest.raises(ValueError, match="fractions"):
        load_or_create_split(ids, None, fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="unique"):
        load_or_create_split(["a", "a"], None)
    with pytest.raises(ValueError, match="empty"):
        load_or_create_split([], None)


# ----------------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------------
def test_validate_accepts_good_data_and_logs_cases_without_target(msd_root, processor, caplog):
    ds = index_dataset(msd_root)
    with caplog.at_level(logging.INFO, logger="sam3d_hf.data"):
        validate_dataset(ds, processor)
    assert "synthetic_003" in caplog.text and "synthetic_000" not in caplog.text
    validate_dataset(ds, Sam3DProcessor(processor), case_ids=["synthetic_000"])


def _rows(tmp_path, label_affine=None, label_shape=None):
    """A folder dataset with a good case and a case 'bad' whose label map is cut to `label_shape` or moved."""
    _, label = _save(5, tmp_path / "images" / "bad.nii.gz", None, num_lesions=1)
    data = np.asarray(label.dataobj)
    if label_shape is not None:
        data = data[: label_shape[0]]
    (tmp_path / "labels").mkdir()
    nib.save(
        nib.Nifti1Image(data, label.affine if label_affine is None else label_affine),
        tmp_path / "labels" / "bad.nii.gz",
    )
    _save(6, tmp_path / "images" / "good.nii.gz", tmp_path / "labels" / "good.nii.gz", num_lesions=1)
    return index_dataset(tmp_path, layout="folder")


def test_validate_shape_mismatch_names_the_case(tmp_path, processor):
    ds = _rows(tmp_path, label_shape=(10,))
    with pytest.raises(ValueError, match="Case 'bad': the label map has shape"):
        validate_dataset(ds, processor)


def test_validate_affine_mismatch_names_the_case(tmp_path, processor):
    affine = generate_case(5, num_lesions=1)[0].affine.copy()
    affine[0, 3] += 2.0
    ds = _rows(tmp_path, label_affine=affine)
    with pytest.raises(ValueError, match="Case 'bad': the label map's affine differs"):
        validate_dataset(ds, processor)


def test_validate_missing_and_unreadable_files_name_the_case(tmp_path, msd_root, processor):
    root = tmp_path / "task"
    shutil.copytree(msd_root, root)
    (root / "labelsTr" / "synthetic_001.nii.gz").unlink()
    ds = index_dataset(root)  # dataset.json still names the label
    with pytest.raises(ValueError, match=r"Case 'synthetic_001': the label file .* does not exist"):
        validate_dataset(ds, processor)
    (root / "labelsTr" / "synthetic_001.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(ValueError, match="Case 'synthetic_001': could not read the label file"):
        validate_dataset(ds, processor)
    rows = [{"case_id": "x", "image": ds["image"][0], "label": None}]
    with pytest.raises(ValueError, match="Case 'x' has no label file"):
        validate_dataset(rows, processor)


def test_validate_split_empty_and_target_errors(msd_root, processor):
    ds = index_dataset(msd_root)
    with pytest.raises(ValueError, match="not in the dataset: \\['synthetic_042'\\]"):
        validate_dataset(ds, processor, case_ids=["synthetic_000", "synthetic_042"])
    with pytest.raises(ValueError, match="empty"):
        validate_dataset(ds, processor, case_ids=[])
    with pytest.raises(ValueError, match="No case holds the target label value 2"):
        validate_dataset(ds, processor, case_ids=["synthetic_003"])  # the case without lesion alone
    with pytest.raises(ValueError, match="No case holds the target label value 3"):
        validate_dataset(ds, Sam3DImageProcessor(**{**SYNTHETIC_PROCESSOR_KWARGS, "target_label": 3}))
    with pytest.raises(ValueError, match="target_label"):
        validate_dataset(ds, Sam3DImageProcessor(**{**SYNTHETIC_PROCESSOR_KWARGS, "target_label": None}))
    with pytest.raises(TypeError, match="Sam3DProcessor or Sam3DImageProcessor"):
        validate_dataset(ds, "kits21")


# ----------------------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------------------
@pytest.fixture
def count_preprocess(monkeypatch):
    calls = []
    original = Sam3DImageProcessor.preprocess

    def counting(self, *args, **kwargs):
        calls.append(self.window)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Sam3DImageProcessor, "preprocess", counting)
    return calls


def test_cache_hits_skip_the_processor_and_match_its_output(tmp_path, msd_root, processor, count_preprocess):
    row = index_dataset(msd_root)[0]
    cache = PreprocessedCache(processor, tmp_path / "cache")
    first = cache.get(row)
    assert len(count_preprocess) == 1
    second = PreprocessedCache(Sam3DProcessor(processor), tmp_path / "cache").get(row)  # a new process would do this
    assert len(count_preprocess) == 1
    direct = processor.preprocess(row["image"], segmentation_maps=row["label"], return_tensors="np")
    raw = nib.load(row["label"]).get_fdata()
    for out in (first, second):
        assert out["pixel_values"].dtype == np.float32 and out["labels"].dtype == np.int64
        assert np.array_equal(out["pixel_values"], direct["pixel_values"][0])
        assert np.array_equal(out["labels"], direct["labels"][0])
        assert set(np.unique(out["labels"])) == {0, 1}
        assert np.array_equal(out["geometry"]["resampled_affine"], direct["resampled_affine"])
        # binary target: the tumour's volume in mm^3 is kept by the resampling (1 mm grid) within a few percent
        assert abs(out["labels"].sum() - (raw == 2).sum() * np.prod(nib.load(row["label"]).header.get_zooms())) < (
            0.1 * out["labels"].sum()
        )
    entries = list((tmp_path / "cache").glob("*.safetensors"))
    assert len(entries) == 1 and entries[0].name.startswith("synthetic_000-")
    assert entries[0].stat().st_mode & 0o777 == 0o666 & ~_umask()
    assert set(load_file(entries[0])) >= {"pixel_values", "labels", "geometry.resampled_affine"}
    assert not list((tmp_path / "cache").rglob(".tmp-*"))


def test_cache_is_keyed_by_processor_config_and_file_contents(tmp_path, msd_root, processor, count_preprocess):
    root = tmp_path / "task"
    shutil.copytree(msd_root, root)
    row = index_dataset(root)[0]
    cache_dir = tmp_path / "cache"
    cache = PreprocessedCache(processor, cache_dir)
    cache.get(row)
    other = Sam3DImageProcessor(**{**SYNTHETIC_PROCESSOR_KWARGS, "window": (-100.0, 240.0)})
    PreprocessedCache(other, cache_dir).get(row)
    assert count_preprocess == [(-60.0, 240.0), (-100.0, 240.0)]
    PreprocessedCache(other, cache_dir).get(row)
    assert len(count_preprocess) == 2
    # new label contents at the same path (and same size) -> a new entry
    label = nib.load(row["label"])
    original = np.asarray(label.dataobj).copy()
    data = original.copy()
    data[data == 2] = 1
    nib.save(nib.Nifti1Image(data, label.affine, label.header), row["label"])
    assert cache.get(row)["labels"].sum() == 0 and len(count_preprocess) == 3  # the instance that hashed it before
    nib.save(nib.Nifti1Image(original, label.affine, label.header), row["label"])  # back again
    assert PreprocessedCache(processor, cache_dir).get(row)["labels"].sum() > 0 and len(count_preprocess) == 3
    nib.save(nib.Nifti1Image(data, label.affine, label.header), row["label"])
    assert PreprocessedCache(processor, cache_dir).get(row)["labels"].sum() == 0 and len(count_preprocess) == 3
    assert cache.clear() == 3 and not list(cache_dir.glob("*.safetensors"))
    cache.get(row)
    assert len(count_preprocess) == 4


def test_cache_recomputes_a_damaged_entry_and_default_dir(tmp_path, msd_root, processor, count_preprocess, monkeypatch):
    row = index_dataset(msd_root)[1]
    cache = PreprocessedCache(processor, tmp_path)
    cache.get(row)
    cache.entry_path(row).write_bytes(b"garbage")
    assert cache.get(row)["pixel_values"].ndim == 4 and len(count_preprocess) == 2
    monkeypatch.setenv("SAM3D_HF_CACHE", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    monkeypatch.delenv("SAM3D_HF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert PreprocessedCache(processor).cache_dir == tmp_path / "xdg" / "sam3d-hf" / "preprocessed"


# ----------------------------------------------------------------------------------------------------------------------
# Clicks
# ----------------------------------------------------------------------------------------------------------------------
def _brute_force_distance(points, foreground):
    """Euclidean distance from each point to the nearest foreground voxel, by enumeration."""
    fg = np.argwhere(foreground)
    return np.sqrt(((points[:, None, :] - fg[None]) ** 2).sum(-1)).min(1)


def test_sample_points_positive_inside_negative_in_ring_empty_patch_positive():
    labels = np.zeros((20, 18, 22), np.int64)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in labels.shape], indexing="ij")
    labels[(zz - 9) ** 2 + (yy - 8) ** 2 / 2 + (xx - 12) ** 2 <= 16] = 1
    rng = np.random.default_rng(0)
    for _ in range(20):
        points, point_labels = sample_points(labels, rng, 40, 10, 5, True, negative_ring_width=2.0)
        assert points.dtype == np.float32 and point_labels.dtype == np.int64
        assert (point_labels == 1).sum() == 40 and (point_labels == 0).sum() == 5
        idx = points.astype(int)
        assert np.array_equal(points, idx)  # voxel centres (z, y, x)
        assert np.all(labels[tuple(idx[point_labels == 1].T)] == 1)
        negatives = points[point_labels == 0]
        assert np.all(labels[tuple(idx[point_labels == 0].T)] == 0)
        distance = _brute_force_distance(negatives, labels == 1)
        assert np.all((distance > 0) & (distance <= 2.0)), distance
        assert len(np.unique(negatives, axis=0)) == 5
    points, point_labels = sample_points(labels, rng, 40, 10, 5, use_point_labels=False)
    assert np.all(point_labels == 1) and len(points) == 40
    empty = np.zeros((8, 9, 10), np.int64)
    points, point_labels = sample_points(empty, rng, 40, 10, 5, True)
    assert len(points) == 10 and np.all(point_labels == 1)
    assert np.all((points >= 0) & (points < np.array(empty.shape)))
    # a tiny target: positives repeat (with replacement), negatives around it
    tiny = np.zeros((9, 9, 9), np.int64)
    tiny[4, 4, 4] = 1
    points, point_labels = sample_points(tiny, rng, 40, 10, 3, True, negative_ring_width=1.0)
    assert np.all(points[point_labels == 1] == 4)
    assert np.all(np.abs(points[point_labels == 0] - 4).sum(1) == 1)


# ----------------------------------------------------------------------------------------------------------------------
# Training dataset: the legacy sampler (the official one: tests/test_recipes.py)
# ----------------------------------------------------------------------------------------------------------------------
def legacy(patch_size, augment: bool = True, **changes):
    """The legacy recipe at a test patch size, with or without its (Table 4) augmentations."""
    return get_recipe("legacy").replace(
        patch_size=tuple(patch_size), augmentation="table4" if augment else "none", **changes
    )


def test_crop_ratio_is_one_to_one(tmp_path, processor):
    # axis-aligned scans: MONAI moves centres near the volume's faces inwards, which keeps them in the body (a
    # cylinder along S) only when the grid is not oblique
    ds = index_dataset(generate_dataset(tmp_path / "ras", num_cases=3, seed=1, num_lesions=1, orientation="RAS"))
    train = Sam3DTrainingDataset(
        ds, processor, recipe=legacy((12, 12, 12), augment=False), cache_dir=tmp_path, samples_per_volume=20
    )
    centre_is_tumour = []
    for epoch in range(4):
        train.set_epoch(epoch)
        for i in range(len(train)):
            item = train[i]
            centre_is_tumour.append(int(item["labels"][6, 6, 6]))
            assert item["pixel_values"][0, 6, 6, 6] > processor.pad_value  # background centres in the body, not air
    fraction = np.mean(centre_is_tumour)
    assert len(centre_is_tumour) == 240 and 0.4 < fraction < 0.6, fraction  # binomial sd 0.032


def test_items_shapes_clicks_and_labels(tmp_path, msd_root, processor):
    ds = index_dataset(msd_root)
    patch = (24, 32, 32)
    train = Sam3DTrainingDataset(ds, processor, recipe=legacy(patch), cache_dir=tmp_path, samples_per_volume=4)
    pad_value = processor.pad_value
    seen_empty = seen_full = 0
    for i in range(len(train)):
        item = train[i]
        assert item["pixel_values"].shape == (1, *patch) and item["pixel_values"].dtype == torch.float32
        assert item["labels"].shape == patch and item["labels"].dtype == torch.int64
        assert set(item["labels"].unique().tolist()) <= {0, 1}
        assert item["input_points"].shape == (43, 3) and item["input_labels"].shape == (43,)
        labels, points, point_labels = item["labels"].numpy(), item["input_points"].numpy(), item["input_labels"]
        idx = points.astype(int)
        if labels.any():
            seen_full += 1
            assert (point_labels == 1).sum() == 40 and 1 <= (point_labels == 0).sum() <= 3
            assert np.all(labels[tuple(idx[point_labels == 1].T)] == 1)
            negatives = points[(point_labels == 0).numpy()]
            distance = _brute_force_distance(negatives, labels == 1)
            assert np.all((distance > 0) & (distance <= 3.0))
        else:
            seen_empty += 1
            assert (point_labels == 1).sum() == 10 and (point_labels == -1).sum() == 33
        assert np.all((points >= 0) & (points <= np.array(patch) - 1))
        assert item["pixel_values"].min() >= pad_value - 0.1 - 1e-4  # the intensity shift is at most 0.1
    assert seen_empty and seen_full


def test_augmentations_are_the_papers_table_4(tmp_path, processor):
    """The MONAI chain holds the Table 4 transforms with their probabilities and ranges (and none without augment)."""
    rows = [{"case_id": "a", "image": "a.nii.gz", "label": "a_seg.nii.gz"}]  # never read: the chain alone
    chain = Sam3DTrainingDataset(rows, processor, recipe=legacy((12, 12, 20)), cache_dir=tmp_path).after_crop.transforms
    found = {}
    for transform in chain:
        found.setdefault(type(transform).__name__, []).append(transform)
    (zoom,) = found["RandZoomd"]
    assert (zoom.prob, zoom.rand_zoom.min_zoom, zoom.rand_zoom.max_zoom) == (0.3, (0.9,), (1.1,))
    (turn,) = found["RandRotate90d"]
    assert (turn.prob, turn.max_k, turn.spatial_axes) == (0.5, 3, (1, 2))
    assert sorted((f.prob, f.flipper.spatial_axis) for f in found["RandFlipd"]) == [(0.5, 0), (0.5, 1), (0.5, 2)]
    (shift,) = found["RandShiftIntensityd"]
    assert (shift.prob, shift.shifter.offsets) == (0.5, (-0.1, 0.1))
    (crop,) = found["RandCropByPosNegLabeld"]
    assert crop.cropper.spatial_size == (14, 23, 23)  # ceil(12 / 0.9), then a square plane of ceil(20 / 0.9)
    plain = Sam3DTrainingDataset(rows, processor, recipe=legacy((12, 12, 20), augment=False), cache_dir=tmp_path)
    assert [type(t).__name__ for t in plain.after_crop.transforms] == ["RandCropByPosNegLabeld"]


def test_augmentations_flip_turn_zoom_and_shift_samples(tmp_path, processor):
    """What the chain does to samples, seen from outside: a volume of distinct integers exactly the crop size (so
    the crop takes all of it) goes through 400 items. An item that equals, up to one constant offset, one of the 32
    (quarter turns in the axial plane) x (flips of each axis) arrangements of the centre patch was not zoomed, and
    says which turn and flips it got and its intensity offset; an item that matches none was zoomed. The frequencies
    must be those of Table 4 (bands of 3 to 4 binomial standard deviations), on a non-square patch (H != W)."""
    patch = (12, 12, 20)
    rows = [{"case_id": "a", "image": "a.nii.gz", "label": "a_seg.nii.gz"}]
    train = Sam3DTrainingDataset(
        rows,
        processor,
        recipe=legacy(patch, num_positive_points=1, num_patch_points=1),
        cache_dir=tmp_path,
        samples_per_volume=400,
    )
    crop = (14, 23, 23)
    image = np.random.default_rng(0).permutation(np.prod(crop)).reshape(1, *crop).astype(np.float32) + 10
    label = np.zeros((1, *crop), np.float32)
    label[0, 4:10, 6:15, 9:18] = 1  # foreground centres exist: the positive crops run too
    train._volume = lambda case_index: {"image": image, "label": label}  # the cache and the files are bypassed

    def arrangements(volume):
        for k in range(4):
            turned = np.rot90(volume, k, axes=(1, 2))
            start = [n // 2 - p // 2 for n, p in zip(turned.shape, patch)]  # MONAI's centre crop
            centre = turned[tuple(slice(s, s + p) for s, p in zip(start, patch))]
            for flips in itertools.product((False, True), repeat=3):
                axes = [a for a, f in enumerate(flips) if f]
                yield (k, flips), np.flip(centre, axes) if axes else centre

    candidates = list(arrangements(image[0]))
    label_candidates = dict(arrangements(label[0]))
    zoomed, turns, flips, offsets = 0, [], [], []
    for index in range(len(train)):
        item = train[index]
        out, labels = item["pixel_values"][0].numpy(), item["labels"].numpy()
        offset = float(out.flat[0] - np.round(out.flat[0]))
        match = [key for key, candidate in candidates if np.allclose(out - offset, candidate, rtol=0, atol=2e-3)]
        if not match:
            zoomed += 1
            continue
        (key,) = match
        assert np.array_equal(labels, label_candidates[key])  # the label map moved with the image
        turns.append(key[0])
        flips.append(key[1])
        offsets.append(offset)
    n = len(turns)
    # zoom p=0.3; a factor in [1, 1 + 1/23) leaves this crop's size, hence its voxels, unchanged: 0.3 x 0.78 = 0.235
    assert 0.15 <= zoomed / len(train) <= 0.32, zoomed
    assert 0.4 <= turns.count(0) / n <= 0.6  # no turn with p=0.5, else 1, 2 or 3 quarter turns alike
    for k in (1, 2, 3):
        assert 0.1 <= turns.count(k) / n <= 0.24, (k, turns.count(k))
    for axis in range(3):
        assert 0.4 <= np.mean([f[axis] for f in flips]) <= 0.6, axis
    shifted = [abs(o) for o in offsets if abs(o) > 1e-3]
    assert 0.4 <= len(shifted) / n <= 0.6  # p=0.5, offsets drawn from [-0.1, 0.1]
    assert max(shifted) <= 0.1 + 1e-3 and max(shifted) > 0.08 and min(shifted) < 0.03


def test_volume_smaller_than_patch_is_padded_with_air_and_background(tmp_path, msd_root, processor):
    row = index_dataset(msd_root)[0]
    depth = PreprocessedCache(processor, tmp_path).get(row)["pixel_values"].shape[1]
    patch = (depth + 20, 16, 16)
    train = Sam3DTrainingDataset([row], processor, recipe=legacy(patch, augment=False), cache_dir=tmp_path)
    item = train[0]
    assert item["pixel_values"].shape == (1, *patch)
    # MONAI pads symmetrically: 10 slices of air before and after, labels 0 there
    assert torch.all(item["pixel_values"][0, :10] == processor.pad_value)
    assert torch.all(item["pixel_values"][0, -10:] == processor.pad_value)
    assert not item["labels"][:10].any() and not item["labels"][-10:].any()
    assert not torch.all(item["pixel_values"][0, 10:-10] == processor.pad_value)


def test_samples_depend_only_on_seed_epoch_index(tmp_path, msd_root, processor):
    ds = index_dataset(msd_root)
    kwargs = {"recipe": legacy((16, 16, 16)), "cache_dir": tmp_path, "samples_per_volume": 2}
    a, b = Sam3DTrainingDataset(ds, processor, **kwargs), Sam3DTrainingDataset(ds, processor, **kwargs)
    order = [5, 0, 7, 3]
    np.random.seed(1)
    torch.manual_seed(1)
    first = [a[i] for i in order]
    np.random.seed(2)
    torch.manual_seed(2)
    again = [b[i] for i in reversed(order)][::-1]
    for x, y in zip(first, again):
        for key in x:
            assert torch.equal(x[key], y[key]), key
    b.set_epoch(1)
    assert not all(torch.equal(x["pixel_values"], b[i]["pixel_values"]) for x, i in zip(first, order))
    c = Sam3DTrainingDataset(ds, processor, **{**kwargs, "seed": 1})
    assert not torch.equal(first[0]["pixel_values"], c[order[0]]["pixel_values"])
    # DataLoader workers give the same samples as the main process
    a.set_epoch(1)
    loader = torch.utils.data.DataLoader(a, batch_size=2, num_workers=2, collate_fn=sam3d_collate)
    batches = list(loader)
    for i in range(len(a)):
        expected = b[i]
        assert torch.equal(batches[i // 2]["pixel_values"][i % 2], expected["pixel_values"])
        assert torch.equal(batches[i // 2]["input_points"][i % 2], expected["input_points"])


def test_collate_pads_points_with_minus_one():
    items = [
        {"pixel_values": torch.zeros(1, 4, 4, 4), "labels": torch.zeros(4, 4, 4, dtype=torch.long),
         "input_points": torch.ones(3, 3), "input_labels": torch.tensor([1, 0, 1])},
        {"pixel_values": torch.ones(1, 4, 4, 4), "labels": torch.ones(4, 4, 4, dtype=torch.long),
         "input_points": torch.full((1, 3), 2.0), "input_labels": torch.tensor([1])},
    ]  # fmt: skip
    batch = sam3d_collate(items)
    assert batch["pixel_values"].shape == (2, 1, 4, 4, 4) and batch["labels"].shape == (2, 4, 4, 4)
    assert batch["input_labels"].tolist() == [[1, 0, 1], [1, -1, -1]]
    assert batch["input_points"][1].tolist() == [[2.0, 2.0, 2.0], [0, 0, 0], [0, 0, 0]]
    with pytest.raises(ValueError, match="empty"):
        sam3d_collate([])


def test_training_dataset_errors(tmp_path, msd_root, processor):
    ds = index_dataset(msd_root)
    with pytest.raises(ValueError, match="empty"):
        Sam3DTrainingDataset([], processor, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="Case 'x' has no label file"):
        Sam3DTrainingDataset([{"case_id": "x", "image": ds["image"][0], "label": None}], processor, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="patch_size"):
        Sam3DTrainingDataset(ds, processor, recipe=legacy((64, 64)), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="num_positive_points >= 1"):
        Sam3DTrainingDataset(ds, processor, recipe=legacy(PATCH, num_positive_points=0), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="num_patch_points >= 1"):
        official = get_recipe("official").replace(patch_size=PATCH, num_patch_points=0)
        Sam3DTrainingDataset(ds, processor, recipe=official, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="keys case_id, image and label"):
        Sam3DTrainingDataset([{"image": ds["image"][0]}], processor, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="must be a file path"):
        Sam3DTrainingDataset(ds.cast_column("image", datasets.Nifti()), processor, cache_dir=tmp_path)
    with pytest.raises(IndexError):
        Sam3DTrainingDataset(ds, processor, cache_dir=tmp_path)[len(ds)]


def test_a_batch_trains_the_tiny_model(tmp_path, msd_root, processor):
    """The contract with the model: a collated batch goes straight into forward and gives a finite loss and gradients
    (non-cubic patch, H != W: the quarter turns run too, the shapes still match the model's image_size)."""
    train = Sam3DTrainingDataset(index_dataset(msd_root), processor, recipe=legacy(PATCH), cache_dir=tmp_path)
    batch = next(iter(torch.utils.data.DataLoader(train, batch_size=2, shuffle=False, collate_fn=sam3d_collate)))
    assert batch["labels"].shape == (2, *PATCH) and batch["input_points"].shape == (2, 43, 3)
    assert ((batch["input_labels"] == 1).sum(1) >= 1).all()
    torch.manual_seed(0)
    # The dataset gives negative clicks (use_point_labels=True, as models this package trains); a model without
    # point labels would refuse them.
    config = Sam3DConfig(
        **{**TINY, "prompt_encoder_config": {**TINY["prompt_encoder_config"], "use_point_labels": True}}
    )
    model = Sam3DForPromptableSegmentation(config)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
