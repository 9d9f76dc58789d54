"""`sam3d demo`: the whole workflow on a fresh machine, offline, on the CPU, into one folder.

1. Generate synthetic CT scans with lesions (`sam3d_hf.synthetic.generate_dataset`) and a split whose held-out
   cases all hold a lesion.
2. Fine-tune a small configuration (the `tiny` preset, spatial adapters as in the paper; offline there are no SAM
   weights, so the frozen ViT weights are random) with the `interactive` recipe through `accelerate launch -m
   sam3d_hf.training`: the one training loop of the package.
3. Evaluate 1/3/10 clicks and the interactive protocol (a first click, five corrections; Dice, NSD at 5 and 2 mm) on
   the held-out cases with
   `sam3d_hf.evaluation.main` (cases.csv, summary.json, table.md, overlays/).
4. Keep the 1-click masks the evaluation scored (`--save_masks`) as `predictions/` (NIfTI, the scans' own geometry).
5. Render the model card from the recorded facts (the training's `training_info.json`, the evaluation's
   `summary.json`). The model folder carries the pipeline's code (as every folder training saves), so it serves
   `pipeline("sam3d-segmentation", model=..., trust_remote_code=True)` with or without sam3d-hf installed.

Everything is built in a hidden sibling folder and moved to `output_dir` at the end, so a failed or interrupted demo
leaves no half-written folder behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["DEMO_SETTINGS", "run_demo"]

# Why these sizes: the full demo must finish within 10 minutes on a 2-core CPU and reach a 1-click Dice of 0.70 on
# held-out lesions. A 32³ patch at 1.5 mm voxels (48 mm) holds a whole synthetic lesion (6-25 mm) with its
# surroundings while keeping a training step of the tiny model cheap, and the step count is what fits the time budget
# together with the evaluation. The README ("The demo") gives the measured time and Dice.
DEMO_SETTINGS = {
    "full": {"num_cases": 24, "num_test": 5, "steps": 2000, "protocols": "1,3,10,interactive", "rounds": 5},
    "quick": {"num_cases": 5, "num_test": 1, "steps": 8, "protocols": "1,interactive", "rounds": 1},
}
PATCH_SIZE = (32, 32, 32)
TARGET_SPACING = (1.5, 1.5, 1.5)
# The interactive recipe (one click, the previous mask and click maps, 0-5 simulated corrections per step) at 1e-4:
# from random weights the official 4e-4 does not learn (docs/recipes.md).
TRAIN_ARGS = [
    "--recipe", "interactive", "--model_config", "tiny", "--finetune", "adapter", "--learning_rate", "1e-4",
    "--validation_steps", "0", "--report_to", "jsonl",
]  # fmt: skip


def idle_cores(window: float = 0.5, stat: str = "/proc/stat") -> float:
    """How many of the machine's cores other processes leave idle now: the idle share of all CPU time over `window`
    seconds (Linux `/proc/stat`), else the cores minus the 1-minute load average (macOS, or no /proc)."""
    cores = os.cpu_count() or 1

    def totals() -> tuple[int, int]:
        fields = [int(value) for value in Path(stat).read_text().splitlines()[0].split()[1:]]
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        return fields[3] + fields[4], sum(fields[:8])

    try:
        idle_before, total_before = totals()
        time.sleep(window)
        idle_after, total_after = totals()
    except (OSError, ValueError, IndexError):
        return max(0.0, cores - os.getloadavg()[0])
    return cores * (idle_after - idle_before) / max(total_after - total_before, 1)


def choose_threads(requested: int | None = None, idle: float | None = None) -> tuple[int, str]:
    """torch threads for a stage of the demo and a line saying why (e.g. "2 threads: 2.0 of 2 cores idle"):
    `requested` if given, else one per idle core (at least one).

    Why: the demo's tiny model works on small tensors, where OpenMP threads that find their core taken spin against
    the other process. On the 2-core machine one training step took 0.178 s with 2 threads and 0.259 s with 1 when
    quiet, but 0.730 s with 2 and 0.271 s with 1 beside one CPU-bound process (`benchmarks/benchmark_threads.py`):
    2 threads when both cores are free, 1 when one is taken keeps a busy run within 1.5x of a quiet one.
    """
    if requested is not None:
        threads, why = requested, "as --threads asked"
    else:
        cores = os.cpu_count() or 1
        idle = idle_cores() if idle is None else idle
        threads, why = max(1, min(cores, round(idle))), f"{idle:.1f} of {cores} cores idle"
    return threads, f"{threads} thread{'s' if threads > 1 else ''}: {why}"


def _step(number: int, text: str) -> None:
    print(f"[{number}/5] {text}", flush=True)


def _has_tumour(label_path: Path, target: int) -> bool:
    return bool((np.asarray(nib.load(label_path).dataobj) == target).any())


def run_demo(
    output_dir: str | os.PathLike = "sam3d-demo",
    quick: bool = False,
    overwrite: bool = False,
    seed: int = 0,
    threads: int | None = None,
):
    """Run the demo and write its folder; returns the path of `output_dir`. `threads`: torch threads of training and
    evaluation (default: one per core that other processes leave idle when the stage starts, see [`choose_threads`]).

    Layout of `output_dir`: `data/` (generated MSD-style scans), `model/` (model, processor, `adapter/`, README.md =
    model card), `training/` (split, logs),
    `evaluation/` (cases.csv, lesions.csv, summary.json, table.md, overlays), `predictions/<case>.nii.gz` (1-click masks
    of the held-out cases in their scans' geometry).
    """
    import torch

    from . import evaluation, training
    from .files import make_staging_folder, replace_folder, write_json
    from .hub import render_model_card
    from .image_processing_sam3d import Sam3DImageProcessor
    from .processing_sam3d import Sam3DProcessor
    from .synthetic import SYNTHETIC_PROCESSOR_KWARGS, generate_dataset

    settings = DEMO_SETTINGS["quick" if quick else "full"]
    output_dir = Path(output_dir).expanduser().resolve()
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"{output_dir} is a file; choose a folder for the demo (--output-dir)")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise ValueError(f"{output_dir} already exists and is not empty; pass --overwrite or choose --output-dir")
    # `kill` (SIGTERM) ends Python without unwinding; as an exception it reaches the clean-up below.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    work = make_staging_folder(output_dir)
    started = time.perf_counter()
    try:
        _step(1, f"generating {settings['num_cases']} synthetic CT scans")
        data_dir = generate_dataset(work / "data", num_cases=settings["num_cases"], seed=seed)
        target = SYNTHETIC_PROCESSOR_KWARGS["target_label"]
        cases = sorted(p.name.split(".")[0] for p in (data_dir / "labelsTr").glob("*.nii.gz"))
        with_tumour = [c for c in cases if _has_tumour(data_dir / "labelsTr" / f"{c}.nii.gz", target)]
        test = with_tumour[-settings["num_test"] :]
        rest = [c for c in cases if c not in test]
        split = {"train": rest[1:], "validation": rest[:1], "test": test, "seed": seed}
        split["fractions"] = [len(split[k]) / len(cases) for k in ("train", "validation", "test")]
        (work / "training").mkdir()
        write_json(work / "training" / "split.json", split)
        image_processor = Sam3DImageProcessor(**SYNTHETIC_PROCESSOR_KWARGS, target_spacing=TARGET_SPACING)
        processor_dir = work / "training" / "processor"
        Sam3DProcessor(image_processor, patch_size=PATCH_SIZE, cluster_margin=4).save_pretrained(processor_dir)

        stage_threads, threads_line = choose_threads(threads)
        _step(
            2,
            f"fine-tuning the tiny model for {settings['steps']} steps (accelerate launch -m sam3d_hf.training; "
            f"{threads_line})",
        )
        train_argv = [
            "--data_dir", str(data_dir), "--output_dir", str(work / "training"), "--processor", str(processor_dir),
            "--split_file", str(work / "training" / "split.json"), "--cache_dir", str(work / "cache"),
            "--patch_size", *map(str, PATCH_SIZE), "--max_train_steps", str(settings["steps"]),
            "--checkpointing_steps", str(settings["steps"]), "--checkpoints_total_limit", "1", "--seed", str(seed),
            *TRAIN_ARGS,
        ]  # fmt: skip
        environment = training.launch_environment({**os.environ, "HF_HUB_OFFLINE": "1"})
        environment["OMP_NUM_THREADS"] = str(stage_threads)
        options = (*training.CPU_LAUNCH_OPTIONS, "--num_cpu_threads_per_process", str(stage_threads))
        command = training.launch_command(train_argv, options)
        if subprocess.run(command, env=environment).returncode:
            raise SystemExit("sam3d demo: error: training failed (see its output above); nothing was kept")
        shutil.move(work / "training" / "final_model", work / "model")
        shutil.rmtree(work / "training" / "checkpoints", ignore_errors=True)
        shutil.rmtree(work / "cache", ignore_errors=True)

        stage_threads, threads_line = choose_threads(threads)
        _step(
            3,
            f"evaluating {len(test)} held-out case(s): clicks {settings['protocols']} (sam3d_hf.evaluation; "
            f"{threads_line})",
        )
        evaluation_dir = work / "evaluation"
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(stage_threads)
        try:
            evaluation.main([
                "--model", str(work / "model"), "--data_dir", str(data_dir), "--split_file",
                str(work / "training" / "split.json"), "--split", "test", "--protocols", settings["protocols"],
                "--rounds", str(settings["rounds"]), "--dataset_name", "synthetic", "--seed", str(seed),
                "--click_placement", "official,per_lesion",
                "--output_dir", str(evaluation_dir), "--save_masks",
            ])  # fmt: skip
        finally:
            torch.set_num_threads(previous_threads)

        _step(4, "keeping the scored 1-click masks of the held-out cases as predictions/ (NIfTI)")
        os.replace(evaluation_dir / "masks" / "1-per_lesion", work / "predictions")  # the masks its table scored
        label_image = nib.load(data_dir / "labelsTr" / f"{test[0]}.nii.gz")
        tumour = np.asarray(label_image.dataobj) == target
        lesions, count = ndimage.label(tumour)  # a voxel inside the largest lesion, for the `sam3d segment` line
        largest = 1 + int(np.argmax(ndimage.sum(tumour, lesions, range(1, count + 1))))
        inside = np.argwhere(lesions == largest)
        example = (test[0], inside[np.argmin(((inside - inside.mean(0)) ** 2).sum(1))])

        _step(5, "rendering the model card")
        card = render_model_card(
            work / "model", dataset="synthetic", evaluation=evaluation_dir / "summary.json", model_name="sam3d-demo",
        )  # fmt: skip
        card.save(work / "model" / "README.md")

        replace_folder(work, output_dir)  # --overwrite: the old folder goes only once the new one is complete
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise

    minutes = (time.perf_counter() - started) / 60
    print(f"\ndone in {minutes:.1f} min. Everything is in {output_dir}:")
    for name, what in (
        ("model/", "model, processor_config.json, adapter/ and README.md (the model card)"),
        ("evaluation/table.md", "Dice / NSD per protocol (also cases.csv, lesions.csv, summary.json)"),
        ("evaluation/overlays/", "PNG overlays: ground truth, prediction, clicks"),
        ("predictions/", "1-click masks of the held-out cases (NIfTI, the scans' geometry)"),
        ("data/", "the generated scans (MSD layout)"),
        ("training/", "split.json, the training logs and the processor it trained with"),
    ):
        print(f"  {output_dir / name}  {what}")
    print("\n" + (output_dir / "evaluation" / "table.md").read_text().strip())
    case, voxel = example
    relative = os.path.relpath(output_dir)
    print("\nTry next:")
    print(
        f"  sam3d segment --model {relative}/model --image {relative}/data/imagesTr/{case}.nii.gz "
        f"--point {','.join(str(int(v)) for v in voxel)} --output mask.nii.gz --overlay mask.png"
    )
    return output_dir
