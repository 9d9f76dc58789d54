"""The README's Python examples run as written (in a scratch folder that holds the files they name), each block on its
own: a reader copies one block, so each imports and defines every name it uses (files written by an earlier block,
which the block then names, are still there)."""

import re
from pathlib import Path

import nibabel as nib
import numpy as np

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def make_scan(path: Path) -> None:
    """A small oblique CT-like scan with a bright 'lesion' (0.8 x 0.8 x 2.5 mm voxels)."""
    rng = np.random.default_rng(0)
    data = rng.normal(40, 10, size=(60, 56, 24)).astype(np.float32)
    i, j, k = np.indices(data.shape)
    data[(i - 30) ** 2 + (j - 28) ** 2 + ((k - 12) * 3) ** 2 < 100] = 150
    angle = np.deg2rad(15)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 0.8, 2.5])
    affine[:3, 3] = [-20, 10, -30]
    nib.save(nib.Nifti1Image(data, affine), path)


def test_readme_examples_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert blocks, "README.md has no python examples"
    monkeypatch.chdir(tmp_path)
    make_scan(tmp_path / "ct.nii.gz")
    for number, block in enumerate(blocks, start=1):
        try:
            exec(compile(block, f"{README} (python block {number})", "exec"), {"__name__": "__readme__"})
        except NameError as error:
            raise AssertionError(f"README python block {number} uses a name it does not define: {error}") from error
    # The examples leave their outputs behind: check what they promise where they write files.
    for written in re.findall(r"[\"']([\w.-]+\.nii\.gz)[\"']", "\n".join(blocks)):
        assert (tmp_path / written).exists(), f"the README example should have written {written}"
