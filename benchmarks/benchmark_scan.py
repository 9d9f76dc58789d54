"""Whole-scan latency, the number a user feels: a CT file on disk to a saved mask, stage by stage.

    OMP_NUM_THREADS=2 python benchmarks/benchmark_scan.py                        # ViT-B, 512 x 512 x 300 scan
    python benchmarks/benchmark_scan.py --preset tiny --shape 128 128 60 --repeats 1     # a quick dry run

A generated CT (`--shape` voxels of `--spacing` mm, stored RAS, int16 HU: a water-like body with noise in air and a
brighter spherical lesion) is written once as .nii.gz; then, `--repeats` times, each stage of what `sam3d segment`
and `Sam3DPredictor` run is timed on its own:
- read: `nib.load` and the voxels (`np.asanyarray(img.dataobj)`: decompression);
- preprocess: `Sam3DImageProcessor.preprocess` of the in-memory image (checks, float32, reorientation to the
  canonical axes, clipping, resampling to the preset's spacing the nnU-Net way, normalisation);
- crop: `Sam3DProcessor.prepare_prompts` (the click to patch voxels, the patch cut from the resampled scan);
- encode: `get_image_embeddings` of the patch (random weights: timings do not depend on them);
- click: the prompt-dependent part on the cached patch;
- paste back: `post_process_masks` (patch probabilities back onto the original 512 x 512 x 300 grid);
- write: `save_mask_nifti` (.nii.gz).
Prints the median of each stage, its share of the total, and a JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation, Sam3DProcessor
from sam3d_hf.processing_sam3d import save_mask_nifti

STAGES = ("read", "preprocess", "crop", "encode", "click", "paste back", "write")


def generated_ct(shape: tuple[int, int, int], spacing: tuple[float, float, float], seed: int = 0):
    """`(image, lesion centre voxel)`: int16 HU, air outside an elliptic body of ~40 HU with noise, a 15 mm lesion."""
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[(np.arange(n) - n / 2) * s for n, s in zip(shape, spacing, strict=True)], indexing="ij")
    x, y, _ = grids
    body = (x / 170) ** 2 + (y / 130) ** 2 <= 1
    volume = np.where(body, 40.0, -1000.0) + rng.normal(0, 12, shape)
    centre = np.array([n // 2 + 40 for n in shape[:2]] + [shape[2] // 2])
    offsets = [(np.arange(n) - c) * s for n, c, s in zip(shape, centre, spacing, strict=True)]
    lesion = sum(o.reshape([-1 if a == i else 1 for a in range(3)]) ** 2 for i, o in enumerate(offsets)) <= 15**2
    volume[lesion] += 45
    return nib.Nifti1Image(volume.astype(np.int16), np.diag([*spacing, 1.0])), centre


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["vit_b", "tiny"], default="vit_b", help="model size (random weights)")
    parser.add_argument("--shape", type=int, nargs=3, default=(512, 512, 300), help="stored voxels (i, j, k)")
    parser.add_argument("--spacing", type=float, nargs=3, default=(0.7, 0.7, 1.5), help="mm per stored axis")
    parser.add_argument("--dataset", default="kits21", help="processor preset (window, spacing, patch size)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    processor = Sam3DProcessor.from_preset(args.dataset)
    patch = processor.patch_size
    if args.preset == "tiny":
        patch = (48, 48, 48)
        processor = Sam3DProcessor.from_preset(args.dataset, patch_size=patch, cluster_margin=8)
        config = Sam3DConfig.from_preset("tiny", vision_config={"image_size": patch})
    else:
        config = Sam3DConfig(vision_config={"image_size": patch})
    torch.manual_seed(0)
    model = Sam3DForPromptableSegmentation(config).eval()
    image, centre = generated_ct(tuple(args.shape), tuple(args.spacing))
    folder = Path(tempfile.mkdtemp(prefix="sam3d-scan-"))
    scan = folder / "ct.nii.gz"
    nib.save(image, scan)
    print(
        f"{args.preset}, scan {tuple(args.shape)} at {tuple(args.spacing)} mm ({scan.stat().st_size / 2**20:.0f} MiB "
        f"on disk), preset {args.dataset} (patch {patch}), torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, load average {os.getloadavg()}"
    )
    seconds = {stage: [] for stage in STAGES}

    @contextlib.contextmanager
    def stage(name: str):
        start = time.perf_counter()
        yield
        seconds[name].append(time.perf_counter() - start)

    for _ in range(args.repeats):
        with stage("read"):
            loaded = nib.load(scan)
            data = np.asanyarray(loaded.dataobj)
        in_memory = nib.Nifti1Image(data, loaded.affine, loaded.header)
        with stage("preprocess"):
            preprocessed = processor.image_processor.preprocess(in_memory, return_tensors=None)
        with stage("crop"):
            inputs = processor.prepare_prompts(preprocessed, [centre.tolist()])
        with torch.inference_mode():
            with stage("encode"):
                embeddings = model.get_image_embeddings(inputs["pixel_values"])
            with stage("click"):
                points, labels = inputs["input_points"], inputs["input_labels"]
                logits = model(image_embeddings=embeddings, input_points=points, input_labels=labels).logits
        with stage("paste back"):
            mask = processor.post_process_masks(logits, inputs)
        with stage("write"):
            save_mask_nifti(mask, in_memory, folder / "mask.nii.gz")
    medians = {stage: statistics.median(values) for stage, values in seconds.items()}
    total = sum(medians.values())
    for stage in STAGES:
        print(f"  {stage:11s} {medians[stage]:8.2f} s  {100 * medians[stage] / total:5.1f}%")
    print(f"  {'total':11s} {total:8.2f} s  (resampled scan {tuple(preprocessed['resampled_size'].tolist())})")
    results = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_end": os.getloadavg(),
        "preset": args.preset,
        "scan": list(args.shape),
        "spacing": list(args.spacing),
        "median_s": {stage: round(value, 3) for stage, value in medians.items()},
        "total_s": round(total, 2),
    }
    print(json.dumps(results))
    return results


if __name__ == "__main__":
    main()
