"""Peak memory of one training step of the paper's scheme (adapters, norms, new 3D parts, prompt encoder, decoder).

ViT-B, batch 1, on the CPU, with and without gradient checkpointing and bf16 autocast (the `--gradient_checkpointing`
and `--mixed_precision bf16` of examples/train.py). Each setting runs in its own process, so each peak resident set
size (`ru_maxrss`) is its own, under an address-space limit (`RLIMIT_AS`, which counts reserved as well as resident
memory), so a setting that does not fit fails with MemoryError instead of taking the machine down:

    python benchmarks/benchmark_memory.py --size 128 --limit_gb 20     # the four settings at 128³
    python benchmarks/benchmark_memory.py --size 64 --settings bf16 --limit_gb 0     # 0: no limit
    python benchmarks/benchmark_memory.py --settings checkpointing --malloc_mmap_threshold 1048576

`--malloc_mmap_threshold` sets glibc's `MALLOC_MMAP_THRESHOLD_` for the steps: allocations above it are mapped and
unmapped one by one instead of coming from the heap. By default glibc raises the threshold to the largest block freed
so far (up to 32 MB), and freed heap blocks stay resident: at 64³ with checkpointing the peak resident set was 2.10 GB
by default and 1.47 GB with a fixed 1 MB threshold. The price is a page fault on every first touch of a large buffer.

Prints one JSON line per setting as it finishes, then a table of all of them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

SETTINGS = ["plain", "checkpointing", "bf16", "checkpointing+bf16"]


def one_step(size: int, setting: str, limit_gb: float) -> None:
    if limit_gb > 0:
        resource.setrlimit(resource.RLIMIT_AS, (int(limit_gb * 2**30), int(limit_gb * 2**30)))
    import torch

    from sam3d_hf import Sam3DAdapterConfig, Sam3DConfig, Sam3DForPromptableSegmentation, get_adapter_model

    config = Sam3DConfig(
        vision_config={"image_size": size}, prompt_encoder_config={"use_point_labels": True}
    )  # ViT-B, as the package trains it
    model = get_adapter_model(Sam3DForPromptableSegmentation(config), Sam3DAdapterConfig())
    if "checkpointing" in setting:
        model.model.activation_checkpointing_enable()
    model.train()
    pixel_values = torch.randn(1, 1, size, size, size)
    points = torch.tensor([[[size / 2, size / 2, size / 2]]])
    labels = torch.zeros(1, size, size, size, dtype=torch.long)
    labels[:, size // 3 : size // 2, size // 3 : size // 2, size // 3 : size // 2] = 1
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled="bf16" in setting):
        loss = model(pixel_values=pixel_values, input_points=points, labels=labels).loss
    loss.backward()
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    print(json.dumps({"size": size, "setting": setting, "peak_rss_gb": round(peak_gb, 2), "step_s": round(seconds, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="cubic patch size (ViT-B)")
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=SETTINGS)
    parser.add_argument("--limit_gb", type=float, default=20.0, help="address-space limit per setting (0: none)")
    parser.add_argument("--malloc_mmap_threshold", type=int, help="glibc MALLOC_MMAP_THRESHOLD_ (bytes) of the steps")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        one_step(args.size, args._child, args.limit_gb)
        return
    rows = []
    for setting in args.settings:
        command = [sys.executable, __file__, "--size", str(args.size), "--limit_gb", str(args.limit_gb)]
        env = dict(os.environ)
        if args.malloc_mmap_threshold is not None:
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        result = subprocess.run([*command, "--_child", setting], capture_output=True, text=True, env=env)
        if result.returncode == 0:
            row = json.loads(result.stdout.strip().splitlines()[-1])
            row["malloc_mmap_threshold"] = args.malloc_mmap_threshold
        else:
            reason = "MemoryError" if "MemoryError" in result.stderr or "alloc" in result.stderr else "failed"
            row = {"size": args.size, "setting": setting, "result": f"{reason} under {args.limit_gb} GB"}
        print(json.dumps(row), flush=True)
        rows.append(row)
    limit = "no" if args.limit_gb <= 0 else f"a {args.limit_gb} GB"
    malloc = f", MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}" if args.malloc_mmap_threshold else ""
    print(f"\nViT-B training step, batch 1, {args.size}³ patch, CPU, {limit} address-space limit per setting{malloc}")
    print("| setting | peak RSS (GB) | step (s) |\n|---|---|---|")
    for row in rows:
        if "result" in row:
            print(f"| {row['setting']} | {row['result']} | |")
        else:
            print(f"| {row['setting']} | {row['peak_rss_gb']:.2f} | {row['step_s']:.1f} |")


if __name__ == "__main__":
    main()
