"""sam3d_hf.files: a file or folder is replaced only once its new content is complete, with the user's usual modes."""

import os
import stat

import pytest

from sam3d_hf import files


def _fail(temporary):
    with open(temporary, "w") as file:
        file.write("half")
    raise RuntimeError("interrupted")


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    (tmp_path / "note.txt").write_text("old")
    with pytest.raises(RuntimeError, match="interrupted"):
        files.atomic_write(tmp_path / "note.txt", _fail)
    assert [p.name for p in tmp_path.iterdir()] == ["note.txt"] and (tmp_path / "note.txt").read_text() == "old"


def test_atomic_write_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"folder '.*missing' does not exist; create it first"):
        files.atomic_write_text(tmp_path / "missing" / "note.txt", "x")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        files.write_json(tmp_path / "file" / "note.json", {})
    files.write_json(tmp_path / "made" / "note.json", {"b": 1, "a": [1, 2]}, make_parents=True, sort_keys=True)
    assert (tmp_path / "made" / "note.json").read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_staged_folder_replaces_the_old_one_only_when_complete(tmp_path, umask):
    target = tmp_path / "out" / "run"
    previous = os.umask(umask)
    try:
        with pytest.raises(RuntimeError), files.staged_folder(target) as work:
            (work / "a.txt").write_text("new")
            raise RuntimeError("interrupted")
        assert not target.exists() and os.listdir(tmp_path / "out") == []  # nothing half-written stays
        target.mkdir()
        (target / "old.txt").write_text("old")
        with pytest.raises(RuntimeError), files.staged_folder(target) as work:
            (work / "a.txt").write_text("new")
            raise RuntimeError("interrupted")
        assert os.listdir(target) == ["old.txt"] and sorted(os.listdir(tmp_path / "out")) == ["run"]
        with files.staged_folder(target) as work:
            (work / "sub").mkdir()
            (work / "sub" / "a.txt").write_text("new")
            os.chmod(work / "sub" / "a.txt", 0o600)  # as save_pretrained writes its safetensors
            assert os.listdir(target) == ["old.txt"]  # the old folder stays until the new one is complete
    finally:
        os.umask(previous)
    assert os.listdir(target) == ["sub"] and sorted(os.listdir(tmp_path / "out")) == ["run"]
    for path in (target, target / "sub", target / "sub" / "a.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~umask, path
