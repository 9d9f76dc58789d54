"""The app (sam3d_hf.app): display geometry, the click -> voxel -> predictor -> mask chain, undo / redo, errors, the
API endpoints through gradio_client, `sam3d app` and examples/app.py. The browser test is tests/test_app_browser.py.

Expectations come from independent computations: world directions and sizes through nibabel's `apply_affine`, the
displayed voxel of each pixel written out here from the affine, the phantom's anatomy (spine at the back), and an
analytic model whose mask is a ball around the clicks, so that where the mask lands says where the click went.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import TINY, randomize
from nibabel.affines import apply_affine

from sam3d_hf import (
    Sam3DConfig,
    Sam3DForPromptableSegmentation,
    Sam3DImageEmbeddings,
    Sam3DImageProcessor,
    Sam3DProcessor,
    Sam3DSegmentationOutput,
)
from sam3d_hf.app import VIEWS, AppSession, ModelStore, ViewGeometry, load_model, read_scan, render_view
from sam3d_hf.synthetic import SYNTHETIC_PROCESSOR_KWARGS, generate_case

REPOSITORY = Path(__file__).resolve().parents[1]
BALL_RADIUS = 5.0  # patch voxels = mm at the synthetic processor's 1 mm


# ----------------------------------------------------------------------------------------------------------------------
# An analytic model and helpers (also used by test_app_browser.py)
# ----------------------------------------------------------------------------------------------------------------------
class BallModel(Sam3DForPromptableSegmentation):
    """Foreground = within `BALL_RADIUS` patch voxels of a positive click and not within half of it of a negative one.

    Its "encoder" keeps the patch (and counts its calls; `delay` seconds each, to see a slow encode), so the
    predictor's caching, the patch geometry and the mapping back to the scan run as for a real model.
    """

    def __init__(self, config: Sam3DConfig, delay: float = 0.0):
        super().__init__(config)
        self.encodings = 0
        self.delay = delay

    def get_image_embeddings(self, pixel_values: torch.Tensor) -> Sam3DImageEmbeddings:
        self.encodings += 1
        time.sleep(self.delay)
        return Sam3DImageEmbeddings(feature_maps=(pixel_values,), decoder_context=pixel_values)

    def forward(self, pixel_values=None, input_points=None, input_labels=None, image_embeddings=None, **kwargs):
        if image_embeddings is None:
            image_embeddings = self.get_image_embeddings(pixel_values)
        batch, _, depth, height, width = image_embeddings.decoder_context.shape
        grid = torch.stack(torch.meshgrid(*(torch.arange(n) for n in (depth, height, width)), indexing="ij"), -1)
        foreground = torch.zeros(batch, depth, height, width, dtype=torch.bool)
        for b in range(batch):
            distances = [((grid - point) ** 2).sum(-1).sqrt() for point in input_points[b]]
            for distance, label in zip(distances, input_labels[b]):
                if label == 1:
                    foreground[b] |= distance <= BALL_RADIUS
            for distance, label in zip(distances, input_labels[b]):
                if label == 0:
                    foreground[b] &= distance > BALL_RADIUS / 2
        logits = torch.stack([torch.zeros(foreground.shape), torch.where(foreground, 8.0, -8.0)], dim=1)
        return Sam3DSegmentationOutput(logits=logits)


def ball_model(delay: float = 0.0) -> tuple[BallModel, Sam3DProcessor]:
    prompt = {**TINY["prompt_encoder_config"], "use_point_labels": True}
    model = BallModel(Sam3DConfig(**{**TINY, "prompt_encoder_config": prompt}), delay=delay).eval()
    processor = Sam3DProcessor(
        Sam3DImageProcessor(**SYNTHETIC_PROCESSOR_KWARGS), patch_size=(32, 32, 32), cluster_margin=4
    )
    return model, processor


def save_tiny_model(folder: Path) -> Path:
    """A tiny random-weight Sam3D model (conftest's TINY, no point labels) and its processor, saved in `folder`."""
    randomize(Sam3DForPromptableSegmentation(Sam3DConfig(**TINY))).save_pretrained(folder)
    processor = Sam3DProcessor(
        Sam3DImageProcessor(**SYNTHETIC_PROCESSOR_KWARGS), patch_size=(40, 24, 44), cluster_margin=4
    )
    processor.save_pretrained(folder)
    return folder


def lesion_centre(label: np.ndarray) -> tuple[int, int, int]:
    """The lesion voxel closest to the lesion's centroid (stored order)."""
    inside = np.argwhere(label == 2)
    return tuple(int(v) for v in inside[np.argmin(((inside - inside.mean(0)) ** 2).sum(1))])


def red_pixels(rgb: np.ndarray) -> int:
    """Pixels of the mask's colour (red clearly above green and blue): nothing else on a view is red."""
    rgb = np.asarray(rgb)[..., :3].astype(np.int32)
    return int(np.sum(rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2]) > 80))


def ball_session(tmp_path, seed: int = 7, orientation: str = "oblique") -> tuple[AppSession, BallModel, np.ndarray]:
    model, processor = ball_model()
    session = AppSession(ModelStore({"ball": (model, processor)}), ("ball", None, None), workdir=tmp_path)
    session.load_generated(seed, orientation, 1)
    _, label = generate_case(seed, orientation=orientation, num_lesions=1)
    return session, model, np.asarray(label.dataobj)


def mask_centre_world(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return apply_affine(affine, np.argwhere(mask > 0)).mean(0)


# ----------------------------------------------------------------------------------------------------------------------
# Display geometry, against the affine
# ----------------------------------------------------------------------------------------------------------------------
def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.deg2rad(degrees)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def scan_affine(directions: np.ndarray, spacing, origin=(-40.0, 12.0, 7.5)) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(directions, float) * np.asarray(spacing, float)  # column a: stored axis a
    affine[:3, 3] = origin
    return affine


PERMUTED = np.array([[0, 0, -1], [1, 0, 0], [0, -1, 0]], float)  # stored axes -> S..., R, P: a CT stored as (z, x, y)
SCANS = {
    "RAS": (scan_affine(np.eye(3), (0.7, 0.9, 3.0)), (23, 17, 9)),
    "LPS": (scan_affine(np.diag([-1.0, -1.0, 1.0]), (0.8, 0.8, 2.5)), (19, 21, 7)),
    "permuted": (scan_affine(PERMUTED, (2.0, 0.6, 1.1)), (8, 25, 13)),
    "oblique": (scan_affine(rotation((0.3, -1.0, 0.5), 12.0) @ PERMUTED, (3.0, 0.7, 1.3)), (7, 26, 15)),
}
# What each view's image directions must point at in RAS world: (columns grow towards, rows grow towards, slider).
EXPECTED_DIRECTIONS = {
    "axial": ((-1, 0, 0), (0, -1, 0), (0, 0, 1)),  # patient's left, posterior; superior
    "coronal": ((-1, 0, 0), (0, 0, -1), (0, 1, 0)),  # patient's left, inferior; anterior
    "sagittal": ((0, -1, 0), (0, 0, -1), (1, 0, 0)),  # posterior, inferior; right
}


def expected_voxel(affine, shape, view, x, y, slice_index, width, height) -> tuple[int, int, int]:
    """The voxel pixel (x, y) shows, written out from the affine: for each image direction, the stored axis whose
    world direction is closest to it, reversed when it points the other way; the pixel's centre picks the voxel
    whose extent holds it."""
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    voxel = [0, 0, 0]
    for target, pixel, pixels in zip(EXPECTED_DIRECTIONS[view][:2], (x, y), (width, height)):
        alignment = np.asarray(target, float) @ directions  # cosine of each stored axis with the target direction
        axis = int(np.argmax(np.abs(alignment)))
        n = shape[axis]
        index = int(np.floor((pixel + 0.5) / pixels * n))
        voxel[axis] = index if alignment[axis] > 0 else n - 1 - index
    (slice_axis,) = {0, 1, 2} - set(_axes_of(affine, view))
    voxel[slice_axis] = slice_index
    return tuple(voxel)


def _axes_of(affine, view) -> list[int]:
    directions = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return [int(np.argmax(np.abs(np.asarray(t, float) @ directions))) for t in EXPECTED_DIRECTIONS[view][:2]]


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("view", VIEWS)
def test_view_directions_are_radiological(scan, view):
    """Moving right / down / along the slider on a view moves, in world RAS, mostly towards the documented direction
    (axial: patient's left / posterior / superior, ...), on oblique, anisotropic, non-cubic scans."""
    affine, shape = SCANS[scan]
    geometry = ViewGeometry.build(view, affine, shape, size=120)
    middle = geometry.position_of(shape[geometry.slice_axis] // 2)
    index = geometry.slice_of(middle)
    steps = {
        "columns": (geometry.pixel_to_voxel(0, 0, index), geometry.pixel_to_voxel(geometry.width - 1, 0, index)),
        "rows": (geometry.pixel_to_voxel(0, 0, index), geometry.pixel_to_voxel(0, geometry.height - 1, index)),
        "slider": (
            geometry.pixel_to_voxel(0, 0, geometry.slice_of(0)),
            geometry.pixel_to_voxel(0, 0, geometry.slice_of(geometry.num_slices - 1)),
        ),
    }
    for (name, (start, end)), target in zip(steps.items(), EXPECTED_DIRECTIONS[view]):
        move = apply_affine(affine, end) - apply_affine(affine, start)
        direction = move / np.linalg.norm(move)
        assert direction @ np.asarray(target) > 0.9, (name, direction.round(3), target)


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("view", VIEWS)
def test_every_pixel_shows_the_voxel_the_affine_says(scan, view):
    affine, shape = SCANS[scan]
    geometry = ViewGeometry.build(view, affine, shape, size=100)
    volume = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)  # each voxel's value is its flat index
    for slice_index in (0, shape[geometry.slice_axis] - 1):
        shown = geometry.take(volume, slice_index)
        assert shown.shape == (geometry.height, geometry.width)
        for y in range(geometry.height):
            for x in range(geometry.width):
                voxel = expected_voxel(affine, shape, view, x, y, slice_index, geometry.width, geometry.height)
                assert geometry.pixel_to_voxel(x, y, slice_index) == voxel, (x, y)
                assert shown[y, x] == volume[voxel], (x, y)


@pytest.mark.parametrize("scan", SCANS)
@pytest.mark.parametrize("view", VIEWS)
def test_pixel_aspect_follows_the_spacing(scan, view):
    """Width / height of a view is its physical width / height (voxel sizes measured through `apply_affine`)."""
    affine, shape = SCANS[scan]
    geometry = ViewGeometry.build(view, affine, shape, size=300)
    column_axis, row_axis = _axes_of(affine, view)

    def extent(axis: int) -> float:
        step = np.zeros(3)
        step[axis] = 1.0
        return shape[axis] * float(np.linalg.norm(apply_affine(affine, step) - apply_affine(affine, np.zeros(3))))

    assert max(geometry.width, geometry.height) == 300
    assert geometry.width / geometry.height == pytest.approx(extent(column_axis) / extent(row_axis), rel=0.01)


def test_pixels_are_mirror_symmetric_and_round_trip():
    """A pixel shows the voxel holding the pixel's centre: the mapping is symmetric end to end, each voxel's pixels
    are contiguous, and a voxel's centre pixel maps back to it."""
    affine, shape = SCANS["oblique"]
    for view in VIEWS:
        geometry = ViewGeometry.build(view, affine, shape, size=400)
        for pixels, lookup, n in (
            (geometry.width, geometry.columns, shape[geometry.column_axis]),
            (geometry.height, geometry.rows, shape[geometry.row_axis]),
        ):
            on_boundary = ((2 * np.arange(pixels) + 1) * n) % (2 * pixels) == 0  # a tie: either voxel is right
            mirrored = lookup + lookup[::-1]
            np.testing.assert_array_equal(mirrored[~on_boundary & ~on_boundary[::-1]], n - 1)
            assert np.all(np.abs(np.diff(lookup)) <= 1) and len(np.unique(lookup)) == n
        index = shape[geometry.slice_axis] // 2
        for voxel in np.ndindex(*shape):
            if voxel[geometry.slice_axis] != index:
                continue
            x, y = (round(v) for v in geometry.voxel_to_pixel(voxel))
            assert geometry.pixel_to_voxel(x, y, index) == voxel


def test_a_voxel_centre_is_the_centre_of_its_pixels():
    """On an isotropic cube drawn at 3 pixels per voxel, display voxel c covers pixels 3c..3c+2 and its centre (where
    the cursor lines and click crosses go) is pixel 3c+1 exactly; at 1 pixel per voxel it is pixel c."""
    affine = scan_affine(np.eye(3), (1.0, 1.0, 1.0))
    for size, per_voxel in ((30, 3), (1, 1)):
        geometry = ViewGeometry.build("axial", affine, (10, 10, 10), size=size)
        assert (geometry.width, geometry.height) == (10 * per_voxel, 10 * per_voxel)
        for i in range(10):
            # RAS scan: display column c shows i = 9 - c (patient's right on the left), display row r shows j = 9 - r
            x, y = geometry.voxel_to_pixel((i, i, 0))
            c = 9 - i
            assert (x, y) == (per_voxel * c + (per_voxel - 1) / 2, per_voxel * c + (per_voxel - 1) / 2)
            assert set(np.flatnonzero(geometry.columns == i)) == set(range(per_voxel * c, per_voxel * (c + 1)))


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "permuted", "oblique"])
def test_generated_anatomy_is_shown_radiologically(orientation):
    """On the phantom itself: the spine (bone) lies in the lower half of the axial view (posterior at the bottom),
    and a lesion on the patient's right appears on the image's left (axial, coronal)."""
    checked = 0
    for seed in range(4):
        image, label, lesions = generate_case(seed, orientation=orientation, num_lesions=1, return_lesions=True)
        data, affine = np.asarray(image.dataobj), image.affine
        centre_world = apply_affine(affine, (np.asarray(data.shape) - 1) / 2)  # the phantom's centre
        right = lesions[0]["center_world"][0] - centre_world[0]
        for view in ("axial", "coronal"):
            geometry = ViewGeometry.build(view, affine, data.shape, size=200)
            voxel = lesion_centre(np.asarray(label.dataobj))
            shown = geometry.take(np.asarray(label.dataobj), voxel[geometry.slice_axis]) == 2
            if abs(right) > 5:
                columns = np.nonzero(shown)[1].mean()
                assert (columns < geometry.width / 2) == (right > 0), (seed, view, right)
                checked += 1
        geometry = ViewGeometry.build("axial", affine, data.shape, size=200)
        bone_rows = np.nonzero(geometry.take(data, data.shape[geometry.slice_axis] // 2) > 300)[0]
        assert bone_rows.mean() > geometry.height / 2, (seed, orientation)
    assert checked >= 2


# ----------------------------------------------------------------------------------------------------------------------
# Click -> voxel -> predictor -> mask, undo / redo
# ----------------------------------------------------------------------------------------------------------------------
def test_view_click_reaches_the_predictor_and_the_mask(tmp_path):
    session, model, label = ball_session(tmp_path)
    affine = session.scan.volume.affine
    target = lesion_centre(label)
    assert session.cursor == target  # a generated case opens on its lesion
    axial = session.views["axial"]
    x, y = (round(v) for v in axial.voxel_to_pixel(target))
    assert session.will_encode(target, 1)
    message = session.click_view("axial", x, y, "positive")
    assert "ran the encoder" in message and model.encodings == 1
    click = session.clicks[0]
    assert click.voxel == target and click.label == 1
    np.testing.assert_allclose(click.world, apply_affine(affine, target))
    assert click.intensity == session.scan.volume.data[target]
    mask = session.mask
    assert mask.shape == label.shape and mask.dtype == np.uint8
    # The ball lands around the click in world mm (a flipped or shifted axis would move it).
    assert np.linalg.norm(mask_centre_world(mask, affine) - apply_affine(affine, target)) < 1.0
    assert click.volume_ml == pytest.approx(mask.sum() * abs(np.linalg.det(affine[:3, :3])) / 1000)
    assert click.volume_ml == pytest.approx(4 / 3 * np.pi * BALL_RADIUS**3 / 1000, rel=0.25)
    # The clicked pixel is red on the axial view, and the mask shows on all three views through the cursor.
    assert axial.take(mask, target[axial.slice_axis])[y, x] == 1
    assert red_pixels(session.render("axial")[y + 5 : y + 6, x + 5 : x + 6]) == 1  # beside the click's cross
    assert all(red_pixels(session.render(view)) > 20 for view in VIEWS)
    assert (mask & (label == 2)).sum() > 0.5 * mask.sum()  # the ball sits in the lesion


def test_nearby_clicks_reuse_the_patch_and_far_ones_encode(tmp_path):
    session, model, label = ball_session(tmp_path)
    target = np.asarray(lesion_centre(label))
    session.add_click(target, 1)
    near = target + np.array([2, 1, 0])
    assert not session.will_encode(near, 1)
    assert "cached patch" in session.add_click(near, 1) and model.encodings == 1
    assert [c.encoded for c in session.clicks] == [True, False]
    # The previous prediction of the cluster is kept, for a model that takes a previous mask.
    (cluster,) = session.state.clusters
    assert cluster.clicks == (0, 1) and tuple(cluster.foreground_logits.shape) == (32, 32, 32)
    assert cluster.foreground_logits.dtype == torch.float16
    assert session.previous_logits(cluster.patch_origin) is cluster.foreground_logits
    far = np.zeros(3, int)  # a corner of the scan: another patch
    assert session.will_encode(far, 1)
    session.add_click(far, 1)
    assert model.encodings == 2 and len(session.state.clusters) == 2


def test_undo_redo_clear_restore_the_masks_exactly(tmp_path):
    session, _, label = ball_session(tmp_path)
    target = np.asarray(lesion_centre(label))
    session.add_click(target, 1)
    first = session.mask.copy()
    negative = target + np.array([4, 0, 0])  # 3.8 mm: in the ball, beyond half of it
    session.add_click(negative, 0)
    second = session.mask.copy()
    assert first[tuple(negative)] == 1 and second[tuple(negative)] == 0 and second[tuple(target)] == 1
    assert session.can_undo and not session.can_redo
    session.undo()
    np.testing.assert_array_equal(session.mask, first)
    assert len(session.clicks) == 1 and session.can_redo
    session.redo()
    np.testing.assert_array_equal(session.mask, second)
    session.clear()
    assert session.mask.sum() == 0 and session.clicks == ()
    session.undo()  # clear is undoable
    np.testing.assert_array_equal(session.mask, second)
    session.undo()
    np.testing.assert_array_equal(session.mask, first)
    session.redo()  # one step forward (two clicks), not to the end (cleared)
    np.testing.assert_array_equal(session.mask, second)
    session.undo()
    session.undo()
    assert session.mask.sum() == 0
    session.redo()
    np.testing.assert_array_equal(session.mask, first)
    session.add_click(target + np.array([0, 2, 0]), 1)  # a new click after an undo drops the redo step
    assert not session.can_redo and len(session.clicks) == 2
    session.undo()
    session.undo()
    assert session.mask.sum() == 0 and not session.can_undo
    with pytest.raises(ValueError, match="nothing to undo"):
        session.undo()


def test_slices_cursor_and_window(tmp_path):
    session, _, _ = ball_session(tmp_path, orientation="LPS")
    geometry = session.views["axial"]
    session.set_slice("axial", 3)
    assert session.slider_position("axial") == 3 and session.cursor[geometry.slice_axis] == geometry.slice_of(3)
    with pytest.raises(ValueError, match=r"axial slice 999 is outside 0\.\."):
        session.set_slice("axial", 999)
    voxel = (5, 6, 7)
    assert "voxel (i, j, k) = (5, 6, 7)" in session.move_cursor(voxel)
    assert session.clicks == ()  # moving the cursor adds no click
    for view in VIEWS:
        assert session.render(view).shape == (session.views[view].height, session.views[view].width, 3)
    level, width = session.set_window_preset("CT bone (L 400, W 1800)")
    assert (level, width) == (400.0, 1800.0)
    session.set_window_preset("auto (1st-99th percentile)")
    assert session.window[1] > 0
    with pytest.raises(ValueError, match="window width must be > 0"):
        session.set_window(40, 0)


def test_render_view_draws_only_the_mask_in_red():
    affine, shape = SCANS["oblique"]
    geometry = ViewGeometry.build("axial", affine, shape, size=100)
    volume = np.random.default_rng(0).normal(40, 100, shape)
    mask = np.zeros(shape, np.uint8)
    cursor = tuple(n // 2 for n in shape)
    plain = render_view(geometry, volume, cursor, (-160, 240), mask, mask)
    assert red_pixels(plain) == 0  # grey scan, cursor lines, no mask
    mask[cursor] = 1
    assert red_pixels(render_view(geometry, volume, cursor, (-160, 240), mask)) > 0


def test_real_model_flow_and_saved_mask(tmp_path):
    """A tiny random-weight Sam3D model from a folder, through `load_model`: the encoder runs once for two nearby
    clicks, negative clicks are refused (no point labels), the saved NIfTI has the scan's geometry and header."""
    save_tiny_model(tmp_path / "tiny")
    loaded = load_model(str(tmp_path / "tiny"))
    assert not loaded.accepts_negative and "positive clicks only" in loaded.describe()
    session = AppSession(ModelStore(), (str(tmp_path / "tiny"), None, None), workdir=tmp_path)
    image, label = generate_case(3, orientation="permuted", num_lesions=1)
    nib.save(image, tmp_path / "ct.nii.gz")
    session.load_file(tmp_path / "ct.nii.gz")
    target = np.asarray(lesion_centre(np.asarray(label.dataobj)))
    session.add_click(target, 1)
    session.add_click(target + 1, 1)
    assert session.predictor.cache_misses == 1 and session.predictor.cache_hits == 1
    with pytest.raises(ValueError, match="takes no negative clicks"):
        session.add_click(target + 2, 0)
    assert len(session.clicks) == 2
    path = session.save_mask(tmp_path / "out")
    assert path.name == "ct_sam3d_mask.nii.gz"
    saved = nib.load(path)
    np.testing.assert_array_equal(np.asarray(saved.dataobj), session.mask)
    assert saved.shape == image.shape and saved.get_data_dtype() == np.uint8
    np.testing.assert_allclose(saved.affine, image.affine, atol=1e-6)
    assert int(saved.header["qform_code"]) == int(image.header["qform_code"]) == 1
    assert int(saved.header["sform_code"]) == int(image.header["sform_code"])


# ----------------------------------------------------------------------------------------------------------------------
# Errors: a message, and the session keeps working
# ----------------------------------------------------------------------------------------------------------------------
def write_png(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
    return path


@pytest.mark.parametrize(
    "name, write, message",
    [
        ("garbage.nii.gz", lambda p: p.write_bytes(b"not an image at all"), "could not be read as a scan"),
        ("picture.png", write_png, "could not be read as a scan"),
        ("flat.nii.gz", lambda p: nib.save(nib.Nifti1Image(np.zeros((16, 16), np.int16), np.eye(4)), p),
         "Expected a 3D volume"),
        ("one_slice.nii.gz", lambda p: nib.save(nib.Nifti1Image(np.zeros((1, 16, 16), np.int16), np.eye(4)), p),
         "a single slice"),
        ("broken.zip", lambda p: p.write_bytes(b"PK but not a zip"), "not a readable zip file"),
        ("empty.zip", lambda p: zipfile.ZipFile(p, "w").close(), "the zip file is empty"),
        ("slice.dcm", lambda p: p.write_bytes(b""), "single DICOM file"),
    ],
)  # fmt: skip
def test_unreadable_scans_are_messages_and_the_session_keeps_working(tmp_path, name, write, message):
    session, _, label = ball_session(tmp_path)
    before = session.scan
    path = tmp_path / name
    write(path)
    with pytest.raises(ValueError, match=message):
        session.load_file(path)
    assert session.scan is before
    assert "ran the encoder" in session.add_click(lesion_centre(label), 1)


def test_zipped_dicom_and_nrrd_uploads(tmp_path):
    from test_processing import write_dicom_series

    nrrd = pytest.importorskip("nrrd")
    volume = np.random.default_rng(0).integers(-100, 200, size=(6, 10, 12))  # (slices, rows, columns)
    write_dicom_series(tmp_path / "series" / "CT", volume)
    with zipfile.ZipFile(tmp_path / "series.zip", "w") as archive:
        for file in sorted((tmp_path / "series").rglob("*.dcm")):
            archive.write(file, file.relative_to(tmp_path / "series"))
    scan = read_scan(tmp_path / "series.zip", tmp_path)
    np.testing.assert_array_equal(scan.volume.data, volume.transpose(2, 1, 0))  # (column, row, slice)
    image, _ = generate_case(2, orientation="LPS", num_lesions=1)
    lps = np.diag([-1.0, -1.0, 1.0])
    header = {"space": "left-posterior-superior", "space directions": (lps @ image.affine[:3, :3]).T,
              "space origin": lps @ image.affine[:3, 3]}  # fmt: skip
    nrrd.write(str(tmp_path / "ct.nrrd"), np.asarray(image.dataobj), header)
    scan = read_scan(tmp_path / "ct.nrrd", tmp_path)
    np.testing.assert_allclose(scan.volume.affine, image.affine, atol=1e-5)
    # A mask of an NRRD scan is written with the scan's affine (no NIfTI header to keep).
    model, processor = ball_model()
    session = AppSession(ModelStore({"ball": (model, processor)}), ("ball", None, None), workdir=tmp_path)
    session.load_file(tmp_path / "ct.nrrd")
    session.add_click(tuple(n // 2 for n in scan.shape), 1)
    saved = nib.load(session.save_mask(tmp_path / "out"))
    assert saved.shape == scan.shape
    np.testing.assert_allclose(saved.affine, image.affine, atol=1e-5)


def test_click_errors_change_nothing(tmp_path):
    session, model, label = ball_session(tmp_path)
    empty = AppSession(ModelStore(), workdir=tmp_path)
    with pytest.raises(ValueError, match="load a scan first"):
        empty.add_click((1, 2, 3), 1)
    empty.set_scan(session.scan)
    with pytest.raises(ValueError, match="load a model first"):
        empty.add_click((1, 2, 3), 1)
    with pytest.raises(ValueError, match=r"lies outside the scan \(shape \(114, 114, 61\)"):
        session.add_click((200, 5, 5), 1)
    with pytest.raises(ValueError, match=r"lies outside the axial view \(400 x 400 pixels\)"):
        session.click_view("axial", 400, 10, "positive")
    with pytest.raises(ValueError, match="the first click must be positive"):
        session.add_click(lesion_centre(label), 0)
    with pytest.raises(ValueError, match="click mode must be one of"):
        session.click_view("axial", 1, 1, "sideways")
    with pytest.raises(ValueError, match="view must be one of"):
        session.click_view("oblique", 1, 1, "positive")
    with pytest.raises(ValueError, match="nothing to save yet"):
        session.save_mask()
    assert session.clicks == () and model.encodings == 0
    session.add_click(lesion_centre(label), 1)
    # A negative click far from every positive one falls in no patch: said so, not silently ignored.
    assert "in no patch of a positive click, so it was not used" in session.add_click((0, 0, 0), 0)


@pytest.mark.parametrize(
    "name, message",
    [
        ("no/such/folder/here", "no such folder, and not a Hub id"),
        ("", "give a model"),
    ],
)
def test_model_errors(name, message):
    with pytest.raises(ValueError, match=message):
        load_model(name)


def test_prompt_free_model_is_refused_with_the_reason(tmp_path):
    """A prompt-free model (the official automatic one) takes no clicks: the app says so at load, not at the first
    click."""
    model = Sam3DForPromptableSegmentation(Sam3DConfig(**{**TINY, "use_prompt_encoder": False}))
    model.save_pretrained(tmp_path / "auto")
    with pytest.raises(ValueError, match=r"prompt-free .*sam3d evaluate --automatic"):
        load_model(str(tmp_path / "auto"), preset="kits21")


def test_model_folder_without_config_is_one_message(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"could not load .*empty"):
        load_model(str(tmp_path / "empty"))


# ----------------------------------------------------------------------------------------------------------------------
# Optional Gradio, the command and the example
# ----------------------------------------------------------------------------------------------------------------------
def run_python(code: str, **kwargs) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, **kwargs)


def test_importing_the_package_and_the_app_module_does_not_import_gradio():
    result = run_python("import sys, sam3d_hf, sam3d_hf.app, sam3d_hf.cli; print('gradio' in sys.modules)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_sam3d_app_without_gradio_says_how_to_install_it():
    code = "import sys; sys.modules['gradio'] = None; from sam3d_hf.cli import main; sys.exit(main(['app']))"
    result = run_python(code)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == ['sam3d app: error: the app needs Gradio: pip install "sam3d-hf[app]"'], result.stderr


def test_sam3d_app_help_is_complete(capsys):
    from sam3d_hf.cli import main

    with pytest.raises(SystemExit):
        main(["app", "--help"])
    out = capsys.readouterr().out
    for option in ("--model", "--adapter", "--preset", "--host", "--port", "--share"):
        assert option in out
    assert "usage: sam3d app " in out


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app on localhost, serving the ball model (default, slow encoder) and a tiny Sam3D folder by name."""
    pytest.importorskip("gradio")
    from sam3d_hf.app import build_app

    folder = tmp_path_factory.mktemp("models") / "tiny"
    save_tiny_model(folder)
    model, processor = ball_model(delay=1.0)
    page = build_app("ball", models={"ball": (model, processor)}, display_size=300)
    page.queue()
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}/", "tiny": str(folder), "model": model}
    page.close()


def outputs_of(result) -> dict:
    """The endpoints' outputs by name. gradio_client returns them in order, without the session state and the two
    buttons; a slider comes as its update (`{"value": position, "maximum": ...}`)."""
    names = ["axial", "coronal", "sagittal", "axial_slice", "coronal_slice", "sagittal_slice", "status", "cursor",
             "clicks"]  # fmt: skip
    assert len(result) == len(names), result
    return dict(zip(names, result))


def picture(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def test_gradio_client_flow(served, tmp_path):
    """The browser's flow through the API: load a case, click the lesion (the encoder message first), a second
    click on the cached patch, undo and redo (the same pictures again), save the mask, errors as messages."""
    from gradio_client import Client

    client = Client(served["url"], verbose=False)
    image, label = generate_case(7, orientation="oblique", num_lesions=1)
    target = lesion_centre(np.asarray(label.dataobj))
    loaded = outputs_of(client.predict(7, "oblique", 1, api_name="/load_generated"))
    assert "loaded **synthetic_seed7.nii.gz**" in loaded["status"]
    assert f"voxel (i, j, k) = {target}" in loaded["cursor"]
    assert all(red_pixels(picture(loaded[view])) == 0 for view in VIEWS)

    job = client.submit(", ".join(map(str, target)), "voxel", "positive", api_name="/click_voxel")
    first = outputs_of(job.result())
    steps = [outputs_of(step)["status"] for step in job.outputs()]
    assert "Encoding a new 32×32×32 patch" in steps[0] and "a minute or more for ViT-B on a CPU" in steps[0]
    assert "ran the encoder" in first["status"]
    assert all(red_pixels(picture(first[view])) > 20 for view in VIEWS)
    assert first["clicks"]["data"][0][:5] == [1, "+", *target]

    second = outputs_of(client.predict("axial", 0, 0, "move cursor", api_name="/click_view"))
    assert "voxel (i, j, k)" in second["cursor"] and len(second["clicks"]["data"]) == 1
    near = (target[0] + 1, target[1], target[2])
    second = outputs_of(client.predict(", ".join(map(str, near)), "voxel", "positive", api_name="/click_voxel"))
    assert "cached patch" in second["status"]
    undone = outputs_of(client.predict(api_name="/undo"))
    redone = outputs_of(client.predict(api_name="/redo"))
    assert "undone" in undone["status"] and "redone" in redone["status"]
    assert len(undone["clicks"]["data"]) == 1 and len(redone["clicks"]["data"]) == 2

    status, saved = client.predict(api_name="/save_mask")
    assert "saved **synthetic_seed7_sam3d_mask.nii.gz**" in status
    mask_image = nib.load(saved)
    assert mask_image.shape == image.shape
    np.testing.assert_allclose(mask_image.affine, image.affine, atol=1e-6)
    assert (np.asarray(mask_image.dataobj).astype(bool) & (np.asarray(label.dataobj) == 2)).sum() > 100

    outside = outputs_of(client.predict("axial", 5000, 3, "positive", api_name="/click_view"))
    assert "**Error:** the click at pixel (5000.0, 3.0) lies outside the axial view" in outside["status"]
    outside = outputs_of(client.predict("999, 1, 1", "voxel", "positive", api_name="/click_voxel"))
    assert "lies outside the scan" in outside["status"] and len(outside["clicks"]["data"]) == 2
    world = outputs_of(client.predict("1e6, 0, 0", "world", "positive", api_name="/click_voxel"))
    assert "lies outside the scan" in world["status"]
    from gradio_client import handle_file

    png = write_png(tmp_path / "picture.png")
    refused = outputs_of(client.predict(handle_file(str(png)), api_name="/load_scan"))
    assert (
        "**Error:** picture.png could not be read as a scan" in refused["status"]
        and len(refused["clicks"]["data"]) == 2
    )
    assert "cached patch" in outputs_of(client.predict(", ".join(map(str, target)), "voxel", "positive",
                                                       api_name="/click_voxel"))["status"]  # fmt: skip


def test_gradio_client_model_errors_and_sessions(served):
    from gradio_client import Client

    client = Client(served["url"], verbose=False)
    bad = outputs_of(client.predict("no/such/folder/x", "", "", api_name="/load_model"))
    assert "**Error:** model 'no/such/folder/x': no such folder" in bad["status"]
    tiny = outputs_of(client.predict(served["tiny"], "", "", api_name="/load_model"))
    assert "Error" not in tiny["status"] and "positive clicks only" in tiny["status"]
    client.predict(4, "RAS", 1, api_name="/load_generated")
    _, label = generate_case(4, orientation="RAS", num_lesions=1)
    target = ", ".join(map(str, lesion_centre(np.asarray(label.dataobj))))
    assert (
        "ran the encoder" in outputs_of(client.predict(target, "voxel", "positive", api_name="/click_voxel"))["status"]
    )
    refused = outputs_of(client.predict(target, "voxel", "negative", api_name="/click_voxel"))
    assert "**Error:** this model takes no negative clicks" in refused["status"]
    # Another client is another session: no scan there.
    other = outputs_of(Client(served["url"], verbose=False).predict("1, 2, 3", "voxel", "positive",
                                                                    api_name="/click_voxel"))  # fmt: skip
    assert "load a scan first" in other["status"]


def test_sam3d_app_command_serves_the_api(tmp_path):
    """`sam3d app --model FOLDER --port P` in its own process, driven through gradio_client."""
    pytest.importorskip("gradio")
    from gradio_client import Client

    folder = tmp_path / "tiny"
    save_tiny_model(folder)
    port = free_port()
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "sam3d_hf.cli", "app", "--model", str(folder), "--port", str(port)]
    server = subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + 180
        while True:
            try:
                client = Client(url, verbose=False)
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"sam3d app did not serve {url}:\n{server.stdout.read()}") from None
                time.sleep(1)
        loaded = outputs_of(client.predict(3, "permuted", 1, api_name="/load_generated"))
        assert "loaded **synthetic_seed3.nii.gz**" in loaded["status"]
        _, label = generate_case(3, orientation="permuted", num_lesions=1)
        target = ", ".join(map(str, lesion_centre(np.asarray(label.dataobj))))
        clicked = outputs_of(client.predict(target, "voxel", "positive", api_name="/click_voxel"))
        assert "ran the encoder" in clicked["status"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_example_app_builds_from_its_environment(tmp_path, monkeypatch):
    pytest.importorskip("gradio")
    import gradio as gr

    folder = tmp_path / "tiny"
    save_tiny_model(folder)
    monkeypatch.setenv("SAM3D_MODEL", str(folder))
    import importlib.util

    spec = importlib.util.spec_from_file_location("sam3d_example_app", REPOSITORY / "examples" / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert isinstance(module.demo, gr.Blocks)
    requirements = (REPOSITORY / "examples" / "app_requirements.txt").read_text()
    assert "sam3d-hf[app]" in requirements.splitlines()


def test_the_page_stays_responsive_while_the_encoder_runs(served):
    """A slider move is served while a click's encoding is still running (in the same session)."""
    from gradio_client import Client

    client = Client(served["url"], verbose=False)
    client.predict(11, "RAS", 1, api_name="/load_generated")
    _, label = generate_case(11, orientation="RAS", num_lesions=1)
    served["model"].delay = 6.0
    try:
        started = time.monotonic()
        job = client.submit(", ".join(map(str, lesion_centre(np.asarray(label.dataobj)))), "voxel", "positive",
                            api_name="/click_voxel")  # fmt: skip
        time.sleep(1.0)
        moved = outputs_of(client.predict("coronal", 3, api_name="/set_slice"))
        assert not job.done() and time.monotonic() - started < 6.0  # answered during the encoding
        assert moved["coronal_slice"]["value"] == 3
        assert "ran the encoder" in outputs_of(job.result())["status"]
    finally:
        served["model"].delay = 1.0


def test_a_failed_load_changes_nothing(tmp_path):
    session, _, label = ball_session(tmp_path)
    target = lesion_centre(label)
    session.add_click(target, 1)
    scan, predictor, mask = session.scan, session.predictor, session.mask.copy()
    with pytest.raises(ValueError, match="no such folder"):
        session.set_model("no/such/folder/x")
    fresh = AppSession(ModelStore(), ("no/such/folder/x", None, None), workdir=tmp_path)
    with pytest.raises(ValueError, match="no such folder"):
        fresh.set_scan(scan)  # the default model does not load: no scan without its predictor
    assert fresh.scan is None and fresh.predictor is None
    assert session.scan is scan and session.predictor is predictor and len(session.clicks) == 1
    np.testing.assert_array_equal(session.mask, mask)
