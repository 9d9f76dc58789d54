"""Validation Dice against wall time for two training recipes, trained side by side on the same generated data.

Both runs start at once, each in its own process with one thread, so that they share the machine alike; both validate
the same way (whole validation scans, one click per lesion, Dice in the scans' geometry: `--validation scans`) every
`--validation_steps`, and the script prints each run's curve (seconds since its start, step, Dice) and the Dice each
reached by equal times.

    OMP_NUM_THREADS=1 python benchmarks/benchmark_recipes.py --recipes official legacy --minutes 10
    OMP_NUM_THREADS=1 python benchmarks/benchmark_recipes.py --recipes official official:learning_rate=1e-4

A run is `RECIPE` or `RECIPE:FLAG=VALUE,FLAG=VALUE` (training flags without their dashes, overriding the recipe).

Tiny model, random weights, 32³ patches of the demo's generated scans at 1.5 mm; the recipes keep their own
learning rates, schedules (compressed into `--epochs`), clicks, crops and augmentations.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sam3d_hf.demo import PATCH_SIZE, TARGET_SPACING
from sam3d_hf.image_processing_sam3d import Sam3DImageProcessor
from sam3d_hf.processing_sam3d import Sam3DProcessor
from sam3d_hf.synthetic import SYNTHETIC_PROCESSOR_KWARGS, generate_dataset
from sam3d_hf.training import CPU_LAUNCH_OPTIONS, launch_command


def curve(output_dir: Path) -> list[tuple[float, int, float]]:
    """(seconds since the first logged line, step, validation Dice) of a run's metrics.jsonl."""
    records = [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    start = records[0]["time"]
    return [(r["time"] - start, r["step"], r["validation_dice"]) for r in records if "validation_dice" in r]


def folder_name(run: str) -> str:
    """The run's folder: `official:learning_rate=1e-4` -> `official_learning_rate-1e-4`."""
    return run.replace(":", "_").replace("=", "-").replace(",", "_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", nargs="+", default=["official", "legacy"], help="RECIPE[:FLAG=VALUE,...] each")
    parser.add_argument("--minutes", type=float, default=10.0, help="wall time of each run")
    parser.add_argument("--epochs", type=int, default=60, help="each recipe's schedule is compressed into these")
    parser.add_argument("--validation_steps", type=int, default=100)
    parser.add_argument("--cases", type=int, default=24)
    parser.add_argument("--work_dir", help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="sam3d-recipes-"))
    data = generate_dataset(work / "data", num_cases=args.cases, seed=0)
    processor_dir = work / "processor"
    image_processor = Sam3DImageProcessor(**SYNTHETIC_PROCESSOR_KWARGS, target_spacing=TARGET_SPACING)
    Sam3DProcessor(image_processor, patch_size=PATCH_SIZE, cluster_margin=4).save_pretrained(processor_dir)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    runs = {}
    for run in args.recipes:
        recipe, _, overrides = run.partition(":")
        flags = [f"--{o.partition('=')[0]}={o.partition('=')[2]}" for o in overrides.split(",") if o]
        name = folder_name(run)
        argv = ["--recipe", recipe, *flags, "--data_dir", str(data), "--output_dir", str(work / name), "--processor",
                str(processor_dir), "--split_file", str(work / "split.json"), "--cache_dir", str(work / "cache"),
                "--model_config", "tiny", "--patch_size", *map(str, PATCH_SIZE), "--num_train_epochs",
                str(args.epochs), "--validation", "scans", "--validation_steps", str(args.validation_steps),
                "--checkpointing_steps", "100000", "--report_to", "jsonl", "--max_validation_cases", "3"]  # fmt: skip
        log = (work / f"{name}.log").open("w")
        runs[run] = subprocess.Popen(launch_command(argv, CPU_LAUNCH_OPTIONS), env=env, stdout=log, stderr=log)
        if len(runs) == 1:
            time.sleep(30)  # the first run writes the split and fills the cache; the others reuse both
    deadline = time.monotonic() + 60 * args.minutes
    while time.monotonic() < deadline and any(p.poll() is None for p in runs.values()):
        time.sleep(5)
    for process in runs.values():
        if process.poll() is None:
            process.terminate()
            process.wait()

    curves = {run: curve(work / folder_name(run)) for run in args.recipes}
    print(f"load average at the end: {os.getloadavg()}; runs in {work}")
    for recipe, points in curves.items():
        print(f"\n{recipe}: seconds, step, validation Dice")
        for seconds, step, dice in points:
            print(f"  {seconds:7.0f}  {step:6d}  {dice:.3f}")
    print("\nbest validation Dice reached by each time (same wall time for every recipe)")
    marks = sorted({round(s, -1) for points in curves.values() for s, _, _ in points if s > 0})[:: max(1, 1)]
    header = "  seconds  " + "  ".join(f"{r:>12s}" for r in args.recipes)
    print(header)
    for mark in marks[:: max(1, len(marks) // 10)]:
        best = [max([d for s, _, d in curves[r] if s <= mark] or [float("nan")]) for r in args.recipes]
        print(f"  {mark:7.0f}  " + "  ".join(f"{b:12.3f}" for b in best))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
