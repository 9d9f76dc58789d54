"""sam3d_hf.evaluation (what examples/evaluate.py and `sam3d evaluate` run) on a tiny random model and generated
scans: every output file, CSV and JSON agree, results do not depend on the order of the protocols, nothing
half-written is left behind, the sliding-window mode has its own row, and two real CPU processes (Accelerate) give the
same results as one."""

import csv
import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import PATCH, TINY, copy_with_an_unlabelled_scan, randomize
from scipy import ndimage
from test_metrics import brute_force_depth_mm

from sam3d_hf import (
    Sam3DAdapterConfig,
    Sam3DConfig,
    Sam3DForPromptableSegmentation,
    Sam3DImageProcessor,
    Sam3DProcessor,
    get_adapter_model,
)
from sam3d_hf.data import index_dataset
from sam3d_hf.hub import render_model_card
from sam3d_hf.inference import Sam3DPredictor
from sam3d_hf.metrics import evaluate_case, normalized_surface_dice, simulate_clicks
from sam3d_hf.synthetic import SYNTHETIC_PROCESSOR_KWARGS, generate_case, generate_dataset


def load_script():
    from sam3d_hf import evaluation

    return evaluation


def save_model(
    folder: Path, use_point_labels: bool, model=None, preset: str | None = "synthetic", spacing: float = 2.0
) -> Path:
    if model is None:
        prompt_config = {**TINY["prompt_encoder_config"], "use_point_labels": use_point_labels}
        config = Sam3DConfig(**{**TINY, "prompt_encoder_config": prompt_config})
        model = randomize(Sam3DForPromptableSegmentation(config))
    model.save_pretrained(folder)
    image_processor = Sam3DImageProcessor(
        **{**SYNTHETIC_PROCESSOR_KWARGS, "target_spacing": (spacing,) * 3, "preset": preset}
    )
    Sam3DProcessor(image_processor, patch_size=PATCH, cluster_margin=4).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    data = generate_dataset(root / "data", num_cases=4, seed=1, num_lesions=2, orientation="oblique")
    return {"root": root, "data": data, "model": save_model(root / "model", use_point_labels=True)}


@pytest.fixture
def ended(monkeypatch) -> list[int]:
    """How many times a run ended its Accelerator (which destroys the process group of a multi-process run)."""
    calls, end_training = [], Accelerator.end_training

    def counted(self):
        calls.append(1)
        end_training(self)

    monkeypatch.setattr(Accelerator, "end_training", counted)
    return calls


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_every_output_and_summary_equals_csv_means(setup):
    out = setup["root"] / "out"
    split = setup["root"] / "split.json"
    load_script().main([
        "--model", str(setup["model"]), "--data_dir", str(setup["data"]), "--split_file", str(split),
        "--split", "train", "--max_cases", "2", "--protocols", "1,3,center,correction", "--rounds", "2",
        "--output_dir", str(out), "--dataset_name", "synthetic",
    ])  # fmt: skip
    train = json.loads(split.read_text())["train"]
    rows = read_csv(out / "cases.csv")
    assert sorted({r["case_id"] for r in rows}) == sorted(train)[:2]
    # 1 and 3 clicks (official and per_lesion placements), center: one row per case each; correction: rounds 0, 1, 2.
    assert len(rows) == 2 * 8
    assert sorted({r["protocol"] for r in rows if r["protocol_name"] in ("1", "3")}) == ["official", "per_lesion"]
    for r in rows:
        if r["protocol_name"] != "center":
            assert json.loads(r["click_labels"]).count(1) >= 1
    record = json.loads((out / "summary.json").read_text())
    assert record["format"] == "sam3d-hf-evaluation-v1" and record["split"] == "train"
    assert record["settings"]["tolerance_mm"] == 5.0 and record["settings"]["rounds"] == 2
    summary = record["summary"]
    groups = {}
    for r in rows:
        groups.setdefault((r["method"], r["protocol"], int(r["num_clicks"]), int(r["round"])), []).append(r)
    assert len(summary) == len(groups) == 8
    for (method, protocol, clicks, round_), members in groups.items():
        name = f"{method}, {clicks} click{'s' if clicks != 1 else ''} ({protocol})"
        name += f" + {round_} correction{'s' if round_ != 1 else ''}" if round_ else ""
        stats = summary[name]["synthetic"]
        assert stats["n"] == len(members) == 2
        assert stats["dice_mean"] == pytest.approx(np.mean([float(m["dice"]) for m in members]), abs=1e-12)
        assert stats["nsd_mean"] == pytest.approx(np.mean([float(m["nsd"]) for m in members]), abs=1e-12)
        assert stats["dice_std"] == pytest.approx(np.std([float(m["dice"]) for m in members], ddof=1), abs=1e-12)
    lesions = read_csv(out / "lesions.csv")
    assert len(lesions) == sum(int(r["n_lesions"]) for r in rows) > 0
    table = (out / "table.md").read_text()
    assert all(name in table for name in summary)
    for png in [out / "dice_per_round.png", *(out / "overlays" / f"{case}.png" for case in sorted(train)[:2])]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.rglob(".tmp-*")]  # nothing half-written left behind
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".out")) == []


def _clicks(rows: list[dict], protocol_name: str) -> dict[str, np.ndarray]:
    return {r["case_id"]: np.asarray(json.loads(r["clicks"])) for r in rows if r["protocol_name"] == protocol_name}


def test_clicks_follow_the_seed_per_case_and_the_placement(setup, tmp_path):
    """Each case's clicks are `simulate_clicks(tumour, --click_placement, N, seed=seed * 1_000_003 + position)`: two
    copies of one scan get different clicks, --seed changes them, and per_lesion differs from uniform."""
    data = shutil.copytree(setup["data"], tmp_path / "data")
    meta = json.loads((data / "dataset.json").read_text())
    first = meta["training"][0]
    for folder, key in (("imagesTr", "image"), ("labelsTr", "label")):
        shutil.copy(data / first[key], data / folder / "zz_copy.nii.gz")
    meta["training"].append({"image": "./imagesTr/zz_copy.nii.gz", "label": "./labelsTr/zz_copy.nii.gz"})
    (data / "dataset.json").write_text(json.dumps(meta))
    cases = [dict(row) for row in index_dataset(data)]
    runs = {}
    for placement, seed in (("uniform", 0), ("uniform", 4), ("per_lesion", 0)):
        out = tmp_path / f"{placement}-{seed}"
        load_script().main(["--model", str(setup["model"]), "--data_dir", str(data), "--protocols", "2",
                            "--click_placement", placement, "--seed", str(seed), "--output_dir", str(out)])  # fmt: skip
        runs[placement, seed] = clicks = _clicks(read_csv(out / "cases.csv"), "2")
        for position, case in enumerate(cases):
            tumour = np.asarray(nib.load(case["label"]).dataobj) == 2
            spacing = np.linalg.norm(nib.load(case["label"]).affine[:3, :3], axis=0)
            expected, _ = simulate_clicks(tumour, placement, 2, seed=seed * 1_000_003 + position, spacing=spacing)
            np.testing.assert_array_equal(clicks[case["case_id"]], expected)
    original = cases[0]["case_id"]
    assert not np.array_equal(runs["uniform", 0][original], runs["uniform", 0]["zz_copy"])  # same scan, other case
    assert not np.array_equal(runs["uniform", 0][original], runs["uniform", 4][original])
    assert any(not np.array_equal(runs["uniform", 0][c], runs["per_lesion", 0][c]) for c in runs["uniform", 0])


def test_correction_clicks_carry_the_label_correction_click_gives(setup, tmp_path, monkeypatch):
    """Each round appends correction_click's point with its label (0 for a false positive, 1 for a miss)."""
    evaluation = load_script()
    given = []

    def scripted(tumour, mask, spacing):
        voxel = np.argwhere(tumour)[len(given)]
        given.append(len(given) % 2)  # negative, positive, negative
        return voxel.astype(np.float64), given[-1]

    monkeypatch.setattr(evaluation, "correction_click", scripted)
    out = tmp_path / "out"
    evaluation.main(["--model", str(setup["model"]), "--data_dir", str(setup["data"]), "--protocols", "correction",
                     "--rounds", "3", "--max_cases", "1", "--output_dir", str(out)])  # fmt: skip
    rows = sorted(read_csv(out / "cases.csv"), key=lambda r: int(r["round"]))
    assert [json.loads(r["click_labels"]) for r in rows] == [[1], [1, 0], [1, 0, 1], [1, 0, 1, 0]]
    assert given == [0, 1, 0]


def test_the_nsd_tolerance_is_used_and_recorded(setup, tmp_path):
    """--tolerance_mm reaches the metric (NSD of the saved, scored masks at 1 mm) and summary.json records it."""
    nsd = {}
    for tolerance in (1.0, 5.0):
        out = tmp_path / f"tolerance-{tolerance:g}"
        load_script().main(["--model", str(setup["model"]), "--data_dir", str(setup["data"]), "--protocols", "1",
                            "--click_placement", "per_lesion", "--max_cases", "2", "--tolerance_mm", str(tolerance),
                            "--save_masks",
                            "--output_dir", str(out)])  # fmt: skip
        assert json.loads((out / "summary.json").read_text())["settings"]["tolerance_mm"] == tolerance
        rows = read_csv(out / "cases.csv")
        for row, case in zip(rows, index_dataset(setup["data"])):
            label = nib.load(case["label"])
            mask = np.asarray(nib.load(out / "masks" / "1-per_lesion" / f"{case['case_id']}.nii.gz").dataobj)
            spacing = np.linalg.norm(label.affine[:3, :3], axis=0)
            expected = evaluate_case(mask, np.asarray(label.dataobj) == 2, spacing, tolerance_mm=tolerance)
            assert float(row["nsd"]) == pytest.approx(expected["nsd"], abs=1e-12)
            assert float(row["dice"]) == pytest.approx(expected["dice"], abs=1e-12)
        nsd[tolerance] = [float(r["nsd"]) for r in rows]
    assert nsd[1.0] != nsd[5.0]


def test_results_do_not_depend_on_the_order_of_the_protocols(setup, tmp_path):
    """The same clicks give the same scores whatever protocols ran before them on the scan's predictor. At 1 mm the
    patch is small against the scan, so patches opened by one protocol could hold another's clicks (they did)."""
    model = save_model(tmp_path / "model", use_point_labels=True, spacing=1.0)

    def run(protocols: str) -> dict:
        out = tmp_path / protocols.replace(",", "-")
        load_script().main(["--model", str(model), "--data_dir", str(setup["data"]), "--max_cases", "1",
                            "--protocols", protocols, "--rounds", "2", "--output_dir", str(out)])  # fmt: skip
        keys = ("dataset", "protocol", "num_clicks", "clicks", "click_labels", "dice", "nsd")
        return {(r["protocol_name"], r["round"]): [r[k] for k in keys] for r in read_csv(out / "cases.csv")}

    rows = run("1,3,correction")
    assert run("correction,3,1") == rows
    assert {row[0] for row in rows.values()} == {"synthetic"}  # the dataset name defaults to the processor's preset
    assert rows["1", "0"][1:] == rows["correction", "0"][1:]  # protocol 1 and correction round 0: the same click
    # The correction rounds are one interactive session: a fresh predictor given the same clicks round after round,
    # with its default patch reuse, gives the same scores.
    predictor = Sam3DPredictor(
        Sam3DForPromptableSegmentation.from_pretrained(model), Sam3DProcessor.from_pretrained(model)
    )
    case = index_dataset(setup["data"])[0]
    predictor.set_image(case["image"])
    label = nib.load(case["label"])
    tumour, spacing = np.asarray(label.dataobj) == 2, np.linalg.norm(label.affine[:3, :3], axis=0)
    for round_ in ("0", "1", "2"):
        _, _, _, clicks, click_labels, dice, nsd = rows["correction", round_]
        scores = evaluate_case(predictor.predict(json.loads(clicks), json.loads(click_labels)).mask, tumour, spacing)
        assert (scores["dice"], scores["nsd"]) == pytest.approx((float(dice), float(nsd)), abs=1e-12)


def test_correction_rounds_are_one_interactive_session(tiny_model):
    """Correction rounds (`predict_in_session`) give the masks of a fresh predictor with its default patch reuse, on a
    predictor where another protocol opened a patch first: round 1 keeps round 0's patch (a fresh placement would
    differ), round 2 does not take the other protocol's patch (which would hold its clicks)."""
    image, label = generate_case(3, orientation="oblique", num_lesions=2)
    first = np.argwhere(np.asarray(label.dataobj) == 2)[0].astype(np.float64)
    image_processor = Sam3DImageProcessor(**{**SYNTHETIC_PROCESSOR_KWARGS, "target_spacing": (1.0, 1.0, 1.0)})
    processor = Sam3DProcessor(image_processor, patch_size=PATCH, cluster_margin=4)
    shared, fresh = Sam3DPredictor(tiny_model, processor), Sam3DPredictor(tiny_model, processor)
    shared.set_image(image)
    fresh.set_image(image)
    shared.predict([first + np.array([-20, -8, -3])])  # another protocol
    script, clicks = load_script(), [first]
    session = script.Session()
    for added in (None, (-12, -8, -3), (-28, -16, -3)):
        clicks += [first + np.array(added)] if added else []
        mask = script.predict_in_session(shared, np.stack(clicks), np.ones(len(clicks), np.int64), session)
        expected = fresh.predict(np.stack(clicks))
        assert torch.equal(mask, expected.mask)
        assert session.origins[0] == expected.inputs["patch_origins"][0].tolist()
        assert session.last.mask is mask  # kept for the next round (`predict(..., previous=session.last)`)


def test_two_processes_equal_one(setup):
    args = ["--model", str(setup["model"]), "--data_dir", str(setup["data"]), "--protocols", "1,correction",
            "--rounds", "1", "--max_cases", "3"]  # fmt: skip
    one, two = setup["root"] / "one", setup["root"] / "two"
    load_script().main([*args, "--output_dir", str(one)])
    with socket.socket() as s:  # a free port: other test runs may be launching processes too
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", str(port), "-m", "sam3d_hf.evaluation"]  # fmt: skip
    result = subprocess.run([*launch, *args, "--output_dir", str(two)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "3 cases on 2 process(es)" in result.stdout
    assert read_csv(two / "cases.csv") == read_csv(one / "cases.csv")
    assert read_csv(two / "lesions.csv") == read_csv(one / "lesions.csv")
    assert json.loads((two / "summary.json").read_text()) == json.loads((one / "summary.json").read_text())


def test_base_and_adapter_equal_the_adapted_model(setup, tmp_path):
    save_model(tmp_path / "base", use_point_labels=False)
    base = Sam3DForPromptableSegmentation.from_pretrained(tmp_path / "base")
    adapted = get_adapter_model(base, Sam3DAdapterConfig(adapter_dim=8))
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the trained tensors (what the adapter file holds) now differ from the base's
        for parameter in adapted.model.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    adapted.save_pretrained(tmp_path / "adapter")
    save_model(tmp_path / "merged", use_point_labels=False, model=adapted.merge_and_unload())
    common = ["--data_dir", str(setup["data"]), "--protocols", "1", "--max_cases", "1"]
    script = load_script()
    script.main([*common, "--model", str(tmp_path / "merged"), "--output_dir", str(tmp_path / "merged_out")])
    script.main([*common, "--base", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                 "--output_dir", str(tmp_path / "adapter_out")])  # fmt: skip
    merged, adapter = read_csv(tmp_path / "merged_out" / "cases.csv"), read_csv(tmp_path / "adapter_out" / "cases.csv")
    assert merged[0]["dice"] != "" and merged == adapter


def test_errors(setup, tmp_path):
    script = load_script()
    plain = save_model(tmp_path / "plain", use_point_labels=False)
    base = ["--data_dir", str(setup["data"]), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="use_point_labels"):
        script.main([*base, "--model", str(plain), "--protocols", "correction"])
    with pytest.raises(ValueError, match=r"protocol 'interactive' places negative clicks.*use_point_labels=False"):
        script.main([*base, "--model", str(plain), "--protocols", "1,interactive"])
    with pytest.raises(SystemExit):
        script.main([*base, "--model", str(plain), "--protocols", "1,sideways"])
    with pytest.raises(SystemExit):
        script.main([*base, "--model", str(plain), "--base", str(plain)])


def test_a_failed_run_leaves_nothing_and_an_output_is_replaced_only_once_complete(setup, tmp_path, ended):
    """Also: a run ends its Accelerator whether it fails or succeeds. A process that exits with its process group alive
    can abort in Gloo's teardown, which fails a multi-process launch at random (seen in CI)."""
    data = shutil.copytree(setup["data"], tmp_path / "task")
    model = save_model(tmp_path / "model", use_point_labels=False, preset=None)
    out = tmp_path / "runs" / "eval"  # its parent does not exist either
    argv = ["--model", str(model), "--data_dir", str(data), "--protocols", "1", "--max_cases", "2",
            "--output_dir", str(out)]  # fmt: skip
    second = Path(index_dataset(data)[1]["image"])  # fails after the first case has its overlay
    scan = second.read_bytes()
    script = load_script()
    second.write_bytes(scan[: len(scan) // 2])  # truncated: its header reads, its voxels do not
    with pytest.raises(ValueError, match="Could not read"):
        script.main(argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "task"]  # no runs/, no hidden partial folder
    assert len(ended) == 1
    second.write_bytes(scan)
    script.main(argv)
    assert len(ended) == 2
    assert {r["dataset"] for r in read_csv(out / "cases.csv")} == {"task"}  # no preset: the data folder's name
    assert len(list((out / "overlays").iterdir())) == 2
    with pytest.raises(ValueError, match=r"not empty.*--overwrite"):
        script.main(argv)
    (out / "old.txt").write_text("from an earlier run")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    second.write_bytes(scan[: len(scan) // 2])
    with pytest.raises(ValueError, match="Could not read"):  # --overwrite, but the run fails: the old folder stays
        script.main([*argv, "--overwrite"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in out.parent.iterdir()] == ["eval"]
    second.write_bytes(scan)
    script.main([*argv, "--overwrite"])
    assert not (out / "old.txt").exists() and (out / "summary.json").is_file()
    assert [p.name for p in out.parent.iterdir()] == ["eval"]


def test_bad_data_is_refused_before_the_model_is_loaded(setup, tmp_path, ended, monkeypatch):
    """A label map that does not lie on its image's grid, an unreadable image or a wrong --target_label: one error
    naming the case (and the label value), before any model is loaded, as training refuses the same data."""
    evaluation = load_script()
    monkeypatch.setattr(evaluation, "load_model", lambda args: pytest.fail("the model was loaded"))
    data = shutil.copytree(setup["data"], tmp_path / "task")
    case = index_dataset(data)[1]
    argv = ["--model", str(setup["model"]), "--data_dir", str(data), "--protocols", "1", "--output_dir",
            str(tmp_path / "out")]  # fmt: skip
    label = nib.load(case["label"])
    values = np.asarray(label.dataobj)  # read now: the file is rewritten below
    shifted = label.affine.copy()
    shifted[:3, 3] += 7.0
    nib.save(nib.Nifti1Image(values, shifted), case["label"])
    with pytest.raises(ValueError, match=rf"not usable: Case '{case['case_id']}': the label map's affine differs"):
        evaluation.main(argv)
    nib.save(nib.Nifti1Image(values[:-1], label.affine), case["label"])
    with pytest.raises(ValueError, match=rf"Case '{case['case_id']}': the label map has shape"):
        evaluation.main(argv)
    nib.save(nib.Nifti1Image(values, label.affine), case["label"])
    with pytest.raises(
        ValueError, match=r"No case holds the target label value 7 .*--target_label.* e\.g\. \[0, 1, 2\]"
    ):
        evaluation.main([*argv, "--target_label", "7"])
    Path(case["image"]).write_bytes(b"not a scan")
    with pytest.raises(ValueError, match=rf"Case '{case['case_id']}': could not read the image file"):
        evaluation.main(argv)
    assert len(ended) == 4 and not (tmp_path / "out").exists()


def test_an_empty_split_says_so(setup, tmp_path):
    split = tmp_path / "split.json"
    cases = list(index_dataset(setup["data"])["case_id"])
    split.write_text(json.dumps({"train": cases, "validation": [], "test": []}))
    with pytest.raises(ValueError, match=r"the 'test' split of .*split.json holds no case"):
        load_script().main(["--model", str(setup["model"]), "--data_dir", str(setup["data"]), "--split_file",
                            str(split), "--output_dir", str(tmp_path / "out")])  # fmt: skip


def test_scans_without_a_label_are_left_out_as_in_training(setup, tmp_path):
    """The split evaluate.py makes leaves out unlabelled scans, as train.py's does (same cases, same seed)."""
    data, labelled = copy_with_an_unlabelled_scan(setup["data"], tmp_path / "task")
    load_script().main(["--model", str(setup["model"]), "--data_dir", str(data), "--protocols", "1", "--max_cases",
                        "1", "--split", "train", "--split_file", str(tmp_path / "split.json"), "--output_dir",
                        str(tmp_path / "out")])  # fmt: skip
    split = json.loads((tmp_path / "split.json").read_text())
    assert sorted(split["train"] + split["validation"] + split["test"]) == labelled
    assert read_csv(tmp_path / "out" / "cases.csv")[0]["case_id"] in labelled


def test_automatic_mode_is_its_own_row(setup, tmp_path, capsys):
    out = tmp_path / "automatic"
    load_script().main(["--model", str(setup["model"]), "--data_dir", str(setup["data"]), "--automatic",
                        "--centre_clicks", "--sw_batch_size", "4", "--max_cases", "1",
                        "--output_dir", str(out)])  # fmt: skip
    assert "cases: 100%" in capsys.readouterr().err  # the progress bar
    rows = read_csv(out / "cases.csv")
    assert [(r["protocol_name"], r["protocol"], r["num_clicks"], r["clicks"]) for r in rows] == [
        ("automatic", "automatic", "0", "[]")
    ]
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["summary"]) == ["3DSAM-adapter, automatic (sliding window)"]
    # The row scores the predictor's sliding-window mask.
    case = index_dataset(setup["data"])[0]
    predictor = Sam3DPredictor(
        Sam3DForPromptableSegmentation.from_pretrained(setup["model"]), Sam3DProcessor.from_pretrained(setup["model"])
    )
    predictor.set_image(case["image"])
    label = nib.load(case["label"])
    expected = evaluate_case(
        predictor.predict_automatic(batch_size=4, centre_clicks=True).mask,
        np.asarray(label.dataobj) == 2,
        np.linalg.norm(label.affine[:3, :3], axis=0),
    )
    assert (float(rows[0]["dice"]), float(rows[0]["nsd"])) == pytest.approx((expected["dice"], expected["nsd"]))
    assert 0 < expected["dice"] < 1  # a mask that tells modes apart
    assert not (out / "dice_per_round.png").exists()  # no click rows to plot


def test_help_names_the_command_and_explains_every_option(capsys):
    script = load_script()
    assert [action.option_strings for action in script.build_parser()._actions if not action.help] == []
    with pytest.raises(SystemExit):
        script.parse_args(["--help"], prog="sam3d evaluate")
    out = capsys.readouterr().out
    assert out.startswith("usage: sam3d evaluate ") and "--automatic" in out and "preset" in out


class Everything(torch.nn.Module):
    """A prompted stand-in that calls every voxel of its input foreground: its mask is the crop itself."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.config = Sam3DConfig.from_preset("tiny")
        self.points = []

    @property
    def device(self):
        return self.anchor.device

    def forward(self, pixel_values, input_points=None, input_labels=None):
        self.points.append(input_points)
        self.pixel_values = pixel_values
        ones = torch.ones_like(pixel_values)
        return type("Out", (), {"logits": torch.cat([-10 * ones, 10 * ones], dim=1)})()


def test_official_placement_is_test_pys_crop_and_misses_the_far_lesion(tmp_path):
    """On a 1 mm scan read the official way (no resampling, no reorientation), test.py's rule written out: N tumour
    voxels, one crop of the patch size centred at (max + min) // 2 of the clicks, never shifted (here it leaves the
    scan), zero padding; a lesion outside the crop is missed."""
    from sam3d_hf import evaluation

    shape = (120, 80, 120)
    label = np.zeros(shape, np.uint8)
    label[2:9, 2:8, 2:9] = 2  # near the scan's corner: the crop leaves the scan
    label[95:103, 60:66, 95:104] = 2  # far away: outside any crop around the first
    image = nib.Nifti1Image(np.full(shape, 40.0, np.float32), np.eye(4))
    processor = Sam3DProcessor(Sam3DImageProcessor.from_preset("official_kits"), patch_size=PATCH, cluster_margin=4)
    model = Everything()
    predictor = Sam3DPredictor(model, processor)
    predictor.set_image(image)
    tumour = label == 2
    first = np.zeros(shape, bool)
    first[2:9, 2:8, 2:9] = True
    for seed in range(4):
        mask, clicks = evaluation.official_crop_prediction(predictor, first, 3, seed)
        assert clicks.shape == (3, 3) and first[tuple(np.rint(clicks).astype(int).T)].all()
        centre = (clicks.max(0) + clicks.min(0)) // 2
        low = (centre - np.array(PATCH) // 2).astype(int)
        box = np.zeros(shape, bool)
        box[tuple(slice(max(a, 0), a + p) for a, p in zip(low, PATCH))] = True
        assert (low < 0).any()  # the crop leaves the scan: not shifted inside
        np.testing.assert_array_equal(mask.numpy().astype(bool), box)
        np.testing.assert_array_equal(model.points[-1][0].numpy(), clicks - low)  # the clicks in patch voxels
        crop = model.pixel_values[0, 0]
        inside = tuple(slice(max(-a, 0), None) for a in low)  # the part of the crop inside the scan (at its start)
        ip = processor.image_processor
        assert torch.allclose(crop[inside], torch.tensor((40.0 - ip.intensity_mean) / ip.intensity_std))
        assert (crop == 0).sum() == np.prod(PATCH) - crop[inside].numel()  # zero padding: the dataset mean
        lesions = evaluate_case(mask, tumour, (1, 1, 1))["lesions"]
        assert [lesion["detected"] for lesion in lesions] == [True, False]  # the far lesion counts as missed


# ------------------------------------------------------------------------------------------------------ interactive
ROUNDS = 3


@pytest.fixture(scope="module")
def interactive_run(setup):
    out = setup["root"] / "interactive"
    load_script().main(["--model", str(setup["model"]), "--data_dir", str(setup["data"]), "--protocols",
                        "1,interactive", "--rounds", str(ROUNDS), "--max_cases", "2", "--save_masks",
                        "--output_dir", str(out)])  # fmt: skip
    return out


def _deepest_voxels_of_largest_lesion(tumour, spacing):
    """Every voxel of the largest 26-connected lesion at its greatest depth (mm to the nearest voxel outside, by
    brute force on its box grown by one voxel: every voxel there outside the lesion counts as outside)."""
    lesions, _ = ndimage.label(tumour, np.ones((3, 3, 3)))
    largest = 1 + int(np.argmax(np.bincount(lesions.ravel())[1:]))
    box = tuple(slice(s.start - 1, s.stop + 1) for s in ndimage.find_objects(lesions)[largest - 1])
    depth = brute_force_depth_mm(lesions[box] == largest, spacing)
    return {tuple(v) for v in np.argwhere(depth >= np.nanmax(depth) - 1e-9) + [s.start for s in box]}


def test_interactive_rounds_curves_and_areas(setup, interactive_run):
    """cases.csv has rounds 0..R of protocol interactive per case, the first click at the centre of the largest
    lesion, NSD at 2 mm besides --tolerance_mm; interactive.csv's areas are the trapezoid of those rows; summary.json's
    block is their mean; table.md shows the curve."""
    rows = read_csv(interactive_run / "cases.csv")
    sessions = [r for r in rows if r["protocol_name"] == "interactive"]
    cases = sorted({r["case_id"] for r in rows})
    assert len(cases) == 2 and len(sessions) == 2 * (ROUNDS + 1)
    assert all(r["nsd_2mm"] == "" for r in rows if r["protocol_name"] != "interactive")
    per_case = {c: sorted((r for r in sessions if r["case_id"] == c), key=lambda r: int(r["round"])) for c in cases}
    by_id = {case["case_id"]: case for case in index_dataset(setup["data"])}
    for case_id, members in per_case.items():
        assert [int(r["round"]) for r in members] == list(range(ROUNDS + 1))
        assert {(r["protocol"], r["num_clicks"], r["method"]) for r in members} == {
            ("interactive", "1", "3DSAM-adapter")
        }
        assert len(json.loads(members[0]["clicks"])) == 1
        label = nib.load(by_id[case_id]["label"])
        tumour, spacing = np.asarray(label.dataobj) == 2, np.linalg.norm(label.affine[:3, :3], axis=0)
        (first,) = json.loads(members[0]["clicks"])
        assert tuple(int(v) for v in first) in _deepest_voxels_of_largest_lesion(tumour, spacing)
        assert json.loads(members[0]["click_labels"]) == [1]
        mask = np.asarray(nib.load(interactive_run / "masks" / "interactive" / f"{case_id}.nii.gz").dataobj)
        assert float(members[-1]["nsd_2mm"]) == pytest.approx(normalized_surface_dice(mask, tumour, spacing, 2.0))
        assert float(members[-1]["nsd"]) == pytest.approx(normalized_surface_dice(mask, tumour, spacing, 5.0))
    table = {r["case_id"]: r for r in read_csv(interactive_run / "interactive.csv")}
    assert sorted(table) == cases
    record = json.loads((interactive_run / "summary.json").read_text())
    block = record["interactive"]
    assert block["rounds"] == block["auc_max"] == ROUNDS and block["n_cases"] == 2
    for metric in ("dice", "nsd", "nsd_2mm"):
        curves = np.array([[float(r[metric]) for r in per_case[c]] for c in cases])  # (cases, rounds + 1)
        areas = [np.trapezoid(curve, x=np.arange(ROUNDS + 1)) for curve in curves]
        for case_id, area, curve in zip(cases, areas, curves):
            assert float(table[case_id][f"{metric}_auc"]) == pytest.approx(area, abs=1e-12)
            assert float(table[case_id][f"{metric}_final"]) == pytest.approx(curve[-1], abs=1e-12)
        np.testing.assert_allclose(block[f"{metric}_per_round"], curves.mean(0), atol=1e-12)
        assert block[f"{metric}_auc_mean"] == pytest.approx(np.mean(areas), abs=1e-12)
        assert block[f"{metric}_final_mean"] == pytest.approx(curves[:, -1].mean(), abs=1e-12)
    assert block["repeated_corrections"] == sum(int(table[c]["repeated_corrections"]) for c in cases)
    assert block["corrections"] == sum(int(table[c]["corrections"]) for c in cases)
    assert (block["nsd_tolerance_mm"], block["nsd_2mm_tolerance_mm"]) == (5.0, 2.0)
    names = [f"3DSAM-adapter, 1 click (interactive){f' + {k} correction' + 's' * (k > 1) if k else ''}"
             for k in range(ROUNDS + 1)]  # fmt: skip
    assert all(name in record["summary"] for name in names)
    text = (interactive_run / "table.md").read_text()
    assert f"| 0 (first click) | {100 * block['dice_per_round'][0]:.2f} |" in text
    assert f"{block['repeated_corrections']} of {block['corrections']}" in text


def test_a_model_that_ignores_clicks_has_every_correction_counted_as_repeated(setup, tmp_path, monkeypatch):
    """A predictor whose mask stays empty: each correction would click the largest lesion's centre again, so every
    one counts as repeated and goes to the next lesion instead (a scan with two), then to none (no lesion left to
    click: the clicks stay as they are)."""
    predict = Sam3DPredictor.predict

    def ignoring(self, *args, **kwargs):
        prediction = predict(self, *args, **kwargs)
        return dataclasses.replace(prediction, mask=torch.zeros_like(prediction.mask))

    monkeypatch.setattr(Sam3DPredictor, "predict", ignoring)
    out = tmp_path / "out"
    load_script().main(["--model", str(setup["model"]), "--data_dir", str(setup["data"]), "--protocols",
                        "interactive", "--rounds", str(ROUNDS), "--max_cases", "2",
                        "--output_dir", str(out)])  # fmt: skip
    rows = read_csv(out / "cases.csv")
    labels = {c["case_id"]: c["label"] for c in index_dataset(setup["data"])}
    counts = []
    for case in read_csv(out / "interactive.csv"):
        assert (int(case["corrections"]), int(case["repeated_corrections"])) == (ROUNDS, ROUNDS)
        assert float(case["dice_auc"]) == 0.0
        members = sorted((r for r in rows if r["case_id"] == case["case_id"]), key=lambda r: int(r["round"]))
        clicks = [json.loads(r["clicks"]) for r in members]
        lesions, count = ndimage.label(np.asarray(nib.load(labels[case["case_id"]]).dataobj) == 2, np.ones((3,) * 3))
        counts.append(count)
        lesion_of = [lesions[tuple(int(v) for v in click)] for click in clicks[-1]]
        if count == 1:  # the only lesion's centre, once: nothing else to click
            assert clicks == [clicks[0]] * (ROUNDS + 1) and len(clicks[0]) == 1
        else:  # then the other lesion's centre, positive; then nothing left
            assert len(clicks[1]) == 2 and clicks[1][0] == clicks[0][0] and clicks[2:] == [clicks[1]] * (ROUNDS - 1)
            assert lesion_of[0] != lesion_of[1] and min(lesion_of) > 0
            assert json.loads(members[1]["click_labels"]) == [1, 1]
    assert sorted(counts) == [1, 2]  # both kinds of scan
    block = json.loads((out / "summary.json").read_text())["interactive"]
    assert block["repeated_corrections"] == block["corrections"] == 2 * ROUNDS


def test_the_card_states_the_interactive_curve_from_summary_json(setup, interactive_run):
    """Each interactive statement of the card (curve per round, areas, tolerances, repeats) is summary.json's number."""
    block = json.loads((interactive_run / "summary.json").read_text())["interactive"]
    card = str(render_model_card(setup["model"], evaluation=interactive_run / "summary.json"))
    assert "| after | Dice | NSD (5 mm) | NSD (2 mm) |" in card
    for round_ in range(ROUNDS + 1):
        after = f"correction {round_}" if round_ else "first click"
        (line,) = [row for row in card.splitlines() if row.startswith(f"| {after} |")]
        cells = [float(c) for c in line.strip("|").split("|")[1:]]
        assert cells == [round(block[f"{m}_per_round"][round_], 4) for m in ("dice", "nsd", "nsd_2mm")]
    match = re.search(
        r"Area under the curve \(trapezoid over rounds 0 to (\d+), x = round, at most (\d+)\), mean ± standard "
        r"deviation over cases: Dice ([\d.]+) ± ([\d.]+); NSD \(5 mm\) ([\d.]+) ± ([\d.]+); NSD \(2 mm\) ([\d.]+) ± "
        r"([\d.]+)\..*Corrections the model ignored \(the next click would have repeated an earlier one\): (\d+) of "
        r"(\d+)\.",
        card,
    )
    assert match, card[card.index("## Evaluation") :]
    expected = [block["rounds"], block["auc_max"]]
    for metric in ("dice", "nsd", "nsd_2mm"):
        expected += [round(block[f"{metric}_auc_mean"], 4), round(block[f"{metric}_auc_std"], 4)]
    expected += [block["repeated_corrections"], block["corrections"]]
    assert [float(v) for v in match.groups()] == expected
    assert f"Interactive evaluation ({block['n_cases']} cases)" in card
    assert f"then {block['rounds']} corrections" in card


def test_the_interactive_recipe_evaluates_protocol_interactive():
    args = load_script().parse_args(["--model", "m", "--data_dir", "d", "--output_dir", "o", "--recipe", "interactive"])
    assert args.protocols == ["1", "3", "10", "interactive"]
    args = load_script().parse_args(["--model", "m", "--data_dir", "d", "--output_dir", "o", "--protocols",
                                     "correction,interactive"])  # fmt: skip
    assert args.protocols == ["correction", "interactive"]
