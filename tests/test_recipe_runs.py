"""Each recipe trains, saves, reloads and evaluates (tiny model, generated data); the official recipe's schedule and
optimiser groups in a real run; the official splits on folders laid out like the real datasets."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import call_training

from sam3d_hf import Sam3DForPromptableSegmentation
from sam3d_hf.data import OFFICIAL_SPLITS_DIR, index_dataset, official_split
from sam3d_hf.hub import render_model_card
from sam3d_hf.recipes import RECIPES
from sam3d_hf.synthetic import generate_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("data") / "synthetic", num_cases=6, seed=0)


def train(recipe: str, data_dir: Path, output_dir: Path, *extra: str) -> Path:
    patch = ["32", "24", "40"]  # multiples of 8 too: the prompt-free recipe's token stride
    call_training(["--recipe", recipe, "--data_dir", str(data_dir), "--output_dir", str(output_dir),
                   "--cache_dir", str(data_dir.parent / "cache"), "--model_config", "tiny", "--patch_size", *patch,
                   "--report_to", "jsonl", "--seed", "2", *extra])  # fmt: skip
    return output_dir


def records(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_each_recipe_trains_saves_reloads_and_evaluates(recipe, data_dir, tmp_path):
    from sam3d_hf import evaluation

    output_dir = train(recipe, data_dir, tmp_path / recipe, "--max_train_steps", "3", "--checkpointing_steps", "3")
    folder = output_dir / "final_model"
    model = Sam3DForPromptableSegmentation.from_pretrained(folder)
    values = RECIPES[recipe]
    assert model.config.use_prompt_encoder == values.use_prompt_encoder
    assert model.config.vision_config.token_stride == values.token_stride
    if values.use_prompt_encoder:
        assert model.config.prompt_encoder_config.use_point_labels == values.use_point_labels
    assert model.config.mask_decoder_config.use_mask_prompt == values.use_mask_prompt
    record = json.loads((folder / "training_info.json").read_text())
    assert record["recipe"]["name"] == recipe and record["recipe"]["values"]["learning_rate"] == values.learning_rate
    assert record["recipe"]["overridden"] == {"patch_size": [32, 24, 40]}
    evaluate = ["--model", str(folder), "--data_dir", str(data_dir), "--split_file", str(output_dir / "split.json"),
                "--output_dir", str(tmp_path / "eval"), "--max_cases", "1"]  # fmt: skip
    evaluate += ["--automatic"] if not values.use_prompt_encoder else ["--protocols", "1"]
    evaluation.main(evaluate)
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    rows = list(summary["summary"])
    assert rows == (["3DSAM-adapter, automatic (sliding window)"] if not values.use_prompt_encoder else
                    ["3DSAM-adapter, 1 click (official)", "3DSAM-adapter, 1 click (per_lesion)"])  # fmt: skip


def test_the_official_run_steps_its_schedule_per_epoch_with_three_parameter_groups(data_dir, tmp_path):
    """4 training scans, batch 1: 4 steps an epoch. Over 3 epochs the learning rate is torch's LinearLR(1 -> 0.01)
    stepped per epoch; the optimiser holds the encoder, prompt encoder and decoder as groups at lr 4e-4, wd 0; the
    validation is the patches' Dice loss at every epoch's end."""
    output_dir = train("official", data_dir, tmp_path / "official", "--num_train_epochs", "3",
                       "--checkpointing_steps", "12")  # fmt: skip
    steps = {r["step"]: r for r in records(output_dir) if "lr" in r}
    assert sorted(steps) == list(range(1, 13))
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=4e-4)
    reference = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.01, total_iters=3)
    for epoch in range(3):
        for step in range(4 * epoch + 1, 4 * epoch + 5):
            assert steps[step]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-9), step
        reference.step()
    validations = [r["step"] for r in records(output_dir) if "validation_dice_loss" in r]
    assert validations == [0, 4, 8, 12]  # the initial weights, then every epoch
    state = torch.load(output_dir / "checkpoints" / "checkpoint_12" / "optimizer.bin", weights_only=True)
    groups = state["param_groups"]
    assert [g["name"] for g in groups] == ["encoder", "prompt_encoder", "mask_decoder"]
    assert all((g["weight_decay"], g["betas"], g["initial_lr"]) == (0.0, (0.9, 0.999), 4e-4) for g in groups)
    assert groups[0]["lr"] == pytest.approx(4e-4 * 0.01)  # after the last epoch: the end factor
    best = json.loads((output_dir / "best_model" / "training_info.json").read_text())
    assert best["selection"]["saved"].startswith("lowest validation Dice loss")
    final = json.loads((output_dir / "final_model" / "training_info.json").read_text())
    assert final["selection"]["step"] == 12 and final["epochs"] == 3
    assert final["data"]["clicks"]["scheme"] == "official" and final["optimisation"]["gradient_clipping"].endswith(
        "per part (encoder, prompt encoder, decoder)")  # fmt: skip
    # The card of the run's own folder states its record.
    card = str(render_model_card(output_dir / "final_model", dataset="synthetic"))
    assert "| optimiser steps | 12 |" in card and "| epochs | 3 (4 optimiser steps each; the steps decide) |" in card
    assert "| schedule | linear from 1 to 0.01 x the learning rate over 3 epochs, stepped once per epoch" in card
    assert (
        "| recipe | `official` (docs/recipes.md); overridden: `num_train_epochs=3`, `patch_size=[32, 24, 40]` |" in card
    )


def test_a_resumed_official_run_continues_its_per_epoch_schedule(data_dir, tmp_path):
    """A run stopped after epoch 1 (its later checkpoints removed, as if killed) and resumed: the learning rates of
    epochs 2 and 3 are the uninterrupted run's, since the schedule's state travels with the checkpoint."""
    common = ["--num_train_epochs", "3", "--validation_steps", "0", "--checkpointing_steps", "4"]
    whole = train("official", data_dir, tmp_path / "whole", *common)
    part = shutil.copytree(whole, tmp_path / "part")
    for name in ("checkpoint_8", "checkpoint_12"):
        shutil.rmtree(part / "checkpoints" / name)
    train("official", data_dir, part, *common, "--resume_from_checkpoint", "latest")
    lrs = {r["step"]: r["lr"] for r in records(whole) if "lr" in r}
    resumed = {}
    for r in records(part):  # the resumed run logs steps 5-12 again: the last line for a step counts
        if "lr" in r:
            resumed[r["step"]] = r["lr"]
    assert resumed == pytest.approx(lrs) and sorted(resumed) == list(range(1, 13))
    assert len({round(v, 12) for v in resumed.values()}) == 3  # three epochs, three learning rates


# ----------------------------------------------------------------------------------------------------------------------
# Official splits
# ----------------------------------------------------------------------------------------------------------------------
def lay_out(root: Path, dataset: str, case_ids: list[str]) -> Path:
    """Empty files where the real dataset keeps them (index_dataset only lists files)."""
    for case in case_ids:
        if dataset == "kits":
            files = [root / case / "imaging.nii.gz", root / case / "aggregated_MAJ_seg.nii.gz"]
        elif dataset == "lits":
            number = case.split("-")[1]
            files = [root / "batch" / f"volume-{number}.nii", root / "batch" / f"segmentation-{number}.nii"]
        else:
            files = [root / "imagesTr" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz"]
        for path in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
    return root


@pytest.mark.parametrize("dataset", ["kits", "pancreas", "lits", "colon"])
def test_official_split_maps_every_case_of_fold_0(dataset, tmp_path):
    folds = json.loads((OFFICIAL_SPLITS_DIR / f"{dataset}.json").read_text())["folds"]
    fold0 = {part: sorted(folds[0][part]) for part in ("train", "val", "test")}
    every = sorted({c for fold in folds for part in fold.values() for c in part})
    root = lay_out(tmp_path / dataset, dataset, every)
    ids = index_dataset(root)["case_id"]
    split, description = official_split(ids)  # the dataset is found from the case ids
    assert split == {"train": fold0["train"], "validation": fold0["val"], "test": fold0["test"]}
    assert description == f"{dataset} fold 0"
    sizes = {"kits": (209, 30, 61), "pancreas": (196, 28, 57), "lits": (83, 11, 24), "colon": (89, 11, 26)}[dataset]
    assert tuple(len(split[p]) for p in ("train", "validation", "test")) == sizes  # OFFICIAL_RECIPE.md's fold 0
    assert official_split(ids, fold=3)[0]["test"] == sorted(folds[3]["test"])
    gone = [fold0["test"][0], fold0["train"][5]]
    with pytest.raises(ValueError, match=rf"2 case\(s\) of fold 0 of {dataset}.json are not in the dataset folder: "):
        official_split([c for c in ids if c not in gone], dataset=dataset)
    with pytest.raises(ValueError, match="folds 0 to 4; got --fold 5"):
        official_split(ids, fold=5)


def test_official_split_from_a_json_of_its_own_and_errors(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"folds": [{"train": {"a": [], "b": []}, "val": {"c": []}, "test": {"d": []}}]}))
    assert official_split(["a", "b", "c", "d"], path)[0] == {"train": ["a", "b"], "validation": ["c"], "test": ["d"]}
    path.write_text(json.dumps({"train": ["a"]}))
    with pytest.raises(ValueError, match="not an official-format split"):
        official_split(["a"], path)
    with pytest.raises(ValueError, match=r"none of the 2 cases .* is in an official split"):
        official_split(["x_1", "y_2"])
