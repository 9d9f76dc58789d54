"""`import sam3d_hf` imports neither torch nor transformers, yet Sam3D is registered with transformers (Auto classes,
the processor, the pipeline task) whichever of the two is imported first and by whatever route. Each case runs in a
fresh interpreter: registration is about what a process has imported."""

import json
import os
import subprocess
import sys

import pytest

# Prints what transformers resolves for Sam3D; reading the mappings imports transformers' modules (which is the point:
# a user's `from transformers import AutoModel` must find Sam3D).
CHECK = """
import json
from transformers import AutoConfig, AutoModel, AutoModelForMaskGeneration
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_MASK_GENERATION_MAPPING, MODEL_MAPPING
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from transformers.pipelines import PIPELINE_REGISTRY

def name(cls):
    if isinstance(cls, dict):  # image processors: one class per backend
        return sorted({name(value) for value in cls.values()})
    cls = cls[0] if isinstance(cls, (tuple, list)) else cls
    return f"{cls.__module__}.{cls.__name__}"

config = CONFIG_MAPPING["sam3d"]
vision = CONFIG_MAPPING["sam3d_vision_model"]
print(json.dumps({
    "config": name(config),
    "vision_config": name(vision),
    "model": name(MODEL_MAPPING[config]),
    "vision_model": name(MODEL_MAPPING[vision]),
    "mask_generation": name(MODEL_FOR_MASK_GENERATION_MAPPING[config]),
    "image_processor": name(IMAGE_PROCESSOR_MAPPING[config]),
    "processor": name(PROCESSOR_MAPPING[config]),
    "pipeline": name(PIPELINE_REGISTRY.check_task("sam3d-segmentation")[1]["impl"]),
}))
"""

EXPECTED = {
    "config": "sam3d_hf.configuration_sam3d.Sam3DConfig",
    "vision_config": "sam3d_hf.configuration_sam3d.Sam3DVisionConfig",
    "model": "sam3d_hf.modeling_sam3d.Sam3DForPromptableSegmentation",
    "vision_model": "sam3d_hf.modeling_sam3d.Sam3DVisionModel",
    "mask_generation": "sam3d_hf.modeling_sam3d.Sam3DForPromptableSegmentation",
    "image_processor": ["sam3d_hf.image_processing_sam3d.Sam3DImageProcessor"],
    "processor": "sam3d_hf.processing_sam3d.Sam3DProcessor",
    "pipeline": "sam3d_hf.pipeline.Sam3DSegmentationPipeline",
}


def run_python(code: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=300)


def test_importing_the_package_and_the_cli_imports_neither_torch_nor_transformers():
    code = (
        "import sys, contextlib, io\n"
        "import sam3d_hf\n"
        "from sam3d_hf.cli import main\n"
        "for argv in (['--version'], ['--help'], ['segment', '--help'], ['demo', '--help'], ['convert', '--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(argv)\n"
        "        except SystemExit as exit_info:\n"
        "            assert exit_info.code == 0, (argv, exit_info.code)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'nibabel', 'monai') if m in sys.modules))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_sam3d_segment_prints_its_first_line_before_importing_torch(tmp_path):
    """The user sees `reading <scan>` at once; torch and transformers (seconds) come after it."""
    code = (
        "import sys\n"
        "from sam3d_hf import cli\n"
        "seen = []\n"
        "cli._progress = lambda text: seen.append((text, 'torch' in sys.modules, 'transformers' in sys.modules))\n"
        f"status = cli.main(['segment', '--image', {str(tmp_path / 'missing.nii.gz')!r}, '--point', '1,2,3', "
        f"'--model', {str(tmp_path)!r}, '--output', {str(tmp_path / 'mask.nii.gz')!r}])\n"
        "print(seen[0])\n"
        "print(status)\n"
    )
    result = run_python(code)
    first, status = result.stdout.strip().splitlines()
    assert first.startswith("('reading ") and first.endswith("False, False)"), (first, result.stderr)
    assert status == "1" and "missing.nii.gz" in result.stderr  # the missing scan is still reported, as one line


IMPORT_ORDERS = {
    "package, then transformers": "import sam3d_hf\n",
    "transformers' auto modules and pipelines first, then the package": (
        "from transformers import AutoConfig, AutoModel, AutoImageProcessor, AutoProcessor, pipeline\nimport sam3d_hf\n"
    ),
    "a class through the package": "from sam3d_hf import Sam3DForPromptableSegmentation\n",
    "a module that imports the others (the predictor)": "from sam3d_hf.inference import Sam3DPredictor\n",
    "the processor module alone": "import sam3d_hf.processing_sam3d\n",
    "the pipeline module alone": "import sam3d_hf.pipeline\n",
}


@pytest.mark.parametrize("prelude", IMPORT_ORDERS.values(), ids=IMPORT_ORDERS.keys())
def test_sam3d_is_registered_whatever_is_imported_first(prelude):
    result = run_python(prelude + CHECK)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == EXPECTED


def test_a_saved_model_and_processor_load_through_the_auto_classes_after_a_bare_import(tmp_path):
    """`import sam3d_hf` and nothing else of it: AutoModel / AutoProcessor / pipeline give the installed classes (not
    remote code), and the pipeline runs."""
    from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation, Sam3DProcessor

    config = Sam3DConfig.from_preset("tiny")
    Sam3DForPromptableSegmentation(config).save_pretrained(tmp_path)
    Sam3DProcessor.from_preset("kits21").save_pretrained(tmp_path)
    code = (
        "import sam3d_hf\n"
        "from transformers import AutoModel, AutoProcessor, pipeline\n"
        f"model = AutoModel.from_pretrained({str(tmp_path)!r})\n"
        f"processor = AutoProcessor.from_pretrained({str(tmp_path)!r})\n"
        f"segmenter = pipeline('sam3d-segmentation', model={str(tmp_path)!r})\n"
        "for item in (model, processor, segmenter):\n"
        "    print(type(item).__module__ + '.' + type(item).__name__)\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [
        "sam3d_hf.modeling_sam3d.Sam3DForPromptableSegmentation",
        "sam3d_hf.processing_sam3d.Sam3DProcessor",
        "sam3d_hf.pipeline.Sam3DSegmentationPipeline",
    ]
