"""Thread settings for the demo's small model, on a quiet machine and beside one other CPU-bound process.

    python benchmarks/benchmark_threads.py                      # builds a `sam3d demo --quick` folder to work on
    python benchmarks/benchmark_threads.py --demo_dir sam3d-demo --steps 80

Each setting runs the demo's two heavy stages as the demo runs them, in fresh processes:
- training: `accelerate launch -m sam3d_hf.training` with the demo's arguments (tiny model, `interactive` recipe, 32³
  patches) for `--steps` steps; the figure is the median step time from its metrics.jsonl after 10 warm-up steps;
- evaluation: `python -m sam3d_hf.evaluation` of the demo's model on its held-out scans (`--protocols`), timed whole
  (imports included).
Settings: OMP_NUM_THREADS=1, =2 (what accelerate picks on a 2-core machine, and torch's default), and =2 with
OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning), each quiet and with a competing process (a
Python busy loop: one core taken, load average +1) started before and stopped after. The slowdown of a setting is its
busy time over its quiet time; the demo's choice should keep it <= 2. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

SETTINGS = {
    "1 thread": {"OMP_NUM_THREADS": "1"},
    "2 threads": {"OMP_NUM_THREADS": "2"},
    "2 threads, passive wait": {"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"},
}


def median_step_seconds(metrics: Path, warm_up: int = 10) -> float:
    times = [json.loads(line)["time"] for line in metrics.read_text().splitlines() if '"train_loss"' in line]
    gaps = [b - a for a, b in zip(times[warm_up:], times[warm_up + 1 :])]
    return statistics.median(gaps)


def train(demo: Path, work: Path, steps: int, environment: dict) -> float:
    from sam3d_hf import demo as demo_module
    from sam3d_hf import training

    output = work / "training"
    argv = [
        "--data_dir", str(demo / "data"), "--output_dir", str(output),
        "--processor", str(demo / "training" / "processor"),
        "--split_file", str(demo / "training" / "split.json"), "--cache_dir", str(work / "cache"),
        "--patch_size", *map(str, demo_module.PATCH_SIZE), "--max_train_steps", str(steps),
        "--checkpointing_steps", str(steps), "--checkpoints_total_limit", "1", "--seed", "0", *demo_module.TRAIN_ARGS,
    ]  # fmt: skip
    command = training.launch_command(argv, training.CPU_LAUNCH_OPTIONS)
    subprocess.run(command, env=environment, check=True, capture_output=True)
    return median_step_seconds(output / "logs" / "metrics.jsonl")


def evaluate(demo: Path, work: Path, protocols: str, environment: dict) -> float:
    command = [
        sys.executable, "-m", "sam3d_hf.evaluation", "--model", str(demo / "model"), "--data_dir", str(demo / "data"),
        "--split_file", str(demo / "training" / "split.json"), "--split", "test", "--protocols", protocols,
        "--rounds", "5", "--output_dir", str(work / "evaluation"),
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, env=environment, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo_dir", help="a finished `sam3d demo` folder (default: build a --quick one)")
    parser.add_argument("--steps", type=int, default=60, help="training steps per run (10 of them warm-up)")
    parser.add_argument("--protocols", default="1,interactive", help="evaluation protocols per run")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        demo = Path(args.demo_dir) if args.demo_dir else None
        if demo is None:
            from sam3d_hf.demo import run_demo

            demo = run_demo(Path(scratch) / "demo", quick=True)
        results = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "device": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "load_average_start": os.getloadavg(),
            "rows": [],
        }
        for name in args.settings:
            row = {"setting": name}
            for load in ("quiet", "busy"):
                inherited = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
                environment = {**inherited, "HF_HUB_OFFLINE": "1", **SETTINGS[name]}
                competitor = None
                if load == "busy":
                    competitor = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    time.sleep(2)
                try:
                    work = Path(tempfile.mkdtemp(dir=scratch))
                    row[f"train_step_s_{load}"] = round(train(demo, work, args.steps, environment), 4)
                    row[f"evaluation_s_{load}"] = round(evaluate(demo, work, args.protocols, environment), 1)
                finally:
                    if competitor is not None:
                        competitor.kill()
                        competitor.wait()
            row["train_slowdown"] = round(row["train_step_s_busy"] / row["train_step_s_quiet"], 2)
            row["evaluation_slowdown"] = round(row["evaluation_s_busy"] / row["evaluation_s_quiet"], 2)
            results["rows"].append(row)
            print(
                f"{name:24s} train step {row['train_step_s_quiet']:.3f} s quiet, {row['train_step_s_busy']:.3f} s busy "
                f"({row['train_slowdown']:.2f}x); evaluation {row['evaluation_s_quiet']:.1f} s quiet, "
                f"{row['evaluation_s_busy']:.1f} s busy ({row['evaluation_slowdown']:.2f}x)",
                flush=True,
            )
        results["load_average_end"] = os.getloadavg()
        print(json.dumps(results))


if __name__ == "__main__":
    main()
