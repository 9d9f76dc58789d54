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


# Thick slices at an integer ratio to the 1 mm target (5 mm) and at a non-integer one (2.5 mm, an odd number of slices
# so that no resampled voxel centre lies exactly between two slices): at an integer ratio `nearest` and
# `nearest-exact` pick the same slices, so only the second catches a half-voxel shift through the slices.
THICK_SLICES = [(SPACING, SHAPE), ((0.7, 0.8, 2.5), (36, 40, 25))]


@pytest.mark.parametrize("spacing, shape", THICK_SLICES, ids=["5mm", "2.5mm"])
def test_blob_at_known_world_position_appears_at_the_click(spacing, shape):
    """A bright blob centred on world point `p`: clicking `p` must give the patch voxel where the blob is in
    `pixel_values` (its intensity centroid, within half a voxel), and `patch_affines` must map that voxel to `p`."""
    affine = oblique_affine(spacing)
    # the centre lies on a slice centre (k = 6): through thick slices the resampling is nearest neighbour (nnU-Net),
    # so a centre between slices would move to the nearest one by design
    blob = (affine @ [17.3, 21.6, 6.0, 1.0])[:3]
    data = 1000.0 * np.exp(-((world_grid(shape, affine) - blob) ** 2).sum(-1) / (2 * 3.0**2))
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


def analytic_resampled_coordinates(old, new) -> list[np.ndarray]:
    """Canonical coordinate of each resampled voxel, per axis `(D, H, W)`, for voxel-centre-aligned grids: voxel `r`
    of `new` sits at `(r + 0.5) * old / new - 0.5`; through the thick axis D the nearest slice is taken."""
    coords = [(np.arange(m) + 0.5) * n / m - 0.5 for n, m in zip(old, new)]
    coords[0] = np.floor(coords[0] + 0.5)
    return coords


# (spacing, stored shape, target spacing, resampled size): 5 mm -> 1 mm (an integer slice ratio), 2.5 mm -> 1 mm and
# 3 mm -> 1.4 mm (non-integer ratios; odd slice counts, so that no resampled voxel centre lies between two slices).
ANISOTROPIC_GRIDS = [
    (SPACING, (30, 26, 8), 1.0, [40, 21, 21]),
    ((0.7, 0.8, 2.5), (30, 26, 15), 1.0, [38, 21, 21]),
    ((0.7, 0.7, 3.0), (30, 26, 11), 1.4, [24, 13, 15]),
]


@pytest.mark.parametrize("spacing, shape, target, size", ANISOTROPIC_GRIDS, ids=["5mm", "2.5mm", "3mm-to-1.4mm"])
def test_anisotropic_label_resampling_is_nnunet_linear_in_plane_nearest_through_slices(spacing, shape, target, size):
    """Thick slices: per label, bilinear in-plane and nearest through the slices, threshold 0.5, labels in increasing
    order; reference built with `scipy.ndimage.map_coordinates` on the analytic voxel-centre-aligned grid."""
    affine = np.diag([*spacing, 1.0])  # RAS storage: canonical (D, H, W) = stored (k, j, i)
    grid = world_grid(shape, affine)
    label = np.zeros(shape, np.int64)
    label[(((grid - [10.0, 10.0, 17.0]) / [6.0, 5.0, 12.0]) ** 2).sum(-1) <= 1.0] = 1
    label[(((grid - [11.0, 10.5, 17.0]) / [3.0, 2.5, 6.0]) ** 2).sum(-1) <= 1.0] = 2
    ip = Sam3DImageProcessor(target_label=2, target_spacing=(target,) * 3)
    out = ip.preprocess(np.zeros(shape), segmentation_maps=label, affine=affine)
    new = out["resampled_size"].numpy()
    assert new.tolist() == size
    mesh = np.meshgrid(*analytic_resampled_coordinates(np.asarray(shape)[[2, 1, 0]], new), indexing="ij")
    reference = (label == 2).transpose(2, 1, 0).astype(np.float64)
    probability = ndimage.map_coordinates(reference, mesh, order=1, mode="nearest")
    ties = np.abs(probability - 0.5) < 1e-6
    labels = out["labels"][0].numpy()
    assert labels.sum() > 30 and ties.mean() < 0.05
    np.testing.assert_array_equal(labels[~ties], (probability >= 0.5)[~ties])


@pytest.mark.parametrize("spacing, shape, target, size", ANISOTROPIC_GRIDS, ids=["5mm", "2.5mm", "3mm-to-1.4mm"])
def test_anisotropic_image_resampling_matches_scipy(spacing, shape, target, size):
    """Thick slices: the image is resampled cubic in-plane and takes the nearest slice through the slices. Reference:
    each nearest slice (analytic, voxel-centre aligned) interpolated with `scipy.ndimage.map_coordinates(order=3)`.
    scipy's cubic B-spline and torch's cubic convolution differ by up to 4 on this smooth field of range ~800 (0.5 %);
    voxel corners aligned in-plane instead of centres (`align_corners=True`) gives errors of 12-23, one slice off
    through the slices (`nearest` for `nearest-exact`) errors of 400."""
    rng = np.random.default_rng(0)
    field = ndimage.gaussian_filter(rng.normal(0, 1, shape), (4, 4, 0))  # smooth in-plane, independent slices
    data = 500 + 400 * field / np.abs(field).max()
    ip = Sam3DImageProcessor(window=(0.0, 1000.0), intensity_mean=0.0, intensity_std=1.0, target_spacing=(target,) * 3)
    out = ip.preprocess(data, affine=np.diag([*spacing, 1.0]))  # RAS storage: canonical (D, H, W) = stored (k, j, i)
    got = out["pixel_values"][0, 0].double().numpy()
    assert got.shape == tuple(size)
    depth, *in_plane = analytic_resampled_coordinates(np.asarray(shape)[[2, 1, 0]], size)
    canonical = data.transpose(2, 1, 0)
    mesh = np.meshgrid(*in_plane, indexing="ij")
    expected = np.stack([ndimage.map_coordinates(canonical[int(k)], mesh, order=3, mode="nearest") for k in depth])
    np.testing.assert_allclose(got, expected, atol=5.0, rtol=0)


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
