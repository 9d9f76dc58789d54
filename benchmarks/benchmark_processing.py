"""Time Sam3DProcessor on a typical abdominal CT: 512 x 512 x 100 voxels of 0.7 x 0.7 x 5 mm, three clicks.

    python benchmarks/benchmark_processing.py --repeats 3

Prints the median seconds of one processor call (read from memory, reorient, clip, resample to 1 mm the nnU-Net way,
normalise, crop one 128^3 patch per click cluster), with and without a label map, and of `post_process_masks` back to
the 512 x 512 x 100 grid. The volume is random noise: timings do not depend on the values.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from sam3d_hf import Sam3DProcessor


def measure(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    shape, spacing = (512, 512, 100), (0.7, 0.7, 5.0)
    image = rng.normal(40, 30, size=shape).astype(np.float32)  # stored (i, j, k), HU
    label = np.zeros(shape, np.uint8)
    label[200:300, 220:320, 40:60] = 1
    label[230:260, 250:280, 45:55] = 2  # multi-valued map: needs target_label (the preset's tumour label)
    clicks = [[250, 260, 50], [240, 270, 48], [100, 400, 20]]  # two near each other, one far: two patches
    processor = Sam3DProcessor.from_preset("kits21")

    inputs = processor(images=image, spacing=spacing, input_points=clicks)
    print(
        f"scan {shape} at {spacing} mm -> resampled {tuple(inputs['resampled_size'].tolist())}, "
        f"{inputs['pixel_values'].shape[0]} patches of {processor.patch_size}; torch threads {torch.get_num_threads()}"
    )
    seconds = measure(lambda: processor(images=image, spacing=spacing, input_points=clicks), args.repeats)
    print(f"preprocess, 3 clicks:                 {seconds:.2f} s")
    seconds = measure(
        lambda: processor(images=image, spacing=spacing, input_points=clicks, segmentation_maps=label), args.repeats
    )
    print(f"preprocess, 3 clicks + label map:     {seconds:.2f} s")
    logits = torch.zeros(inputs["pixel_values"].shape[0], 2, *processor.patch_size)
    seconds = measure(lambda: processor.post_process_masks(logits, inputs), args.repeats)
    print(f"post_process_masks back to {shape}: {seconds:.2f} s")


if __name__ == "__main__":
    main()
