import re
from pathlib import Path

from setuptools import find_packages, setup

# One home for the version: sam3d_hf/version.py (read as text: importing the package needs its dependencies).
VERSION = re.search(r'__version__ = "([^"]+)"', Path("sam3d_hf/version.py").read_text(encoding="utf-8")).group(1)

setup(
    name="sam3d-hf",
    version=VERSION,
    description="3DSAM-adapter: SAM adapted to 3D point-promptable tumour segmentation in CT, for Hugging Face",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    # The model-card files have one home, the top-level hub_cards/ folder; the wheel installs it as sam3d_hf/hub_cards.
    # Likewise docs/ (design.md, which error messages cite) is installed as sam3d_hf/docs.
    packages=[*find_packages(include=["sam3d_hf", "sam3d_hf.*"]), "sam3d_hf.hub_cards", "sam3d_hf.docs"],
    package_dir={"sam3d_hf.hub_cards": "hub_cards", "sam3d_hf.docs": "docs"},
    # The official code's splits (datafile/<dataset>/split.pkl, as JSON): `--split_file official`.
    package_data={
        "sam3d_hf": ["official_splits/*.json"],
        "sam3d_hf.hub_cards": ["*.md", "*.yaml"],
        "sam3d_hf.docs": ["*.md"],
    },
    python_requires=">=3.10",
    # The versions these were verified with (see ECOSYSTEM_NOTES); torch is installed first, from the CPU wheel.
    install_requires=[
        "torch>=2.13,<2.15",
        "numpy>=1.26",
        "transformers~=5.23.0",
        "huggingface_hub~=2.4.0",
        "safetensors~=0.8.0",
        "accelerate~=1.15.0",
        "monai~=1.6.1",
        "datasets~=5.2.0",
        "nibabel~=5.4.2",
        "peft~=0.21.2",
        "scipy>=1.11",
        # `sam3d demo` (the README's first command) and `sam3d segment --overlay` draw PNG overlays.
        "matplotlib>=3.8",
    ],
    extras_require={
        "io": ["pynrrd>=1.0", "pydicom>=2.4"],
        # `sam3d train --report_to tensorboard` (the default `all` logs to TensorBoard only when it is installed).
        "train": ["tensorboard>=2.16"],
        # examples/evaluate.py draws overlays and curves.
        "eval": ["matplotlib>=3.8"],
        # `sam3d app` / examples/app.py. Gradio 6.31 is the newest release and asks for huggingface_hub >=1.16,<3, so it
        # installs beside the 2.4 pin above without moving it; uploads read NRRD and zipped DICOM series.
        "app": ["gradio~=6.31.0", "pynrrd>=1.0", "pydicom>=2.4"],
        "dev": [
            "pytest>=8",
            "ruff>=0.6",
            "parameterized>=0.9",
            "pynrrd>=1.0",
            "pydicom>=2.4",
            "segment-anything==1.0",
            "matplotlib>=3.8",
            # examples/train.py's default --report_to all uses it when installed: the tests run that path
            "tensorboard>=2.16",
            # tests/test_app.py (gradio_client against the app) and tests/test_app_browser.py (Playwright drives the
            # system's Chromium, /usr/bin/chromium; the package's own browser download is never used)
            "gradio~=6.31.0",
            "playwright>=1.50",
        ],
    },
    entry_points={"console_scripts": ["sam3d=sam3d_hf.cli:main"]},
)
