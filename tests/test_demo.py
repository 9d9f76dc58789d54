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


def test_idle_cores_reads_the_idle_share_of_cpu_time(tmp_path, monkeypatch):
    from sam3d_hf import demo

    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice: over the window 300 of 850 ticks are idle or
    # waiting on I/O (250 + 50); the other 550 are work (user 300, nice 50, system 100, steal 100); guest time (70) is
    # already inside user and must not count twice.
    snapshots = iter(["cpu 1000 0 500 4000 100 0 0 0 0 0", "cpu 1300 50 600 4250 150 0 0 100 70 0"])
    stat.write_text(next(snapshots) + "\ncpu0 1 2 3 4\n")
    monkeypatch.setattr(demo.time, "sleep", lambda seconds: stat.write_text(next(snapshots) + "\n"))
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    assert demo.idle_cores(stat=str(stat)) == pytest.approx(2 * 300 / 850)
    # Without /proc/stat (macOS): the cores minus the 1-minute load average, never below 0.
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (1.25, 0.0, 0.0))
    assert demo.idle_cores(stat=str(tmp_path / "missing")) == pytest.approx(0.75)
    monkeypatch.setattr(demo.os, "getloadavg", lambda: (3.5, 0.0, 0.0))
    assert demo.idle_cores(stat=str(tmp_path / "missing")) == 0.0


def test_threads_are_one_per_idle_core_at_least_one(monkeypatch):
    from sam3d_hf import demo

    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    assert [demo.choose_threads(idle=idle)[0] for idle in (1.95, 1.6, 1.0, 0.3, 0.0)] == [2, 2, 1, 1, 1]
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 8)
    assert demo.choose_threads(idle=6.7)[0] == 7
    assert demo.choose_threads(requested=3, idle=0.0) == (3, "3 threads: as --threads asked")
    assert demo.choose_threads(idle=1.0)[1] == "1 thread: 1.0 of 8 cores idle"


def test_the_demo_trains_and_evaluates_with_the_threads_it_chose(tmp_path, monkeypatch, capsys):
    """One core taken by another process: training is launched with one thread (accelerate's option and
    OMP_NUM_THREADS), evaluation runs with one torch thread, and the process's own setting is restored."""
    import torch

    from sam3d_hf import demo, evaluation

    monkeypatch.setattr(demo, "idle_cores", lambda: 1.0)
    monkeypatch.setattr(demo.os, "cpu_count", lambda: 2)
    launched = {}

    def fake_run(command, env):
        launched.update(command=command, env=env)
        output = Path(command[command.index("--output_dir") + 1])
        (output / "final_model").mkdir(parents=True)
        return subprocess.CompletedProcess(command, 0)

    seen = []

    def fake_evaluation(argv):
        seen.append(torch.get_num_threads())
        raise RuntimeError("stop after the evaluation's start")

    monkeypatch.setattr(demo.subprocess, "run", fake_run)
    monkeypatch.setattr(evaluation, "main", fake_evaluation)
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # the process's own setting, different from the one the demo chooses
    try:
        with pytest.raises(RuntimeError, match="stop after"):
            demo.run_demo(tmp_path / "demo", quick=True)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    command = launched["command"]
    assert command[command.index("--num_cpu_threads_per_process") + 1] == "1"
    assert command.index("--num_cpu_threads_per_process") < command.index("sam3d_hf.training")  # accelerate's option
    assert launched["env"]["OMP_NUM_THREADS"] == "1"
    assert launched["env"]["MALLOC_MMAP_THRESHOLD_"] == os.environ.get("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert seen == [1] and after == 2
    printed = capsys.readouterr().out
    assert "1 thread: 1.0 of 2 cores idle" in printed
    assert not (tmp_path / "demo").exists()
