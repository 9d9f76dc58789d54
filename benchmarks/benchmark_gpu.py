"""Every GPU figure of issue 22 in one call (about 10 minutes on an H100), written to a JSON file as it goes.

    python benchmarks/benchmark_gpu.py --output gpu_figures.json              # ViT-B, 128³, on cuda
    python benchmarks/benchmark_gpu.py --dry_run --output /tmp/dry.json       # tiny model on the CPU, seconds

Figures (random weights; the timings do not depend on them), each the median of `--repeats` runs after a warm-up,
with the peak allocated memory of those runs:
- `encode/*`: `get_image_embeddings` of one patch (encoder, necks, prompt-independent decoder part), in float32 and
  under bf16 autocast, eager and `torch.compile`d, plus the plain path (explicit x4 upsampling, eager attention with
  the dense bias) in float32 as the baseline of the same run;
- `click/*`: a new click on the cached patch (`model(image_embeddings=..., input_points=...)`), same variants;
- `train/*`: one training step of the paper's adapter scheme (forward with labels, backward, AdamW step), batch 1,
  float32 and bf16 autocast, with and without gradient checkpointing.
The JSON is rewritten after every figure, so a run cut short keeps what it measured; a figure that fails records its
error and the run goes on. Compiled variants come last because each compilation takes a minute or more.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from benchmark_encoder import Paths  # the plain path of the CPU benchmark (run from any folder)

from sam3d_hf import Sam3DAdapterConfig, Sam3DConfig, Sam3DForPromptableSegmentation, get_adapter_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True, help="JSON file for the figures")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", type=int, default=128, help="cubic patch size (ViT-B)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of each figure after one warm-up")
    parser.add_argument("--skip_compile", action="store_true", help="leave out the torch.compile variants")
    parser.add_argument("--skip_train", action="store_true", help="leave out the training steps")
    parser.add_argument(
        "--dry_run",
        action="store_true",
        help="tiny model, (40, 24, 44) patch, CPU, 1 repeat, compile with the 'eager' backend: checks that it runs",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.dry_run:
        args.device, args.repeats = "cpu", 1
    return args


class Figures:
    """Measures figures and keeps the JSON file up to date."""

    def __init__(self, path: str, device: torch.device, header: dict):
        self.path, self.device = Path(path), device
        self.data = {**header, "figures": {}}
        self.write()

    def write(self) -> None:
        self.path.write_text(json.dumps(self.data, indent=1))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def measure(self, name: str, fn: Callable[[], object], repeats: int) -> None:
        try:
            fn()  # warm-up (and, for compiled variants, the compilation)
            self.sync()
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                self.sync()
                times.append(time.perf_counter() - start)
            figure = {"median_ms": round(1000 * statistics.median(times), 2), "min_ms": round(1000 * min(times), 2)}
            if self.device.type == "cuda":
                figure["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        except Exception as error:  # a figure that fails must not cost the others
            figure = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()[-2000:]}
        self.data["figures"][name] = figure
        print(name, {k: v for k, v in figure.items() if k != "traceback"}, flush=True)
        self.write()


def build_model(args: argparse.Namespace) -> Sam3DForPromptableSegmentation:
    size = (40, 24, 44) if args.dry_run else (args.size,) * 3
    config = Sam3DConfig.from_preset("tiny" if args.dry_run else "vit_b", vision_config={"image_size": size})
    torch.manual_seed(0)
    model = Sam3DForPromptableSegmentation(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    return model


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = torch.device(args.device)
    model = build_model(args).to(device).eval()
    size = model.config.vision_config.image_size
    header = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine(),
        "patch": size,
        "repeats": args.repeats,
        "dry_run": args.dry_run,
        "argv": sys.argv[1:] if argv is None else argv,
    }
    figures = Figures(args.output, device, header)
    backend = "eager" if args.dry_run else "inductor"
    pixel_values = torch.randn(1, 1, *size, device=device)
    points = torch.tensor([[[s / 2 for s in size], [s / 3 for s in size]]], device=device)

    def precision(name: str):
        if name == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    with torch.inference_mode():
        paths = Paths(model)
        paths.plain()
        figures.measure("encode/plain_fp32", lambda: model.get_image_embeddings(pixel_values), args.repeats)
        paths.default()
        compiled = [False] if args.skip_compile else [False, True]
        for use_compile in compiled:
            encode = model.get_image_embeddings
            decode = model
            if use_compile:
                torch._dynamo.reset()
                encode = torch.compile(model.get_image_embeddings, backend=backend)
                decode = torch.compile(model, backend=backend)
            suffix = "_compiled" if use_compile else ""
            for dtype in ("fp32", "bf16"):
                with precision(dtype):
                    figures.measure(f"encode/{dtype}{suffix}", lambda e=encode: e(pixel_values), args.repeats)
                    embeddings = encode(pixel_values)
                    figures.measure(
                        f"click/{dtype}{suffix}",
                        lambda d=decode, e=embeddings: d(image_embeddings=e, input_points=points),
                        args.repeats,
                    )
                del embeddings
    if not args.skip_train:
        labels = torch.zeros(1, *size, dtype=torch.long, device=device)
        labels[:, size[0] // 3 : size[0] // 2, size[1] // 3 : size[1] // 2, size[2] // 3 : size[2] // 2] = 1
        for checkpointing in (False, True):
            for dtype in ("fp32", "bf16"):
                trainee = get_adapter_model(build_model(args), Sam3DAdapterConfig()).to(device).train()
                if checkpointing:
                    trainee.model.activation_checkpointing_enable()
                optimizer = torch.optim.AdamW([p for p in trainee.parameters() if p.requires_grad], lr=1e-4)

                def step(trainee=trainee, optimizer=optimizer, dtype=dtype):
                    with precision(dtype):
                        loss = trainee(pixel_values=pixel_values, input_points=points, labels=labels).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)

                name = f"train/{dtype}{'_checkpointing' if checkpointing else ''}"
                figures.measure(name, step, max(1, args.repeats // 2))
                del trainee, optimizer
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return figures.data


if __name__ == "__main__":
    main()
