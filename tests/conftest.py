import copy
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

# One intra-op thread unless the caller chose: on a small shared CPU box, OpenMP threads that wait on each other at
# every op barrier while another process holds a core made the tiny-model forward 35x slower (test_modeling: 12 s
# with one thread, 160 s with two under load; about the same with either on an idle machine).
if "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by subprocess tests
    torch.set_num_threads(1)

from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation
from sam3d_hf.configuration_sam3d import TINY_PRESET

# The library's tiny preset at an anisotropic, non-cubic patch: (40, 24, 44) gives a (10, 6, 11) token grid, padded to
# (16, 8, 16) for 8³ windows; blocks 0 and 2 are shifted; blocks 1 and 3 use the long (SAM "global") tables; all four
# levels are tapped; the depth table (8 rows) is resized to 10 and the 16x16 position table pooled to 6x11; attention
# runs in chunks of 3 windows.
PATCH = (40, 24, 44)
TINY = copy.deepcopy(TINY_PRESET)
TINY["vision_config"].update(image_size=PATCH, attention_chunk_size=3)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Give every tensor random values so that no path is trivially zero (fresh tables start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("rel_pos_scale"):
                tensor.copy_(1 + 0.1 * torch.randn((), generator=generator))
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * std + (1 if "layer_norm" in name else 0))
    return model


@pytest.fixture
def tiny_config() -> Sam3DConfig:
    return Sam3DConfig(**TINY)


@pytest.fixture
def tiny_model(tiny_config) -> Sam3DForPromptableSegmentation:
    return randomize(Sam3DForPromptableSegmentation(tiny_config)).eval()


@pytest.fixture
def tiny_inputs() -> dict:
    generator = torch.Generator().manual_seed(1)
    return {
        "pixel_values": torch.randn(2, 1, *PATCH, generator=generator),
        "input_points": torch.tensor([[[3.0, 4.0, 5.0], [30.0, 20.0, 40.5]], [[39.0, 0.0, 43.0], [0.0, 0.0, 0.0]]]),
        "input_labels": torch.tensor([[1, 1], [1, -1]]),
    }


def assert_mask_of(mask: torch.Tensor, probabilities: torch.Tensor, threshold: float = 0.5, margin: float = 1e-4):
    """`mask` is `probabilities >= threshold` computed in another order (another batch size, a cached path): the two
    may disagree only where a probability lies within `margin` of the threshold (float rounding), and at few voxels."""
    expected = probabilities >= threshold
    differ = mask.bool() != expected
    assert not (differ & ((probabilities - threshold).abs() > margin)).any(), "masks differ away from the threshold"
    assert differ.sum() <= max(3, expected.sum() // 1000), f"{int(differ.sum())} voxels differ"


def call_training(argv: list[str]) -> None:
    """`sam3d_hf.training.main(argv)` in this process (as `accelerate launch` with the CPU config runs it);
    Accelerate's process-wide state is reset before and after."""
    from accelerate.state import AcceleratorState, GradientState

    from sam3d_hf import training

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        training.main(argv)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


OFFICIAL_RECIPE = Path(__file__).resolve().parents[2] / "shared" / "OFFICIAL_RECIPE.md"


def official_recipe_text() -> str:
    """../shared/OFFICIAL_RECIPE.md: the values of the official code, which the recipe tests check against."""
    if not OFFICIAL_RECIPE.is_file():
        pytest.fail(f"{OFFICIAL_RECIPE} is missing: the tests need the project's shared folder beside the checkout")
    return OFFICIAL_RECIPE.read_text(encoding="utf-8")


def official_dataset_constants() -> dict[str, dict]:
    """The per-dataset constants of ../shared/OFFICIAL_RECIPE.md (read from the official code), parsed from its
    table: {kits|lits|pancreas|colon: window, mean, std, axes, rotate, target}."""
    text = official_recipe_text()
    rows = {}
    for line in text.split("## Per-dataset constants", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.search(r"\((kits|lits)\)|MSD (pancreas|colon)", cells[0]) if len(cells) == 7 else None
        if match:
            window = tuple(float(v) for v in re.findall(r"-?\d+", cells[1]))
            axes = tuple(int(v) for v in re.findall(r"\d", cells[4]))
            rows[match.group(1) or match.group(2)] = {
                "window": window, "mean": float(cells[2]), "std": float(cells[3]), "axes": axes,
                "rotate": cells[5].startswith("yes"), "target": int(cells[6]),
            }  # fmt: skip
    assert sorted(rows) == ["colon", "kits", "lits", "pancreas"], rows
    return rows


def copy_with_an_unlabelled_scan(msd_folder: Path, destination: Path) -> tuple[Path, list[str]]:
    """A copy of an MSD task folder whose dataset.json also lists a scan without a label (as a KiTS19 checkout's test
    cases); returns the copy and the ids of the labelled cases."""
    folder = shutil.copytree(msd_folder, destination)
    meta = json.loads((folder / "dataset.json").read_text())
    labelled = sorted(Path(entry["image"]).name.split(".")[0] for entry in meta["training"])
    shutil.copy(folder / "imagesTr" / f"{labelled[0]}.nii.gz", folder / "imagesTr" / "unlabelled_9.nii.gz")
    meta["training"].append({"image": "./imagesTr/unlabelled_9.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps(meta))
    return folder, labelled
