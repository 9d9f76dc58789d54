"""Speed (and, on CUDA, peak memory) of the model's main paths, as ratios measured in one run.

    python benchmarks/benchmark_model.py --preset vit_b --size 128 --device cpu

Prints:
- the folded patch embedding vs the official "upsample x4, then 16x16 / 16-tap kernels" path;
- SDPA vs eager window attention (one encoder block);
- a full forward vs decoding one more set of clicks from cached image embeddings (encode once, click many);
- a training step (forward + backward) with and without gradient checkpointing.
Weights are random: timings do not depend on them.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation


def measure(fn, device: torch.device, repeats: int) -> tuple[float, float | None]:
    """Median seconds of `fn()` over `repeats` runs after one warm-up, and peak CUDA memory in GiB (None on CPU)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return statistics.median(times), peak


def official_patch_embedding(embed, pixel_values: torch.Tensor) -> torch.Tensor:
    """The official path, materialising the x4 volume: trilinear x4, 16x16/16 per slice, 16-tap depth filter."""
    up = F.interpolate(pixel_values, scale_factor=4, mode="trilinear", align_corners=False)  # (B, 1, 4D, 4H, 4W)
    batch, _, depth, height, width = up.shape
    slices = up.permute(0, 2, 1, 3, 4).reshape(batch * depth, 1, height, width)
    planes = F.conv2d(slices, embed.projection_weight, embed.projection_bias, stride=16)  # (B*4D, C, H/4, W/4)
    channels = planes.shape[1]
    planes = planes.reshape(batch, depth, channels, *planes.shape[2:]).permute(0, 2, 1, 3, 4)
    kernel = embed.depth_weight[:, None, :, None, None]  # (C, 1, 16, 1, 1)
    return F.conv3d(planes, kernel, embed.depth_bias, stride=(16, 1, 1), groups=channels)


def report(name: str, seconds: float, peak: float | None, reference: float | None = None) -> None:
    memory = f"  peak {peak:6.2f} GiB" if peak is not None else ""
    ratio = f"  ({reference / seconds:5.2f}x faster than the reference above)" if reference else ""
    print(f"  {name:44s} {seconds * 1000:10.1f} ms{memory}{ratio}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="vit_b", choices=["vit_b", "vit_l", "vit_h"])
    parser.add_argument("--size", type=int, nargs="+", default=[128], help="patch size: one int or D H W")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = tuple(args.size * 3 if len(args.size) == 1 else args.size)
    device = torch.device(args.device)
    torch.manual_seed(0)
    config = Sam3DConfig.from_sam_preset(args.preset, vision_config={"image_size": size})
    model = Sam3DForPromptableSegmentation(config).to(device).eval()
    pixel_values = torch.randn(1, 1, *size, device=device)
    points = torch.tensor([[[s / 2 for s in size]]], device=device)
    print(f"{args.preset}, patch {size}, device {device}, threads {torch.get_num_threads()}")

    print("patch embedding")
    embed = model.vision_encoder.patch_embed
    with torch.inference_mode():
        error = (official_patch_embedding(embed, pixel_values).permute(0, 2, 3, 4, 1) - embed(pixel_values)).abs().max()
        seconds, peak = measure(lambda: official_patch_embedding(embed, pixel_values), device, args.repeats)
        report("official: x4 upsampling + 16-tap kernels", seconds, peak)
        folded, peak = measure(lambda: embed(pixel_values), device, args.repeats)
        report("folded 6-tap stride-4 kernel", folded, peak, seconds)
    print(f"  max |folded - official| = {error.item():.2e}")

    print("one encoder block (shifted windows)")
    layer = model.vision_encoder.layers[0]
    tokens = torch.randn(1, *config.vision_config.token_grid, config.vision_config.hidden_size, device=device)
    with torch.inference_mode():
        model.set_attn_implementation("eager")
        eager, peak = measure(lambda: layer(tokens), device, args.repeats)
        report("eager attention", eager, peak)
        model.set_attn_implementation("sdpa")
        sdpa, peak = measure(lambda: layer(tokens), device, args.repeats)
        report("SDPA attention", sdpa, peak, eager)

    print("encode once, click many")
    with torch.inference_mode():
        full, peak = measure(lambda: model(pixel_values=pixel_values, input_points=points), device, args.repeats)
        report("full forward (encoder + prompt + decoder)", full, peak)
        embeddings = model.get_image_embeddings(pixel_values)
        click, peak = measure(lambda: model(image_embeddings=embeddings, input_points=points), device, args.repeats)
        report("new clicks on cached image embeddings", click, peak, full)

    print("training step (forward + backward, all parameters trainable)")
    labels = (pixel_values[:, 0] > 0).long()
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model(pixel_values=pixel_values, input_points=points, labels=labels).loss.backward()

    plain, peak = measure(step, device, max(1, args.repeats - 1))
    report("without gradient checkpointing", plain, peak)
    model.activation_checkpointing_enable()
    checkpointed, peak = measure(step, device, max(1, args.repeats - 1))
    report("with gradient checkpointing", checkpointed, peak, plain)


if __name__ == "__main__":
    main()
