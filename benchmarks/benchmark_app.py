"""Time from a click to the updated overlay in the app, for a click on a new patch and on a cached one.

The app (sam3d_hf.app) is served on localhost with a random-weight model and driven through gradio_client, as the
page drives it: `/load_generated` (a synthetic case), then `/click_voxel` on the lesion. A round trip is what a user
waits for after a click, less the browser's painting: the request, the predictor (encoder for a new patch, prompt
encoder and decoder for a cached one, mapping back to the scan), rendering the three views, PNG encoding and
downloading them. The predictor's own share comes from the page's clicks table.

    python benchmarks/benchmark_app.py                         # tiny config and ViT-B at 128³ (a few minutes on CPU)
    python benchmarks/benchmark_app.py --presets tiny --cached 10
    OMP_NUM_THREADS=2 python benchmarks/benchmark_app.py --presets vit_b --new 2

Random weights: the masks mean nothing, the times are those of the real computation.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import numpy as np
import torch

from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation, Sam3DImageProcessor, Sam3DProcessor
from sam3d_hf.app import build_app
from sam3d_hf.synthetic import SYNTHETIC_PROCESSOR_KWARGS, generate_case

PRESETS = {"tiny": ({"image_size": (40, 24, 44)}, 4), "vit_b": ({}, 16)}  # vision overrides, processor cluster_margin


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,vit_b", help="comma-separated: tiny, vit_b (default both)")
    parser.add_argument("--new", type=int, default=1, help="clicks on new patches per preset (default 1)")
    parser.add_argument("--cached", type=int, default=5, help="clicks on the cached patch per preset (default 5)")
    parser.add_argument("--seed", type=int, default=7, help="the generated case (default 7)")
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def measure(preset: str, args: argparse.Namespace) -> list[tuple[str, float, float]]:
    from gradio_client import Client

    overrides, margin = PRESETS[preset]
    config = Sam3DConfig.from_preset(preset, vision_config=overrides)
    model = Sam3DForPromptableSegmentation(config).eval()
    patch = tuple(config.vision_config.image_size)
    processor = Sam3DProcessor(
        Sam3DImageProcessor(**SYNTHETIC_PROCESSOR_KWARGS), patch_size=patch, cluster_margin=margin
    )
    page = build_app(preset, models={preset: (model, processor)})
    page.queue()
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        client.predict(args.seed, "oblique", 1, api_name="/load_generated")
        _, label = generate_case(args.seed, orientation="oblique", num_lesions=1)
        lesion = np.argwhere(np.asarray(label.dataobj) == 2)
        centre = lesion[np.argmin(((lesion - lesion.mean(0)) ** 2).sum(1))]
        shape = np.asarray(label.shape)
        # New patches: the lesion first, then the scan's corners (each outside the earlier patches).
        corners = [np.zeros(3, int), shape - 1, np.array([0, shape[1] - 1, 0]), np.array([shape[0] - 1, 0, 0])]
        clicks = [("new patch", centre)] + [("new patch", c) for c in corners[: args.new - 1]]
        clicks += [("cached patch", centre + np.array([(n % 3) - 1, (n // 3) % 3 - 1, 0])) for n in range(args.cached)]
        results = []
        for kind, voxel in clicks:
            started = time.perf_counter()
            outputs = client.predict(
                ", ".join(str(int(v)) for v in voxel), "voxel", "positive", api_name="/click_voxel"
            )
            round_trip = time.perf_counter() - started
            status, table = outputs[6], outputs[8]
            encoded = "ran the encoder" in status
            if encoded != (kind == "new patch"):
                raise SystemExit(f"expected a {kind}, the app said: {status}")
            results.append((kind, round_trip, float(table["data"][-1][9])))
            print(f"  {preset:6s} {kind:13s} round trip {round_trip:7.2f} s (predictor {results[-1][2]:.2f} s)")
        return results
    finally:
        page.close()


def main() -> None:
    args = parse_args()
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        raise SystemExit(f"--presets: unknown {unknown}; choose from {sorted(PRESETS)}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    rows = []
    for preset in presets:
        for kind, times in _by_kind(measure(preset, args)).items():
            rows.append((preset, kind, times))
    print("\n| model | click on | round trip (median, s) | predictor (median, s) | clicks |")
    print("|---|---|---|---|---|")
    for preset, kind, times in rows:
        trips, predictor = [t for t, _ in times], [p for _, p in times]
        name = "tiny (40×24×44)" if preset == "tiny" else "ViT-B (128³)"
        print(
            f"| {name} | {kind} | {statistics.median(trips):.2f} | {statistics.median(predictor):.2f} | {len(times)} |"
        )


def _by_kind(results: list[tuple[str, float, float]]) -> dict[str, list[tuple[float, float]]]:
    grouped: dict[str, list[tuple[float, float]]] = {}
    for kind, round_trip, predictor in results:
        grouped.setdefault(kind, []).append((round_trip, predictor))
    return grouped


if __name__ == "__main__":
    main()
