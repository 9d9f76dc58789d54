"""The `sam3d` command line: a user mistake is one clear line on stderr and exit status 1, never a traceback."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_conversion import OFFICIAL_TINY, official_tensors

import sam3d_hf
from sam3d_hf import Sam3DConfig
from sam3d_hf.cli import main

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def official():
    return official_tensors(Sam3DConfig(**OFFICIAL_TINY))


def one_line_error(argv: list[str], capsys) -> str:
    """Run `sam3d argv`, check that it failed with exactly one line on stderr, and return that line."""
    assert main(argv) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"sam3d {argv[0]}: error: ") and "Traceback" not in captured.err
    return lines[0]


def test_version(capsys):
    setup = (REPOSITORY / "setup.py").read_text()
    version = re.search(r'version="([^"]+)"', setup).group(1)  # what pip installs, read independently
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"sam3d {version}\n"
    assert sam3d_hf.__version__ == version


@pytest.mark.parametrize(
    "change, message",
    [
        ("no pos_embed", r"lacks or mis-stores an entry .*\(KeyError: 'pos_embed'\).*docs/design.md"),
        ("1-D pos_embed", r"lacks or mis-stores an entry .*\(IndexError: "),
        ("decoder_dict is a list", r"decoder_dict is a list, expected a state dict \(names -> tensors\)"),
        ("encoder_dict is a number", r"encoder_dict is a int, expected a state dict"),
    ],
)
@pytest.mark.parametrize("image_size", [[], ["--image-size", "40", "24", "44"]])  # config read before / after mapping
def test_malformed_official_snapshot_is_one_line(official, tmp_path, capsys, change, message, image_size):
    encoder, prompt, decoder = (dict(section) for section in official)
    if change == "no pos_embed":
        del encoder["pos_embed"]
    elif change == "1-D pos_embed":
        encoder["pos_embed"] = encoder["pos_embed"].flatten()
    elif change == "decoder_dict is a list":
        decoder = list(decoder.values())
    else:
        encoder = 3
    path = tmp_path / "snapshot.pth.tar"
    torch.save({"encoder_dict": encoder, "feature_dict": [prompt] * 4, "decoder_dict": decoder}, path)
    argv = ["convert", "official", "--checkpoint", str(path), "--output", str(tmp_path / "out"), *image_size]
    assert re.search(message, one_line_error(argv, capsys))
    assert not (tmp_path / "out").exists()


def test_missing_config_is_one_line(tmp_path, capsys, monkeypatch):
    argv = ["convert", "sam", "--checkpoint", str(tmp_path / "sam.pth"), "--output", str(tmp_path / "out")]
    line = one_line_error([*argv, "--config", "./nowhere"], capsys)
    assert "--config './nowhere': no such file or folder; give a Sam3DConfig folder or config.json" in line
    line = one_line_error([*argv, "--config", str(tmp_path / "configs" / "vit_t.json")], capsys)
    assert "vit_t.json': no such file or folder" in line
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    line = one_line_error([*argv, "--config", "someone/sam3d-config"], capsys)
    assert "no such file or folder (HF_HUB_OFFLINE is set, so it cannot be a Hub id)" in line
    (tmp_path / "empty").mkdir()  # transformers 5.23 reads an empty folder as the default (ViT-B) config
    line = one_line_error([*argv, "--config", str(tmp_path / "empty")], capsys)
    assert re.search(r"--config '.*empty' is a folder without config.json \(found \[\]\)", line)
    (tmp_path / "broken.json").write_text("{not json")
    line = one_line_error([*argv, "--config", str(tmp_path / "broken.json")], capsys)
    assert re.search(r"--config '.*broken.json' could not be loaded: ", line)


def test_output_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("keep me")
    argv = ["convert", "official", "--checkpoint", str(tmp_path / "none.pth.tar"), "--output"]
    line = one_line_error([*argv, str(tmp_path / "a-file")], capsys)
    assert re.search(r"'.*a-file' is an existing file, not a folder; choose a folder to write into", line)
    assert "overwrite" not in line
    line = one_line_error([*argv, str(tmp_path / "a-file" / "model")], capsys)
    assert re.search(r"cannot create '.*a-file/model': '.*a-file' is a file, not a folder", line)
    assert "overwrite" not in line
    line = one_line_error([*argv, str(tmp_path / "a-file"), "--overwrite"], capsys)  # never replaces a file
    assert "is an existing file, not a folder" in line
    assert (tmp_path / "a-file").read_text() == "keep me"


@pytest.mark.parametrize("source", ["sam", "official"])
def test_taken_output_fails_before_the_checkpoint_is_read(tmp_path, capsys, source):
    """The output is checked first: the (here unreadable) checkpoint is never opened."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "config.json").write_text("{}")
    checkpoint = tmp_path / "broken.pth"
    checkpoint.write_bytes(b"not a checkpoint")
    argv = ["convert", source, "--checkpoint", str(checkpoint), "--output", str(tmp_path / "out")]
    line = one_line_error(argv, capsys)
    assert "already exists and is not an empty folder" in line and "--overwrite" in line
    assert (tmp_path / "out" / "config.json").read_text() == "{}"
    assert "could not read" in one_line_error([*argv, "--overwrite"], capsys)  # the checkpoint's own error comes next


def test_subprocess_prints_one_line_and_no_traceback(tmp_path):
    """The real command (one process start, about 10 s of imports): a malformed snapshot (a KeyError before)."""
    path = tmp_path / "snapshot.pth.tar"
    torch.save({"encoder_dict": {}, "feature_dict": [{}] * 4, "decoder_dict": {}}, path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPOSITORY), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "sam3d_hf.cli", "convert", "official", "--checkpoint", str(path), "--output"]
    result = subprocess.run([*command, str(tmp_path / "out")], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1, result.stderr
    assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("sam3d convert: error: the official snapshot lacks or mis-stores an entry")


def test_system_errors_are_one_line(tmp_path, capsys, monkeypatch):
    """What the system refuses (here a permission error while reading) is reported in one line too."""

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", "/data/best.pth.tar")

    monkeypatch.setattr("sam3d_hf.convert_sam3d.load_official_checkpoint", refuse)
    argv = ["convert", "official", "--checkpoint", "/data/best.pth.tar", "--output", str(tmp_path / "out")]
    assert one_line_error(argv, capsys).endswith("[Errno 13] Permission denied: '/data/best.pth.tar'")


# ------------------------------------------------------------------------------------------- segment / push / etc.
@pytest.fixture(scope="module")
def segment_setup(tmp_path_factory):
    """A tiny random model with point labels + its processor in one folder, and an oblique synthetic scan."""
    import nibabel as nib
    from conftest import PATCH, TINY, randomize

    from sam3d_hf import Sam3DForPromptableSegmentation, Sam3DImageProcessor, Sam3DProcessor
    from sam3d_hf.synthetic import SYNTHETIC_PROCESSOR_KWARGS, generate_case

    root = tmp_path_factory.mktemp("segment")
    config = Sam3DConfig(
        **{**TINY, "prompt_encoder_config": {**TINY["prompt_encoder_config"], "use_point_labels": True}}
    )
    model = randomize(Sam3DForPromptableSegmentation(config), seed=4).eval()
    processor = Sam3DProcessor(Sam3DImageProcessor(**SYNTHETIC_PROCESSOR_KWARGS), patch_size=PATCH, cluster_margin=4)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    image, label = generate_case(3, orientation="oblique", num_lesions=2)
    nib.save(image, root / "ct.nii.gz")
    lesion = np.argwhere(np.asarray(label.dataobj) == 2)
    return {"root": root, "model": model, "processor": processor, "image": image, "lesion": lesion}


def _predict(setup, points, labels, threshold=0.5):
    from sam3d_hf.inference import Sam3DPredictor

    predictor = Sam3DPredictor(setup["model"], setup["processor"])
    predictor.set_image(str(setup["root"] / "ct.nii.gz"))
    return predictor.predict(points, labels, threshold=threshold)


def _segment_argv(setup, out, *extra):
    root = setup["root"]
    return ["segment", "--model", str(root / "model"), "--image", str(root / "ct.nii.gz"), "--output", str(out), *extra]


def test_segment_writes_the_predictors_mask_with_negative_clicks(segment_setup, tmp_path, capsys):
    import nibabel as nib

    positive, negative = segment_setup["lesion"][0], segment_setup["lesion"][-1]
    with_negative = _predict(segment_setup, [positive, negative], [1, 0])
    # A threshold inside the probability range, so the mask is neither empty nor full.
    inside = with_negative.probabilities[with_negative.probabilities > 0]
    threshold = float(inside.median())
    expected = (with_negative.probabilities >= threshold).numpy()
    all_positive = _predict(segment_setup, [positive, negative], [1, 1], threshold).mask.numpy()
    assert (all_positive != expected).any()  # so a CLI that ignores --negative fails below
    out = tmp_path / "mask.nii.gz"
    point = ",".join(map(str, positive))
    argv = _segment_argv(segment_setup, out, "--point", point, "--negative", ",".join(map(str, negative)))
    assert main([*argv, "--threshold", str(threshold), "--overlay", str(tmp_path / "overlay.png")]) == 0
    written = nib.load(out)
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
    np.testing.assert_allclose(written.affine, segment_setup["image"].affine, atol=1e-5)
    assert (tmp_path / "overlay.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz", "overlay.png"]  # no temporary files left
    assert f"wrote {out}" in capsys.readouterr().out


def test_segment_world_points_are_mm(segment_setup, tmp_path):
    import nibabel as nib

    voxels = segment_setup["lesion"][[0, len(segment_setup["lesion"]) // 2]]
    world = nib.affines.apply_affine(segment_setup["image"].affine, voxels)  # independent: nibabel's voxel -> RAS mm
    argv = _segment_argv(
        segment_setup, tmp_path / "voxel.nii.gz", *[a for v in voxels for a in ("--point", ",".join(map(str, v)))]
    )
    assert main(argv) == 0
    argv = _segment_argv(segment_setup, tmp_path / "world.nii.gz", "--points-in", "world",
                         *[a for w in world for a in ("--point=" + ",".join(f"{x:.6f}" for x in w),)])  # fmt: skip
    assert main(argv) == 0
    voxel_mask = np.asarray(nib.load(tmp_path / "voxel.nii.gz").dataobj)
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "world.nii.gz").dataobj), voxel_mask)
    assert voxel_mask.any()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--point", "1,2"], r"argument --point: expected three numbers i,j,k \(e.g. 60,48,20\), got '1,2'"),
        (["--point", "a,b,c"], r"expected three numbers i,j,k"),
        ([], r"the following arguments are required: --point"),
        (["--point", "1,2,3", "--points-in", "mm"], r"argument --points-in: invalid choice: 'mm'"),
    ],
)
def test_segment_usage_errors_are_one_line(segment_setup, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        main(_segment_argv(segment_setup, tmp_path / "m.nii.gz", *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("sam3d segment: error: ") and re.search(message, err), err


def test_segment_user_errors_are_one_line_and_write_nothing(segment_setup, tmp_path, capsys, monkeypatch):
    root = segment_setup["root"]
    point = ["--point", ",".join(map(str, segment_setup["lesion"][0]))]
    assert "--output must end in .nii or .nii.gz" in one_line_error(
        _segment_argv(segment_setup, tmp_path / "m.png", *point), capsys
    )
    argv = _segment_argv(segment_setup, tmp_path / "m.nii.gz", *point)
    line = one_line_error([*argv[:2], str(tmp_path / "nowhere"), *argv[3:]], capsys)
    assert "--model" in line and "no such folder" in line
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    line = one_line_error([*argv[:2], "someone/no-such-model", *argv[3:]], capsys)  # a Hub id, offline
    assert "--model 'someone/no-such-model' could not be loaded: " in line
    line = one_line_error([*argv[:4], str(tmp_path / "missing.nii.gz"), *argv[5:]], capsys)
    assert "missing.nii.gz" in line
    line = one_line_error([*argv, "--point", "5000,1,1"], capsys)  # outside the scan: the processor's message
    assert "5000" in line
    no_labels = tmp_path / "no-labels"
    Sam3DConfig(**{**segment_setup["model"].config.to_dict(), "prompt_encoder_config": {
        **segment_setup["model"].config.prompt_encoder_config.to_dict(), "use_point_labels": False}})  # fmt: skip
    import shutil

    shutil.copytree(root / "model", no_labels)
    config = json.loads((no_labels / "config.json").read_text())
    config["prompt_encoder_config"]["use_point_labels"] = False
    (no_labels / "config.json").write_text(json.dumps(config))
    line = one_line_error([*argv[:2], str(no_labels), *argv[3:], "--negative", "1,1,1"], capsys)
    assert "--negative needs a model trained with point labels" in line

    def fail_midway(image, path):  # the disk fills up after part of the file is written
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("nibabel.save", fail_midway)
    assert "No space left on device" in one_line_error(argv, capsys)
    assert list(tmp_path.glob("*m.nii.gz")) == [] and not list(tmp_path.glob(".tmp*"))


def test_push_dry_run_and_errors(segment_setup, tmp_path, capsys):
    argv = ["push", str(segment_setup["root"] / "model"), "--repo-id", "someone/sam3d-tiny", "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "files for someone/sam3d-tiny:" in out and "model.safetensors" in out and "processor_config.json" in out
    assert "--adapter-only needs --base-model-id" in one_line_error([*argv, "--adapter-only"], capsys)
    assert "is not a folder" in one_line_error(["push", str(tmp_path / "none"), "--repo-id", "a/b"], capsys)
    line = one_line_error(["push", str(segment_setup["root"] / "model"), "--repo-id", "not a repo id"], capsys)
    assert "not a repo id" in line


def test_push_uploads_through_hub(segment_setup, capsys, monkeypatch):
    """Without --dry-run the command calls hub.push_to_hub with the folder and the repo id."""
    calls = []

    class Info:
        commit_url = "https://huggingface.co/someone/sam3d-tiny/commit/abc"

    monkeypatch.setattr(
        "sam3d_hf.hub.push_to_hub", lambda folder, repo_id, **kw: calls.append((folder, repo_id, kw)) or Info()
    )
    assert main(["push", str(segment_setup["root"] / "model"), "--repo-id", "someone/sam3d-tiny", "--private"]) == 0
    assert calls[0][:2] == (str(segment_setup["root"] / "model"), "someone/sam3d-tiny") and calls[0][2]["private"]
    assert "pushed: https://huggingface.co/someone/sam3d-tiny/commit/abc" in capsys.readouterr().out


def test_evaluate_runs_the_example_and_reports_errors(segment_setup, tmp_path, capsys):
    from sam3d_hf.synthetic import generate_dataset

    data = generate_dataset(tmp_path / "data", num_cases=2, seed=1, num_lesions=1)
    argv = ["evaluate", "--model", str(segment_setup["root"] / "model"), "--data_dir", str(data), "--protocols", "1",
            "--output_dir", str(tmp_path / "eval")]  # fmt: skip
    assert main(argv) == 0
    rows = (tmp_path / "eval" / "cases.csv").read_text().splitlines()
    assert len(rows) == 3  # header + one row per case
    line = one_line_error([*argv[:-1], str(tmp_path / "eval2"), "--protocols", "7x"], capsys)
    assert "unknown protocol '7x'" in line
    line = one_line_error(["evaluate", "--data_dir", str(data), "--output_dir", str(tmp_path / "e")], capsys)
    assert "give --model, or --base together with --adapter" in line


def test_train_launches_accelerate_and_reports_errors(tmp_path, capsys, monkeypatch):
    from sam3d_hf import cli

    commands = []
    monkeypatch.setattr(
        "subprocess.run", lambda command, **kw: commands.append(command) or subprocess.CompletedProcess(command, 0)
    )
    config = REPOSITORY / "examples" / "accelerate_configs" / "cpu.yaml"
    argv = ["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "run"), "--model_config", "tiny"]
    assert main(["train", "--accelerate_config", str(config), *argv]) == 0
    assert commands == [[sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                         str(REPOSITORY / "examples" / "train.py"), *argv]]  # fmt: skip
    line = one_line_error(["train", *argv[:-1], "vit_z"], capsys)
    assert "--model_config must be one of" in line and "'vit_z'" in line
    assert "no such file" in one_line_error(["train", "--accelerate_config", str(tmp_path / "x.yaml"), *argv], capsys)
    monkeypatch.setattr("subprocess.run", lambda command, **kw: subprocess.CompletedProcess(command, 3))
    with pytest.raises(SystemExit, match=r"^sam3d train: error: training failed \(exit status 3"):
        main(["train", *argv])
    monkeypatch.setattr(cli, "__file__", str(tmp_path / "site-packages" / "sam3d_hf" / "cli.py"))  # a wheel install
    line = one_line_error(["train", *argv], capsys)
    assert "not installed with the package" in line and "pip install -e ." in line


@pytest.mark.parametrize("command", ["segment", "push", "demo", "convert", "evaluate", "train"])
def test_help_is_complete(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    expected = {
        "segment": ["--model", "--image", "--point", "--negative", "--points-in", "--output", "--overlay"],
        "push": ["--repo-id", "--adapter-only", "--dry-run"],
        "demo": ["--quick", "--output-dir", "--overwrite"],
        "convert": ["--checkpoint", "--output"],
        "evaluate": ["--model", "--data_dir", "--protocols", "--output_dir"],
        "train": ["--accelerate_config", "--data_dir", "--output_dir", "--max_train_steps"],
    }[command]
    assert all(option in out for option in expected), out
