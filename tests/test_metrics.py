"""Metrics and click simulation, checked against expectations derived independently of `sam3d_hf.metrics`: voxel
counts and the ball-lens volume for Dice, a hand count of marching-cubes surface elements for NSD, brute-force
distances for click positions."""

import math

import numpy as np
import pytest
import torch

from sam3d_hf.metrics import (
    correction_click,
    curve_auc,
    dice_score,
    evaluate_case,
    markdown_table,
    normalized_surface_dice,
    simulate_clicks,
    summarize,
    summarize_interactive,
)


def ball(shape, centre, radius_mm, spacing=(1.0, 1.0, 1.0)):
    grid = np.indices(shape).astype(np.float64)
    dist2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
    return dist2 <= radius_mm**2


def box(shape, lo, hi):
    mask = np.zeros(shape, dtype=bool)
    mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = True
    return mask


def brute_force_depth_mm(mask, spacing):
    """Per voxel of `mask`: Euclidean distance (mm) to the nearest voxel outside it, by checking every outside voxel
    (the masks used here stay off the array border, so the array's outside voxels are all there is)."""
    inside, outside = np.argwhere(mask) * spacing, np.argwhere(~mask) * spacing
    depth = np.empty(len(inside))
    for start in range(0, len(inside), 256):
        chunk = inside[start : start + 256]
        depth[start : start + 256] = np.sqrt(((chunk[:, None, :] - outside[None]) ** 2).sum(-1)).min(1)
    out = np.full(mask.shape, np.nan)
    out[mask] = depth
    return out


# ------------------------------------------------------------------------------------------------------------ Dice
def test_dice_of_two_offset_spheres():
    shape, radius, offset = (40, 40, 40), 10.0, 6.0
    a = ball(shape, (19, 19, 19), radius)
    b = ball(shape, (19 + offset, 19, 19), radius)
    # Exact: an explicit overlap count of the two voxel sets.
    expected = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
    assert dice_score(b, a) == pytest.approx(expected, abs=1e-12)
    # Continuous: two balls of radius R at distance d overlap in a lens of volume pi (4R + d)(2R - d)^2 / 12, so
    # Dice = lens / ball volume; a 10-voxel radius sampled on the grid lands within 2 %.
    lens = math.pi * (4 * radius + offset) * (2 * radius - offset) ** 2 / 12
    assert dice_score(b, a) == pytest.approx(lens / (4 / 3 * math.pi * radius**3), abs=0.02)
    # Torch uint8 masks (what Sam3DProcessor.post_process_masks returns) give the same.
    assert dice_score(torch.from_numpy(b.astype(np.uint8)), a) == pytest.approx(expected, abs=1e-12)


# ------------------------------------------------------------------------------------------------------------- NSD
def shifted_box_nsd_by_hand(n, k, spacing, tolerance):
    """NSD of a box of `n = (nx, ny, nz)` voxels and the same box shifted by `k` voxels along axis 2.

    MONAI's `use_subvoxels=True` (DeepMind's definition) puts the surface elements on the vertices *between* voxels
    (one per 2x2x2 neighbourhood with mixed content) and weights each by the area of its marching-cubes patch. For a
    box of n voxels per side the vertices form the boundary of an (n+1)^3 lattice, and with spacing (a, b, c):
      * a face vertex (4 of its 8 voxels inside) is a flat patch: area a*b on the faces normal to axis 2, etc.;
      * an edge vertex (2 inside, along the edge) is a chamfer strip: along axis 0 its area is a * sqrt(b^2 + c^2) / 2;
      * a corner vertex (1 inside) is a triangle through three edge midpoints: |(bc, ac, ab)| / 8.
    Distances go between vertex positions in mm. With the prediction k voxels higher along axis 2 (c mm apart):
      * side vertices (and vertical edges) at height z >= k also lie on the prediction's sides: distance 0; below,
        the nearest predicted vertex is straight above: (k - z) * c;
      * the bottom cap (face, rim edges, corners) is k*c below the prediction's bottom;
      * the top rim (edges and corners) lies on the prediction's sides: 0; an inner top-face vertex is
        min(k*c, (nz - k)*c, in-plane distance to the side walls) from the prediction's surface.
    Shifting back maps the prediction onto the label, so both surfaces score the same and NSD = correct / total on
    the label's surface. Ties (distance == tolerance) count as correct, as in MONAI and DeepMind.
    """
    nx, ny, nz = n
    a, b, c = spacing
    face_xy, face_xz, face_yz = a * b, a * c, b * c
    edge_x, edge_y, edge_z = a * math.hypot(b, c) / 2, b * math.hypot(a, c) / 2, c * math.hypot(a, b) / 2
    corner = math.sqrt((b * c) ** 2 + (a * c) ** 2 + (a * b) ** 2) / 8
    ring = 2 * (nx - 1) * face_xz + 2 * (ny - 1) * face_yz + 4 * edge_z  # one height level of the sides
    cap_face = (nx - 1) * (ny - 1) * face_xy
    cap_rim = 2 * (nx - 1) * edge_x + 2 * (ny - 1) * edge_y + 4 * corner
    total = 2 * (cap_face + cap_rim) + (nz - 1) * ring
    correct = cap_rim  # the top rim
    correct += sum(ring for z in range(1, nz) if max(k - z, 0) * c <= tolerance)
    if k * c <= tolerance:
        correct += cap_face + cap_rim  # the bottom cap
    top_inner = [
        min(k * c, (nz - k) * c, x * a, (nx - x) * a, y * b, (ny - y) * b) for x in range(1, nx) for y in range(1, ny)
    ]
    correct += face_xy * sum(d <= tolerance for d in top_inner)
    return correct / total


# A box of 40 x 20 x 7 voxels = 20 x 20 x 21 mm at (0.5, 1, 3) mm, shifted by 2 voxels (6 mm) along the 3 mm axis.
SHAPE, LO, HI, SHIFT = (48, 28, 14), (4, 4, 2), (44, 24, 9), 2


@pytest.mark.parametrize(
    "spacing, tolerance",
    [((0.5, 1.0, 3.0), 1.0), ((0.5, 1.0, 3.0), 5.0), ((1.0, 1.0, 1.0), 1.0), ((1.0, 0.5, 2.0), 2.5)],
)
def test_nsd_of_a_shifted_box_matches_the_hand_count(spacing, tolerance):
    label = box(SHAPE, LO, HI)
    prediction = box(SHAPE, (LO[0], LO[1], LO[2] + SHIFT), (HI[0], HI[1], HI[2] + SHIFT))
    expected = shifted_box_nsd_by_hand(np.subtract(HI, LO), SHIFT, spacing, tolerance)
    assert 0.3 < expected < 0.8  # a value the tolerance and spacing decide, not a trivial 0 or 1
    assert normalized_surface_dice(prediction, label, spacing, tolerance) == pytest.approx(expected, rel=1e-5)
    assert evaluate_case(prediction, label, spacing, tolerance_mm=tolerance)["nsd"] == pytest.approx(expected, rel=1e-5)


def test_nsd_depends_on_spacing_and_tolerance_in_mm():
    label = box(SHAPE, LO, HI)
    prediction = box(SHAPE, (LO[0], LO[1], LO[2] + SHIFT), (HI[0], HI[1], HI[2] + SHIFT))
    n = np.subtract(HI, LO)
    # Same masks: 6 mm apart at 3 mm slices (about 0.57 at 1 mm, 0.76 at 5 mm), 2 mm apart at 1 mm voxels (about
    # 0.38 at 1 mm, and every element within 5 mm).
    values = {}
    for spacing in ((0.5, 1.0, 3.0), (1.0, 1.0, 1.0)):
        for tolerance in (1.0, 5.0):
            values[spacing, tolerance] = normalized_surface_dice(prediction, label, spacing, tolerance)
            hand = shifted_box_nsd_by_hand(n, SHIFT, spacing, tolerance)
            assert values[spacing, tolerance] == pytest.approx(hand, rel=1e-5)
    assert values[(1.0, 1.0, 1.0), 5.0] == 1.0
    assert len({round(v, 4) for v in values.values()}) == 4
    # Transposing the masks together with the spacing is the same geometry.
    transposed = normalized_surface_dice(prediction.transpose(2, 0, 1), label.transpose(2, 0, 1), (3.0, 0.5, 1.0), 1.0)
    assert transposed == pytest.approx(values[(0.5, 1.0, 3.0), 1.0], rel=1e-5)


def test_empty_masks():
    empty, full = np.zeros((8, 9, 10), bool), box((8, 9, 10), (2, 2, 2), (6, 6, 6))
    both = evaluate_case(empty, empty, (1, 1, 1))
    assert (both["dice"], both["nsd"], both["lesions"], both["voxels"]) == (1.0, 1.0, [], 0)
    missed = evaluate_case(empty, full, (1, 1, 1))
    assert (missed["dice"], missed["nsd"]) == (0.0, 0.0)
    assert missed["lesions"] == [
        {"lesion": 1, "voxels": 64, "volume_mm3": 64.0, "detected": False, "dice": 0.0, "nsd": 0.0}
    ]
    spurious = evaluate_case(full, empty, (1, 1, 1))
    assert (spurious["dice"], spurious["nsd"], spurious["lesions"]) == (0.0, 0.0, [])


# ------------------------------------------------------------------------------------------------------ per lesion
@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (1.0, 1.0, 2.0)])
def test_per_lesion_scores_use_the_neighbourhood_prediction(spacing):
    shape = (34, 34, 26)
    a = box(shape, (4, 4, 4), (10, 10, 10))  # predicted exactly
    b = box(shape, (4, 20, 4), (10, 26, 10))  # predicted 2 voxels higher along axis 2
    c = box(shape, (20, 4, 4), (24, 8, 8))  # a prediction beside it, 3 voxels (3 mm or 6 mm) away, no overlap
    d = box(shape, (20, 20, 14), (23, 23, 17))  # nothing predicted near it
    e = np.zeros(shape, bool)
    e[28, 10, 20] = e[29, 11, 21] = True  # two voxels touching at a corner: one lesion under 26-connectivity
    label = a | b | c | d | e
    b_pred = box(shape, (4, 20, 6), (10, 26, 12))
    c_pred = box(shape, (20, 4, 10), (24, 8, 14))
    far_false_positive = box(shape, (28, 26, 2), (32, 30, 6))
    prediction = a | b_pred | c_pred | far_false_positive

    record = evaluate_case(prediction, label, spacing, tolerance_mm=5.0, lesion_margin_mm=5.0)
    # The case score sees every voxel, the far false positive included.
    counts = np.count_nonzero(prediction & label), np.count_nonzero(prediction), np.count_nonzero(label)
    assert record["dice"] == pytest.approx(2 * counts[0] / (counts[1] + counts[2]), abs=1e-12)
    assert record["volume_mm3"] == pytest.approx(counts[2] * np.prod(spacing))
    lesions = {les["voxels"]: les for les in record["lesions"]}
    assert sorted(les["voxels"] for les in record["lesions"]) == [2, 27, 64, 216, 216]
    first, second = (les for les in record["lesions"] if les["voxels"] == 216)  # scipy labels in scan order: a, b
    assert (first["dice"], first["nsd"], first["detected"]) == (1.0, 1.0, True)
    assert second["dice"] == pytest.approx(2 * 6 * 6 * 4 / (2 * 216), abs=1e-12)
    assert second["nsd"] == pytest.approx(shifted_box_nsd_by_hand((6, 6, 6), 2, spacing, 5.0), rel=1e-5)
    # Lesion c: its neighbour prediction is 3 mm away at 1 mm slices (inside the 5 mm margin), 6 mm at 2 mm slices.
    assert lesions[64]["detected"] is (spacing[2] == 1.0)
    assert lesions[64]["dice"] == 0.0
    assert lesions[27]["detected"] is False and (lesions[27]["dice"], lesions[27]["nsd"]) == (0.0, 0.0)
    assert lesions[2]["volume_mm3"] == pytest.approx(2 * np.prod(spacing))


def test_lesion_margin_selects_prediction_components():
    label = box((30, 30, 30), (5, 5, 5), (10, 10, 10))
    beside = box((30, 30, 30), (5, 5, 12), (10, 10, 17))  # first slice 3 slices (3 mm) after the lesion's last
    prediction = label | beside
    near = evaluate_case(prediction, label, (1, 1, 1), lesion_margin_mm=3.0)["lesions"][0]
    # Within 3 mm: the neighbouring component counts against the lesion (it doubles the predicted volume).
    assert near["dice"] == pytest.approx(2 * 125 / (250 + 125))
    far = evaluate_case(prediction, label, (1, 1, 1), lesion_margin_mm=2.9)["lesions"][0]
    assert (far["dice"], far["nsd"]) == (1.0, 1.0)


def test_lesion_ignores_components_outside_its_margin_even_when_nearby_in_the_box():
    shape = (30, 16, 20)
    label = box(shape, (5, 5, 5), (10, 10, 10))  # 125 voxels, predicted exactly
    bar = box(shape, (5, 5, 12), (25, 10, 14))  # 200 voxels, 3 mm above the lesion: in its neighbourhood
    blob = box(shape, (20, 5, 5), (24, 10, 10))  # 100 voxels, 10 mm from the lesion, inside the bar's bounding box
    lesion = evaluate_case(label | bar | blob, label, (1, 1, 1), lesion_margin_mm=3.0)["lesions"][0]
    assert lesion["dice"] == pytest.approx(2 * 125 / (125 + 125 + 200))


# ---------------------------------------------------------------------------------------------------------- clicks
def two_lesions():
    label = box((30, 30, 30), (2, 2, 2), (10, 10, 10))  # 512 voxels
    label |= box((30, 30, 30), (20, 20, 20), (24, 24, 24))  # 64 voxels
    return label


@pytest.mark.parametrize("num_clicks", [1, 3, 10])
def test_uniform_clicks_lie_in_the_target(num_clicks):
    label = two_lesions()
    points, labels = simulate_clicks(label, "uniform", num_clicks, seed=7)
    assert points.shape == (num_clicks, 3) and points.dtype == np.float64
    assert labels.tolist() == [1] * num_clicks
    assert np.array_equal(points, np.round(points))
    assert label[tuple(points.astype(int).T)].all()


def test_uniform_clicks_are_uniform_over_voxels_not_lesions():
    label = two_lesions()
    points, _ = simulate_clicks(label, "uniform", 4000, seed=1)
    in_big = np.mean(points[:, 0] < 15)
    assert in_big == pytest.approx(512 / 576, abs=0.03)  # binomial std 0.005; per-lesion sampling would give 0.5


def test_per_lesion_clicks_hit_every_lesion():
    shape = (40, 40, 12)
    sizes = {}
    label = np.zeros(shape, bool)
    for index, (lo, side) in enumerate([((2, 2, 2), 6), ((2, 20, 2), 3), ((20, 2, 2), 5), ((25, 25, 2), 2)]):
        lesion = box(shape, lo, np.add(lo, side))
        label |= lesion
        sizes[index] = lesion
    voxels = {i: int(m.sum()) for i, m in sizes.items()}  # 216, 27, 125, 8

    def lesions_hit(points):
        return [i for p in points.astype(int) for i, m in sizes.items() if m[tuple(p)]]

    ten, _ = simulate_clicks(label, "per_lesion", 10, seed=3)
    assert sorted(set(lesions_hit(ten))) == [0, 1, 2, 3] and len(lesions_hit(ten)) == 10
    four, _ = simulate_clicks(label, "per_lesion", 4, seed=3)
    assert sorted(lesions_hit(four)) == [0, 1, 2, 3]
    two, _ = simulate_clicks(label, "per_lesion", 2, seed=3)
    largest_two = sorted(sorted(voxels, key=voxels.get)[-2:])
    assert sorted(lesions_hit(two)) == largest_two == [0, 2]
    # The plain protocol with 10 clicks misses the 8-voxel lesion for some seed; per lesion never does.
    misses = [3 not in lesions_hit(simulate_clicks(label, "uniform", 10, seed=s)[0]) for s in range(20)]
    assert any(misses)


@pytest.mark.parametrize("protocol", ["uniform", "per_lesion", "center", "marginal"])
def test_clicks_are_seeded_and_leave_global_state_alone(protocol):
    label = ball((30, 30, 30), (15, 15, 15), 10.0) | box((30, 30, 30), (1, 1, 1), (4, 4, 4))
    np.random.seed(0)
    state = np.random.get_state()[1].copy()
    first, _ = simulate_clicks(label, protocol, 10, seed=11, spacing=(1, 1, 1))
    assert np.array_equal(np.random.get_state()[1], state)  # the global generator was not advanced
    np.random.seed(123)
    again, _ = simulate_clicks(label, protocol, 10, seed=11, spacing=(1, 1, 1))
    other, _ = simulate_clicks(label, protocol, 10, seed=12, spacing=(1, 1, 1))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_position_protocols_follow_the_depth_in_mm():
    spacing = np.array([1.0, 1.0, 2.5])
    shape = (26, 26, 14)
    lesion = ball(shape, (12, 12, 6.5), 9.0, spacing)  # a 9 mm sphere: about 9 voxels in-plane, 3.6 slices
    small = box(shape, (1, 1, 1), (3, 3, 3))
    label = lesion | small
    depth = brute_force_depth_mm(lesion, spacing)
    ratio = depth / np.nanmax(depth)
    bounds = {"center": (2 / 3, 1.0 + 1e-9), "surrounding": (1 / 3, 2 / 3), "marginal": (0.0, 1 / 3)}
    for protocol, (lo, hi) in bounds.items():
        points, labels = simulate_clicks(label, protocol, 300, seed=5, spacing=spacing)
        idx = tuple(points.astype(int).T)
        assert lesion[idx].all(), protocol  # in the largest lesion only
        r = ratio[idx]
        assert np.all((r >= lo - 1e-9) & (r < hi - 1e-9 if protocol != "center" else r <= hi)), protocol
        # Every voxel of the band is reachable: 300 draws cover it (the bands hold tens to hundreds of voxels).
        band = lesion & (ratio >= lo - 1e-9) & (ratio < hi)
        assert len({tuple(p) for p in points.astype(int)}) > min(50, band.sum() // 2), protocol
        assert labels.tolist() == [1] * 300


# ------------------------------------------------------------------------------------------------------ correction
def two_blob_component(shape, origin):
    """An error region whose deepest voxel in mm (spacing (1, 1, 3)) differs from its deepest voxel in voxels: blob A
    (7x7x7 voxels = 7x7x21 mm) is 4 voxels but only 4 mm deep; blob B (9x9x3 voxels = 9x9x9 mm) is 2 voxels but
    5 mm deep. A one-voxel bridge joins them."""
    x, y, z = origin
    comp = box(shape, (x, y, z), (x + 7, y + 7, z + 7))
    comp |= box(shape, (x + 9, y, z + 2), (x + 18, y + 9, z + 5))
    comp |= box(shape, (x + 7, y + 3, z + 3), (x + 9, y + 4, z + 4))
    return comp


def test_correction_click_is_positive_at_the_centre_of_the_largest_miss():
    spacing = np.array([1.0, 1.0, 3.0])
    shape = (40, 30, 16)
    label = box(shape, (2, 2, 2), (24, 14, 12))
    miss = two_blob_component(shape, (3, 3, 3))  # 343 + 243 + 2 voxels
    small_miss = box(shape, (20, 10, 9), (22, 12, 11))
    false_positive = box(shape, (28, 18, 4), (35, 25, 11))  # 343 voxels, fewer than the miss
    prediction = (label & ~miss & ~small_miss) | false_positive
    point, click_label = correction_click(label, prediction, spacing)
    assert click_label == 1
    depth = brute_force_depth_mm(miss, spacing)
    assert miss[tuple(point.astype(int))]
    assert depth[tuple(point.astype(int))] == pytest.approx(np.nanmax(depth)) == pytest.approx(5.0)
    assert point[0] >= 12  # blob B, the deeper one in mm


def test_correction_click_is_negative_in_the_largest_false_positive():
    spacing = (0.8, 0.8, 2.0)
    shape = (40, 30, 16)
    label = box(shape, (2, 2, 2), (14, 14, 10))
    false_positive = box(shape, (20, 5, 3), (31, 14, 12))  # 11 x 9 x 9 voxels
    small_false_positive = box(shape, (2, 20, 2), (5, 23, 5))
    miss = box(shape, (3, 3, 3), (6, 6, 6))
    prediction = (label & ~miss) | false_positive | small_false_positive
    point, click_label = correction_click(label, prediction, spacing)
    assert click_label == 0
    depth = brute_force_depth_mm(false_positive, np.array(spacing))
    assert false_positive[tuple(point.astype(int))]
    assert depth[tuple(point.astype(int))] == pytest.approx(np.nanmax(depth))


def test_correction_click_none_without_error():
    label = two_lesions()
    assert correction_click(label, label.copy(), (1, 1, 1)) is None
    empty = np.zeros((5, 5, 5), bool)
    assert correction_click(empty, empty, (1, 1, 1)) is None
    point, click_label = correction_click(label, np.zeros_like(label), (1, 1, 1))
    assert click_label == 1 and point[0] < 15  # everything missed: the larger lesion first


def _deepest_voxel(region, spacing):
    """The voxel of `region` farthest from its outside, by brute force; the regions below have a single one."""
    depth = brute_force_depth_mm(region, np.asarray(spacing, dtype=float))
    (deepest,) = np.argwhere(depth == np.nanmax(depth))
    return deepest


def test_correction_click_avoids_earlier_clicks_and_takes_the_next_largest_region():
    """Three error regions of distinct sizes (a 7³ miss, a 5³ false positive, a 3³ miss; odd cubes, so each has one
    deepest voxel): avoiding the largest region's centre gives the false positive's, avoiding both gives the small
    miss's, avoiding all three gives None; a click given off the voxel centre still counts as that voxel."""
    shape, spacing = (40, 30, 30), (1.0, 1.0, 1.0)
    label = box(shape, (2, 2, 2), (20, 20, 20))
    big_miss, small_miss = box(shape, (4, 4, 4), (11, 11, 11)), box(shape, (14, 14, 14), (17, 17, 17))
    false_positive = box(shape, (26, 10, 10), (31, 15, 15))
    prediction = (label & ~big_miss & ~small_miss) | false_positive
    centres = [_deepest_voxel(region, spacing) for region in (big_miss, false_positive, small_miss)]
    point, click_label = correction_click(label, prediction, spacing)
    np.testing.assert_array_equal(point, centres[0])
    assert click_label == 1
    assert correction_click(label, prediction, spacing, avoid=None)[0].tolist() == point.tolist()
    point, click_label = correction_click(label, prediction, spacing, avoid=[centres[0] + 0.3])
    np.testing.assert_array_equal(point, centres[1])
    assert click_label == 0
    point, click_label = correction_click(label, prediction, spacing, avoid=np.stack(centres[:2]) - 0.4)
    np.testing.assert_array_equal(point, centres[2])
    assert click_label == 1
    far = np.array([[0.0, 0.0, 0.0]])  # a click elsewhere changes nothing
    np.testing.assert_array_equal(correction_click(label, prediction, spacing, avoid=far)[0], centres[0])
    assert correction_click(label, prediction, spacing, avoid=np.stack(centres)) is None


def test_correction_click_avoid_keeps_the_tie_to_the_miss():
    """A miss and a false positive of the same size: the miss first; once its centre is avoided, the false positive;
    then a smaller miss below both."""
    shape, spacing = (40, 30, 30), (1.0, 1.0, 1.0)
    label = box(shape, (2, 2, 2), (12, 12, 12)) | box(shape, (2, 20, 2), (9, 27, 9))
    miss, tiny_miss = box(shape, (4, 4, 4), (9, 9, 9)), box(shape, (4, 22, 4), (7, 25, 7))
    false_positive = box(shape, (26, 10, 10), (31, 15, 15))  # 5³, as the miss
    prediction = (label & ~miss & ~tiny_miss) | false_positive
    order = [(_deepest_voxel(region, spacing), value) for region, value in ((miss, 1), (false_positive, 0))]
    order.append((_deepest_voxel(tiny_miss, spacing), 1))
    given = np.zeros((0, 3))
    for centre, value in order:
        point, click_label = correction_click(label, prediction, spacing, avoid=given)
        np.testing.assert_array_equal(point, centre)
        assert click_label == value
        given = np.vstack([given, point])
    assert correction_click(label, prediction, spacing, avoid=given) is None


def test_curve_auc_is_the_trapezoid_over_rounds():
    rng = np.random.default_rng(3)
    for length in (2, 5, 6):
        values = rng.random(length)
        assert curve_auc(values) == pytest.approx(np.trapezoid(values, x=np.arange(length)), abs=1e-12)
    assert curve_auc([1.0] * 6) == pytest.approx(5.0)  # at most R = 5 for 6 rounds
    with pytest.raises(ValueError, match=r"one score per round.*R >= 1.*shape \(1,\)"):
        curve_auc([0.5])


def test_summarize_interactive_means_areas_and_repeats():
    rng = np.random.default_rng(4)
    records = [
        {**{m: rng.random(4).tolist() for m in ("dice", "nsd", "nsd_2mm")}, "corrections": 3, "repeated_corrections": r}
        for r in (0, 2, 1)
    ]
    block = summarize_interactive(records, tolerance_mm=5.0)
    assert block["rounds"] == block["auc_max"] == 3 and block["n_cases"] == 3
    assert (block["corrections"], block["repeated_corrections"]) == (9, 3)
    assert (block["nsd_tolerance_mm"], block["nsd_2mm_tolerance_mm"]) == (5.0, 2.0)
    for metric in ("dice", "nsd", "nsd_2mm"):
        curves = np.array([r[metric] for r in records])
        np.testing.assert_allclose(block[f"{metric}_per_round"], curves.mean(0), atol=1e-12)
        areas = [np.trapezoid(c) for c in curves]
        assert block[f"{metric}_auc_mean"] == pytest.approx(np.mean(areas), abs=1e-12)
        assert block[f"{metric}_auc_std"] == pytest.approx(np.std(areas, ddof=1), abs=1e-12)
        assert block[f"{metric}_final_mean"] == pytest.approx(curves[:, -1].mean(), abs=1e-12)
    with pytest.raises(ValueError, match=r"same R >= 1.*lengths \[3, 4\]"):
        summarize_interactive([records[0], {**records[1], "nsd": [0.1, 0.2, 0.3]}], tolerance_mm=5.0)


# ---------------------------------------------------------------------------------------------------------- report
def test_summarize_and_markdown_table():
    rng = np.random.default_rng(0)
    values = {}
    records = []
    for dataset in ("kits", "lits"):
        for num_clicks, rounds in ((1, 0), (10, 0), (1, 2)):
            dice, nsd = rng.uniform(0.3, 0.9, 4), rng.uniform(0.3, 0.9, 4)
            values[dataset, num_clicks, rounds] = (dice, nsd)
            for d, n in zip(dice, nsd):
                lesion = {"dice": d / 2, "nsd": n / 2}
                records.append(
                    {"dice": d, "nsd": n, "num_clicks": num_clicks, "round": rounds, "dataset": dataset,
                     "lesions": [lesion, lesion]}
                )  # fmt: skip
    records.append({"dice": 0.5, "nsd": 0.25, "num_clicks": 1, "protocol": "center", "dataset": "kits"})
    records.append({"dice": 0.4, "nsd": 0.3, "num_clicks": 0, "protocol": "automatic", "dataset": "lits"})
    summary = summarize(records)
    assert list(summary) == [
        "3DSAM-adapter, 1 click (uniform)",
        "3DSAM-adapter, 1 click (uniform) + 2 corrections",
        "3DSAM-adapter, 10 clicks (uniform)",
        "3DSAM-adapter, 1 click (center)",
        "3DSAM-adapter, automatic (sliding window)",
    ]
    automatic = summary["3DSAM-adapter, automatic (sliding window)"]
    assert list(automatic) == ["lits"] and (automatic["lits"]["dice_mean"], automatic["lits"]["n"]) == (0.4, 1)
    cell = summary["3DSAM-adapter, 10 clicks (uniform)"]["lits"]
    dice, nsd = values["lits", 10, 0]
    assert cell["dice_mean"] == pytest.approx(np.mean(dice)) and cell["nsd_mean"] == pytest.approx(np.mean(nsd))
    assert cell["dice_std"] == pytest.approx(np.std(dice, ddof=1)) and cell["nsd_std"] == pytest.approx(
        np.std(nsd, ddof=1)
    )
    assert (cell["n"], cell["n_lesions"]) == (4, 8)
    assert cell["lesion_dice_mean"] == pytest.approx(np.mean(dice) / 2)
    single = summary["3DSAM-adapter, 1 click (center)"]
    assert list(single) == ["kits"] and single["kits"]["n"] == 1 and math.isnan(single["kits"]["dice_std"])

    table = markdown_table(summary).splitlines()
    assert table[0] == "| Method | kits Dice (%) | kits NSD (%) | lits Dice (%) | lits NSD (%) | n |"
    dice_k, nsd_k = values["kits", 1, 2]
    row = next(line for line in table if "+ 2 corrections" in line)
    assert f"{100 * np.mean(dice_k):.2f} ± {100 * np.std(dice_k, ddof=1):.2f}" in row
    assert f"{100 * np.mean(nsd_k):.2f} ± {100 * np.std(nsd_k, ddof=1):.2f}" in row
    assert row.endswith("| 4/4 |")
    assert table[-2] == "| 3DSAM-adapter, 1 click (center) | 50.00 | 25.00 | – | – | 1/0 |"
    assert table[-1] == "| 3DSAM-adapter, automatic (sliding window) | – | – | 40.00 | 30.00 | 0/1 |"


# ---------------------------------------------------------------------------------------------------------- errors
def test_errors_name_the_problem():
    mask = box((6, 6, 6), (1, 1, 1), (4, 4, 4))
    with pytest.raises(ValueError, match=r"same shape.*stored axis order"):
        evaluate_case(mask, mask[:5], (1, 1, 1))
    with pytest.raises(ValueError, match=r"binary.*\[2\].*label == 2"):
        evaluate_case(mask, mask.astype(int) * 2, (1, 1, 1))
    with pytest.raises(ValueError, match=r"3D mask.*mask\[0, 0\]"):
        dice_score(mask[None], mask[None])
    with pytest.raises(TypeError, match="dtype"):
        dice_score(mask.astype(str), mask)
    with pytest.raises(ValueError, match=r"3 voxel sizes.*\(s, s, s\)"):
        normalized_surface_dice(mask, mask, 1.0)
    with pytest.raises(ValueError, match=r"> 0 mm"):
        evaluate_case(mask, mask, (1, 0, 1))
    with pytest.raises(ValueError, match="tolerance_mm"):
        evaluate_case(mask, mask, (1, 1, 1), tolerance_mm=-1)
    with pytest.raises(ValueError, match=r"protocol.*one of"):
        simulate_clicks(mask, "random", 1)
    with pytest.raises(ValueError, match=r"num_clicks.*1, 3, 10"):
        simulate_clicks(mask, "uniform", 0)
    with pytest.raises(TypeError, match="seed"):
        simulate_clicks(mask, "uniform", 1, seed=1.5)
    with pytest.raises(ValueError, match=r"empty.*no target"):
        simulate_clicks(np.zeros((4, 4, 4)), "uniform", 1)
    with pytest.raises(ValueError, match="pass `spacing`"):
        simulate_clicks(mask, "center", 1)
    single = np.zeros((5, 5, 5), bool)
    single[2, 2, 2] = True
    with pytest.raises(ValueError, match=r"'marginal' region.*too small.*uniform"):
        simulate_clicks(single, "marginal", 1, spacing=(1, 1, 1))
    with pytest.raises(ValueError, match="same shape"):
        correction_click(mask, mask[:, :5], (1, 1, 1))
    with pytest.raises(ValueError, match=r"`avoid` must be \(N, 3\) finite stored voxel indices.*shape \(2,\)"):
        correction_click(mask, mask, (1, 1, 1), avoid=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"`avoid` must be \(N, 3\) finite"):
        correction_click(mask, mask, (1, 1, 1), avoid=[[1.0, np.nan, 2.0]])
    with pytest.raises(ValueError, match="non-empty list"):
        summarize([])
    with pytest.raises(ValueError, match=r"record 0 lacks \['num_clicks'\]"):
        summarize([{"dice": 1.0, "nsd": 1.0}])
    with pytest.raises(ValueError, match="protocol 'random'"):
        summarize([{"dice": 1.0, "nsd": 1.0, "num_clicks": 1, "protocol": "random"}])
    with pytest.raises(ValueError, match="summarize"):
        markdown_table({})
