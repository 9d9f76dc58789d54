"""`sam3d demo --quick` end to end (the real command in a subprocess) and the demo's failure paths."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sam3d_hf.cli import main
from sam3d_hf.metrics import dice_score
from sam3d_hf.pipeline import remote_code_files

REPOSITORY = Path(__file__).resolve().parents[1]


def test_quick_demo_writes_everything_and_its_segment_line_works(tmp_path, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "sam3d_hf.cli", "demo", "--quick", "--output-dir", "demo"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    demo = tmp_path / "demo"
    for name in (
        "model/config.json", "model/model.safetensors", "model/processor_config.json", "model/README.md",
        "model/adapter/adapter_config.json", "model/adapter/adapter_model.safetensors", "evaluation/table.md",
        "evaluation/summary.json", "evaluation/cases.csv", "training/split.json", "data/dataset.json",
    ):  # fmt: skip
        assert (demo / name).is_file(), name
    assert list((demo / "evaluation" / "overlays").glob("*.png"))
    # The folder carries the pipeline's code: pipeline("sam3d-segmentation", ..., trust_remote_code=True) anywhere.
    config = json.loads((demo / "model" / "config.json").read_text())
    assert set(remote_code_files(config)) <= {p.name for p in (demo / "model").iterdir()}
    assert config["custom_pipelines"]["sam3d-segmentation"]["impl"] == "pipeline.Sam3DSegmentationPipeline"
    umask = os.umask(0)
    os.umask(umask)
    for item in [demo, *demo.rglob("*")]:  # the user's usual modes, not mkdtemp's 0700 or save_pretrained's 0600
        assert item.stat().st_mode & 0o777 == (0o777 if item.is_dir() else 0o666) & ~umask, item
    card = (demo / "model" / "README.md").read_text()
    assert "model-index" in card and "Dice" in card
    table = (demo / "evaluation" / "table.md").read_text()
    assert "1 click" in table and "interactive" in table
    predictions = sorted((demo / "predictions").glob("*.nii.gz"))
    assert predictions
    scored = {
        row["case_id"]: float(row["dice"])
        for row in csv.DictReader((demo / "evaluation" / "cases.csv").open())
        if row["protocol_name"] == "1"
    }
    assert sorted(scored) == sorted(p.name.split(".")[0] for p in predictions)
    for prediction in predictions:  # in the scan's own geometry, and the very masks the table scored
        scan = nib.load(demo / "data" / "imagesTr" / prediction.name)
        mask = nib.load(prediction)
        assert mask.shape == scan.shape
        np.testing.assert_allclose(mask.affine, scan.affine, atol=1e-5)
        label = np.asarray(nib.load(demo / "data" / "labelsTr" / prediction.name).dataobj) == 2
        dice = dice_score(np.asarray(mask.dataobj), label)
        assert dice == pytest.approx(scored[prediction.name.split(".")[0]], abs=1e-9)
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]  # no partial folder left next to it
    for step in range(1, 6):
        assert f"[{step}/5]" in result.stdout
    # The printed next step runs as printed (paths relative to where the demo ran).
    line = re.search(r"^  (sam3d segment .*)$", result.stdout, re.M).group(1)
    os.chdir(tmp_path)
    assert main(line.split()[1:]) == 0
    assert (tmp_path / "mask.nii.gz").is_file() and (tmp_path / "mask.png").is_file()
    assert nib.load(tmp_path / "mask.nii.gz").shape == nib.load(line.split("--image ")[1].split()[0]).shape


def _one_line(argv, capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("sam3d demo: error: ") and "Traceback" not in err, err
    return err


def test_demo_refuses_a_taken_folder(tmp_path, capsys):
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "mine.txt").write_text("keep")
    assert "already exists and is not empty; pass --overwrite" in _one_line(
        ["demo", "--quick", "--output-dir", str(tmp_path / "demo")], capsys
    )
    (tmp_path / "file").write_text("keep")
    assert "is a file" in _one_line(["demo", "--quick", "--output-dir", str(tmp_path / "file")], capsys)
    assert (tmp_path / "demo" / "mine.txt").read_text() == "keep" and (tmp_path / "file").read_text() == "keep"


def test_failed_training_leaves_nothing_and_keeps_the_old_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sam3d_hf.training.launch_command", lambda argv, options: [sys.executable, "-c", "exit(3)"])
    with pytest.raises(SystemExit, match=r"^sam3d demo: error: training failed"):
        main(["demo", "--quick", "--output-dir", str(tmp_path / "demo")])
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "table.md").write_text("old run")
    with pytest.raises(SystemExit):
        main(["demo", "--quick", "--overwrite", "--output-dir", str(tmp_path / "old")])
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (tmp_path / "old" / "table.md").read_text() == "old run"
