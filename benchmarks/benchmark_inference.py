"""Time a new click on a cached patch against a full forward, and measure how far bf16 autocast moves the masks.

Part 1 (timing): a random-weight model (`Sam3DConfig()`, ViT-B by default) on one `--patch` patch: the full forward
(`model(pixel_values=..., input_points=...)`: encoder, prompt encoder, decoder), the encoding alone
(`get_image_embeddings`) and a new click on the cached embeddings (`model(image_embeddings=..., input_points=...)`:
prompt encoder, level-3 head and its share of the fused convolution), which is what `Sam3DPredictor.predict` costs
once the patch is cached.

Part 2 (`--bf16_cases N`): on N generated scans, a small random model predicts from one click per lesion with
`Sam3DPredictor` in float32 and with bf16 autocast; prints the Dice between the two masks per case and their mean.
Random weights say nothing about accuracy, only about how much bf16 rounding changes a mask. The seconds are one
`predict` (encoding and decoding, not the preprocessing). bf16 is only fast on GPUs and CPUs with native bf16
(`grep -o 'avx512_bf16\\|amx_bf16' /proc/cpuinfo`).

    OMP_NUM_THREADS=2 python benchmarks/benchmark_inference.py                       # ViT-B, 128³
    python benchmarks/benchmark_inference.py --preset tiny --patch 40 24 44 --bf16_cases 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation, Sam3DImageProcessor, Sam3DProcessor
from sam3d_hf.inference import Sam3DPredictor
from sam3d_hf.metrics import dice_score, simulate_clicks
from sam3d_hf.synthetic import SYNTHETIC_PROCESSOR_KWARGS, generate_case

# A small model for the bf16 comparison and quick runs: the library's tiny preset (every path of the ViT-B
# computation, far fewer channels) at an anisotropic, non-cubic patch.
TINY = {"vision_config": {"image_size": (40, 24, 44)}}


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> torch.nn.Module:
    """Random values everywhere, so that no path is trivially zero (fresh position tables start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not name.endswith("rel_pos_scale"):
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * std + (1 if "layer_norm" in name else 0))
    return model


def timed(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_click(config: Sam3DConfig, patch: tuple[int, int, int], repeats: int) -> None:
    model = Sam3DForPromptableSegmentation(config).eval()
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 1, *patch, generator=generator)
    points = torch.tensor([[[p / 2 for p in patch]]])
    other = torch.tensor([[[p / 2 for p in patch], [p / 3 for p in patch]]])
    with torch.inference_mode():
        full = timed(lambda: model(pixel_values=pixel_values, input_points=points), 1)
        embeddings = model.get_image_embeddings(pixel_values)
        encode = timed(lambda: model.get_image_embeddings(pixel_values), 1)
        click = timed(lambda: model(image_embeddings=embeddings, input_points=other), repeats)
    print(
        f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, patch {patch}, "
        f"{torch.get_num_threads()} threads"
    )
    print(f"full forward (encoder + prompt + decoder): {full[0]:.2f} s")
    print(f"get_image_embeddings (once per patch):     {encode[0]:.2f} s")
    print(
        f"new click on the cached patch:             {statistics.median(click):.3f} s (median of {repeats}; "
        f"min {min(click):.3f}, max {max(click):.3f})  -> {full[0] / statistics.median(click):.0f}x faster"
    )


def bench_bf16(num_cases: int) -> None:
    model = randomize(Sam3DForPromptableSegmentation(Sam3DConfig.from_preset("tiny", **TINY))).eval()
    image_processor = Sam3DImageProcessor(**{**SYNTHETIC_PROCESSOR_KWARGS, "target_spacing": (2.0, 2.0, 2.0)})
    processor = Sam3DProcessor(image_processor, patch_size=(40, 24, 44), cluster_margin=4)
    predictors = {"fp32": Sam3DPredictor(model, processor), "bf16": Sam3DPredictor(model, processor, bf16=True)}
    dices = []
    for case in range(num_cases):
        image, label = generate_case(100 + case, num_lesions=2)
        tumour = np.asarray(label.dataobj) == 2
        points, labels = simulate_clicks(tumour, "per_lesion", num_clicks=2, seed=case)
        masks, seconds = {}, {}
        for name, predictor in predictors.items():
            predictor.set_image(image)
            start = time.perf_counter()  # the prediction only (encoding included), not the preprocessing
            masks[name] = predictor.predict(points, labels).mask
            seconds[name] = time.perf_counter() - start
        dices.append(dice_score(masks["bf16"], masks["fp32"]))
        print(
            f"case {case}: Dice(bf16 mask, fp32 mask) = {dices[-1]:.4f}  "
            f"({int(masks['fp32'].sum())} fp32 voxels; {seconds['fp32']:.2f} s fp32, {seconds['bf16']:.2f} s bf16)"
        )
    print(f"mean Dice(bf16, fp32) over {num_cases} generated cases: {np.mean(dices):.4f} (min {min(dices):.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["vit_b", "tiny"], default="vit_b", help="model size (random weights)")
    parser.add_argument("--patch", type=int, nargs=3, default=(128, 128, 128), help="(D, H, W) patch")
    parser.add_argument("--repeats", type=int, default=5, help="timed new clicks")
    parser.add_argument("--bf16_cases", type=int, default=0, help="generated cases for the bf16 vs fp32 Dice")
    parser.add_argument("--skip_timing", action="store_true")
    args = parser.parse_args()
    if not args.skip_timing:
        config = Sam3DConfig() if args.preset == "vit_b" else Sam3DConfig.from_preset("tiny", **TINY)
        bench_click(config, tuple(args.patch), args.repeats)
    if args.bf16_cases:
        bench_bf16(args.bf16_cases)


if __name__ == "__main__":
    main()
