"""`pipeline("sam3d-segmentation")`: same mask as the predictor, the scan's affine, a pushed repo that serves the task
with `trust_remote_code=True` in a process that cannot import sam3d_hf, and "mask-generation" refused at build time."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import PATCH, TINY, randomize
from huggingface_hub import HfApi
from transformers import pipeline

from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation, Sam3DImageProcessor, Sam3DProcessor
from sam3d_hf.hub import push_to_hub
from sam3d_hf.inference import Sam3DPredictor
from sam3d_hf.pipeline import TASK, Sam3DSegmentationPipeline, remote_code_files
from sam3d_hf.synthetic import SYNTHETIC_PROCESSOR_KWARGS, generate_case


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    config = Sam3DConfig(
        **{**TINY, "prompt_encoder_config": {**TINY["prompt_encoder_config"], "use_point_labels": True}}
    )
    model = randomize(Sam3DForPromptableSegmentation(config), seed=2).eval()
    processor = Sam3DProcessor(Sam3DImageProcessor(**SYNTHETIC_PROCESSOR_KWARGS), patch_size=PATCH, cluster_margin=4)
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    image, label = generate_case(5, orientation="permuted", num_lesions=2)
    nib.save(image, root / "ct.nii.gz")
    lesion = np.argwhere(np.asarray(label.dataobj) == 2)
    points = [lesion[0].tolist(), lesion[-1].tolist()]
    predictor = Sam3DPredictor(model, processor)
    predictor.set_image(str(root / "ct.nii.gz"))
    expected = predictor.predict(points, [1, 0])
    return {"root": root, "image": image, "points": points, "expected": expected}


def test_pipeline_returns_the_predictors_mask_in_the_scans_geometry(saved):
    segmenter = pipeline("sam3d-segmentation", model=str(saved["root"] / "model"))
    assert isinstance(segmenter, Sam3DSegmentationPipeline)
    for scan in (str(saved["root"] / "ct.nii.gz"), saved["image"]):  # a path and a nibabel image
        out = segmenter(scan, points=saved["points"], labels=[1, 0])
        np.testing.assert_array_equal(out["mask"], saved["expected"].mask.numpy())
        assert out["mask"].shape == saved["image"].shape and out["mask"].dtype == np.uint8
        np.testing.assert_allclose(out["affine"], saved["image"].affine, atol=1e-6)
        np.testing.assert_allclose(out["scores"], saved["expected"].scores.numpy(), rtol=1e-6)
    world = nib.affines.apply_affine(saved["image"].affine, np.asarray(saved["points"], dtype=float))
    out = segmenter(str(saved["root"] / "ct.nii.gz"), points=world, labels=[1, 0], points_in="world")
    np.testing.assert_array_equal(out["mask"], saved["expected"].mask.numpy())


def test_pipeline_errors(saved, tmp_path):
    segmenter = pipeline("sam3d-segmentation", model=str(saved["root"] / "model"))
    with pytest.raises(ValueError, match=r"give the clicks: segmenter\(scan, points=\[\[i, j, k\], \.\.\.\]\)"):
        segmenter(str(saved["root"] / "ct.nii.gz"))
    bare = tmp_path / "bare"
    Sam3DForPromptableSegmentation.from_pretrained(saved["root"] / "model").save_pretrained(bare)
    with pytest.raises(ValueError, match=r"has no processor_config.json: pass processor=Sam3DProcessor"):
        pipeline("sam3d-segmentation", model=str(bare))
    with pytest.raises(TypeError, match=r"`processor` must be a Sam3DProcessor, got dict"):
        pipeline("sam3d-segmentation", model=str(bare), processor={})


def test_mask_generation_refuses_a_sam3d_model_at_build_time(saved):
    """transformers' "mask-generation" pipeline would load the model (registered for AutoModelForMaskGeneration), then
    fail on the first scan inside PIL; it is refused when built, pointing to the right task."""
    message = (
        r"pipeline\('mask-generation'\) cannot run a Sam3D model: .* Use pipeline\('sam3d-segmentation', model=\.\.\.\)"
    )
    with pytest.raises(ValueError, match=message):
        pipeline("mask-generation", model=str(saved["root"] / "model"))
    with pytest.raises(ValueError, match=message):
        pipeline("mask-generation", model=str(saved["root"] / "model"), trust_remote_code=True)


def test_pipeline_save_pretrained_writes_what_push_uploads(saved, tmp_path):
    """transformers' own Pipeline.save_pretrained (custom_pipelines + custom_object_save) and `remote_code_files`,
    which `sam3d push` and `sam3d demo` use without saving the model, give the same entry and code."""
    pipeline("sam3d-segmentation", model=str(saved["root"] / "model")).save_pretrained(tmp_path / "repo")
    files = remote_code_files(json.loads((saved["root"] / "model" / "config.json").read_text()))
    written = json.loads((tmp_path / "repo" / "config.json").read_text())
    assert written["custom_pipelines"] == json.loads(files["config.json"])["custom_pipelines"]
    assert written["custom_pipelines"][TASK]["impl"] == "pipeline.Sam3DSegmentationPipeline"
    code = {name: path for name, path in files.items() if name != "config.json"}
    assert {p.name for p in (tmp_path / "repo").glob("*.py")} == set(code)
    for name, path in code.items():
        assert (tmp_path / "repo" / name).read_bytes() == path.read_bytes()
    assert (tmp_path / "repo" / "processor_config.json").is_file()


def test_pushed_repo_serves_with_trust_remote_code_without_the_package(saved, tmp_path, monkeypatch):
    """What `push_to_hub` uploads (HfApi patched at its boundary), laid out as the repo, serves the task in a process
    where `import sam3d_hf` fails: only the repo's own files can do it."""
    operations = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: None)
    monkeypatch.setattr(HfApi, "create_commit", lambda self, repo_id, ops, **kwargs: operations.extend(ops))
    push_to_hub(saved["root"] / "model", "someone/sam3d-tiny")
    repo = tmp_path / "repo"
    for operation in operations:
        source = operation.path_or_fileobj
        (repo / operation.path_in_repo).parent.mkdir(parents=True, exist_ok=True)
        (repo / operation.path_in_repo).write_bytes(source if isinstance(source, bytes) else Path(source).read_bytes())
    script = f"""
import sys
sys.modules["sam3d_hf"] = None  # any `import sam3d_hf` now raises ImportError
import numpy as np
from transformers import pipeline
segmenter = pipeline("sam3d-segmentation", model={str(repo)!r}, trust_remote_code=True)
out = segmenter({str(saved["root"] / "ct.nii.gz")!r}, points={saved["points"]!r}, labels=[1, 0])
np.save({str(tmp_path / "mask.npy")!r}, out["mask"])
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONNOUSERSITE="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "mask.npy"), saved["expected"].mask.numpy())
