"""`pipeline("sam3d-segmentation")`: same mask as the predictor, the scan's affine, and a saved folder that serves the
task with `trust_remote_code=True` in a process that never imports sam3d_hf."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import PATCH, TINY, randomize
from transformers import pipeline

from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation, Sam3DImageProcessor, Sam3DProcessor
from sam3d_hf.inference import Sam3DPredictor
from sam3d_hf.pipeline import Sam3DSegmentationPipeline
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


def test_saved_pipeline_serves_with_trust_remote_code_without_the_package(saved, tmp_path):
    segmenter = pipeline("sam3d-segmentation", model=str(saved["root"] / "model"))
    segmenter.save_pretrained(tmp_path / "repo")
    config = json.loads((tmp_path / "repo" / "config.json").read_text())
    assert config["custom_pipelines"]["sam3d-segmentation"]["impl"] == "pipeline.Sam3DSegmentationPipeline"
    script = f"""
import sys, numpy as np
from transformers import pipeline
segmenter = pipeline("sam3d-segmentation", model={str(tmp_path / "repo")!r}, trust_remote_code=True)
assert "sam3d_hf" not in sys.modules, "the package was imported"
out = segmenter({str(saved["root"] / "ct.nii.gz")!r}, points={saved["points"]!r}, labels=[1, 0])
np.save({str(tmp_path / "mask.npy")!r}, out["mask"])
"""
    # No sam3d_hf on the path: only the repo's own code can serve the task.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONNOUSERSITE="1")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    np.testing.assert_array_equal(np.load(tmp_path / "mask.npy"), saved["expected"].mask.numpy())
    assert Path(tmp_path / "repo" / "processor_config.json").is_file()
