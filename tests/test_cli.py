"""The `sam3d` command line: a user mistake is one clear line on stderr and exit status 1, never a traceback."""

import os
import re
import subprocess
import sys
from pathlib import Path

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
