"""The training recipes against ../shared/OFFICIAL_RECIPE.md (the official code, value by value): the recipe
definitions, the click scheme, the crop sampler and its frequencies, the augmentation chain, the per-part clipping, the
per-epoch schedule of a real run, and docs/recipes.md."""

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import official_recipe_text
from monai import transforms as mt

from sam3d_hf import Sam3DImageProcessor
from sam3d_hf.recipes import RECIPES, Sam3DRecipe, get_recipe, official_learning_rate_factor
from sam3d_hf.sampling import OFFICIAL_INTENSITY_SHIFT_HU, Sam3DTrainingDataset, official_clicks, validation_patch
from sam3d_hf.training import clip_gradients

ROOT = Path(__file__).resolve().parents[1]


def number(pattern: str, text: str | None = None) -> float:
    """The number that `pattern` (a regex with one group) captures in OFFICIAL_RECIPE.md."""
    match = re.search(pattern, text or official_recipe_text(), flags=re.S)
    assert match, f"OFFICIAL_RECIPE.md no longer says {pattern!r}"
    return float(match.group(1))


# ----------------------------------------------------------------------------------------------------------------------
# The definitions
# ----------------------------------------------------------------------------------------------------------------------
def test_official_recipe_values_are_the_official_codes():
    official = RECIPES["official"]
    assert official.learning_rate == number(r"all\s+lr ([\d.e-]+), weight_decay")
    assert official.weight_decay == number(r"weight_decay (\d+), default betas")
    assert (official.adam_beta1, official.adam_beta2) == (0.9, 0.999)  # "default betas": torch's AdamW defaults
    assert official.schedule == "linear_per_epoch"
    assert official.end_factor == number(r"LinearLR\(start_factor=1\.0, end_factor=([\d.]+), total_iters=500\)")
    assert official.num_train_epochs == number(r"Batch size 1; (\d+) epochs")
    assert official.train_batch_size == number(r"Batch size (\d+);")
    assert official.max_grad_norm == number(r"clip_grad_norm_\(encoder, ([\d.]+)\)") and official.clip_per_part
    assert official.patch_size == (int(number(r"Patch (\d+)³ for all four datasets")),) * 3
    assert official.num_positive_points == number(r"If the patch holds tumour: (\d+) tumour voxels")
    assert official.num_patch_points == number(r"Always: (\d+) voxels drawn uniformly")
    assert official.clicks == "official" and not official.use_point_labels  # "without labels"
    assert official.crop_scale == number(r"round\(([\d.]+) x patch\)")
    assert official.crop_pos == number(r"154³, pos=(\d+), neg=\d+,\s+num_samples=1\)")
    assert official.crop_neg == number(r"154³, pos=\d+, neg=(\d+),\s+num_samples=1\)")
    assert (official.sampler, official.augmentation, official.validation) == ("official", "official", "patches")
    assert official.resampling == "official"


def test_paper_and_automatic_recipes():
    text = official_recipe_text()
    paper, auto = RECIPES["paper"], RECIPES["official_auto"]
    assert paper.learning_rate == number(r"paper text: lr ([\d.e-]+), weight decay")
    assert paper.weight_decay == number(r"paper text: lr [\d.e-]+, weight decay ([\d.e-]+)\)")
    assert paper.num_train_epochs == number(r"\(paper: (\d+)\)")
    assert paper.augmentation == "table4" and paper.end_factor == 0.1  # the reading of the paper's schedule
    assert auto.patch_size == (int(number(r"- (\d+)³ crops; two AdamW", text)),) * 3
    assert auto.max_grad_norm == number(r"clipping at ([\d.]+)\.", text)
    assert auto.learning_rate == number(r"two AdamW \(encoder, decoder\), lr ([\d.e-]+)", text)
    assert not auto.use_prompt_encoder and auto.token_stride == 8  # 256³ upsampled x2: the encoder's 32³ tokens
    interactive = RECIPES["interactive"]
    assert interactive.use_point_labels and interactive.clicks == "labelled"
    for field in ("learning_rate", "schedule", "num_train_epochs", "sampler", "augmentation", "clip_per_part"):
        assert getattr(interactive, field) == getattr(RECIPES["official"], field), field


def test_recipes_refuse_inconsistent_values():
    with pytest.raises(ValueError, match="official clicks carry no labels"):
        RECIPES["official"].replace(use_point_labels=True)
    with pytest.raises(ValueError, match="schedule must be one of"):
        Sam3DRecipe(name="x", description="", schedule="cosine")
    with pytest.raises(ValueError, match="not fields of a recipe"):
        RECIPES["official"].replace(lr=1.0)
    with pytest.raises(ValueError, match="unknown recipe 'fast'"):
        get_recipe("fast")


def test_the_schedule_factor_is_torchs_linear_lr_per_epoch():
    """official_learning_rate_factor against torch's own LinearLR, stepped once per epoch."""
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=4e-4)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.01, total_iters=500)
    for epoch in range(503):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-4 * official_learning_rate_factor(epoch, 500, 0.01))
        optimizer.step()
        scheduler.step()
    assert official_learning_rate_factor(499, 500, 0.01) == pytest.approx(0.01 + 0.99 / 500)


# ----------------------------------------------------------------------------------------------------------------------
# Clicks
# ----------------------------------------------------------------------------------------------------------------------
def test_official_clicks_counts_and_places():
    labels = np.zeros((20, 16, 24), np.int64)
    labels[5:9, 4:8, 10:14] = 1  # 64 tumour voxels of 7680
    rng = np.random.default_rng(0)
    inside, total = 0, 0
    for _ in range(300):
        points, point_labels = official_clicks(labels, rng)
        assert points.shape == (30, 3) and np.all(point_labels == 1)  # unlabelled: the official prompt encoder
        idx = points.astype(int)
        assert np.all(labels[tuple(idx[:10].T)] == 1)  # the 10 tumour clicks
        inside += labels[tuple(idx[10:].T)].sum()
        total += 20
    assert 0.3 * 64 / 7680 < inside / total < 3 * 64 / 7680  # the 20 others: uniform over the whole patch
    single = np.zeros_like(labels)
    single[3, 4, 5] = 1
    points, _ = official_clicks(single, rng)
    assert np.all(points[:10] == [3, 4, 5])  # with replacement: one tumour voxel, ten clicks on it
    empty_points, empty_labels = official_clicks(np.zeros_like(labels), rng)
    assert empty_points.shape == (20, 3) and np.all(empty_labels == 1)  # no tumour: the 20 patch voxels alone


def test_labelled_clicks_carry_the_truth():
    labels = np.zeros((20, 16, 24), np.int64)
    labels[2:18, 2:14, 2:22] = 1  # most of the patch: both labels occur among the patch voxels
    points, point_labels = official_clicks(labels, np.random.default_rng(1), labelled=True, num_negative_points=3)
    idx = points.astype(int)
    assert points.shape == (33, 3)
    np.testing.assert_array_equal(point_labels[:30], labels[tuple(idx[:30].T)])  # each patch voxel: its truth
    assert np.all(point_labels[30:] == 0) and np.all(labels[tuple(idx[30:].T)] == 0)  # negatives by the lesion
    assert set(point_labels[10:30].tolist()) == {0, 1}


# ----------------------------------------------------------------------------------------------------------------------
# The crop sampler and the augmentations
# ----------------------------------------------------------------------------------------------------------------------
def _processor() -> Sam3DImageProcessor:
    return Sam3DImageProcessor.from_preset("official_kits")


def _dataset(recipe: Sam3DRecipe, volume: dict, branch: str = "zoom", samples: int = 1) -> Sam3DTrainingDataset:
    rows = [{"case_id": "a", "image": "a.nii.gz", "label": "a_seg.nii.gz"}]  # never read: _volume is replaced
    train = Sam3DTrainingDataset(rows, _processor(), recipe=recipe, augmentation_branch=branch,
                                 samples_per_volume=samples)  # fmt: skip
    train._volume = lambda case_index: volume
    return train


def test_the_official_crop_is_centred_on_tumour_two_times_in_three():
    """A 2³ tumour in an 80³ body: the 1.2 x 16 = 19³ crop is centred on it with probability 2/3 (pos 2 : neg 1), and
    the random 16³ patch inside such a crop always holds it; a background crop holds it only by chance (~2%)."""
    image = np.ones((1, 80, 80, 80), np.float32)  # all body (above air)
    label = np.zeros((1, 80, 80, 80), np.float32)
    label[0, 40:42, 40:42, 40:42] = 1
    recipe = RECIPES["official"].replace(patch_size=(16, 16, 16), augmentation="none")
    train = _dataset(recipe, {"image": image, "label": label}, samples=600)
    holds = [bool(train[i]["labels"].any()) for i in range(len(train))]
    assert 0.62 < np.mean(holds) < 0.75, np.mean(holds)  # 2/3 + ~0.02, binomial sd 0.019


def test_the_official_augmentation_chain_is_the_official_codes():
    text = official_recipe_text()
    recipe = RECIPES["official"].replace(patch_size=(16, 16, 16))
    volume = {"image": np.ones((1, 30, 30, 30), np.float32), "label": np.zeros((1, 30, 30, 30), np.float32)}
    ip = _processor()
    for branch in ("zoom", "rotate_zoom"):
        train = _dataset(recipe, volume, branch)
        found = {}
        for transform in [*train.before_crop.transforms, *train.after_crop.transforms]:
            found.setdefault(type(transform).__name__, []).append(transform)
        (shift,) = found["RandShiftIntensityd"]
        offsets = number(r"RandShiftIntensityd\(offsets=(\d+), prob=[\d.]+\)", text)
        assert shift.prob == number(r"RandShiftIntensityd\(offsets=\d+, prob=([\d.]+)\)", text)
        assert shift.shifter.offsets == pytest.approx((-offsets / ip.intensity_std, offsets / ip.intensity_std))
        assert offsets == OFFICIAL_INTENSITY_SHIFT_HU
        (crop_body,) = found["CropForegroundd"]
        assert bool(crop_body.cropper.select_fn(torch.tensor(ip.air_value + 1e-3)))
        assert not bool(crop_body.cropper.select_fn(torch.tensor(ip.air_value)))  # strictly above the window's low
        if branch == "zoom":
            (zoom,) = found["RandZoomd"]
            assert zoom.prob == number(r"Others \(KiTS, LiTS\):\s+`RandZoomd\(prob=([\d.]+)", text)
            low = number(r"Others.*?RandZoomd\(prob=[\d.]+, min_zoom=([\d.]+)", text)
            high = number(r"Others.*?RandZoomd\(prob=[\d.]+, min_zoom=[\d.]+, max_zoom=([\d.]+)", text)
            assert (zoom.rand_zoom.min_zoom, zoom.rand_zoom.max_zoom) == ((low,), (high,))
            assert "RandRotated" not in found
        else:
            (rotate,) = found["RandRotated"]
            assert rotate.prob == number(r"`RandRotated\(prob=([\d.]+), range_x=", text)
            assert rotate.rand_rotate.range_x == pytest.approx((-math.radians(30), math.radians(30)))
            assert not rotate.rand_rotate.keep_size  # keep_size=False
            (zoom,) = found["RandZoomd"]
            assert zoom.prob == number(r"RandRotated.*?`RandZoomd\(prob=([\d.]+), min_zoom=\[1", text)
            assert (tuple(zoom.rand_zoom.min_zoom), tuple(zoom.rand_zoom.max_zoom)) == ((1, 0.9, 0.9), (1, 1.1, 1.1))
        (pad,) = found["SpatialPadd"]
        assert tuple(pad.padder.spatial_size) == (round(16 * 1.2),) * 3
        (sampler,) = found["RandCropByPosNegLabeld"]
        assert (sampler.cropper.pos_ratio, tuple(sampler.cropper.spatial_size)) == (2 / 3, (19, 19, 19))
        (patch,) = found["RandSpatialCropd"]
        assert tuple(patch.cropper.roi_size) == (16, 16, 16) and not patch.cropper.random_size
        flips = sorted((f.prob, f.flipper.spatial_axis) for f in found["RandFlipd"])
        assert flips == [(0.5, 0), (0.5, 1), (0.5, 2)]
        (turn,) = found["RandRotate90d"]
        assert (turn.prob, turn.max_k, turn.spatial_axes) == (0.5, 3, (0, 1))  # MONAI's default plane: (D, H)


def test_quarter_turns_keep_a_non_square_patch_by_turning_half():
    recipe = RECIPES["official"].replace(patch_size=(12, 16, 20))
    volume = {"image": np.ones((1, 30, 30, 30), np.float32), "label": np.zeros((1, 30, 30, 30), np.float32)}
    train = _dataset(recipe, volume, samples=20)
    half_turn = [t for t in train.after_crop.transforms if isinstance(t, mt.RandFlipd) and t.flipper.spatial_axis
                 == (0, 1)]  # fmt: skip
    assert len(half_turn) == 1 and half_turn[0].prob == 0.5
    assert not any(isinstance(t, mt.RandRotate90d) for t in train.after_crop.transforms)
    assert {tuple(train[i]["pixel_values"].shape) for i in range(len(train))} == {(1, 12, 16, 20)}


def test_the_official_validation_patch():
    """Padded with 0 HU (the official code pads before normalising), centred on tumour, 10 tumour clicks."""
    ip = _processor()
    volume = {"pixel_values": np.full((1, 10, 30, 30), 1.5, np.float32), "labels": np.zeros((10, 30, 30), np.uint8)}
    volume["labels"][4:6, 20:24, 3:7] = 1
    for seed in range(5):
        patch = validation_patch(volume, ip, (16, 16, 16), np.random.default_rng(seed))
        assert patch["pixel_values"].shape == (1, 1, 16, 16, 16) and patch["labels"].any()
        padded = patch["pixel_values"][0, 0][patch["pixel_values"][0, 0] != 1.5]
        assert torch.allclose(padded, torch.tensor(-ip.intensity_mean / ip.intensity_std))
        points = patch["input_points"][0].long()
        assert points.shape == (10, 3) and patch["labels"][0][tuple(points.T)].all()


# ----------------------------------------------------------------------------------------------------------------------
# Clipping per part
# ----------------------------------------------------------------------------------------------------------------------
def test_clipping_per_part_clips_each_part_on_its_own():
    """The official code clips the encoder, the decoder and the prompt encoder each at 1.0; all together, one norm."""

    class Plain:
        def unscale_gradients(self):
            pass

        def clip_grad_norm_(self, parameters, max_norm):
            return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def parts(norms):
        made = {}
        for name, norm in norms.items():
            parameter = torch.nn.Parameter(torch.zeros(4))
            parameter.grad = torch.tensor([norm, 0.0, 0.0, 0.0])
            made[name] = [parameter]
        return made

    args = type("Args", (), {"max_grad_norm": 1.0, "clip_per_part": True})()
    each = parts({"encoder": 3.0, "prompt_encoder": 0.5, "mask_decoder": 4.0})
    total = clip_gradients(Plain(), each, args)
    assert float(total) == pytest.approx(math.sqrt(9 + 0.25 + 16))
    assert [float(p[0].grad.norm()) for p in each.values()] == pytest.approx([1.0, 0.5, 1.0], rel=1e-5)
    args.clip_per_part = False
    together = parts({"encoder": 3.0, "prompt_encoder": 0.5, "mask_decoder": 4.0})
    clip_gradients(Plain(), together, args)
    scale = 1.0 / math.sqrt(9 + 0.25 + 16)
    assert [float(p[0].grad.norm()) for p in together.values()] == pytest.approx([3 * scale, 0.5 * scale, 4 * scale],
                                                                                 rel=1e-4)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# docs/recipes.md
# ----------------------------------------------------------------------------------------------------------------------
def test_docs_recipes_table_states_each_recipes_values():
    """Every row of docs/recipes.md's table names a recipe field; its cell for each recipe is that recipe's value."""
    text = (ROOT / "docs" / "recipes.md").read_text(encoding="utf-8")
    section = text.split("## The recipes", 1)[1].split("\n## ", 1)[0].splitlines()
    table = [line for line in section if line.startswith("| `")]
    header = next(line for line in section if line.startswith("| field"))
    names = [cell.strip(" `") for cell in header.strip("|").split("|")[3:-1]]
    assert names == list(RECIPES)
    fields = {f for f in Sam3DRecipe.__dataclass_fields__ if f not in ("name", "description")}
    seen = set()
    for line in table:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        field = cells[0].strip("`")
        seen.add(field)
        for name, cell in zip(names, cells[3:-1], strict=True):
            value = getattr(RECIPES[name], field)
            shown = " × ".join(map(str, value)) if isinstance(value, tuple) else f"{value:g}" if isinstance(
                value, float) else str(value)  # fmt: skip
            assert cell.strip("`") == shown, (field, name, cell, shown)
    assert seen == fields, f"docs/recipes.md lacks rows for {sorted(fields - seen)}"
