"""The `sam3d` command line: a user mistake is one clear line on stderr and exit status 1, never a traceback."""

import importlib.metadata
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_conversion import OFFICIAL_TINY, official_tensors

import sam3d_hf
from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation
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
    version = importlib.metadata.version("sam3d-hf")  # what pip installed, read independently of the package
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
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # online: a Hub id would be looked up ...
    monkeypatch.setattr(Sam3DConfig, "from_pretrained", classmethod(lambda cls, *a, **k: pytest.fail("looked up")))
    line = one_line_error([*argv, "--config", "nowhere"], capsys)  # ... but a bare name is no Hub id: fails at once
    assert "--config 'nowhere': no such file or folder; give a Sam3DConfig folder or config.json" in line
    monkeypatch.undo()
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
    out_lines = capsys.readouterr().out.splitlines()
    steps = ["reading ", "loading the model ", "preprocessing the scan", "encoding and segmenting", "writing "]
    assert [next(i for i, line in enumerate(out_lines) if line.startswith(s)) for s in steps] == list(range(5))
    assert out_lines[-2].startswith(f"wrote {out}: ") and out_lines[-1] == f"wrote {tmp_path / 'overlay.png'}"


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
    # The world clicks come back to voxels through the inverse affine (to ~1e-6): a voxel at the threshold may flip.
    differ = np.asarray(nib.load(tmp_path / "world.nii.gz").dataobj) != voxel_mask
    assert voxel_mask.sum() > 100 and differ.sum() <= 3


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


def test_segment_checks_clicks_against_the_header_before_loading_the_model(
    segment_setup, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("sam3d_hf.cli._load_model_and_processor", lambda *a: pytest.fail("the model was loaded"))
    shape = segment_setup["image"].shape
    argv = _segment_argv(segment_setup, tmp_path / "m.nii.gz", "--point", f"{shape[0]},1,1")  # one voxel past the end
    line = one_line_error(argv, capsys)
    assert "1 of 1 points lie outside the volume" in line and f"size {list(shape)}" in line
    far = nib.affines.apply_affine(segment_setup["image"].affine, [-40, 1, 1])  # RAS mm of a voxel outside
    argv = _segment_argv(segment_setup, tmp_path / "m.nii.gz", "--points-in", "world",
                         "--point=" + ",".join(f"{x:.4f}" for x in far))  # fmt: skip
    assert "(world RAS mm) = voxel [-40.0, 1.0, 1.0]" in one_line_error(argv, capsys)
    assert not (tmp_path / "m.nii.gz").exists()


def test_segment_without_a_processor_names_preset(segment_setup, tmp_path, capsys):
    import shutil

    bare = shutil.copytree(segment_setup["root"] / "model", tmp_path / "bare")
    (bare / "processor_config.json").unlink()
    argv = _segment_argv(segment_setup, tmp_path / "m.nii.gz", "--point", "1,1,1")
    line = one_line_error([*argv[:2], str(bare), *argv[3:]], capsys)
    assert "has no processor_config.json: pass --preset (one of kits21, msd_pancreas" in line


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
    assert "--model 'someone/no-such-model': no such folder (HF_HUB_OFFLINE is set, so it cannot be a Hub id)" in line
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)  # online, yet no Hub look-up:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # a mistyped folder inside an existing one is not taken for a Hub id
    line = one_line_error([*argv[:2], str(Path("demo") / "modle"), *argv[3:]], capsys)
    assert "--model 'demo/modle': no such folder (demo exists: is the last part mistyped?)" in line
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


def test_segment_checks_its_arguments_before_reading_anything(tmp_path, capsys, monkeypatch):
    """Mistakes in the arguments alone are reported first: the scan and the model here do not even exist."""
    monkeypatch.setattr("sam3d_hf.image_processing_sam3d.load_volume", lambda *a, **k: pytest.fail("scan read"))
    (tmp_path / "a-file").write_text("keep me")
    argv = ["segment", "--model", str(tmp_path / "no-model"), "--image", str(tmp_path / "no-scan.nii.gz"),
            "--point", "1,2,3", "--output"]  # fmt: skip
    for threshold in ("1.5", "0", "nan"):
        line = one_line_error([*argv, str(tmp_path / "m.nii.gz"), "--threshold", threshold], capsys)
        assert f"--threshold is a foreground probability strictly between 0 and 1, got {float(threshold)}" in line
    line = one_line_error([*argv, str(tmp_path / "a-file" / "m.nii.gz")], capsys)
    assert re.search(r"--output '.*a-file/m.nii.gz': '.*a-file' is a file, not a folder", line)
    line = one_line_error([*argv, str(tmp_path / "no-dir" / "m.nii.gz")], capsys)
    assert re.search(r"the folder '.*no-dir' does not exist; create it", line)
    line = one_line_error([*argv, str(tmp_path / "m.nii.gz"), "--overlay", str(tmp_path / "a-file" / "o.png")], capsys)
    assert re.search(r"--overlay '.*a-file/o.png': '.*a-file' is a file, not a folder", line)
    assert (tmp_path / "a-file").read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_segment_model_load_failures_are_one_line(segment_setup, tmp_path, capsys, monkeypatch):
    import shutil

    from sam3d_hf import Sam3DAdapterConfig, get_adapter_model

    point = ["--point", ",".join(map(str, segment_setup["lesion"][0]))]
    argv = _segment_argv(segment_setup, tmp_path / "m.nii.gz", *point)
    # Adapter files copied by hand into the model's folder (save_pretrained refuses to put them there): transformers
    # would hand the folder to peft, which does not know the scheme; the library says so and the CLI prints one line.
    both = tmp_path / "model-and-adapter"
    shutil.copytree(segment_setup["root"] / "model", both)
    get_adapter_model(
        Sam3DForPromptableSegmentation(segment_setup["model"].config), Sam3DAdapterConfig()
    ).save_pretrained(tmp_path / "adapter")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "adapter" / name, both / name)
    line = one_line_error([*argv[:2], str(both), *argv[3:]], capsys)
    assert f"--model '{both}' could not be loaded: " in line
    assert "holds a model and a Sam3D adapter" in line and "subfolder" in line
    # A bare name is a local path, never looked up on the Hub (online, huggingface_hub would retry for ~25 s).
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    line = one_line_error([*argv[:2], "no-such-model", *argv[3:]], capsys)
    assert "--model 'no-such-model': no such folder" in line
    assert not (tmp_path / "m.nii.gz").exists()


def test_overlay_keeps_the_voxel_spacing(tmp_path):
    """Each panel shows its slice in mm: measured in the PNG, width / height is the physical extent's ratio. The scan
    is stored S, R, A (permuted) with 3 / 0.5 / 1 mm voxels: 20 mm (R) x 30 mm (A) x 30 mm (S)."""
    from matplotlib.image import imread
    from scipy import ndimage

    from sam3d_hf.visualization import save_overlay

    affine = np.array([[0, 0.5, 0, 0], [0, 0, 1.0, 0], [3.0, 0, 0, 0], [0, 0, 0, 1]])
    image = np.full((10, 40, 30), 100.0)  # one grey level: the panels are plain grey rectangles
    empty = np.zeros(image.shape, dtype=bool)
    save_overlay(tmp_path / "o.png", image, affine, {"prediction": (empty, "red")}, [[5, 20, 15]], [1], (0, 200))
    pixels = imread(tmp_path / "o.png")[..., :3]
    grey = (np.abs(pixels - 0.5) < 0.05).all(-1)
    regions, _ = ndimage.label(grey)
    boxes = sorted(
        ndimage.find_objects(regions), key=lambda box: (box[0].stop - box[0].start) * (box[1].stop - box[1].start)
    )
    panels = sorted(boxes[-3:], key=lambda box: box[1].start)  # axial, coronal, sagittal, left to right
    ratios = [(b[1].stop - b[1].start) / (b[0].stop - b[0].start) for b in panels]
    # axial: R (20 mm) by A (30 mm); coronal: R by S (30 mm); sagittal: A by S
    np.testing.assert_allclose(ratios, [20 / 30, 20 / 30, 30 / 30], rtol=0.05)


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

    data = generate_dataset(tmp_path / "data", num_cases=1, seed=1, num_lesions=1)
    argv = ["evaluate", "--model", str(segment_setup["root"] / "model"), "--data_dir", str(data), "--protocols", "1",
            "--output_dir", str(tmp_path / "eval")]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()  # the progress bar
    rows = (tmp_path / "eval" / "cases.csv").read_text().splitlines()
    assert len(rows) == 3  # header + one row per case and click placement (official, per_lesion)
    # Its summary.json (one case: every std is null) and its column (named by --dataset_name) make the card.
    assert "null" in (tmp_path / "eval" / "summary.json").read_text()
    push = ["push", str(segment_setup["root"] / "model"), "--repo-id", "me/m", "--dry-run", "--evaluation"]
    assert main([*push, str(tmp_path / "eval" / "summary.json")]) == 0
    assert "README.md (the model card" in capsys.readouterr().out
    line = one_line_error([*argv[:-1], str(tmp_path / "eval2"), "--protocols", "7x"], capsys)
    assert "unknown protocol '7x'" in line
    line = one_line_error(["evaluate", "--data_dir", str(data), "--output_dir", str(tmp_path / "e")], capsys)
    assert "give --model, or --base together with --adapter" in line


def test_train_launches_accelerate_and_reports_errors(tmp_path, capsys, monkeypatch):

    commands, environments = [], []

    def run(command, env=None, **kw):
        commands.append(command)
        environments.append(env)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr("subprocess.run", run)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("SAM3D_TEST_VARIABLE", "kept")
    config = REPOSITORY / "examples" / "accelerate_configs" / "cpu.yaml"
    argv = ["--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "run"), "--model_config", "tiny"]
    assert main(["train", "--accelerate_config", str(config), *argv]) == 0
    assert commands == [[sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                         "-m", "sam3d_hf.training", *argv]]  # fmt: skip
    # Training runs with glibc's fixed 1 MB mmap threshold (large freed activations go back to the system), in the
    # user's environment otherwise; a threshold the user set is kept.
    assert environments[0]["MALLOC_MMAP_THRESHOLD_"] == "1048576" and environments[0]["SAM3D_TEST_VARIABLE"] == "kept"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert main(["train", *argv]) == 0
    assert environments[1]["MALLOC_MMAP_THRESHOLD_"] == "65536"
    line = one_line_error(["train", *argv[:-1], "vit_z"], capsys)
    assert "--model_config must be one of" in line and "'vit_z'" in line
    assert "no such file" in one_line_error(["train", "--accelerate_config", str(tmp_path / "x.yaml"), *argv], capsys)
    monkeypatch.setattr("subprocess.run", lambda command, **kw: subprocess.CompletedProcess(command, 3))
    with pytest.raises(SystemExit, match=r"^sam3d train: error: training failed \(exit status 3"):
        main(["train", *argv])


def _options_without_help(help_text: str) -> list[str]:
    """Option lines of argparse's help with no text after them (on the same line or the indented next one)."""
    lines = [*help_text.splitlines(), ""]
    return [
        line.strip()
        for line, following in itertools.pairwise(lines)
        if re.match(r"^  -", line) and not re.match(r"^  \S.*?\s{2,}\S", line) and not re.match(r"^\s{8,}\S", following)
    ]


@pytest.mark.parametrize("command", ["segment", "push", "demo", "convert", "evaluate", "train", "summary"])
def test_help_is_complete(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    expected = {
        "segment": [
            "--model",
            "--image",
            "--point",
            "--negative",
            "--points-in",
            "--output",
            "--overlay",
            "--threshold",
        ],
        "push": ["--repo-id", "--adapter-only", "--dry-run", "--evaluation"],
        "demo": ["--quick", "--output-dir", "--overwrite"],
        "convert": ["--checkpoint", "--output"],
        "evaluate": ["--model", "--data_dir", "--protocols", "--output_dir"],
        "train": ["--accelerate_config", "--data_dir", "--output_dir", "--max_train_steps"],
        "summary": ["--preset", "SAM image-encoder size"],
    }[command]
    assert all(option in out for option in expected), out
    assert _options_without_help(out) == []
    assert f"usage: sam3d {command} " in out  # the example scripts' parsers too, not "usage: evaluate.py"
    assert len(re.findall(r"^usage: ", out, re.M)) == 1, out


def test_summary_prints_the_documented_parameter_counts(capsys):
    """ViT-B figures from docs/design.md (whole model 113,652,352; prompt encoder 2,900,736; mask decoder 7,088,256)."""
    assert main(["summary"]) == 0
    counts = dict(re.findall(r"^  (\w+) +([\d.]+) M parameters$", capsys.readouterr().out, re.M))
    assert counts == {
        "vision_encoder": f"{(113_652_352 - 2_900_736 - 7_088_256) / 1e6:.2f}",
        "prompt_encoder": f"{2_900_736 / 1e6:.2f}",
        "mask_decoder": f"{7_088_256 / 1e6:.2f}",
        "total": f"{113_652_352 / 1e6:.2f}",
    }
    assert main(["summary", "--preset", "vit_l"]) == 0
    assert float(re.search(r"total +([\d.]+) M", capsys.readouterr().out).group(1)) > 300  # SAM ViT-L: 308 M encoder
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", "--preset", "vit_z"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("sam3d summary: error: argument --preset: invalid choice: 'vit_z'")
        and len(err.splitlines()) == 1
    )
