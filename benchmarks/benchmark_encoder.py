"""The encoder and a new click against the machine's matmul peak, and the package's plain path against its default.

    OMP_NUM_THREADS=2 python benchmarks/benchmark_encoder.py                 # ViT-B, 128³, 3 repeats of each path
    OMP_NUM_THREADS=2 python benchmarks/benchmark_encoder.py --profile       # + time per op type of both paths
    python benchmarks/benchmark_encoder.py --preset tiny --size 40 24 44 --repeats 1    # a quick dry run

The plain path computes as the official code does: explicit x4 upsampling before SAM's 16x16 kernel and the 16-tap
depth filter, eager attention with the dense relative-position bias, masks built in every block, windows cut and put
back with pad/roll/partition copies. The default path is what the package runs: the folded patch embedding and the
default (SDPA) attention with the relative positions inside `q'·k'` and one window partition per block kind and
forward. Both encode the same patch (`get_image_embeddings`: encoder, necks and the prompt-independent decoder part)
alternately, so a change of load falls on both; the ratio of their medians is the speed-up. A new click is
`model(image_embeddings=..., input_points=...)` on the cached patch (prompt encoder, level-3 head and its share of the
fused convolution), as `Sam3DPredictor.predict` runs it once the patch is cached.

Efficiency is useful FLOPs (counted by torch's `FlopCounterMode` on the folded-embedding eager computation, i.e. the
official arithmetic without the x4 volume) per second, against the fp32 matmul peak measured in the same run
(`torch.matmul` of 4096² matrices, best of 5, before and after; the machine is shared, so both are printed with the
load average). Weights are random: timings do not depend on them. Prints a JSON line of every figure at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation


def matmul_peak(size: int = 4096, repeats: int = 5) -> float:
    """Best fp32 GFLOP/s of `torch.matmul` on `size`² matrices."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def official_patch_embedding(embed, pixel_values: torch.Tensor) -> torch.Tensor:
    """The official path, materialising the x4 volume: trilinear x4, 16x16/16 per slice, 16-tap depth filter."""
    up = F.interpolate(pixel_values, scale_factor=4, mode="trilinear", align_corners=False)  # (B, 1, 4D, 4H, 4W)
    batch, _, depth, height, width = up.shape
    slices = up.permute(0, 2, 1, 3, 4).reshape(batch * depth, 1, height, width)
    planes = F.conv2d(slices, embed.projection_weight, embed.projection_bias, stride=16)  # (B*4D, C, H/4, W/4)
    channels = planes.shape[1]
    planes = planes.reshape(batch, depth, channels, *planes.shape[2:]).permute(0, 2, 1, 3, 4)
    kernel = embed.depth_weight[:, None, :, None, None]  # (C, 1, 16, 1, 1)
    tokens = F.conv3d(planes, kernel, embed.depth_bias, stride=(16, 1, 1), groups=channels)
    return tokens.permute(0, 2, 3, 4, 1)  # (B, D', H', W', C)


class Paths:
    """Switches one model between the plain path and the default path."""

    def __init__(self, model: Sam3DForPromptableSegmentation):
        self.model = model
        self.embed = model.vision_encoder.patch_embed

    def plain(self) -> None:
        self.model.set_attn_implementation("eager")
        self.embed.forward = lambda pixel_values: official_patch_embedding(self.embed, pixel_values)

    def default(self) -> None:
        self.model.set_attn_implementation("sdpa")
        self.embed.__dict__.pop("forward", None)

    def useful_flops(self, fn) -> int:
        """FLOPs of `fn` as the official arithmetic without the x4 volume: eager attention, folded embedding."""
        self.model.set_attn_implementation("eager")
        with FlopCounterMode(display=False) as counter:
            fn()
        self.default()
        return counter.get_total_flops()


def summary(seconds: list[float]) -> dict:
    return {"min_s": round(min(seconds), 3), "median_s": round(statistics.median(seconds), 3), "runs": len(seconds)}


def profile_table(fn, rows: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["vit_b", "tiny"], default="vit_b", help="model size (random weights)")
    parser.add_argument("--size", type=int, nargs="+", default=[128], help="patch size: one int or D H W")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path, alternating")
    parser.add_argument("--click_repeats", type=int, default=5, help="timed new clicks")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables (time per op type)")
    parser.add_argument("--skip_plain", action="store_true", help="time the default path only")
    parser.add_argument("--peak_size", type=int, default=4096, help="matrix size of the matmul peak measurement")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = tuple(args.size * 3 if len(args.size) == 1 else args.size)
    started = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "load_average": os.getloadavg()}
    peak_before = matmul_peak(args.peak_size)

    torch.manual_seed(0)
    config = Sam3DConfig.from_preset(args.preset, vision_config={"image_size": size})
    model = Sam3DForPromptableSegmentation(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 1, *size, generator=generator)
    points = torch.tensor([[[s / 2 for s in size], [s / 3 for s in size]]])
    paths = Paths(model)
    print(
        f"{args.preset}, patch {size}, torch {torch.__version__}, {torch.get_num_threads()} threads "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), {platform.processor() or platform.machine()}"
    )
    print(f"fp32 matmul peak before: {peak_before:.1f} GFLOP/s; load average {started['load_average']}")

    encode = lambda: model.get_image_embeddings(pixel_values)  # noqa: E731
    with torch.inference_mode():
        encoder_flops = paths.useful_flops(encode)
        embeddings = encode()
        click = lambda: model(image_embeddings=embeddings, input_points=points)  # noqa: E731
        click_flops = paths.useful_flops(click)
        if not args.skip_plain:
            paths.plain()
            plain_embeddings = encode()
            paths.default()
            worst = max(
                (a - b).abs().max().item() for a, b in zip(plain_embeddings.feature_maps, embeddings.feature_maps)
            )
            scale = max(m.abs().max().item() for m in embeddings.feature_maps)
            print(f"max |plain - default| over the four levels: {worst:.2e} (levels up to {scale:.2f})")
            del plain_embeddings
        times = {"plain": [], "default": []}
        for _ in range(args.repeats):
            for name in ("default",) if args.skip_plain else ("plain", "default"):
                getattr(paths, name)()
                times[name].append(timed(encode))
        paths.default()
        click()
        click_times = [timed(click) for _ in range(args.click_repeats)]
    peak_after = matmul_peak(args.peak_size)
    peak = max(peak_before, peak_after)

    results = {
        **started,
        "load_average_end": os.getloadavg(),
        "device": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "preset": args.preset,
        "patch": size,
        "matmul_peak_gflops": [round(peak_before, 1), round(peak_after, 1)],
        "encode_useful_gflop": round(encoder_flops / 1e9, 1),
        "click_useful_gflop": round(click_flops / 1e9, 1),
        "encode_default": summary(times["default"]),
        "click_default": summary(click_times),
    }
    print(f"fp32 matmul peak after:  {peak_after:.1f} GFLOP/s; load average {results['load_average_end']}")
    print(f"get_image_embeddings ({encoder_flops / 1e9:.0f} useful GFLOP):")
    for name in times:
        if times[name]:
            median = statistics.median(times[name])
            rate = encoder_flops / median / 1e9
            print(
                f"  {name:8s} min {min(times[name]):7.2f} s  median {median:7.2f} s  {rate:6.1f} GFLOP/s = "
                f"{100 * rate / peak:5.1f}% of peak"
            )
    if times["plain"]:
        results["encode_plain"] = summary(times["plain"])
        results["encode_speedup"] = round(statistics.median(times["plain"]) / statistics.median(times["default"]), 2)
        print(f"  default is {results['encode_speedup']:.2f}x faster than plain (ratio of medians)")
    median = statistics.median(click_times)
    results["encode_efficiency"] = round(encoder_flops / statistics.median(times["default"]) / 1e9 / peak, 3)
    results["click_efficiency"] = round(click_flops / median / 1e9 / peak, 3)
    results["click_vs_default_encode"] = round(statistics.median(times["default"]) / median, 1)
    print(
        f"new click ({click_flops / 1e9:.0f} useful GFLOP): min {min(click_times):.3f} s  median {median:.3f} s  "
        f"{click_flops / median / 1e9:6.1f} GFLOP/s = {100 * results['click_efficiency']:5.1f}% of peak; "
        f"{results['click_vs_default_encode']:.0f}x faster than encoding the patch again"
    )
    if args.profile:
        with torch.inference_mode():
            for name in ("plain", "default"):
                getattr(paths, name)()
                print(f"\ntime per op type, {name} path, get_image_embeddings:")
                print(profile_table(encode, 18))
            paths.default()
            print("\ntime per op type, new click:")
            print(profile_table(click, 12))
    print(json.dumps(results))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=1)
    return results


if __name__ == "__main__":
    main()
