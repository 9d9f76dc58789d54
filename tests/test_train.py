"""sam3d_hf.training (what examples/train.py and `sam3d train` run) for real: two DDP processes, SIGKILL + resume,
kills during a save, bad data, every option, TensorBoard, the README's commands, argument checks.

Every run uses the tiny config on a small generated dataset (an anisotropic, non-cubic 32x24x40 patch, batch 2 with
several clicks). The reference run, the DDP run, the killed runs and the README's commands are started as a user
would (`accelerate launch`, or `python` for the killed ones); the other runs call the script's `main()` in this
process, as `accelerate launch` with the CPU config would run it, which saves a new interpreter (about 20 s) each.
"""

import hashlib
import importlib.util
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import copy_with_an_unlabelled_scan

from sam3d_hf.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
# The loop's mechanics (resume, DDP, checkpoints, validation on scans) on the legacy recipe; the official recipes'
# own runs: tests/test_recipe_runs.py.
TINY_ARGS = [
    "--recipe", "legacy", "--model_config", "tiny", "--patch_size", "32", "24", "40", "--train_batch_size", "2",
    "--num_positive_points", "6", "--num_background_points", "3", "--num_negative_points", "1",
    "--max_validation_cases", "1", "--report_to", "jsonl", "--seed", "3",
]  # fmt: skip


@pytest.fixture(scope="module")
def train():
    from sam3d_hf import training

    return training


def call_main(train, argv: list[str]) -> None:
    """The script's `main(argv)` in this process; Accelerate's process-wide state is reset before and after."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        train.main(argv)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def run_main(train, output_dir: Path, data_dir: Path, *extra: str) -> None:
    call_main(train, ["--data_dir", str(data_dir), "--output_dir", str(output_dir),
                      "--cache_dir", str(data_dir.parent / "cache"), *TINY_ARGS, *extra])  # fmt: skip


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("data") / "synthetic", num_cases=6, seed=0)


def environment() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(output_dir: Path, data_dir: Path, *extra: str, processes: int = 1) -> list[str]:
    """`accelerate launch -m sam3d_hf.training`; the preprocessed-volume cache goes next to the data (not ~/.cache)."""
    if processes == 1:
        launcher = ["--config_file", str(ROOT / "examples" / "accelerate_configs" / "cpu.yaml")]
    else:
        launcher = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(free_port())]
    return [
        sys.executable, "-m", "accelerate.commands.launch", *launcher, "-m", "sam3d_hf.training",
        "--data_dir", str(data_dir), "--output_dir", str(output_dir), "--cache_dir", str(data_dir.parent / "cache"),
        *TINY_ARGS, *extra,
    ]  # fmt: skip


def run(command: list[str], **env) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env={**environment(), **env}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def step_losses(output_dir: Path) -> dict[int, float]:
    """Training loss per step; a resumed run logs steps again after its checkpoint: the last line wins."""
    losses = {}
    for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "train_loss" in record:
            losses[record["step"]] = record["train_loss"]
    return losses


def validation_records(output_dir: Path) -> dict[int, dict[str, float]]:
    """The validation scores logged at each step: the mean and one per scan."""
    records = [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    kept = {}
    for record in records:
        if "validation_dice" in record:
            del record["time"]  # the wall time of the line
            kept[record.pop("step")] = record
    return kept


def final_weights(output_dir: Path) -> dict[str, str]:
    return json.loads((output_dir / "weights_rank0.json").read_text())


# 6 cases -> 4 training scans -> 2 batches of 2 per epoch: checkpoints at steps 3 and 6 fall mid-epoch, so resuming
# needs the epoch and the position in it.
RUN_ARGS = ["--max_train_steps", "7", "--checkpointing_steps", "3", "--validation_steps", "3", "--save_rank_checksums"]


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory) -> Path:
    """An uninterrupted single-process run of 7 steps, checkpoints at steps 3, 6 and 7 (the last step)."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    run(launch_command(output_dir, data_dir, *RUN_ARGS))
    return output_dir


def test_run_writes_loadable_outputs(reference_run):
    from transformers import AutoProcessor

    from sam3d_hf import Sam3DAdapterModel, Sam3DForPromptableSegmentation

    losses = step_losses(reference_run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6, 7]
    validations = validation_records(reference_run)
    assert list(validations) == [0, 3, 6]
    assert all(0 <= record["validation_dice"] <= 1 for record in validations.values())
    # total_limit 3 keeps all three checkpoints, named by their step; each one is complete and records its step.
    folders = sorted((reference_run / "checkpoints").iterdir())
    assert [f.name for f in folders] == ["checkpoint_3", "checkpoint_6", "checkpoint_7"]
    states = [json.loads((c / "training_state.json").read_text()) for c in folders]
    assert [state["global_step"] for state in states] == [3, 6, 7]
    # the random states move on between checkpoints (a new epoch's DataLoader draws a seed): the fingerprint sees it
    assert len({state["rng_fingerprint"] for state in states}) == 3
    # The final folder reloads: model + processor, and the adapter files reproduce its outputs on the same base.
    final = reference_run / "final_model"
    model = Sam3DForPromptableSegmentation.from_pretrained(final)
    assert AutoProcessor.from_pretrained(final).patch_size == (32, 24, 40)
    assert model.config.prompt_encoder_config.use_point_labels
    stored = load_safetensors(final / "model.safetensors")
    adapter = load_safetensors(final / "adapter" / "adapter_model.safetensors")
    assert adapter and all(np.array_equal(stored[k], v) for k, v in adapter.items())
    # Only the paper's trained groups are in the adapter file; they reload onto a base of the same architecture.
    base = Sam3DForPromptableSegmentation(model.config)
    wrapped = Sam3DAdapterModel.from_pretrained(base, final / "adapter")
    assert sorted(adapter) == sorted(wrapped.trainable_parameter_names())
    assert 0 < len(adapter) < len(stored)
    # The run's weights are the saved ones: the checksum file of the last rank matches the safetensors file.
    checksums = final_weights(reference_run)
    for name, array in stored.items():
        assert hashlib.sha256(array.astype(np.float32).tobytes()).hexdigest() == checksums[name], name
    assert not list(reference_run.glob(".*")), "a temporary folder was left behind"
    # The model folders get the user's usual modes (save_pretrained writes its safetensors 0600, mkdtemp gives 0700).
    umask = os.umask(0)
    os.umask(umask)
    for folder in ("final_model", "best_model"):
        for item in [reference_run / folder, *(reference_run / folder).rglob("*")]:
            usual = (0o777 if item.is_dir() else 0o666) & ~umask
            assert item.stat().st_mode & 0o777 == usual, (item, oct(item.stat().st_mode))


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def test_two_processes_hold_identical_weights(data_dir, tmp_path, reference_run):
    output_dir = tmp_path / "ddp"
    run(
        launch_command(output_dir, data_dir, "--max_train_steps", "3", "--validation_steps", "0",
                       "--save_rank_checksums", "--train_batch_size", "1", processes=2),
        ACCELERATE_USE_CPU="1",
    )  # fmt: skip
    rank0 = json.loads((output_dir / "weights_rank0.json").read_text())
    rank1 = json.loads((output_dir / "weights_rank1.json").read_text())
    assert rank0 == rank1
    # The ranks trained on different patches (a global batch of 2 = 1 per rank): the logged loss is their mean, and
    # with the seedable sampler the global batches are those of the single-process run with batch 2.
    ddp_losses = step_losses(output_dir)
    single = step_losses(reference_run)
    assert ddp_losses[1] == pytest.approx(single[1], rel=1e-5)


def test_processes_share_the_validation_scans_and_agree_on_the_score(data_dir, tmp_path):
    """Two processes validate one scan each and report the mean of both, as one process does with both."""
    lesion_cases = [
        path.name.split(".")[0]
        for path in sorted((data_dir / "labelsTr").glob("*.nii.gz"))
        if (np.asanyarray(nib.load(path).dataobj) == 2).any()  # the kits21 preset's tumour label
    ]
    cases = sorted(path.name.split(".")[0] for path in (data_dir / "labelsTr").glob("*.nii.gz"))
    validation = lesion_cases[-2:]
    split = {"train": [c for c in cases if c not in validation][:2], "validation": validation, "test": []}
    split["test"] = [c for c in cases if c not in split["train"] + validation]
    (tmp_path / "split.json").write_text(json.dumps(split))
    argv = ["--split_file", str(tmp_path / "split.json"), "--max_validation_cases", "2", "--train_batch_size", "1",
            "--max_train_steps", "1", "--validation_steps", "1000", "--checkpointing_steps", "1000"]  # fmt: skip
    run(launch_command(tmp_path / "one", data_dir, *argv))
    run(launch_command(tmp_path / "two", data_dir, *argv, processes=2), ACCELERATE_USE_CPU="1")
    one, two = validation_records(tmp_path / "one"), validation_records(tmp_path / "two")
    assert list(one) == list(two) == [0]  # the initial weights: the same in both runs (same seed)
    assert sorted(two[0]) == sorted(one[0]) == ["validation_dice", *(f"validation_dice/{c}" for c in validation)]
    assert two[0] == pytest.approx(one[0], abs=1e-6)
    first, second = (one[0][f"validation_dice/{c}"] for c in validation)
    assert abs(first - second) > 1e-3  # so a rank that kept only its own scan's score would be seen
    assert one[0]["validation_dice"] == pytest.approx((first + second) / 2)


KILL_AFTER_CHECKPOINT = """
import pathlib, sys, time
from sam3d_hf import training as train
original = train.mark_complete

def mark_complete(folder, state):
    original(folder, state)
    if state["global_step"] == {step}:  # checkpoint complete: tell the test, then wait for the SIGKILL
        pathlib.Path({sentinel!r}).touch()
        time.sleep(600)

train.mark_complete = mark_complete
train.main(sys.argv[1:])
"""

KILL_DURING_SAVE = """
import pathlib, sys, time
import accelerate.checkpointing as checkpointing
original = checkpointing.save

def save(obj, path, *args, **kwargs):
    if str(path).endswith({in_folder!r}):  # half-written optimiser state of this checkpoint, then the SIGKILL
        pathlib.Path(path).write_bytes(b"partial")
        pathlib.Path({sentinel!r}).touch()
        time.sleep(600)
    return original(obj, path, *args, **kwargs)

checkpointing.save = save
from sam3d_hf import training as train
train.main(sys.argv[1:])
"""


def kill_during_save(in_folder: str) -> str:
    return KILL_DURING_SAVE.replace("{in_folder!r}", repr(os.path.join(in_folder, "optimizer.bin")))


def start_and_kill(wrapper: str, tmp_path: Path, output_dir: Path, data_dir: Path, *extra: str) -> None:
    """Start the run through `wrapper` (which pauses at a known point and touches a sentinel), SIGKILL it there."""
    sentinel = tmp_path / "paused"
    script = tmp_path / "wrapped_train.py"
    script.write_text(wrapper.replace("{sentinel!r}", repr(str(sentinel))))
    command = [sys.executable, str(script), "--data_dir", str(data_dir), "--output_dir", str(output_dir),
               "--cache_dir", str(data_dir.parent / "cache"), *TINY_ARGS]  # fmt: skip
    process = subprocess.Popen([*command, *RUN_ARGS, *extra], env=environment(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not sentinel.exists():
            assert process.poll() is None, f"the run ended before the kill point: {process.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "the run did not reach the kill point in 300 s"
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        process.stderr.close()


def resume_and_compare(train, caplog, output_dir, data_dir, reference_run, resumed_at: int, *extra: str) -> None:
    """Resume with `--resume_from_checkpoint latest`: it starts at step `resumed_at` with the random states the
    uninterrupted run had there, and the following steps and the final weights equal the uninterrupted run's."""
    caplog.set_level(logging.INFO)
    run_main(train, output_dir, data_dir, *RUN_ARGS, *extra, "--resume_from_checkpoint", "latest")
    assert f"starting at step {resumed_at}" in caplog.text
    reference, resumed = step_losses(reference_run), step_losses(output_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6, 7]
    for step in range(resumed_at + 1, 8):  # the steps after the checkpoint equal the uninterrupted run's
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    assert final_weights(output_dir) == final_weights(reference_run)
    if resumed_at:  # the states load_state restored are the ones the uninterrupted run saved at that step
        records = [json.loads(line) for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
        (restored,) = [r for r in records if "resumed_rng_fingerprint" in r]
        states = [json.loads(p.read_text()) for p in (reference_run / "checkpoints").glob("*/training_state.json")]
        (saved,) = [s["rng_fingerprint"] for s in states if s["global_step"] == resumed_at]
        restored.pop("time")  # the wall time of the line
        assert restored == {"step": resumed_at, "resumed_rng_fingerprint": saved}


def checkpoint_steps(train, output_dir: Path) -> list[int]:
    folders = train.list_checkpoints(output_dir)
    assert all(train.is_complete(f) for f in folders)
    return [json.loads((f / "training_state.json").read_text())["global_step"] for f in folders]


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted_run(train, caplog, data_dir, tmp_path,
                                                                        reference_run):  # fmt: skip
    output_dir = tmp_path / "killed"
    wrapper = KILL_AFTER_CHECKPOINT.replace("{step}", "3")
    start_and_kill(wrapper, tmp_path, output_dir, data_dir)
    losses = step_losses(output_dir)
    assert max(losses) == 3  # killed right after the step-3 checkpoint: steps 4 to 7 come from the resumed run
    resume_and_compare(train, caplog, output_dir, data_dir, reference_run, resumed_at=3)


def test_sigkill_during_save_keeps_the_last_complete_checkpoint(train, caplog, data_dir, tmp_path, reference_run):
    output_dir = tmp_path / "killed_in_save"
    # checkpoint_6 is the step-6 save: killed with its optimiser file half-written.
    start_and_kill(kill_during_save("checkpoint_6"), tmp_path, output_dir, data_dir)
    folders = train.list_checkpoints(output_dir)
    assert [f.name for f in folders] == ["checkpoint_3", "checkpoint_6"]
    assert train.is_complete(folders[0]) and not train.is_complete(folders[1])
    resume_and_compare(train, caplog, output_dir, data_dir, reference_run, resumed_at=3)
    # The incomplete folder was set aside; the resumed run wrote complete ones (total_limit 3 -> steps 3, 6, 7).
    assert checkpoint_steps(train, output_dir) == [3, 6, 7]
    assert [p.name for p in (output_dir / "incomplete_checkpoints").iterdir()] == ["checkpoint_6"]


def test_sigkill_during_the_first_save_then_resume(train, caplog, data_dir, tmp_path, reference_run):
    """No complete checkpoint yet: the half-written checkpoint_3 must not block the saves of the next run."""
    output_dir = tmp_path / "killed_in_first_save"
    start_and_kill(kill_during_save("checkpoint_3"), tmp_path, output_dir, data_dir)
    (folder,) = train.list_checkpoints(output_dir)
    assert folder.name == "checkpoint_3" and not train.is_complete(folder)
    resume_and_compare(train, caplog, output_dir, data_dir, reference_run, resumed_at=0)
    assert checkpoint_steps(train, output_dir) == [3, 6, 7]
    assert [p.name for p in (output_dir / "incomplete_checkpoints").iterdir()] == ["checkpoint_3"]


def test_limit_of_one_checkpoint_survives_a_kill_during_a_save(train, caplog, data_dir, tmp_path, reference_run):
    """The old checkpoint goes only once the new one is complete: a kill during a save leaves the previous one."""
    output_dir = tmp_path / "limit_one"
    start_and_kill(kill_during_save("checkpoint_6"), tmp_path, output_dir, data_dir, "--checkpoints_total_limit", "1")
    folders = train.list_checkpoints(output_dir)
    assert [f.name for f in folders] == ["checkpoint_3", "checkpoint_6"]
    assert train.is_complete(folders[0]) and not train.is_complete(folders[1])
    resume_and_compare(train, caplog, output_dir, data_dir, reference_run, 3, "--checkpoints_total_limit", "1")
    assert checkpoint_steps(train, output_dir) == [7]


def test_a_checkpoint_is_complete_only_with_every_listed_file_at_its_size(train, tmp_path):
    folder = tmp_path / "checkpoint_3"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 100)
    (folder / "optimizer.bin").write_bytes(b"y" * 50)
    assert not train.is_complete(folder)  # no marker yet
    train.mark_complete(folder, {"global_step": 3})
    assert train.is_complete(folder)
    (folder / "optimizer.bin").write_bytes(b"y" * 49)  # a file that changed size after the marker
    assert not train.is_complete(folder)
    (folder / "optimizer.bin").unlink()
    assert not train.is_complete(folder)
    alone = tmp_path / "checkpoint_6"  # a marker without the files it lists
    alone.mkdir()
    shutil.copy(folder / train.COMPLETE_MARKER, alone / train.COMPLETE_MARKER)
    assert not train.is_complete(alone)
    (alone / train.COMPLETE_MARKER).write_text(json.dumps({"files": {}}))  # a marker that lists nothing
    assert not train.is_complete(alone)


def test_best_model_is_written_only_when_validation_improves(train, data_dir, tmp_path, monkeypatch, caplog):
    """Scripted validation scores 0.3, 0.6, 0.2, 0.6, 0.1 at steps 0-4: best_model/ is step 1's (a tie does not
    replace it), final_model/ step 4's; both record what they are in training_info.json."""
    scores = iter([0.3, 0.6, 0.2, 0.6, 0.1])
    monkeypatch.setattr(train, "validation_scores", lambda model, processor, rows, accelerator: [("c", next(scores))])
    output_dir = tmp_path / "best"
    caplog.set_level(logging.WARNING)
    run_main(train, output_dir, data_dir, "--max_train_steps", "4", "--validation_steps", "1")
    best = json.loads((output_dir / "best_model" / "training_info.json").read_text())
    final = json.loads((output_dir / "final_model" / "training_info.json").read_text())
    assert best["selection"] == {"saved": "best validation Dice", "step": 1, "validation_dice": 0.6}
    assert final["selection"] == {"saved": "last step", "step": 4, "best_validation_dice": 0.6}
    assert caplog.text.count("NO PRETRAINED WEIGHTS") == 1  # said once, not twice


def test_the_training_record_states_what_the_run_did(reference_run):
    """training_info.json against the run's own logs and files: steps, epochs, batch, parameters, initialisation."""
    from safetensors.numpy import load_file

    from sam3d_hf import Sam3DForPromptableSegmentation

    record = json.loads((reference_run / "final_model" / "training_info.json").read_text())
    logged = step_losses(reference_run)
    assert record["steps"] == record["selection"]["step"] == max(logged) == 7
    # 4 training scans, batch 2: 2 optimiser steps per epoch, so 7 steps take 4 epochs (the last one partly)
    assert (record["updates_per_epoch"], record["epochs"]) == (2, 4)
    assert record["batch"] == {"per_device": 2, "processes": 1, "accumulation": 1, "effective": 2}
    assert record["initialisation"] == {"kind": "random", "source": None}
    adapter = load_file(reference_run / "final_model" / "adapter" / "adapter_model.safetensors")
    model = Sam3DForPromptableSegmentation.from_pretrained(reference_run / "final_model")
    assert record["parameters"] == {
        "trainable": sum(v.size for v in adapter.values()),  # the adapter file holds exactly the trained tensors
        "total": sum(p.numel() for p in model.parameters()),
    }
    assert record["data"]["patch_size"] == [32, 24, 40] and record["seed"] == 3
    assert record["data"]["training_cases"] == len(json.loads((reference_run / "split.json").read_text())["train"])


def test_a_resume_with_other_arguments_warns_and_keeps_the_first_record(train, data_dir, tmp_path, caplog):
    output_dir = tmp_path / "changed"
    run_main(train, output_dir, data_dir, "--max_train_steps", "2", "--checkpointing_steps", "2",
             "--validation_steps", "0")  # fmt: skip
    first = (output_dir / "logs" / "config.json").read_text()
    caplog.set_level(logging.WARNING)
    run_main(train, output_dir, data_dir, "--max_train_steps", "3", "--checkpointing_steps", "2",
             "--validation_steps", "0", "--learning_rate", "0.01", "--resume_from_checkpoint", "latest")  # fmt: skip
    assert "--learning_rate 0.0001 -> 0.01" in caplog.text and "--max_train_steps 2 -> 3" in caplog.text
    assert (output_dir / "logs" / "config.json").read_text() == first
    resumed = json.loads((output_dir / "logs" / "config_resumed_at_step_2.json").read_text())
    assert (resumed["learning_rate"], resumed["max_train_steps"]) == (0.01, 3)


def test_an_output_dir_that_cannot_be_written_is_one_line(train, data_dir, tmp_path):
    (tmp_path / "file").write_text("")
    for output_dir in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(SystemExit, match="a file is in the way") as stopped:
            run_main(train, output_dir, data_dir, "--max_train_steps", "1")
        assert str(stopped.value.code).startswith("error: --output_dir") and "\n" not in str(stopped.value.code)


def test_tensorboard_records_the_run(train, data_dir, tmp_path):
    """`--report_to tensorboard` (and the default `all` when tensorboard is installed): its hparams take only
    scalars and strings, so the list-valued arguments reach it as strings; the scalars equal the JSON-lines ones."""
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir = tmp_path / "tensorboard"
    run_main(train, output_dir, data_dir, "--max_train_steps", "2", "--validation_steps", "0",
             "--report_to", "tensorboard")  # fmt: skip
    events = EventAccumulator(str(output_dir / "logs" / "sam3d-train")).Reload()
    logged = {event.step: event.value for event in events.Scalars("train_loss")}
    assert logged == pytest.approx(step_losses(output_dir), rel=1e-6) and sorted(logged) == [1, 2]
    (hparams,) = (output_dir / "logs" / "sam3d-train").glob("*/hparams.yml")
    assert yaml.safe_load(hparams.read_text())["patch_size"] == "[32, 24, 40]"
    assert json.loads((output_dir / "logs" / "config.json").read_text())["patch_size"] == [32, 24, 40]


def relabel(root: Path, case: str, change) -> None:
    """Rewrite the label map of `case` in the MSD folder `root` with `change(data, affine) -> (data, affine)`."""
    path = root / "labelsTr" / f"{case}.nii.gz"
    image = nib.load(path)
    data, affine = change(np.asanyarray(image.dataobj), image.affine.copy())
    nib.save(nib.Nifti1Image(data, affine), path)


def drop_target(root: Path, case: str) -> None:
    for path in (root / "labelsTr").glob("*.nii.gz"):  # every case: the tumour (2) becomes organ (1)
        relabel(root, path.name.split(".")[0], lambda data, affine: (np.minimum(data, 1).astype(np.uint8), affine))


def shifted(data, affine):
    affine[:3, 3] += 2.0
    return data, affine


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # its header still reads: only decoding every voxel finds it


BAD_DATA = {
    "truncated image": (lambda root, case: truncate(root / "imagesTr" / f"{case}.nii.gz"), "cannot be read"),
    "truncated label map": (lambda root, case: truncate(root / "labelsTr" / f"{case}.nii.gz"), "cannot be decoded"),
    "missing label file": (lambda root, case: (root / "labelsTr" / f"{case}.nii.gz").unlink(), "does not exist"),
    "shape mismatch": (lambda root, case: relabel(root, case, lambda d, a: (d[:-1], a)), "the label map has shape"),
    "affine mismatch": (lambda root, case: relabel(root, case, shifted), "affine differs from the image's"),
    "split naming missing cases": (
        lambda root, case: (root / "split.json").write_text(
            json.dumps({"train": [case, "ghost_9"], "validation": [], "test": []})
        ),
        "not in the dataset: ['ghost_9']",
    ),
    "empty dataset": (
        lambda root, case: (root / "dataset.json").write_text(json.dumps({"name": "empty", "training": []})),
        "No case found",
    ),
    "no label map holds the target value": (drop_target, "No case holds the target label value 2"),
}


@pytest.mark.parametrize("problem", BAD_DATA)
def test_bad_data_stops_before_the_model_with_one_error_line(train, data_dir, tmp_path, monkeypatch, problem):
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    case = Path(json.loads((broken / "dataset.json").read_text())["training"][0]["image"]).name.split(".")[0]
    damage, message = BAD_DATA[problem]
    damage(broken, case)

    def build_model(args):
        raise AssertionError("the model was built before the data was checked")

    monkeypatch.setattr(train, "build_model", build_model)
    extra = ["--split_file", str(broken / "split.json")] if (broken / "split.json").exists() else []
    with pytest.raises(SystemExit) as stopped:
        run_main(train, tmp_path / "out", broken, "--max_train_steps", "2", *extra)
    text = str(stopped.value.code)
    assert text.startswith("error: the dataset in") and "\n" not in text and message in text, text
    if problem in ("missing label file", "shape mismatch", "affine mismatch", "truncated label map"):
        assert f"Case {case!r}" in text  # the message names the case
    if problem == "truncated image":
        assert f"{case}: " in text and f"{case}.nii.gz" in text
    assert not (tmp_path / "out" / "logs" / "metrics.jsonl").exists()  # no step was taken


def test_scans_without_a_label_are_left_out_of_the_split(train, data_dir, tmp_path, monkeypatch):
    """A KiTS19-like folder whose test scans have no label trains on the labelled ones (the data checks pass and the
    split names only those), instead of refusing the whole dataset."""
    folder, labelled = copy_with_an_unlabelled_scan(data_dir, tmp_path / "folder")

    class DataAccepted(Exception):
        pass

    def build_model(args):
        raise DataAccepted

    monkeypatch.setattr(train, "build_model", build_model)
    with pytest.raises(DataAccepted):
        run_main(train, tmp_path / "out", folder, "--max_train_steps", "2")
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    assert sorted(split["train"] + split["validation"] + split["test"]) == labelled


def test_refuses_to_overwrite_checkpoints_without_resume(train, data_dir, reference_run):
    with pytest.raises(SystemExit, match="--resume_from_checkpoint latest"):
        run_main(train, reference_run, data_dir, *RUN_ARGS)


def write_sam_checkpoint(path: Path) -> dict:
    """A random SAM checkpoint in segment_anything's own format (`image_encoder.*`, as `sam_vit_b_01ec64.pth`) at
    the tiny size, from segment_anything's `ImageEncoderViT`. The package's `__init__` imports torchvision (not a
    dependency here), so only its `modeling` subpackage is loaded, and sys.modules is left as it was."""
    from functools import partial

    import torch

    before = {name: module for name, module in sys.modules.items() if name.startswith("segment_anything")}
    package = types.ModuleType("segment_anything")
    package.__path__ = list(importlib.util.find_spec("segment_anything").submodule_search_locations)
    sys.modules["segment_anything"] = package
    try:
        from segment_anything.modeling.image_encoder import ImageEncoderViT

        encoder = ImageEncoderViT(
            img_size=256, patch_size=16, embed_dim=48, depth=4, num_heads=2, mlp_ratio=2.0, out_chans=32,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, window_size=4,
            global_attn_indexes=(1, 3),
        )  # fmt: skip
    finally:
        for name in [name for name in sys.modules if name.startswith("segment_anything")]:
            del sys.modules[name]
        sys.modules.update(before)
    generator = torch.Generator().manual_seed(7)
    state_dict = {
        f"image_encoder.{k}": torch.randn(v.shape, generator=generator) for k, v in encoder.state_dict().items()
    }
    torch.save(state_dict, path)
    return state_dict


def spy_on_the_model(train, monkeypatch) -> list:
    """Record the output dtype of the first ViT block's first MLP layer at every call (autocast makes it bf16; a
    checkpointed block runs it again in the backward pass)."""
    calls, build_model = [], train.build_model

    def spied(args):
        trainee, model = build_model(args)
        model.vision_encoder.layers[0].mlp.lin1.register_forward_hook(lambda module, i, out: calls.append(out.dtype))
        return trainee, model

    monkeypatch.setattr(train, "build_model", spied)
    return calls


def test_lora_from_a_sam_checkpoint_with_checkpointing_and_bf16(train, data_dir, tmp_path, monkeypatch):
    import torch

    sam = write_sam_checkpoint(tmp_path / "sam_tiny.pth")
    calls = spy_on_the_model(train, monkeypatch)
    output_dir = tmp_path / "lora"
    run_main(train, output_dir, data_dir, "--max_train_steps", "2", "--validation_steps", "0", "--finetune", "lora",
             "--sam_checkpoint", str(tmp_path / "sam_tiny.pth"), "--gradient_checkpointing",
             "--mixed_precision", "bf16")  # fmt: skip
    assert calls == [torch.bfloat16] * 4  # 2 steps, each block run twice (forward, then recomputed in backward)
    final = load_safetensors(output_dir / "final_model" / "model.safetensors")
    # frozen by LoRA (not a target, not trained in full): the SAM checkpoint's tensor, untouched
    expected = sam["image_encoder.blocks.0.mlp.lin1.weight"].numpy()
    assert np.array_equal(final["vision_encoder.layers.0.mlp.lin1.weight"], expected)
    adapter_config = json.loads((output_dir / "final_model" / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"


def test_full_finetuning_with_accumulation_and_workers(train, data_dir, tmp_path, monkeypatch, reference_run):
    calls = spy_on_the_model(train, monkeypatch)
    output_dir = tmp_path / "full"
    run_main(train, output_dir, data_dir, "--max_train_steps", "2", "--validation_steps", "0", "--finetune", "full",
             "--train_batch_size", "1", "--gradient_accumulation_steps", "2",
             "--dataloader_num_workers", "1")  # fmt: skip
    assert len(calls) == 4  # 2 optimiser steps of 2 batches
    # Step 1 averages the losses of the sampler's first two patches (from a worker): the reference run's first batch
    # of 2, from the same initial weights (same seed), gave the same loss.
    assert step_losses(output_dir)[1] == pytest.approx(step_losses(reference_run)[1], rel=1e-5)
    # Full fine-tuning trains what the adapter scheme freezes; no adapter files.
    final = load_safetensors(output_dir / "final_model" / "model.safetensors")
    frozen = load_safetensors(reference_run / "final_model" / "model.safetensors")
    name = "vision_encoder.layers.0.mlp.lin1.weight"
    assert not np.array_equal(final[name], frozen[name])
    assert not (output_dir / "final_model" / "adapter").exists()


def test_init_from_a_trained_model(train, data_dir, tmp_path, reference_run, caplog):
    caplog.set_level(logging.INFO)
    output_dir = tmp_path / "init_from"
    run_main(train, output_dir, data_dir, "--max_train_steps", "2", "--validation_steps", "0",
             "--init_from", str(reference_run / "final_model"), "--seed", "5")  # fmt: skip
    final = load_safetensors(output_dir / "final_model" / "model.safetensors")
    start = load_safetensors(reference_run / "final_model" / "model.safetensors")
    name = "vision_encoder.layers.0.mlp.lin1.weight"  # frozen: the starting model's, not seed 5's random weights
    assert np.array_equal(final[name], start[name])
    # no validation: said as such, not as a best Dice of -1
    record = json.loads((output_dir / "final_model" / "training_info.json").read_text())
    assert record["selection"] == {"saved": "last step", "step": 2}  # no best_validation_dice of -1
    assert record["initialisation"] == {"kind": "sam3d-hf model", "source": "final_model"}  # no local path
    assert "no validation score was recorded" in caplog.text and "Dice -1" not in caplog.text
    assert not (output_dir / "best_model").exists()


# ----------------------------------------------------------------------------------------------------------------------
# The README's "Fine-tune on your data" runs as written
# ----------------------------------------------------------------------------------------------------------------------
def fine_tune_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return text.split("## Fine-tune on your data", 1)[1].split("\n## ", 1)[0]


def readme_commands(section: str) -> list[list[str]]:
    """The `accelerate launch ... examples/train.py` commands of the section, as argument lists."""
    blocks = re.findall(r"^```bash\n(.*?)^```", section, flags=re.S | re.M)
    commands = [shlex.split(block.replace("\\\n", " ")) for block in blocks]
    return [c for c in commands if c[:2] == ["accelerate", "launch"] and "examples/train.py" in c]


def test_readme_fine_tune_commands_run_as_written(train, tmp_path, monkeypatch, caplog):
    """The section's Python block makes the data, its CPU command trains through `accelerate launch` (fewer steps),
    the resume it describes (the same command with `--resume_from_checkpoint latest`, run in this process) continues;
    the GPU command's arguments are accepted by the script (no GPU, SAM weights or pancreas data here)."""
    section = fine_tune_section()
    (python,) = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    commands = readme_commands(section)
    (cpu,) = [c for c in commands if "examples/accelerate_configs/cpu.yaml" in c]
    (gpu,) = [c for c in commands if "examples/accelerate_configs/single_gpu.yaml" in c]
    os.symlink(ROOT / "examples", tmp_path / "examples")  # the commands name examples/ relative to the repository
    monkeypatch.setenv("SAM3D_HF_CACHE", str(tmp_path / "cache"))  # the default cache, not ~/.cache
    monkeypatch.chdir(tmp_path)
    exec(compile(python, "README.md", "exec"), {"__name__": "__readme__"})
    fewer = ["--max_train_steps", "2", "--validation_steps", "2", "--checkpointing_steps", "2"]  # argparse: last wins
    launch = [sys.executable, "-m", "accelerate.commands.launch", *cpu[2:], *fewer]
    result = subprocess.run(launch, cwd=tmp_path, env={**environment(), "SAM3D_HF_CACHE": str(tmp_path / "cache")},
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    caplog.set_level(logging.INFO)
    script_args = cpu[cpu.index("examples/train.py") + 1 :]
    call_main(train, [*script_args, "--max_train_steps", "3", *fewer[2:], "--resume_from_checkpoint", "latest"])
    output_dir = tmp_path / cpu[cpu.index("--output_dir") + 1]
    assert "starting at step 2" in caplog.text
    assert sorted(step_losses(output_dir)) == [1, 2, 3]
    assert (output_dir / "best_model" / "model.safetensors").exists()
    assert (output_dir / "final_model" / "model.safetensors").exists()
    assert any((tmp_path / "cache").iterdir())  # the preprocessed volumes went where the README says

    assert (ROOT / gpu[gpu.index("--config_file") + 1]).is_file()
    (tmp_path / gpu[gpu.index("--data_dir") + 1]).mkdir()
    args = train.parse_args(gpu[gpu.index("examples/train.py") + 1 :])
    assert (args.model_config, args.patch_size, args.finetune) == ("vit_b", [128, 128, 128], "adapter")
    assert (args.recipe, args.split_file, args.fold) == ("official", "official", 0)
    from sam3d_hf import Sam3DProcessor

    assert Sam3DProcessor.from_preset(args.preset).image_processor.target_label is not None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--patch_size", "32", "30", "40"], "multiples of 4"),
        (["--model_config", "vit_q"], "--model_config must be one of"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps must be >= 1"),
        (["--finetune", "lora", "--adapter_dim", "8"], "--adapter_dim only applies"),
        (["--sam_checkpoint", "a.pth", "--init_from", "b"], "not allowed with argument"),
    ],
)
def test_argument_sanity_checks(train, data_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        train.parse_args(["--data_dir", str(data_dir), "--output_dir", str(tmp_path), *argv])
    assert message in capsys.readouterr().err


def test_validation_clicks_are_lesion_centres(train):
    """Two balls (one touching the scan border): each click is the ball's centre, known from the construction."""
    i, j, k = np.indices((30, 26, 20))
    truth = ((i - 8) ** 2 + (j - 9) ** 2 + (k - 10) ** 2 <= 16) | ((i - 22) ** 2 + (j - 18) ** 2 + (k - 5) ** 2 <= 25)
    clicks = train.lesion_clicks(truth)
    assert sorted(clicks) == [[8, 9, 10], [22, 18, 5]]
    assert train.dice(truth, truth) == 1.0
    half = truth & (i < 15)
    assert train.dice(half, truth) == pytest.approx(2 * half.sum() / (half.sum() + truth.sum()))
