"""examples/train.py run for real: two DDP processes, SIGKILL + resume, kills during a save, bad data, argument checks.

Every run uses the tiny config on a small generated dataset (an anisotropic, non-cubic 32x24x40 patch, batch 2 with
several clicks); the processes are started with `accelerate launch` exactly as a user would.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sam3d_hf.synthetic import generate_dataset

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train.py"
TINY_ARGS = [
    "--model_config", "tiny", "--patch_size", "32", "24", "40", "--train_batch_size", "2",
    "--num_positive_points", "6", "--num_background_points", "3", "--num_negative_points", "1",
    "--max_validation_cases", "1", "--report_to", "jsonl", "--seed", "3",
]  # fmt: skip


def load_train_module():
    spec = importlib.util.spec_from_file_location("train_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def launch_command(script: Path, output_dir: Path, data_dir: Path, *extra: str, processes: int = 1) -> list[str]:
    """`accelerate launch` of the script; the preprocessed-volume cache goes next to the data (not ~/.cache)."""
    if processes == 1:
        launcher = ["--config_file", str(ROOT / "examples" / "accelerate_configs" / "cpu.yaml")]
    else:
        launcher = ["--multi_gpu", "--num_processes", str(processes), "--main_process_port", str(free_port())]
    return [
        sys.executable, "-m", "accelerate.commands.launch", *launcher, str(script),
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


def final_weights(output_dir: Path) -> dict[str, str]:
    return json.loads((output_dir / "weights_rank0.json").read_text())


# 6 cases -> 4 training scans -> 2 batches of 2 per epoch: checkpoints at steps 3 and 6 fall mid-epoch, so resuming
# needs the epoch and the position in it.
RUN_ARGS = ["--max_train_steps", "7", "--checkpointing_steps", "3", "--validation_steps", "3", "--save_rank_checksums"]


@pytest.fixture(scope="module")
def reference_run(data_dir, tmp_path_factory) -> Path:
    """An uninterrupted single-process run of 7 steps, checkpoints at steps 3, 6 and 7 (the last step)."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    run(launch_command(SCRIPT, output_dir, data_dir, *RUN_ARGS))
    return output_dir


def test_run_writes_loadable_outputs(reference_run):
    from transformers import AutoProcessor

    from sam3d_hf import Sam3DAdapterModel, Sam3DForPromptableSegmentation

    losses = step_losses(reference_run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6, 7]
    records = [json.loads(line) for line in (reference_run / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "validation_dice" in r] == [0, 3, 6]
    assert all(0 <= r["validation_dice"] <= 1 for r in records if "validation_dice" in r)
    # total_limit 3 keeps all three checkpoints; each one is complete and records its step.
    checkpoints = sorted((reference_run / "checkpoints").iterdir())
    steps = [json.loads((c / "training_state.json").read_text())["global_step"] for c in checkpoints]
    assert steps == [3, 6, 7]
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


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(path)


def test_two_processes_hold_identical_weights(data_dir, tmp_path, reference_run):
    output_dir = tmp_path / "ddp"
    run(
        launch_command(SCRIPT, output_dir, data_dir, "--max_train_steps", "3", "--validation_steps", "0",
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


KILL_AFTER_CHECKPOINT = """
import importlib.util, pathlib, sys, time
spec = importlib.util.spec_from_file_location("train_example", {script!r})
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
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
import importlib.util, pathlib, sys, time
import accelerate.checkpointing as checkpointing
original = checkpointing.save

def save(obj, path, *args, **kwargs):
    if str(path).endswith({in_folder!r}):  # half-written optimiser state of this checkpoint, then the SIGKILL
        pathlib.Path(path).write_bytes(b"partial")
        pathlib.Path({sentinel!r}).touch()
        time.sleep(600)
    return original(obj, path, *args, **kwargs)

checkpointing.save = save
spec = importlib.util.spec_from_file_location("train_example", {script!r})
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
train.main(sys.argv[1:])
"""


def start_and_kill(wrapper: str, tmp_path: Path, output_dir: Path, data_dir: Path) -> None:
    """Start the run through `wrapper` (which pauses at a known point and touches a sentinel), SIGKILL it there."""
    sentinel = tmp_path / "paused"
    script = tmp_path / "wrapped_train.py"
    script.write_text(wrapper.replace("{sentinel!r}", repr(str(sentinel))))
    command = [sys.executable, str(script), "--data_dir", str(data_dir), "--output_dir", str(output_dir),
               "--cache_dir", str(data_dir.parent / "cache"), *TINY_ARGS]  # fmt: skip
    process = subprocess.Popen([*command, *RUN_ARGS], env=environment(), stdout=subprocess.DEVNULL,
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


def resume_and_compare(output_dir: Path, data_dir: Path, reference_run: Path, resumed_at: int) -> None:
    result = run(launch_command(SCRIPT, output_dir, data_dir, *RUN_ARGS, "--resume_from_checkpoint", "latest"))
    assert f"starting at step {resumed_at}" in result.stderr
    reference, resumed = step_losses(reference_run), step_losses(output_dir)
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6, 7]
    for step in range(resumed_at + 1, 8):  # the steps after the checkpoint equal the uninterrupted run's
        assert resumed[step] == pytest.approx(reference[step], rel=1e-6, abs=1e-7), step
    assert final_weights(output_dir) == final_weights(reference_run)


def test_sigkill_after_checkpoint_then_resume_matches_uninterrupted_run(data_dir, tmp_path, reference_run):
    output_dir = tmp_path / "killed"
    wrapper = KILL_AFTER_CHECKPOINT.replace("{script!r}", repr(str(SCRIPT))).replace("{step}", "3")
    start_and_kill(wrapper, tmp_path, output_dir, data_dir)
    losses = step_losses(output_dir)
    assert max(losses) == 3  # killed right after the step-3 checkpoint: steps 4 to 7 come from the resumed run
    resume_and_compare(output_dir, data_dir, reference_run, resumed_at=3)


def test_sigkill_during_save_keeps_the_last_complete_checkpoint(data_dir, tmp_path, reference_run):
    output_dir = tmp_path / "killed_in_save"
    # checkpoint_1 is the step-6 save: killed with its optimiser file half-written.
    wrapper = KILL_DURING_SAVE.replace("{script!r}", repr(str(SCRIPT)))
    wrapper = wrapper.replace("{in_folder!r}", repr(os.path.join("checkpoint_1", "optimizer.bin")))
    start_and_kill(wrapper, tmp_path, output_dir, data_dir)
    train = load_train_module()
    folders = train.list_checkpoints(output_dir)
    assert [f.name for f in folders] == ["checkpoint_0", "checkpoint_1"]
    assert train.is_complete(folders[0]) and not train.is_complete(folders[1])
    resume_and_compare(output_dir, data_dir, reference_run, resumed_at=3)
    # The resumed run replaced the incomplete folder with complete ones (total_limit 3 -> steps 3, 6, 7).
    folders = train.list_checkpoints(output_dir)
    assert all(train.is_complete(f) for f in folders)
    assert [json.loads((f / "training_state.json").read_text())["global_step"] for f in folders] == [3, 6, 7]


def test_bad_data_stops_before_the_first_step_naming_the_case(data_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(data_dir, broken)
    entries = json.loads((broken / "dataset.json").read_text())["training"]
    label = broken / entries[0]["label"]
    label.unlink()
    case = Path(entries[0]["image"]).name.split(".")[0]
    command = launch_command(SCRIPT, tmp_path / "out", broken, "--max_train_steps", "2")
    result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert case in result.stderr and "not usable" in result.stderr
    assert not (tmp_path / "out" / "logs" / "metrics.jsonl").exists()  # no step was taken


def test_refuses_to_overwrite_checkpoints_without_resume(data_dir, reference_run):
    command = launch_command(SCRIPT, reference_run, data_dir, *RUN_ARGS)
    result = subprocess.run(command, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and "--resume_from_checkpoint latest" in result.stderr


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
def test_argument_sanity_checks(data_dir, tmp_path, capsys, argv, message):
    train = load_train_module()
    with pytest.raises(SystemExit):
        train.parse_args(["--data_dir", str(data_dir), "--output_dir", str(tmp_path), *argv])
    assert message in capsys.readouterr().err


def test_validation_clicks_are_lesion_centres():
    """Two balls (one touching the scan border): each click is the ball's centre, known from the construction."""
    train = load_train_module()
    i, j, k = np.indices((30, 26, 20))
    truth = ((i - 8) ** 2 + (j - 9) ** 2 + (k - 10) ** 2 <= 16) | ((i - 22) ** 2 + (j - 18) ** 2 + (k - 5) ** 2 <= 25)
    clicks = train.lesion_clicks(truth)
    assert sorted(clicks) == [[8, 9, 10], [22, 18, 5]]
    assert train.dice(truth, truth) == 1.0
    half = truth & (i < 15)
    assert train.dice(half, truth) == pytest.approx(2 * half.sum() / (half.sum() + truth.sum()))
