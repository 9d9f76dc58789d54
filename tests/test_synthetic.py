"""The synthetic CT generator: determinism, Hounsfield ranges, labels where the lesions are, honoured orientation."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from sam3d_hf import compute_intensity_statistics
from sam3d_hf.synthetic import SYNTHETIC_PROCESSOR_KWARGS, case_seed, generate_case, generate_dataset


def _arrays(seed, **kwargs):
    image, label = generate_case(seed, **kwargs)
    return np.asarray(image.dataobj), np.asarray(label.dataobj), image.affine


def test_same_seed_gives_byte_identical_arrays_and_other_seeds_differ():
    image_a, label_a, affine_a = _arrays(3)
    image_b, label_b, affine_b = _arrays(3)
    assert image_a.tobytes() == image_b.tobytes() and label_a.tobytes() == label_b.tobytes()
    assert affine_a.tobytes() == affine_b.tobytes()
    image_c, _, _ = _arrays(4)
    assert image_c.shape != image_a.shape or not np.array_equal(image_c, image_a)


def test_dataset_files_are_reproducible_and_msd_shaped(tmp_path):
    root_a = generate_dataset(tmp_path / "a", num_cases=3, seed=5)
    root_b = generate_dataset(tmp_path / "b", num_cases=3, seed=5)
    meta = json.loads((root_a / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "organ", "2": "tumour"}
    for entry in meta["training"]:
        for key in ("image", "label"):
            a, b = nib.load(root_a / entry[key]), nib.load(root_b / entry[key])
            assert np.asarray(a.dataobj).tobytes() == np.asarray(b.dataobj).tobytes()
        # case i is generate_case(case_seed(seed, i)), whatever num_cases is
    first = np.asarray(nib.load(root_a / meta["training"][0]["image"]).dataobj)
    assert np.array_equal(first, _arrays(case_seed(5, 0))[0])
    assert not list(tmp_path.rglob(".tmp-*")), "temporary files left behind"


def test_hounsfield_ranges_and_lesions_are_where_the_label_says():
    checked = 0
    for seed in range(6):
        image, label, lesions = generate_case(seed, num_lesions=2, return_lesions=True)
        data, lab = np.asarray(image.dataobj).astype(np.float64), np.asarray(label.dataobj)
        assert image.get_data_dtype() == np.int16 and lab.dtype == np.uint8
        assert set(np.unique(lab)) <= {0, 1, 2}
        assert data.min() >= -1024 and data.max() <= 3071
        corners = data[[0, -1]][:, [0, -1]][:, :, [0, -1]]  # the eight corner voxels: air
        assert np.all(np.abs(corners + 1000) < 80)
        organ_hu = lesions[0]["organ_hu"]
        # Organ voxels away from the lesions (eroded, so blur does not bias the mean) have the organ's HU.
        organ_core = ndimage.binary_erosion(lab == 1, iterations=2) & ~ndimage.binary_dilation(lab == 2, iterations=3)
        assert abs(data[organ_core].mean() - organ_hu) < 5
        components, count = ndimage.label(lab == 2)
        assert count == len(lesions)
        for k in range(1, count + 1):
            core = ndimage.binary_erosion(components == k)
            centroid = nib.affines.apply_affine(image.affine, np.argwhere(components == k)).mean(0)
            lesion = min(lesions, key=lambda les: np.linalg.norm(centroid - np.asarray(les["center_world"])))
            assert 20 <= abs(lesion["hu"] - organ_hu) <= 50
            if core.sum() >= 20:
                assert abs(data[core].mean() - lesion["hu"]) < 8, (seed, k)
                checked += 1
    assert checked >= 6


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "permuted", "oblique"])
def test_affine_is_honoured_lesion_world_centroid_matches_the_stated_centre(orientation):
    """Centroid of each labelled lesion, taken to world mm through the file's affine (nibabel), vs the stated centre."""
    for seed in range(4):
        image, label, lesions = generate_case(seed, orientation=orientation, num_lesions=2, return_lesions=True)
        # round-trip through the NIfTI header, as a user would read it
        image = nib.Nifti1Image.from_bytes(image.to_bytes())
        lab = np.asarray(nib.Nifti1Image.from_bytes(label.to_bytes()).dataobj)
        components, count = ndimage.label(lab == 2)
        assert count == len(lesions) >= 1
        zooms = np.asarray(image.header.get_zooms())
        for k in range(1, count + 1):
            centroid = nib.affines.apply_affine(image.affine, np.argwhere(components == k)).mean(0)
            distances = [np.linalg.norm(centroid - np.asarray(les["center_world"])) for les in lesions]
            nearest = lesions[int(np.argmin(distances))]
            # irregular outlines shift the centroid by up to ~10 % of the diameter; the grid by half a voxel
            assert min(distances) < 0.1 * nearest["diameter_mm"] + zooms.max() / 2, (seed, distances)


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "permuted", "oblique"])
def test_spherical_lesion_centroid_is_within_a_fraction_of_a_voxel(orientation):
    """With round lesions the stored-voxel centroid of the label equals inv(affine) @ centre to < 0.3 voxel (a
    half-voxel shift of the grid, the classic off-by-half, fails)."""
    for seed in range(3):
        image, label, lesions = generate_case(
            seed, orientation=orientation, num_lesions=1, lesion_irregularity=0.0, return_lesions=True
        )
        voxels = np.argwhere(np.asarray(label.dataobj) == 2)
        expected = nib.affines.apply_affine(np.linalg.inv(image.affine), lesions[0]["center_world"])
        assert np.all(np.abs(voxels.mean(0) - expected) < 0.3), (seed, voxels.mean(0) - expected)


@pytest.mark.parametrize(
    ("orientation", "check"),
    [
        ("RAS", lambda codes, a: codes == ("R", "A", "S")),
        ("LPS", lambda codes, a: codes == ("L", "P", "S")),
        (
            "permuted",
            lambda codes, a: [next(w for w, p in enumerate(("RL", "AP", "SI")) if c in p) for c in codes] != [0, 1, 2],
        ),
        ("oblique", lambda codes, a: 5 <= _rotation_degrees(a) <= 15.01),
    ],
)
def test_orientation_and_anisotropic_spacing(orientation, check):
    for seed in range(5):
        image, _ = generate_case(seed, orientation=orientation)
        codes = nib.aff2axcodes(image.affine)
        assert check(codes, image.affine), (seed, codes)
        zooms = np.asarray(image.header.get_zooms())
        slice_axis = [c in "SI" for c in codes].index(True)
        assert 1.0 <= zooms[slice_axis] <= 5.0
        assert np.all((zooms[np.arange(3) != slice_axis] >= 0.6) & (zooms[np.arange(3) != slice_axis] <= 1.0))
        assert 16 <= image.shape[slice_axis] <= 64 and all(90 <= n <= 190 for n in np.delete(image.shape, slice_axis))
        assert int(image.header["sform_code"]) == 1 and int(image.header["qform_code"]) == 1


def _rotation_degrees(affine):
    """Angle between the oblique grid and the closest axis-aligned (RAS or LPS) grid."""
    direction = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    best = 180.0
    for base in (np.eye(3), np.diag([-1.0, -1.0, 1.0])):
        rotation = direction @ base.T
        best = min(best, np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1, 1))))
    return best


def test_twenty_case_set_has_cases_without_and_with_several_lesions_and_matching_statistics(tmp_path):
    root = generate_dataset(tmp_path, num_cases=20, seed=0)
    meta = json.loads((root / "dataset.json").read_text())
    counts = []
    for entry in meta["training"]:
        lab = np.asarray(nib.load(root / entry["label"]).dataobj)
        counts.append(ndimage.label(lab == 2)[1])
    assert 0 in counts and max(counts) >= 2
    stats = compute_intensity_statistics(
        [str(root / e["image"]) for e in meta["training"]], [str(root / e["label"]) for e in meta["training"]]
    )
    assert abs(stats["mean"] - SYNTHETIC_PROCESSOR_KWARGS["intensity_mean"]) < 5
    assert abs(stats["std"] - SYNTHETIC_PROCESSOR_KWARGS["intensity_std"]) < 5
    low, high = SYNTHETIC_PROCESSOR_KWARGS["window"]
    assert low < stats["window"][0] and stats["window"][1] < high


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_lesions"):
        generate_case(0, num_lesions=4)
    with pytest.raises(ValueError, match="orientation"):
        generate_case(0, orientation="RSA")
    with pytest.raises(ValueError, match="num_cases"):
        generate_dataset("/nonexistent-never-created", num_cases=0)
