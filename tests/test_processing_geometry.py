"""Geometry of Sam3DProcessor checked against independent computations (scipy / nibabel / analytic), never against
the processor's own matrices alone: a blob at a known world position must show up where the click lands, resampling
must agree with `scipy.ndimage.map_coordinates` / `nibabel.processing.resample_from_to` on the same grid, and
`post_process_masks` must agree with an independent resampling back."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import torch
from nibabel.processing import resample_from_to
from scipy import ndimage

from sam3d_hf.image_processing_sam3d import Sam3DImageProcessor
from sam3d_hf.processing_sam3d import Sam3DProcessor, save_mask_nifti

SHAPE = (36, 40, 12)  # stored (i, j, k): non-cubic
SPACING = (0.7, 0.8, 5.0)  # 5 mm slices: the nnU-Net anisotropic path


def rotation(deg_x: float, deg_y: float, deg_z: float) -> np.ndarray:
    cx, cy, cz = np.cos(np.deg2rad([deg_x, deg_y, deg_z]))
    sx, sy, sz = np.sin(np.deg2rad([deg_x, deg_y, deg_z]))
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_affine(spacing=SPACING) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation(18, -12, 25) @ np.diag(spacing)
    affine[:3, 3] = (-31.0, 12.5, 70.0)
    return affine


def world_grid(shape, affine) -> np.ndarray:
    """World (RAS mm) position of every stored voxel, `shape + (3,)`."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(np.float64)
    return idx @ affine[:3, :3].T + affine[:3, 3]


def raw_processor(patch_size=(32, 32, 32)) -> Sam3DProcessor:
    """Identity intensities inside [0, 1000] HU, so `pixel_values` are the resampled voxel values themselves."""
    ip = Sam3DImageProcessor(window=(0.0, 1000.0), intensity_mean=0.0, intensity_std=1.0, target_label=1)
    return Sam3DProcessor(ip, patch_size=patch_size, cluster_margin=4)


def test_blob_at_known_world_position_appears_at_the_click():
    """A bright blob centred on world point `p`: clicking `p` must give the patch voxel where the blob is in
    `pixel_values` (its intensity centroid, within half a voxel), and `patch_affines` must map that voxel to `p`."""
    affine = oblique_affine()
    # the centre lies on a slice centre (k = 6): through 5 mm slices the resampling is nearest neighbour (nnU-Net), so
    # a centre between slices would move to the nearest one by design
    blob = (affine @ [17.3, 21.6, 6.0, 1.0])[:3]
    data = 1000.0 * np.exp(-((world_grid(SHAPE, affine) - blob) ** 2).sum(-1) / (2 * 3.0**2))
    proc = raw_processor()
    out = proc(images=data, affine=affine, input_points=[blob.tolist()], points_in="world")
    values = out["pixel_values"][0, 0].double().numpy()
    assert values.max() > 500  # the whole blob is in the patch
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in values.shape], indexing="ij"), -1)
    centroid = (grid * values[..., None]).sum((0, 1, 2)) / values.sum()
    click = out["input_points"][0, 0].double().numpy()
    np.testing.assert_array_less(np.abs(centroid - click), 0.5)
    patch_affine = out["patch_affines"][0].numpy()
    np.testing.assert_allclose((patch_affine @ [*centroid, 1.0])[:3], blob, atol=0.5)
    np.testing.assert_allclose((patch_affine @ [*click, 1.0])[:3], blob, atol=1e-4)


def test_clicks_on_the_outer_half_voxel_stay_in_the_patch():
    """Clicks are allowed up to the volume's outer voxel edge (-0.5, size - 0.5); the model needs them on voxel
    centres inside the patch, so they are moved to the first/last resampled voxel centre."""
    proc = raw_processor()
    size = np.asarray(SHAPE, np.float64)
    clicks = [[-0.5, 20.0, 6.0], [size[0] - 0.5, 20.0, 6.0], [18.0, -0.5, size[2] - 0.5]]
    out = proc(images=np.zeros(SHAPE), affine=oblique_affine(), input_points=clicks)
    points = out["input_points"].numpy()
    valid = out["input_labels"].numpy() >= 0
    assert np.all(points[valid] >= 0) and np.all(points[valid] <= np.asarray(proc.patch_size) - 1)


def test_label_resampling_matches_nibabel_linear_on_an_oblique_grid():
    """Below the anisotropy threshold the label map is resampled trilinearly and thresholded at 0.5 (nnU-Net, order
    1): identical to `nibabel.processing.resample_from_to(order=1) >= 0.5` onto the processor's resampled grid."""
    spacing = (0.7, 0.8, 1.5)
    shape = (30, 28, 16)
    affine = oblique_affine(spacing)
    centre = world_grid(shape, affine).reshape(-1, 3).mean(0)
    label = (((world_grid(shape, affine) - centre) / [7.0, 6.0, 8.0]) ** 2).sum(-1) <= 1.0
    out = raw_processor().image_processor.preprocess(
        np.zeros(shape), segmentation_maps=label.astype(np.uint8), affine=affine
    )
    grid = (tuple(out["resampled_size"].tolist()), out["resampled_affine"].numpy())
    reference = resample_from_to(nib.Nifti1Image(label.astype(np.float32), affine), grid, order=1, mode="nearest")
    probability = np.asanyarray(reference.dataobj)
    ties = np.abs(probability - 0.5) < 1e-4
    labels = out["labels"][0].numpy()
    assert labels.sum() > 500
    np.testing.assert_array_equal(labels[~ties], (probability >= 0.5)[~ties])


def test_anisotropic_label_resampling_is_nnunet_linear_in_plane_nearest_through_slices():
    """5 mm slices: per label, bilinear in-plane and nearest through the slices, threshold 0.5, labels in increasing
    order; reference built with `scipy.ndimage.map_coordinates` on the analytic voxel-centre-aligned grid."""
    shape = (30, 26, 8)
    affine = np.diag([*SPACING, 1.0])  # RAS storage: canonical (D, H, W) = stored (k, j, i)
    grid = world_grid(shape, affine)
    label = np.zeros(shape, np.int64)
    label[(((grid - [10.0, 10.0, 17.0]) / [6.0, 5.0, 12.0]) ** 2).sum(-1) <= 1.0] = 1
    label[(((grid - [11.0, 10.5, 17.0]) / [3.0, 2.5, 6.0]) ** 2).sum(-1) <= 1.0] = 2
    ip = Sam3DImageProcessor(target_label=2)
    out = ip.preprocess(np.zeros(shape), segmentation_maps=label, affine=affine)
    new = out["resampled_size"].numpy()
    old = np.asarray(shape)[[2, 1, 0]]
    assert new.tolist() == [40, 21, 21]
    # resampled voxel r sits at canonical coordinate (r + 0.5) * old / new - 0.5; through slices the nearest slice
    coords = [(np.arange(m) + 0.5) * n / m - 0.5 for n, m in zip(old, new)]
    coords[0] = np.floor(coords[0] + 0.5)
    mesh = np.meshgrid(*coords, indexing="ij")
    target = (label == 2).transpose(2, 1, 0).astype(np.float64)
    probability = ndimage.map_coordinates(target, mesh, order=1, mode="nearest")
    ties = np.abs(probability - 0.5) < 1e-6
    labels = out["labels"][0].numpy()
    assert labels.sum() > 100 and ties.mean() < 0.05
    np.testing.assert_array_equal(labels[~ties], (probability >= 0.5)[~ties])


def test_post_process_masks_matches_independent_resampling_back():
    """A patch-level probability pasted into the resampled grid and resampled back to the original voxels with
    `nibabel.processing.resample_from_to(order=1)` (trilinear, voxel-centre aligned) equals `post_process_masks`."""
    affine = oblique_affine()
    proc = raw_processor(patch_size=(32, 16, 32))
    out = proc(images=np.zeros(SHAPE), affine=affine, input_points=[[18.0, 20.0, 5.0]])
    rng = np.random.default_rng(0)
    probability = 1 / (1 + np.exp(-ndimage.gaussian_filter(rng.normal(0, 8, proc.patch_size), 2.0)))
    logits = torch.from_numpy(np.log(probability / (1 - probability)))[None, None]  # one channel: sigmoid
    got = proc.post_process_masks(logits, out, return_probabilities=True).numpy()

    size = out["resampled_size"].numpy()
    canvas = np.zeros(size)
    origin = out["patch_origins"][0].numpy()
    lo, hi = np.maximum(origin, 0), np.minimum(origin + proc.patch_size, size)
    canvas[tuple(slice(a, b) for a, b in zip(lo, hi))] = probability[
        tuple(slice(a, b) for a, b in zip(lo - origin, hi - origin))
    ]
    resampled = nib.Nifti1Image(canvas, out["resampled_affine"].numpy())
    expected = np.asanyarray(resample_from_to(resampled, (SHAPE, affine), order=1, mode="nearest").dataobj)
    assert expected.max() > 0.8 and expected.min() < 0.2
    np.testing.assert_allclose(got, expected, atol=1e-4)
    mask = proc.post_process_masks(logits, out, threshold=0.3).numpy()
    np.testing.assert_array_equal(mask[np.abs(expected - 0.3) > 1e-4], (expected >= 0.3)[np.abs(expected - 0.3) > 1e-4])


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_mask_has_the_users_file_mode(tmp_path, umask):
    """mkstemp creates files 0o600; a written mask gets 0o666 minus the umask like any file the user creates."""
    reference = nib.Nifti1Image(np.zeros(SHAPE), oblique_affine())
    previous = os.umask(umask)
    try:
        save_mask_nifti(np.zeros(SHAPE, np.uint8), reference, tmp_path / "m.nii.gz")
    finally:
        os.umask(previous)
    assert (tmp_path / "m.nii.gz").stat().st_mode & 0o777 == 0o666 & ~umask
