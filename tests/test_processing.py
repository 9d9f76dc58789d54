"""Tests for Sam3DImageProcessor / Sam3DProcessor on synthetic scans built here (no data downloads)."""

from __future__ import annotations

import json
import logging
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import official_dataset_constants

from sam3d_hf.configuration_sam3d import Sam3DConfig
from sam3d_hf.image_processing_sam3d import (
    SAM3D_PRESETS,
    Sam3DImageProcessor,
    compute_intensity_statistics,
    load_volume,
    resample_volume,
)
from sam3d_hf.processing_sam3d import Sam3DProcessor, cluster_points, save_mask_nifti

SHAPE = (40, 48, 20)  # stored (i, j, k)
SPACING = (0.7, 0.7, 5.0)  # strongly anisotropic: 5 mm slices


def rotation(deg_x: float, deg_z: float) -> np.ndarray:
    ax, az = np.deg2rad(deg_x), np.deg2rad(deg_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


def oblique_affine() -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation(20, 20) @ np.diag(SPACING)
    affine[:3, 3] = (-12.0, 30.0, -40.0)
    return affine


def make_scan(affine: np.ndarray | None = None) -> tuple[nib.Nifti1Image, nib.Nifti1Image]:
    """CT-like volume (soft tissue 40 HU, lesion ~120 HU, air border) and its lesion label, both stored (i, j, k)."""
    affine = oblique_affine() if affine is None else affine
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1).astype(np.float64)
    mm = (idx - np.array([19.0, 25.0, 9.5])) * np.array(SPACING)  # distances in the grid's own frame
    label = ((mm / np.array([9.0, 10.0, 32.0])) ** 2).sum(-1) <= 1.0
    rng = np.random.default_rng(0)
    data = 40.0 + 10.0 * rng.standard_normal(SHAPE) + 80.0 * label
    data[:2] = -1000.0
    return (
        nib.Nifti1Image(data.astype(np.int16), affine),
        nib.Nifti1Image(label.astype(np.uint8), affine),
    )


def flipped_copy(img: nib.Nifti1Image, axes=(0, 1)) -> nib.Nifti1Image:
    """Same physical scan with the given stored axes reversed (an RAS-ish scan becomes LPS-ish)."""
    data = np.asanyarray(img.dataobj)
    flip = np.eye(4)
    for a in axes:
        flip[a, a] = -1
        flip[a, 3] = data.shape[a] - 1
    return nib.Nifti1Image(np.flip(data, axes).copy(), img.affine @ flip)


def permuted_copy(img: nib.Nifti1Image, perm=(2, 0, 1)) -> nib.Nifti1Image:
    data = np.asanyarray(img.dataobj)
    swap = np.eye(4)
    swap[:3, :3] = np.eye(3)[:, perm]  # new axis n is old axis perm[n]
    return nib.Nifti1Image(np.transpose(data, perm).copy(), img.affine @ swap)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    return 2.0 * (a & b).sum() / (a.sum() + b.sum())


def one_hot_logits(labels: torch.Tensor) -> torch.Tensor:
    fg = labels.float()
    return torch.stack([-10 * fg + 5, 10 * fg - 5], dim=1)  # (B, 2, D, H, W)


@pytest.fixture
def processor() -> Sam3DProcessor:
    return Sam3DProcessor(Sam3DImageProcessor(target_label=1), patch_size=(72, 32, 32), cluster_margin=4)


# ----------------------------------------------------------------------------------------------------------------------
# Round trips
# ----------------------------------------------------------------------------------------------------------------------
VARIANTS = {
    "oblique": lambda img: img,
    "lps": lambda img: flipped_copy(img, (0, 1)),
    "permuted": lambda img: permuted_copy(img),
    "ras": None,  # axis-aligned RAS copy built from the same voxels
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_label_round_trip_dice(processor, variant, tmp_path):
    if variant == "ras":
        img, label = make_scan(np.diag([*SPACING, 1.0]))
    else:
        img, label = (VARIANTS[variant](x) for x in make_scan())
    nib.save(img, tmp_path / "ct.nii.gz")
    nib.save(label, tmp_path / "seg.nii.gz")
    truth = np.asanyarray(label.dataobj)
    centre = np.argwhere(truth).mean(0)
    inputs = processor(
        images=str(tmp_path / "ct.nii.gz"), input_points=[centre], segmentation_maps=str(tmp_path / "seg.nii.gz")
    )
    assert inputs["pixel_values"].shape == (1, 1, 72, 32, 32)
    assert inputs["pixel_values"].dtype == torch.float32
    assert inputs["labels"].shape == (1, 72, 32, 32) and inputs["labels"].dtype == torch.int64
    # the whole lesion fits in the patch: 1 mm voxels, so the label volume is ~ its physical volume
    assert abs(inputs["labels"].sum().item() - truth.sum() * np.prod(SPACING)) < 0.05 * truth.sum() * np.prod(SPACING)
    mask = processor.post_process_masks(one_hot_logits(inputs["labels"]), inputs)
    assert mask.shape == truth.shape and mask.dtype == torch.uint8
    # label -> 1 mm grid -> back: 0.9767 with nnU-Net's linear label resampling, 0.9747 with nearest neighbour
    assert dice(mask.numpy(), truth) >= 0.976


def test_orientation_variants_give_same_patch(processor):
    """Canonical orientation comes from the affine, not the stored axis order: flipped/permuted copies match."""
    img, _ = make_scan()
    point = np.array([20.0, 22.0, 10.0])
    world = (img.affine @ [*point, 1.0])[:3]
    ref = processor(images=img, input_points=[world], points_in="world")
    for other in (flipped_copy(img), permuted_copy(img)):
        out = processor(images=other, input_points=[world], points_in="world")
        torch.testing.assert_close(out["pixel_values"], ref["pixel_values"])
        torch.testing.assert_close(out["input_points"], ref["input_points"])
        torch.testing.assert_close(out["resampled_affine"], ref["resampled_affine"])


def test_canonical_axes_follow_s_a_r():
    """(D, H, W) grow towards Superior, Anterior, Right; an LPS scan is flipped on its first two axes."""
    affine = np.diag([-0.8, -0.8, 2.5, 1.0])  # LPS storage
    data = np.zeros((10, 12, 8), np.float32)
    data[0, 0, 0] = 100.0  # x = -0.8 i, y = -0.8 j: stored voxel 0 is the most Right, Anterior and Inferior one
    out = Sam3DImageProcessor(window=(0, 100), intensity_mean=0, intensity_std=1).preprocess(data, affine=affine)
    assert out["canonical_axes"].tolist() == [2, 1, 0]
    assert out["canonical_flips"].tolist() == [False, True, True]
    # resampled voxel (d, h, w) -> world: D grows towards +z (S), H towards +y (A), W towards +x (R)
    direction = out["resampled_affine"][:3, :3].numpy()
    assert direction[2, 0] > 0 and direction[1, 1] > 0 and direction[0, 2] > 0
    assert np.count_nonzero(np.round(direction, 9)) == 3
    # stored voxel (0, 0, 0) has the largest x and y, the smallest z => canonical (d=0, h=last, w=last)
    _, h, w = out["resampled_size"].tolist()
    assert out["pixel_values"][0, 0, 0, h - 1, w - 1] > 50


def test_click_inside_label_maps_inside_cropped_label_voxel_and_world(processor):
    img, label = make_scan()
    truth = np.asanyarray(label.dataobj)
    inside = np.argwhere(truth)
    click = inside[len(inside) // 3].astype(np.float64)  # off-centre voxel inside the lesion
    world = (img.affine @ [*click, 1.0])[:3]
    by_voxel = processor(images=img, input_points=[click], segmentation_maps=label)
    by_world = processor(images=img, input_points=[world.tolist()], segmentation_maps=label, points_in="world")
    for out in (by_voxel, by_world):
        d, h, w = out["input_points"][0, 0].round().long().tolist()
        assert out["labels"][0, d, h, w] == 1
        assert out["input_labels"].tolist() == [[1]]
        # the patch affine maps the patch point back to the clicked world position (within a resampled voxel)
        back = out["patch_affines"][0].numpy() @ [*out["input_points"][0, 0].tolist(), 1.0]
        assert np.linalg.norm(back[:3] - world) < 1e-3
    torch.testing.assert_close(by_voxel["pixel_values"], by_world["pixel_values"])
    torch.testing.assert_close(by_voxel["input_points"], by_world["input_points"])
    assert torch.equal(by_voxel["patch_origins"], by_world["patch_origins"])


def test_two_far_clicks_give_two_patches_merged_back():
    """Two lesions 50 mm apart: one patch per click cluster, pasted back into one mask."""
    shape = (80, 36, 30)  # array axes, 1 mm => canonical (D, H, W) = (30, 36, 80)
    label = np.zeros(shape, np.uint8)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    for centre in ((14, 18, 15), (64, 18, 15)):
        label[((grid - centre) ** 2).sum(-1) <= 36] = 1
    image = np.where(label > 0, 120.0, 40.0).astype(np.float32)
    proc = Sam3DProcessor(Sam3DImageProcessor(), patch_size=(32, 32, 32), cluster_margin=4)
    clicks = [[14, 18, 15], [64, 18, 15], [15, 17, 15]]  # the third joins the first
    inputs = proc(images=image, spacing=(1, 1, 1), input_points=clicks, input_labels=[1, 1, 0], segmentation_maps=label)
    assert inputs["pixel_values"].shape[0] == 2
    assert inputs["point_cluster"].tolist() == [0, 1, 0]
    assert inputs["input_labels"].tolist() == [[1, 0], [1, -1]]  # row 1 padded with -1
    # array axis 0 -> canonical W for a diag(spacing) affine; patches centred on clicks, shifted to stay inside
    assert inputs["patch_origins"][:, 2].tolist() == [0, 48]
    torch.testing.assert_close(inputs["input_points"][1, 0], torch.tensor([15.0, 16.0, 16.0]))
    mask = proc.post_process_masks(one_hot_logits(inputs["labels"]), inputs)
    assert mask.shape == shape
    assert dice(mask.numpy(), label) == 1.0
    one_cluster = proc(images=image, spacing=(1, 1, 1), input_points=clicks[:1] + clicks[2:])
    assert one_cluster["pixel_values"].shape[0] == 1


def test_overlapping_patches_merge_with_max():
    proc = Sam3DProcessor(Sam3DImageProcessor(), patch_size=(16, 16, 16), cluster_margin=2)
    inputs = proc(images=np.zeros((10, 10, 40)), spacing=(1, 1, 1), input_points=[[5, 5, 8], [5, 5, 20]])
    assert inputs["patch_origins"][:, 0].tolist() == [0, 12]  # canonical D = array axis 2; overlap on D in [12, 16)
    logits = torch.full((2, 2, 16, 16, 16), -5.0)
    logits[0, 1] = 5.0  # patch 0 says foreground everywhere
    logits[1, 0] = 5.0  # patch 1 says background everywhere
    probs = proc.post_process_masks(logits, inputs, return_probabilities=True)
    assert probs.shape == (10, 10, 40)
    expected = torch.sigmoid(torch.tensor(10.0))  # softmax of (-5, 5)
    torch.testing.assert_close(probs[:, :, 13], torch.full((10, 10), float(expected)))  # the max wins in the overlap
    assert probs[:, :, 20].max() < 0.01 and probs[:, :, 30:].max() == 0  # beyond every patch: 0
    mask = proc.post_process_masks(logits, inputs)
    assert mask[:, :, :16].all() and not mask[:, :, 16:].any()


def test_cluster_points_respects_extent():
    points = np.array([[0, 0, 0], [10, 0, 0], [30, 0, 0], [33, 0, 0], [100, 0, 0]], float)
    assert cluster_points(points, (20, 20, 20)) == [[0, 1], [2, 3], [4]]
    assert cluster_points(points, (200, 200, 200)) == [[0, 1, 2, 3, 4]]


def test_padding_uses_normalised_window_low(processor):
    """Where the patch leaves the volume it is filled with air: (window_low - mean) / std."""
    data = np.full((16, 16, 16), 100.0, np.float32)
    ip = Sam3DImageProcessor(window=(-50, 250), intensity_mean=50, intensity_std=25)
    proc = Sam3DProcessor(ip, patch_size=(32, 32, 32), cluster_margin=0)
    out = proc(images=data, spacing=(1, 1, 1), input_points=[[8, 8, 8]])
    values = out["pixel_values"].unique().tolist()
    assert sorted(values) == pytest.approx([-4.0, 2.0])
    assert (out["pixel_values"] == 2.0).sum() == 16**3


# ----------------------------------------------------------------------------------------------------------------------
# Resampling and intensities
# ----------------------------------------------------------------------------------------------------------------------
def test_intensity_window_and_zscore():
    ip = Sam3DImageProcessor.from_preset("lits17_code")
    out = ip.normalize_intensity(np.array([-1000.0, 60.06, 1000.0]))
    np.testing.assert_allclose(out, [(-48 - 60.06) / 40.20, 0.0, (163 - 60.06) / 40.20], rtol=1e-5)


def test_anisotropic_resampling_keeps_slices():
    """nnU-Net rule: through the 5 mm axis nearest, so each original slice value survives unchanged."""
    rng = np.random.default_rng(0)
    slices = rng.uniform(0, 100, size=(1, 1, 6)).repeat(20, 0).repeat(20, 1).astype(np.float32)
    out = resample_volume(slices.transpose(2, 0, 1), (5.0, 0.7, 0.7), (30, 14, 14))
    assert out.shape == (30, 14, 14)
    np.testing.assert_allclose(out[::5, 7, 7], slices[0, 0], rtol=1e-5)  # every 5th voxel is an original slice
    assert set(np.unique(out[:, 7, 7]).round(4)) <= set(slices[0, 0].round(4))
    # speed: benchmarks/benchmark_processing.py


def test_compute_intensity_statistics():
    rng = np.random.default_rng(1)
    images, labels, fg = [], [], []
    for _ in range(2):
        image = rng.normal(80, 30, size=(12, 12, 6)).astype(np.float32)
        label = np.zeros(image.shape, np.uint8)
        label[3:9, 3:9, 1:5] = rng.integers(1, 3, size=(6, 6, 4))
        images.append(image)
        labels.append(label)
        fg.append(image[label > 0])
    fg = np.concatenate(fg).astype(np.float64)
    stats = compute_intensity_statistics(images, labels, spacings=[(1, 1, 1)] * 2)
    np.testing.assert_allclose(stats["window"], np.percentile(fg, [0.5, 99.5]))
    assert stats["mean"] == pytest.approx(fg.mean()) and stats["std"] == pytest.approx(fg.std())
    assert stats["num_foreground_voxels"] == fg.size
    ip = Sam3DImageProcessor(window=stats["window"], intensity_mean=stats["mean"], intensity_std=stats["std"])
    assert ip.window == pytest.approx(stats["window"])


def test_presets_match_paper_table_5():
    expected = {
        "kits21": ((-52, 247), 59.53, 55.46, 2),
        "msd_pancreas": ((-39, 204), 68.45, 63.42, 2),
        "lits17": ((-17, 201), 99.40, 39.39, 2),
        "lits17_code": ((-48, 163), 60.06, 40.20, 2),
        "msd_colon": ((-57, 175), 65.18, 32.65, 1),
    }
    assert set(SAM3D_PRESETS) == set(expected) | {f"official_{d}" for d in ("kits", "lits", "pancreas", "colon")}
    for name, (window, mean, std, target) in expected.items():
        preset = SAM3D_PRESETS[name]
        assert (preset.window, preset.mean, preset.std, preset.target_label) == (window, mean, std, target)
        assert preset.spacing == (1.0, 1.0, 1.0) and preset.patch_size == (128, 128, 128) and preset.note
    assert "-54" in SAM3D_PRESETS["kits21"].note
    assert "(-48, 163)" in SAM3D_PRESETS["lits17"].note
    proc = Sam3DProcessor.from_preset("msd_colon")
    assert proc.image_processor.target_label == 1 and proc.patch_size == (128, 128, 128)


@pytest.mark.parametrize("dataset", ["kits", "lits", "pancreas", "colon"])
def test_official_presets_are_the_official_code(dataset):
    expected = official_dataset_constants()[dataset]
    preset = SAM3D_PRESETS[f"official_{dataset}"]
    assert (preset.window, preset.mean, preset.std) == (expected["window"], expected["mean"], expected["std"])
    assert preset.stored_axes == expected["axes"] and preset.target_label == expected["target"]
    assert preset.augmentation == ("rotate_zoom" if expected["rotate"] else "zoom")
    assert (preset.resampling, preset.padding, preset.spacing) == ("official", "mean", (1.0, 1.0, 1.0))
    ip = Sam3DImageProcessor.from_preset(f"official_{dataset}")
    assert (ip.resampling, ip.padding, ip.stored_axes, ip.pad_value) == ("official", "mean", expected["axes"], 0.0)


# ----------------------------------------------------------------------------------------------------------------------
# Other readers
# ----------------------------------------------------------------------------------------------------------------------
def test_nrrd_matches_nifti(processor, tmp_path):
    nrrd = pytest.importorskip("nrrd")
    img, _ = make_scan()
    data = np.asanyarray(img.dataobj)
    lps = np.diag([-1.0, -1.0, 1.0])
    header = {
        "space": "left-posterior-superior",
        "space directions": (lps @ img.affine[:3, :3]).T,  # row n = direction of axis n
        "space origin": lps @ img.affine[:3, 3],
    }
    nrrd.write(str(tmp_path / "ct.nrrd"), data, header)
    world = (img.affine @ [20.0, 22.0, 10.0, 1.0])[:3]
    a = processor(images=str(tmp_path / "ct.nrrd"), input_points=[world], points_in="world")
    b = processor(images=img, input_points=[world], points_in="world")
    torch.testing.assert_close(a["original_affine"], b["original_affine"])
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])


def write_dicom_series(folder, volume, pixel_spacing=(0.7, 0.8), thickness=2.5, origin=(-10.0, -20.0, 5.0)):
    """Axial CT series; `volume` is (slices, rows, columns)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    os.makedirs(folder, exist_ok=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(volume.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "synthetic", k + 1
        ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = series, study, frame
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * thickness]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = list(pixel_spacing), thickness
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = volume[k].astype(np.int16).tobytes()
        ds.save_as(os.path.join(folder, f"slice{k:03d}.dcm"), enforce_file_format=True)


def test_dicom_series_folder(processor, tmp_path):
    pytest.importorskip("pydicom")
    volume = np.random.default_rng(0).integers(-100, 200, size=(6, 10, 12))  # (slices, rows, columns)
    write_dicom_series(tmp_path / "series", volume)
    loaded = load_volume(str(tmp_path / "series"))
    # stored order (column, row, slice); DICOM LPS -> RAS flips x and y
    np.testing.assert_array_equal(loaded.data, volume.transpose(2, 1, 0))
    np.testing.assert_allclose(loaded.affine, [[-0.8, 0, 0, 10], [0, -0.7, 0, 20], [0, 0, 2.5, 5], [0, 0, 0, 1]])
    out = processor(images=str(tmp_path / "series"), input_points=[[6, 5, 3]])
    mask = processor.post_process_masks(torch.zeros(1, 2, 72, 32, 32), out)
    assert mask.shape == (12, 10, 6)


# ----------------------------------------------------------------------------------------------------------------------
# Writing masks
# ----------------------------------------------------------------------------------------------------------------------
def test_save_mask_nifti_keeps_affine_and_header(tmp_path):
    img, label = make_scan()
    img.header["descrip"] = b"synthetic ct"
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=2)
    nib.save(img, tmp_path / "ct.nii.gz")
    mask = np.asanyarray(label.dataobj)
    written = save_mask_nifti(torch.from_numpy(mask), str(tmp_path / "ct.nii.gz"), tmp_path / "mask.nii.gz")
    back = nib.load(written)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), mask)
    assert back.get_data_dtype() == np.uint8
    np.testing.assert_allclose(back.affine, img.affine, atol=1e-5)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 2
    assert back.header["descrip"].tobytes().startswith(b"synthetic ct")
    assert sorted(os.listdir(tmp_path)) == ["ct.nii.gz", "mask.nii.gz"]  # no temporary left behind
    with pytest.raises(ValueError, match="shape"):
        save_mask_nifti(mask[:-1], img, tmp_path / "bad.nii.gz")


def test_save_mask_nifti_from_processor_output(processor, tmp_path):
    data = np.zeros((20, 24, 12), np.float32)
    affine = np.diag([-1.0, 1.5, 2.0, 1.0])
    inputs = processor(images=data, affine=affine, input_points=[[10, 12, 6]])
    mask = processor.post_process_masks(torch.zeros(1, 2, 72, 32, 32), inputs)
    save_mask_nifti(mask, inputs, tmp_path / "m.nii")
    np.testing.assert_allclose(nib.load(tmp_path / "m.nii").affine, affine)


# ----------------------------------------------------------------------------------------------------------------------
# Serialisation
# ----------------------------------------------------------------------------------------------------------------------
def test_save_and_auto_load_keep_every_setting(tmp_path):
    from transformers.models.auto.image_processing_auto import AutoImageProcessor
    from transformers.models.auto.processing_auto import AutoProcessor

    ip = Sam3DImageProcessor.from_preset(
        "kits21", window=(-54.0, 247.0), target_spacing=(1.5, 1.0, 1.0), anisotropy_threshold=2.5, axis_order="RAS"
    )
    proc = Sam3DProcessor(ip, patch_size=(64, 96, 128), cluster_margin=8)
    proc.save_pretrained(tmp_path)
    Sam3DConfig().save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())  # plain JSON, no pickle
    assert saved["patch_size"] == [64, 96, 128]
    for loaded in (Sam3DProcessor.from_pretrained(tmp_path), AutoProcessor.from_pretrained(tmp_path)):
        assert isinstance(loaded, Sam3DProcessor)
        assert loaded.patch_size == (64, 96, 128) and loaded.cluster_margin == 8
        assert loaded.image_processor.to_dict() == ip.to_dict()
        assert loaded.image_processor.window == (-54.0, 247.0) and loaded.image_processor.axis_order == "RAS"
    auto_ip = AutoImageProcessor.from_pretrained(tmp_path, intensity_std=10.0)
    assert isinstance(auto_ip, Sam3DImageProcessor) and auto_ip.intensity_std == 10.0
    ip.save_pretrained(tmp_path / "ip")
    assert json.loads((tmp_path / "ip" / "preprocessor_config.json").read_text())["window"] == [-54.0, 247.0]
    assert Sam3DImageProcessor.from_pretrained(tmp_path / "ip").to_dict() == ip.to_dict()


# ----------------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------------
def test_error_unreadable_and_missing_files(processor, tmp_path):
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti at all")
    (tmp_path / "notes.txt").write_text("hello")
    for name in ("broken.nii.gz", "notes.txt"):
        with pytest.raises(ValueError, match="Could not read"):
            processor(images=str(tmp_path / name), input_points=[[0, 0, 0]])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        processor(images=str(tmp_path / "missing.nii.gz"), input_points=[[0, 0, 0]])
    with pytest.raises(TypeError, match="path, a nibabel image"):
        processor(images={"image": "ct.nii.gz"}, input_points=[[0, 0, 0]])
    with pytest.raises(ValueError, match="one volume per call"):
        processor(images=[np.zeros((4, 4, 4))] * 2, spacing=(1, 1, 1), input_points=[[0, 0, 0]])


def test_missing_optional_readers_name_the_extra(processor, tmp_path, monkeypatch):
    """NRRD and DICOM need pynrrd / pydicom, the `io` extra: without them the error says what to install."""
    import importlib.util

    (tmp_path / "ct.nrrd").write_bytes(b"NRRD0004")
    (tmp_path / "series").mkdir()
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("nrrd", "pydicom") else find_spec(n))
    for name, kind in (("ct.nrrd", "NRRD"), ("series", "a DICOM series")):
        with pytest.raises(ValueError, match=rf'Reading {kind} .* pip install "sam3d-hf\[io\]"'):
            processor(images=str(tmp_path / name), input_points=[[0, 0, 0]])


@pytest.mark.parametrize("shape", [(8, 8), (8, 8, 8, 2)])
def test_error_not_3d(processor, shape):
    with pytest.raises(ValueError, match=r"Expected a 3D volume, got [24]D"):
        processor(images=np.zeros(shape), spacing=(1, 1, 1), input_points=[[0, 0, 0]])


def test_trailing_singleton_axis_is_accepted(processor):
    out = processor(images=np.zeros((8, 8, 8, 1)), spacing=(1, 1, 1), input_points=[[1, 1, 1]])
    assert out["original_size"].tolist() == [8, 8, 8]


def test_error_non_finite_voxels(processor):
    data = np.zeros((8, 8, 8), np.float32)
    data[0, 0, :3] = [np.nan, np.inf, -np.inf]
    with pytest.raises(ValueError, match="3 non-finite voxels"):
        processor(images=data, spacing=(1, 1, 1), input_points=[[1, 1, 1]])


@pytest.mark.parametrize("spacing", [(1, 0, 1), (1, 1, -2)])
def test_error_bad_spacing(processor, spacing):
    with pytest.raises(ValueError, match="spacing"):
        processor(images=np.zeros((8, 8, 8)), spacing=spacing, input_points=[[1, 1, 1]])


def test_error_zero_spacing_in_affine(processor):
    # nibabel itself refuses such headers (it resets zero pixdims to 1), so the affine route is the one to guard
    with pytest.raises(ValueError, match="zero voxel size"):
        processor(images=np.zeros((8, 8, 8)), affine=np.diag([1.0, 0.0, 1.0, 1.0]), input_points=[[1, 1, 1]])


def test_error_array_without_geometry(processor):
    with pytest.raises(ValueError, match="spacing"):
        processor(images=np.zeros((8, 8, 8)), input_points=[[1, 1, 1]])


def test_error_points_outside(processor):
    img, _ = make_scan()
    with pytest.raises(ValueError, match=r"1 of 2 points .*voxel coordinates.*point 1: \[40\.0, 0\.0, 0\.0\]"):
        processor(images=img, input_points=[[0, 0, 0], [40, 0, 0]])
    far = (img.affine @ [-5.0, 0.0, 0.0, 1.0])[:3]
    with pytest.raises(ValueError, match=r"world coordinates.*point 0: .*\(world RAS mm\) = voxel \[-5\.0"):
        processor(images=img, input_points=[far], points_in="world")


def test_error_empty_points_and_bad_labels(processor):
    img, _ = make_scan()
    with pytest.raises(ValueError, match="empty"):
        processor(images=img, input_points=[])
    with pytest.raises(ValueError, match="required"):
        processor(images=img)
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        processor(images=img, input_points=[[1, 2]])
    with pytest.raises(ValueError, match="1 \\(positive\\) or 0"):
        processor(images=img, input_points=[[1, 2, 3]], input_labels=[2])
    with pytest.raises(ValueError, match="'voxel' or 'world'"):
        processor(images=img, input_points=[[1, 2, 3]], points_in="ijk")


def test_error_label_shape_mismatch(processor):
    img, _ = make_scan()
    with pytest.raises(ValueError, match=r"label map has shape \(40, 48, 19\) but the image has shape \(40, 48, 20\)"):
        processor(images=img, input_points=[[1, 2, 3]], segmentation_maps=np.zeros((40, 48, 19)))


def test_error_bad_settings_and_logits(processor):
    with pytest.raises(ValueError, match="multiples of 4"):
        Sam3DProcessor(patch_size=(30, 32, 32))
    with pytest.raises(ValueError, match="window"):
        Sam3DImageProcessor(window=(100, -100))
    with pytest.raises(ValueError, match="Unknown preset"):
        Sam3DProcessor.from_preset("brats")
    img, _ = make_scan()
    inputs = processor(images=img, input_points=[[1, 2, 3]])
    with pytest.raises(ValueError, match=r"logits.*\(1, 2, 72, 32, 32\)"):
        processor.post_process_masks(torch.zeros(1, 2, 32, 32, 32), inputs)


def test_error_label_affine_mismatch(processor):
    img, label = make_scan()
    moved = nib.Nifti1Image(np.asanyarray(label.dataobj), label.affine @ np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(ValueError, match="affine differs"):
        processor(images=img, input_points=[[1, 2, 3]], segmentation_maps=moved)


# ----------------------------------------------------------------------------------------------------------------------
# Negative clicks, label values, non-finite input, written masks
# ----------------------------------------------------------------------------------------------------------------------
def test_negative_click_never_opens_a_patch(caplog):
    """A negative click far from every positive one is reported unused (-1, warning), not segmented on its own."""
    proc = Sam3DProcessor(Sam3DImageProcessor(), patch_size=(16, 16, 16), cluster_margin=2)
    image = np.zeros((10, 10, 60), np.float32)  # canonical D = array axis 2
    with caplog.at_level(logging.WARNING, logger="sam3d_hf.processing_sam3d"):
        out = proc(images=image, spacing=(1, 1, 1), input_points=[[5, 5, 8], [5, 5, 50]], input_labels=[1, 0])
    assert out["pixel_values"].shape[0] == 1 and out["patch_origins"][:, 0].tolist() == [0]
    assert out["point_cluster"].tolist() == [0, -1]
    assert out["input_labels"].tolist() == [[1]]
    assert "Negative click(s) [1]" in caplog.text and "[5.0, 5.0, 50.0]" in caplog.text


def test_negative_click_goes_with_every_patch_it_falls_in(caplog):
    proc = Sam3DProcessor(Sam3DImageProcessor(), patch_size=(16, 16, 16), cluster_margin=2)
    image = np.zeros((10, 10, 40), np.float32)
    clicks = [[5, 5, 14], [5, 5, 5], [5, 5, 20]]  # the negative one (first) lies in both patches' overlap [12, 16)
    with caplog.at_level(logging.WARNING, logger="sam3d_hf.processing_sam3d"):
        out = proc(images=image, spacing=(1, 1, 1), input_points=clicks, input_labels=[0, 1, 1])
    assert out["patch_origins"][:, 0].tolist() == [0, 12]
    assert out["point_cluster"].tolist() == [0, 0, 1]
    assert sorted(out["input_labels"][0].tolist()) == [0, 1] and sorted(out["input_labels"][1].tolist()) == [0, 1]
    assert "Negative click" not in caplog.text


def test_error_no_positive_click():
    img, _ = make_scan()
    proc = Sam3DProcessor(patch_size=(32, 32, 32), cluster_margin=4)
    with pytest.raises(ValueError, match=r"`input_labels` \[0, 0\] has no positive click"):
        proc(images=img, input_points=[[1, 2, 3], [4, 5, 6]], input_labels=[0, 0])


def test_error_non_finite_clicks(processor):
    img, _ = make_scan()
    for bad in (np.nan, np.inf):
        with pytest.raises(ValueError, match="`input_points` has non-finite values"):
            processor(images=img, input_points=[[1.0, bad, 3.0]])


def test_multi_valued_label_map_needs_a_target_label():
    image, label = np.zeros((12, 10, 8), np.float32), np.zeros((12, 10, 8), np.int16)
    label[2:6, 2:6, 2:6], label[6:9, 3:7, 3:6] = 1, 2  # KiTS-like: 1 kidney, 2 tumour
    with pytest.raises(ValueError, match=r"values \[0, 1, 2\] but this processor has no `target_label`.*from_preset"):
        Sam3DImageProcessor().preprocess(image, segmentation_maps=label, spacing=(1, 1, 1))
    assert Sam3DImageProcessor().preset is None  # the defaults are KiTS21's intensities, not the KiTS21 preset
    for ip in (Sam3DImageProcessor(target_label=2), Sam3DImageProcessor.from_preset("kits21")):
        out = ip.preprocess(image, segmentation_maps=label, spacing=(1, 1, 1))
        np.testing.assert_array_equal(out["labels"][0].numpy(), (label == 2).transpose(2, 1, 0))
    for binary in (label > 0, (label > 0).astype(np.float32)):  # boolean and float 0/1 maps need no target
        out = Sam3DImageProcessor().preprocess(image, segmentation_maps=binary, spacing=(1, 1, 1))
        np.testing.assert_array_equal(out["labels"][0].numpy(), (label > 0).transpose(2, 1, 0))


def test_error_non_integer_label_values(processor):
    label = np.zeros((12, 10, 8), np.float32)
    label[2:6, 2:6, 2:6] = 0.5
    with pytest.raises(ValueError, match=r"non-integer values \[0\.5\]"):
        processor(images=np.zeros((12, 10, 8)), spacing=(1, 1, 1), input_points=[[3, 3, 3]], segmentation_maps=label)


def test_error_non_finite_logits_and_bad_threshold(processor):
    img, _ = make_scan()
    inputs = processor(images=img, input_points=[[10, 20, 5]])
    logits = torch.zeros(1, 2, 72, 32, 32)
    for threshold in (-0.1, 0.0, 1.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="`threshold` is a probability and must lie strictly between 0 and 1"):
            processor.post_process_masks(logits, inputs, threshold=threshold)
    for bad in (float("nan"), float("inf")):
        broken = logits.clone()
        broken[0, 1, 3, 4, 5] = bad
        with pytest.raises(ValueError, match=r"`logits` has 1 non-finite values"):
            processor.post_process_masks(broken, inputs)


def test_save_mask_nifti_writes_integer_labels_exactly(tmp_path):
    img, _ = make_scan()
    mask = np.zeros(SHAPE, np.int64)
    mask[3:6, 4:8, 2:5] = 1
    written = nib.load(save_mask_nifti(mask, img, tmp_path / "a.nii.gz"))
    assert written.get_data_dtype() == np.uint8
    mask[10, 10, 10] = 256  # a uint8 cast would make it 0
    written = nib.load(save_mask_nifti(mask.astype(np.float32), img, tmp_path / "b.nii.gz"))
    assert written.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), mask)
    written = nib.load(save_mask_nifti(mask > 0, img, tmp_path / "c.nii"))
    assert written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), mask > 0)


def test_save_mask_nifti_float_image_on_request(tmp_path):
    img, _ = make_scan()
    probabilities = np.random.default_rng(0).uniform(0, 1, SHAPE).astype(np.float32)
    written = nib.load(save_mask_nifti(probabilities, img, tmp_path / "p.nii.gz", dtype="float32"))
    assert written.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), probabilities)


def test_error_save_mask_nifti_values(tmp_path):
    img, _ = make_scan()
    cases = {
        "non-integer values \\[0\\.25\\].*dtype='float32'": np.full(SHAPE, 0.25, np.float32),
        "negative values \\(minimum -1\\)": np.full(SHAPE, -1, np.int16),
        "values up to 70000, beyond uint16": np.full(SHAPE, 70000, np.int32),
        "non-finite values": np.full(SHAPE, np.nan, np.float32),
        "real numbers or booleans, got dtype complex": np.zeros(SHAPE, np.complex64),
    }
    for match, mask in cases.items():
        with pytest.raises(ValueError, match=match):
            save_mask_nifti(mask, img, tmp_path / "bad.nii.gz")
    with pytest.raises(ValueError, match="`dtype` must be None \\(integer labels\\) or 'float32'"):
        save_mask_nifti(np.zeros(SHAPE), img, tmp_path / "bad.nii.gz", dtype="uint8")
    assert sorted(os.listdir(tmp_path)) == []  # nothing half-written


def test_error_save_mask_nifti_into_a_missing_folder_names_the_folder(tmp_path):
    """Not the temporary file the atomic write would have used: the folder that is missing (or is a file)."""
    img, _ = make_scan()
    mask = np.zeros(SHAPE, np.uint8)
    missing = tmp_path / "nope" / "deeper"
    with pytest.raises(FileNotFoundError) as error:
        save_mask_nifti(mask, img, missing / "m.nii.gz")
    assert (
        str(error.value) == f"cannot write '{missing / 'm.nii.gz'}': folder '{missing}' does not exist; create it first"
    )
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"'.*a-file' is a file, not a folder$"):
        save_mask_nifti(mask, img, tmp_path / "a-file" / "m.nii.gz")
    assert sorted(os.listdir(tmp_path)) == ["a-file"]


def test_bad_clicks_are_refused_before_the_volume_is_resampled(monkeypatch):
    """A click outside the scan is a user error found from the header alone: no resampling is spent on it."""
    processor = Sam3DProcessor(patch_size=(16, 16, 16), cluster_margin=2)
    calls = []
    original = processor.image_processor.preprocess
    monkeypatch.setattr(processor.image_processor, "preprocess", lambda *a, **k: calls.append(1) or original(*a, **k))
    volume = np.zeros((20, 22, 8), np.float32)
    with pytest.raises(ValueError, match="outside the volume"):
        processor(images=volume, spacing=(1.0, 1.0, 3.0), input_points=[[5, 5, 30]])
    assert calls == []
    processor(images=volume, spacing=(1.0, 1.0, 3.0), input_points=[[5, 5, 3]])
    assert calls == [1]


def official_reading(path_image, path_label, spatial_index, window, mean, std, target):
    """dataset/base_dataset.py's __getitem__ and its first transforms, written out independently: transpose by
    spatial_index, resample (bilinear in-plane then trilinear along depth above a spacing ratio of 8, else trilinear;
    scale_factor = spacing / 1 mm), clip, z-score; the label as the binary target map resampled the same way, > 0.5."""
    import torch.nn.functional as F

    image = nib.load(path_image)
    img = image.get_fdata().astype(np.float32).transpose(spatial_index)
    spacing = tuple(np.array(image.header.get_zooms())[list(spatial_index)])
    seg = (nib.load(path_label).get_fdata().astype(np.float32).transpose(spatial_index) == target).astype(np.float32)

    def resample(x):
        if max(spacing) / min(spacing) > 8:
            t = F.interpolate(torch.tensor(x[:, None]), scale_factor=tuple(spacing[i] for i in (1, 2)), mode="bilinear")
            t = t.unsqueeze(0).permute(0, 2, 1, 3, 4).contiguous()
            return F.interpolate(t, scale_factor=(spacing[0], 1, 1), mode="trilinear")[0, 0].numpy()
        return F.interpolate(torch.tensor(x[None, None]), scale_factor=spacing, mode="trilinear")[0, 0].numpy()

    img = (np.clip(resample(img), *window) - mean) / std
    return img, resample(seg) > 0.5


@pytest.mark.parametrize("zooms", [(0.8, 0.9, 2.5), (0.7, 0.75, 6.4)])  # spacing ratio below and above 8
def test_official_resampling_equals_the_official_reading(tmp_path, zooms):
    rng = np.random.default_rng(0)
    data = rng.normal(60, 80, size=(45, 38, 11)).astype(np.float32)
    label = np.zeros(data.shape, np.uint8)
    label[10:30, 8:25, 3:8] = 1
    label[15:25, 12:20, 4:7] = 2
    affine = np.diag([*zooms, 1.0])
    affine[:3, :3] = np.array([[0, 0, 1], [0, -1, 0], [-1, 0, 0]]) @ affine[:3, :3]  # an orientation to ignore
    nib.save(nib.Nifti1Image(data, affine), tmp_path / "ct.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), tmp_path / "seg.nii.gz")
    preset = SAM3D_PRESETS["official_lits"]
    expected, expected_label = official_reading(
        tmp_path / "ct.nii.gz", tmp_path / "seg.nii.gz", preset.stored_axes, preset.window, preset.mean, preset.std, 2
    )
    out = Sam3DImageProcessor.from_preset("official_lits").preprocess(
        str(tmp_path / "ct.nii.gz"), segmentation_maps=str(tmp_path / "seg.nii.gz"), return_tensors="np"
    )
    assert out["pixel_values"].shape[2:] == expected.shape
    np.testing.assert_allclose(out["pixel_values"][0, 0], expected, atol=2e-5)
    differ = out["labels"][0].astype(bool) != expected_label
    assert expected_label.sum() > 100 and differ.sum() <= 2  # a voxel at exactly 0.5 may fall either way
    # The geometry is the interpolation's own: resampled voxel r lies at (r + 0.5) * 1 mm / spacing - 0.5
    np.testing.assert_allclose(out["resampling_scale"], 1.0 / np.array(zooms)[list(preset.stored_axes)])


@pytest.mark.parametrize(
    ("shape", "size", "box"),
    [
        ((20, 30, 25), (31, 17, 40), ((3, 9), (0, 30), (20, 25))),  # up and down, a box at both borders
        ((7, 9, 11), (3, 50, 5), ((6, 7), (2, 3), (0, 11))),  # one-voxel box, strong down/up-sampling
        ((10, 10, 10), (10, 10, 10), ((0, 10), (0, 10), (0, 10))),  # same size, whole grid
        ((8, 6, 5), (20, 6, 13), ((0, 3), (0, 6), (0, 2))),  # upsampling from the first voxel (clamped index)
    ],
)
def test_paste_back_resizes_only_the_patch_box_as_trilinear_interpolation_would(shape, size, box):
    from sam3d_hf.processing_sam3d import _resize_nonzero_box

    canvas = torch.zeros(shape)
    region = tuple(slice(a, b) for a, b in box)
    canvas[region] = torch.rand(canvas[region].shape, generator=torch.Generator().manual_seed(0)) + 0.01
    expected = torch.nn.functional.interpolate(canvas[None, None], size=size, mode="trilinear", align_corners=False)
    torch.testing.assert_close(_resize_nonzero_box(canvas, size), expected[0, 0], atol=2e-6, rtol=0)
    assert not _resize_nonzero_box(torch.zeros(shape), size).any()


@pytest.mark.parametrize("scale", [(1.37, 0.61, 2.9), (0.5, 1.0, 1.21)])
def test_paste_back_by_steps_is_interpolation_by_scale_factor(scale):
    """Official resampling goes by `scale_factor` (floored sizes): the way back reads the same sample positions,
    `(i + 0.5) / scale - 0.5`, which the size ratio does not."""
    from sam3d_hf.processing_sam3d import _resize_nonzero_box

    canvas = torch.zeros(13, 17, 9)
    canvas[2:9, 5:17, 0:4] = torch.rand(7, 12, 4, generator=torch.Generator().manual_seed(1)) + 0.01
    expected = torch.nn.functional.interpolate(canvas[None, None], scale_factor=scale, mode="trilinear")[0, 0]
    got = _resize_nonzero_box(canvas, tuple(expected.shape), steps=[1 / s for s in scale])
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)
    assert not torch.allclose(_resize_nonzero_box(canvas, tuple(expected.shape)), expected, atol=1e-3)
