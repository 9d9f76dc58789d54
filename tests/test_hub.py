"""Tests for sam3d_hf.hub: model cards and Hub uploads, offline (HfApi patched on the class, operations captured)."""

import importlib.util
import json
import re
import shutil
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import TINY
from huggingface_hub import HfApi
from transformers.dynamic_module_utils import custom_object_save

from sam3d_hf import Sam3DAdapterConfig, Sam3DConfig, Sam3DForPromptableSegmentation, Sam3DProcessor, get_adapter_model
from sam3d_hf.hub import load_evaluation_summary, push_to_hub, render_model_card, upload_plan
from sam3d_hf.metrics import summarize
from sam3d_hf.pipeline import TASK, Sam3DSegmentationPipeline

REPO = Path(__file__).resolve().parent.parent
SUMMARY = {
    "dataset": "kits21",
    "split": "test",
    "protocols": {
        "1 click": {
            "dice": {"mean": 0.7134, "std": 0.2011},
            "nsd": {"mean": 0.6522, "std": 0.2303},
            "n": 30,
            "tolerance_mm": 5.0,
        },
        "3 clicks": {
            "dice": {"mean": 0.7481, "std": 0.1702},
            "nsd": {"mean": 0.6917, "std": 0.1955},
            "n": 29,
            "tolerance_mm": 2.0,
        },
    },
}
# A training record as sam3d train writes it into every saved model folder (training_info.json).
TRAINING = {
    "format": "sam3d-hf-training-v1",
    "sam3d_hf_version": "0.1.0.dev0",
    "recipe": {"name": "official", "overridden": {"train_batch_size": 2}, "values": {}},
    "initialisation": {"kind": "SAM", "source": "sam_vit_b_01ec64.pth"},
    "finetune": "adapter",
    "parameters": {"trainable": 25198976, "total": 114230000},
    "optimisation": {
        "optimizer": "AdamW",
        "learning_rate": 0.0004,
        "betas": [0.9, 0.999],
        "weight_decay": 0.0,
        "schedule": "linear warm-up over 0 steps, then linear decay to 0, stepped per optimiser step",
        "gradient_clipping": "global L2 norm 1.0",
        "loss": "DiceCE (0.5 Dice + 0.5 cross-entropy)",
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
    },
    "steps": 1200,
    "updates_per_epoch": 209,
    "epochs": 6,
    "batch": {"per_device": 2, "processes": 4, "accumulation": 1, "effective": 8},
    "data": {
        "patch_size": [128, 128, 128],
        "processor_preset": "kits21",
        "resampling": "official",
        "patches_per_scan_per_epoch": 1,
        "sampler": "official",
        "augmentation": "official",
        "clicks": {"scheme": "official", "positive": 10, "patch": 20, "negative": 0},
        "validation": "patches",
        "split": "kits fold 0",
        "training_cases": 209,
        "validation_cases": 30,
    },
    "seed": 7,
    "selection": {"saved": "best validation Dice", "step": 900, "validation_dice": 0.7125},
}


# Files a training run leaves next to the weights that must never reach the Hub, and two that should.
JUNK = [
    "checkpoint_3/model.safetensors",
    "checkpoints/checkpoint_0/optimizer.bin",
    "step_100/model.safetensors",
    "epoch_2/state.json",
    "logs/events.jsonl",
    "runs/tb.events",
    "train.log",
    ".staging.tmp",
    ".git/HEAD",
    "README.md",
    "prediction.nii.gz",
    "case_00001.nii",
    "sub/__pycache__/x.pyc",
]
KEPT = ["training_args.json", "notes/eval.txt"]


def _write_extras(folder: Path) -> None:
    for name in JUNK + KEPT:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("my own notes" if name == "README.md" else name, encoding="utf-8")


@pytest.fixture(scope="module")
def tiny_weights():
    return Sam3DForPromptableSegmentation(Sam3DConfig(**TINY))


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, tiny_weights):
    folder = tmp_path_factory.mktemp("full") / "sam3d-kits21"
    tiny_weights.save_pretrained(folder)
    Sam3DProcessor.from_preset("kits21").save_pretrained(folder)
    saved = sorted(p.name for p in folder.iterdir())
    _write_extras(folder)
    return folder, saved


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory, tiny_weights):
    """Adapter files, model files (a trainer that saves both), the processor and the usual junk in one folder."""
    folder = tmp_path_factory.mktemp("adapter") / "kits21-adapter"
    model = Sam3DForPromptableSegmentation(Sam3DConfig(**TINY))
    model.save_pretrained(folder)
    # Both save_pretrained calls refuse to mix a model and an adapter in one folder; a trainer's own writer may not.
    get_adapter_model(model, Sam3DAdapterConfig(adapter_dim=16)).save_pretrained(folder.parent / "adapter-only")
    for path in (folder.parent / "adapter-only").iterdir():
        shutil.copy(path, folder / path.name)
    Sam3DProcessor.from_preset("kits21").save_pretrained(folder)
    _write_extras(folder)
    return folder


@pytest.fixture
def hub(monkeypatch):
    """Patch HfApi at its boundary; record every call."""
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        calls.append(("create_branch", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        operations = list(operations)
        calls.append(("create_commit", repo_id, kwargs, operations))
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def _uploaded(calls) -> dict[str, bytes]:
    commits = [c for c in calls if c[0] == "create_commit"]
    assert len(commits) == 1
    files = {}
    for op in commits[0][3]:
        assert op.path_in_repo not in files, f"{op.path_in_repo} uploaded twice"
        source = op.path_or_fileobj
        files[op.path_in_repo] = source if isinstance(source, bytes) else Path(source).read_bytes()
    return files


def _front_matter(text: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    assert match, "card has no YAML front matter"
    return yaml.safe_load(match.group(1))


def _table_row(text: str, first_cell: str) -> list[str]:
    rows = [line for line in text.splitlines() if line.startswith(f"| {first_cell} |")]
    assert len(rows) == 1, f"expected one table row '{first_cell}', got {rows}"
    return [cell.strip() for cell in rows[0].strip("|").split("|")][1:]


def _numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+(?:\.\d+)?", cell.replace("−", "-"))]


def _snapshot(folder: Path) -> dict:
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------------------------------------------
# Uploads
# ----------------------------------------------------------------------------------------------------------------------
def test_full_model_uploads_exactly_the_model_processor_pipeline_code_and_card(model_folder, hub, tmp_path):
    folder, saved = model_folder
    before = _snapshot(folder)
    info = push_to_hub(folder, "my-lab/sam3d-kits21", evaluation=SUMMARY, training=TRAINING, private=True)
    files = _uploaded(hub)
    # The pipeline's code as transformers' own Pipeline.save_pretrained copies it (custom_object_save).
    custom_object_save(Sam3DSegmentationPipeline, tmp_path)
    code = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert {"pipeline.py", "modeling_sam3d.py", "configuration_sam3d.py", "inference.py"} <= set(code)
    assert set(files) == {*saved, *KEPT, *code, "README.md"}
    assert {"config.json", "model.safetensors", "processor_config.json"} <= set(saved)
    for name in set(files) - {"README.md", "config.json", *code}:
        assert files[name] == (folder / name).read_bytes(), name
    for name in code:  # the package's code, also where the folder has its own copy (modeling_sam3d.py)
        assert files[name] == code[name], name
    config = json.loads(files["config.json"])
    entry = {"impl": "pipeline.Sam3DSegmentationPipeline", "pt": ["AutoModel"], "type": "image"}
    assert config == {**json.loads((folder / "config.json").read_text()), "custom_pipelines": {TASK: entry}}
    assert files["README.md"] != b"my own notes"
    assert _front_matter(files["README.md"].decode())["library_name"] == "transformers"
    assert hub[0] == ("create_repo", "my-lab/sam3d-kits21", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert [c[0] for c in hub] == ["create_repo", "create_commit"]
    assert hub[1][2]["revision"] is None
    assert info.commit_url.startswith("https://huggingface.co/my-lab/sam3d-kits21")
    assert _snapshot(folder) == before  # nothing written into the user's folder
    plan = upload_plan(folder)  # what `sam3d push --dry-run` lists
    assert {name: v if isinstance(v, bytes) else v.read_bytes() for name, v in plan.items()} == {
        name: content for name, content in files.items() if name != "README.md"
    }


def test_adapter_only_uploads_adapter_processor_and_card_against_the_base(adapter_folder, hub):
    push_to_hub(adapter_folder, "my-lab/sam3d-kits21-adapter", adapter_only=True, base_model_id="my-lab/sam3d-vit-b")
    files = _uploaded(hub)
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "processor_config.json", "README.md"}
    assert files["adapter_model.safetensors"] == (adapter_folder / "adapter_model.safetensors").read_bytes()
    uploaded_config = json.loads(files["adapter_config.json"])
    local_config = json.loads((adapter_folder / "adapter_config.json").read_text())
    assert local_config["base_model_name_or_path"] is None  # the folder is not modified ...
    assert uploaded_config == {**local_config, "base_model_name_or_path": "my-lab/sam3d-vit-b"}  # ... the upload is
    metadata = _front_matter(files["README.md"].decode())
    assert metadata["base_model"] == "my-lab/sam3d-vit-b"
    assert "library_name" not in metadata  # not loadable by transformers alone


@pytest.fixture(scope="module")
def train_output_folder(tmp_path_factory):
    """The layout examples/train.py writes (`final_model/`): the model with its adapters, the processor, the adapter
    files in `adapter/`, `training_info.json`; here with its run's `logs/` and a checkpoint left inside as well."""
    folder = tmp_path_factory.mktemp("train") / "final_model"
    model = Sam3DForPromptableSegmentation(Sam3DConfig(**TINY))
    trainee = get_adapter_model(model, Sam3DAdapterConfig(adapter_dim=16))
    trainee.save_pretrained(folder / "adapter")
    model.save_pretrained(folder)
    Sam3DProcessor.from_preset("msd_colon").save_pretrained(folder)
    record = {**TRAINING, "initialisation": {"kind": "random", "source": None}, "steps": 12}
    record["optimisation"] = {**TRAINING["optimisation"], "learning_rate": 0.0001}
    record["data"] = {**TRAINING["data"], "patch_size": [40, 24, 44], "processor_preset": "msd_colon"}
    record["selection"] = {"saved": "last step", "step": 12, "best_validation_dice": 0.5}
    (folder / "training_info.json").write_text(json.dumps(record))
    (folder / "logs").mkdir()
    args = {"learning_rate": 0.0001, "data_dir": "/hospital/scans", "output_dir": "/home/me/run", "preset": "kits21"}
    (folder / "logs" / "config.json").write_text(json.dumps(args))  # the command line: not what the card reads
    (folder / "checkpoints" / "checkpoint_0").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint_0" / "model.safetensors").write_bytes(b"state")
    return folder


def test_train_script_output_pushes_as_model_or_as_adapter(train_output_folder, hub):
    folder = train_output_folder
    push_to_hub(folder, "my-lab/colon-adapter", adapter_only=True, base_model_id="my-lab/sam3d-vit-b")
    files = _uploaded(hub)
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors", "processor_config.json", "README.md"}
    assert files["adapter_model.safetensors"] == (folder / "adapter" / "adapter_model.safetensors").read_bytes()
    local_config = json.loads((folder / "adapter" / "adapter_config.json").read_text())
    assert json.loads(files["adapter_config.json"]) == {**local_config, "base_model_name_or_path": "my-lab/sam3d-vit-b"}
    assert "Adapter: width 16" in files["README.md"].decode()

    hub.clear()
    push_to_hub(folder, "my-lab/colon")  # the card reads the folder's training_info.json
    files = _uploaded(hub)
    model_files = {p.name for p in folder.iterdir() if p.is_file()}
    code = {"pipeline.py", "inference.py", "processing_sam3d.py", "image_processing_sam3d.py"}  # for the pipeline
    adapter = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
    assert set(files) == {*model_files, *code, *adapter, "README.md"}
    assert "training_info.json" in files and "config.json" in files
    card = files["README.md"].decode()
    assert _table_row(card, "fine-tuning") == ["spatial adapters (the paper's scheme)"]
    assert "learning rate 0.0001," in _table_row(card, "optimiser")[0]
    assert _table_row(card, "optimiser steps") == ["12"]
    assert _numbers(_table_row(card, "training patch")[0]) == [40, 24, 44]
    assert _table_row(card, "initialisation") == ["random weights (no pretrained SAM weights)"]
    assert "inherited from SAM" not in card  # trained from random weights
    assert "/hospital" not in card and "/home/me" not in card and "kits21" not in card


def test_revision_creates_the_branch_and_commits_to_it(model_folder, hub):
    push_to_hub(model_folder[0], "my-lab/sam3d-kits21", revision="v1", commit_message="first")
    assert [c[0] for c in hub] == ["create_repo", "create_branch", "create_commit"]
    assert hub[1][2]["branch"] == "v1" and hub[1][2]["exist_ok"] is True
    assert hub[2][2]["revision"] == "v1" and hub[2][2]["commit_message"] == "first"


# ----------------------------------------------------------------------------------------------------------------------
# The card
# ----------------------------------------------------------------------------------------------------------------------
def test_card_metadata_carries_dice_and_nsd_per_protocol(model_folder, tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(SUMMARY))
    card = render_model_card(model_folder[0], evaluation=path, repo_id="my-lab/sam3d-kits21")
    metadata = _front_matter(str(card))
    (entry,) = metadata["model-index"]
    assert entry["name"] == "sam3d-kits21"
    found = {}
    for result in entry["results"]:
        assert result["dataset"]["type"] == "kits21" and result["dataset"]["split"] == "test"
        for metric in result["metrics"]:
            key = (metric["config"], metric["type"])
            assert key not in found
            found[key] = metric
    expected = {(p, m): v[m]["mean"] for p, v in SUMMARY["protocols"].items() for m in ("dice", "nsd")}
    assert {k: m["value"] for k, m in found.items()} == expected
    for protocol, values in SUMMARY["protocols"].items():
        assert found[(protocol, "nsd")]["args"]["tolerance_mm"] == values["tolerance_mm"]
        dice, nsd, tolerance, n = _table_row(str(card), protocol)
        assert _numbers(dice) == [values["dice"]["mean"], values["dice"]["std"]]
        assert _numbers(nsd) == [values["nsd"]["mean"], values["nsd"]["std"]]
        assert float(tolerance) == values["tolerance_mm"] and int(n) == values["n"]


def test_card_reads_the_metrics_summarize_output(model_folder):
    # (dice, nsd) per case, by number of clicks; 10 clicks has a single case (no standard deviation)
    scores = {1: [(0.61, 0.55), (0.83, 0.74), (0.47, 0.52)], 3: [(0.66, 0.58), (0.88, 0.79), (0.52, 0.6)]}
    scores[10] = [(0.9, 0.8)]
    records = [
        {"dice": dice, "nsd": nsd, "num_clicks": clicks, "dataset": "kits21"}
        for clicks, pairs in scores.items()
        for dice, nsd in pairs
    ]
    records.append({"dice": 0.1, "nsd": 0.2, "num_clicks": 1, "dataset": "flare22"})  # sorts first, not this card's
    wrapped = {"summary": summarize(records), "tolerance_mm": 2.0, "split": "test"}
    card = str(render_model_card(model_folder[0], evaluation=wrapped))
    results = _front_matter(card)["model-index"][0]["results"]
    values = {(m["config"], m["type"]): m for r in results for m in r["metrics"]}
    assert len(values) == 2 * len(scores)
    for clicks, pairs in scores.items():
        row = f"3DSAM-adapter, {clicks} click{'s' if clicks > 1 else ''} (uniform)"
        dice, nsd = [p[0] for p in pairs], [p[1] for p in pairs]
        assert values[(row, "dice")]["value"] == pytest.approx(statistics.mean(dice), abs=1e-12)
        assert values[(row, "nsd")]["value"] == pytest.approx(statistics.mean(nsd), abs=1e-12)
        assert values[(row, "nsd")]["args"]["tolerance_mm"] == 2.0
        dice_cell, nsd_cell, tolerance, n = _table_row(card, row)
        if len(pairs) > 1:
            assert _numbers(dice_cell) == [round(statistics.mean(dice), 4), round(statistics.stdev(dice), 4)]
            assert _numbers(nsd_cell) == [round(statistics.mean(nsd), 4), round(statistics.stdev(nsd), 4)]
        else:  # one case: no standard deviation
            assert _numbers(dice_cell) == [dice[0]] and _numbers(nsd_cell) == [nsd[0]]
        assert float(tolerance) == 2.0 and int(n) == len(pairs)
    with pytest.raises(ValueError, match="does not record the NSD tolerance"):  # never a default tolerance
        render_model_card(model_folder[0], evaluation=summarize(records))


def test_card_reads_evaluates_summary_json_of_one_case_and_picks_the_dataset_column(model_folder, tmp_path):
    """sam3d evaluate writes summarize's output (with its settings) with NaN (the std of a single case) as null, in a
    column named by --dataset_name; the card (here kits21, from the processor) takes its own column, else the only
    one."""
    path = tmp_path / "summary.json"

    def card_cells(records):
        record = {"format": "sam3d-hf-evaluation-v1", "settings": {"tolerance_mm": 5.0}, "summary": summarize(records)}
        path.write_text(json.dumps(record).replace("NaN", "null"))  # JSON has no NaN
        return _table_row(str(render_model_card(model_folder[0], evaluation=path)), "3DSAM-adapter, 1 click (uniform)")

    one_case = {"dice": 0.8125, "nsd": 0.9375, "num_clicks": 1, "dataset": "hospital_scans"}
    dice_cell, nsd_cell, _, n = card_cells([one_case])  # the only column, though not named kits21
    assert "null" in path.read_text()
    assert _numbers(dice_cell) == [0.8125] and _numbers(nsd_cell) == [0.9375] and int(n) == 1
    assert "±" not in dice_cell + nsd_cell and "nan" not in (dice_cell + nsd_cell).lower()
    dice_cell, _, _, n = card_cells([one_case, {**one_case, "dice": 0.5, "dataset": "kits21"}])  # the card's column
    assert _numbers(dice_cell) == [0.5] and int(n) == 1
    message = r"datasets \['a', 'b'\], the card is for 'kits21': evaluate with --dataset_name kits21"
    with pytest.raises(ValueError, match=message):  # several columns, none the card's: name them and the fix
        card_cells([{**one_case, "dataset": "a"}, {**one_case, "dataset": "b"}])
    for other in ("msd_pancreas", "lits17_code"):  # another card's dataset (key or preset) is never taken
        with pytest.raises(ValueError, match=rf"datasets \['{other}'\], the card is for 'kits21'"):
            card_cells([{**one_case, "dataset": other}])


@pytest.mark.parametrize(
    "preset, overrides, dataset",
    [
        ("kits21", {}, "kits21"),
        ("lits17_code", {}, "lits17"),
        (
            "msd_colon",
            {"window": (-57.5, 175.25), "intensity_mean": 65.125, "target_spacing": (2.0, 0.8, 0.8)},
            "msd_colon",
        ),
        ("msd_pancreas", {"patch_size": (96, 128, 160), "cluster_margin": 8}, "msd_pancreas"),
        ("official_pancreas", {}, "msd_pancreas"),
    ],
)
def test_card_preprocessing_equals_the_saved_processor_config(tiny_weights, tmp_path, preset, overrides, dataset):
    tiny_weights.save_pretrained(tmp_path)
    Sam3DProcessor.from_preset(preset, **overrides).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    image = config["image_processor"]
    card = str(render_model_card(tmp_path))
    assert _front_matter(card)["tags"][-1] == dataset  # dataset found from the processor's preset
    assert f"preset `{image['preset']}`" in card
    assert _numbers(_table_row(card, "intensity window (HU)")[0]) == image["window"]
    assert _numbers(_table_row(card, "z-score")[0]) == [image["intensity_mean"], image["intensity_std"]]
    resampling = _table_row(card, "resampling")[0]
    if image["resampling"] == "official":
        assert "the official code's: trilinear" in resampling and _numbers(resampling) == image["target_spacing"]
        assert f"stored axes {', '.join(map(str, image['stored_axes']))} taken as" in card
        assert "0 after normalisation" in _table_row(card, "padding")[0]
    else:
        assert _numbers(resampling) == [*image["target_spacing"], image["anisotropy_threshold"]]
        assert "air" in _table_row(card, "padding")[0]
    assert _numbers(_table_row(card, "inference patch")[0]) == config["patch_size"]
    assert _numbers(_table_row(card, "target label")[0]) == [image["target_label"]]
    if image.get("stored_axes") is None:
        assert f"grow towards `{image['axis_order']}`" in card
    assert f"minus a {config['cluster_margin']}-voxel margin" in card


@pytest.mark.parametrize(
    "dataset, data_licence, confirmed",
    [
        ("kits21", "cc-by-nc-sa-4.0", True),
        ("msd_pancreas", "cc-by-sa-4.0", True),
        ("msd_colon", "cc-by-sa-4.0", True),
        ("lits17", "cc-by-nc-sa-4.0", False),
    ],
)
def test_card_keeps_code_weights_and_data_licences_apart(dataset, data_licence, confirmed):
    processor = Sam3DProcessor.from_preset(dataset)
    card = str(render_model_card(processor, dataset=dataset))
    metadata = _front_matter(card)
    assert metadata["license"] == "apache-2.0"
    assert metadata["licenses"] == {
        "code": "apache-2.0",
        "weights": "apache-2.0",
        "training_data": data_licence,
        "training_data_confirmed": confirmed,
    }
    assert "inherited from SAM" not in card  # no training record: nothing says where the weights came from
    assert "inherited from SAM's Apache-2.0 weights" in str(
        render_model_card(processor, dataset=dataset, training=TRAINING)
    )
    assert (
        "check the dataset's terms" in _table_row(card, f"training data ({metadata_name(dataset)})")[0]
    ) is not confirmed
    assert "Research use only" in card and "Gong, Shizhan" in card and "volume  = {98}" in card

    own = _front_matter(str(render_model_card(processor, dataset=dataset, license="cc-by-nc-4.0")))
    assert own["license"] == "cc-by-nc-4.0" and own["licenses"]["weights"] == "cc-by-nc-4.0"
    assert own["licenses"]["code"] == "apache-2.0"


def metadata_name(dataset: str) -> str:
    return yaml.safe_load((REPO / "hub_cards" / f"{dataset}.yaml").read_text())["name"]


def test_card_training_section_states_the_record(model_folder, tmp_path):
    """Each row of the training table against the record's value, for two records (SAM start, best model; random
    start, last step, one process)."""
    path = tmp_path / "training_info.json"
    path.write_text(json.dumps(TRAINING))
    card = str(render_model_card(model_folder[0], training=path))
    assert _table_row(card, "initialisation") == ["SAM's 2D weights `sam_vit_b_01ec64.pth`, inflated to 3D"]
    assert _table_row(card, "fine-tuning") == ["spatial adapters (the paper's scheme)"]
    assert _table_row(card, "trainable parameters") == ["25,198,976 of 114,230,000"]
    assert _table_row(card, "optimiser") == ["AdamW, learning rate 0.0004, betas 0.9 / 0.999, weight decay 0"]
    assert _table_row(card, "schedule") == [TRAINING["optimisation"]["schedule"]]
    assert _table_row(card, "optimiser steps") == ["1,200"]
    assert _table_row(card, "epochs") == ["6 (209 optimiser steps each; the steps decide)"]
    assert _table_row(card, "batch") == ["2 per device × 4 process(es) × 1 accumulation = 8"]
    assert _numbers(_table_row(card, "training patch")[0]) == [128, 128, 128]
    assert _table_row(card, "recipe") == ["`official` (docs/recipes.md); overridden: `train_batch_size=2`"]
    assert _table_row(card, "clicks per patch") == [
        "10 tumour voxels and 20 patch voxels, unlabelled (the official scheme)"
    ]
    assert _table_row(card, "corrections") == ["none simulated; no mask prompt"]
    assert _table_row(card, "scans") == ["209 training, 30 validation (kits fold 0)"]
    assert _table_row(card, "crop sampler") == ["official"] and _table_row(card, "augmentation") == ["official"]
    assert _table_row(card, "validation") == ["tumour-centred patches, Dice loss"]
    assert _table_row(card, "mixed precision") == ["bf16"] and _table_row(card, "seed") == ["7"]
    assert _table_row(card, "weights saved at") == ["best validation Dice (step 900, validation Dice 0.7125)"]
    assert _table_row(card, "trained with") == ["sam3d-hf 0.1.0.dev0"]
    assert "inherited from SAM's Apache-2.0 weights" in card

    other = {**TRAINING, "initialisation": {"kind": "random", "source": None}, "steps": 2000, "epochs": 223}
    other.update(updates_per_epoch=9, batch={"per_device": 2, "processes": 1, "accumulation": 1, "effective": 2})
    other["selection"] = {"saved": "last step", "step": 2000}
    card = str(render_model_card(model_folder[0], training=other))
    assert _table_row(card, "initialisation") == ["random weights (no pretrained SAM weights)"]
    assert _table_row(card, "optimiser steps") == ["2,000"]
    assert _table_row(card, "epochs") == ["223 (9 optimiser steps each; the steps decide)"]
    assert _table_row(card, "weights saved at") == ["last step (step 2,000)"]
    assert "inherited from SAM" not in card
    interactive = {**other, "recipe": {**other["recipe"], "values": {"use_mask_prompt": True, "correction_rounds": 5}}}
    interactive["data"] = {**other["data"], "clicks": {"scheme": "labelled", "positive": 1, "patch": 1, "negative": 0}}
    card = str(render_model_card(model_folder[0], training=interactive))
    assert _table_row(card, "corrections") == [
        "0 to 5 simulated rounds per step (a click at the centre of the largest error of the model's own prediction, "
        "without gradient), loss on the last; the previous mask and the clicks as decoder maps"
    ]
    assert _table_row(card, "clicks per patch") == [
        "1 tumour voxel and 1 patch voxel with their labels, and 0 negatives next to the lesion"
    ]
    with pytest.raises(ValueError, match=r"logs/config.json.* not a record"):  # command-line arguments are refused
        render_model_card(model_folder[0], training={"learning_rate": 1e-4, "max_train_steps": 10})


def test_card_nsd_tolerance_and_settings_come_from_the_evaluation(model_folder):
    """The NSD label, the table's tolerance and the settings line come from the summary's recorded settings."""
    records = [{"dice": 0.5, "nsd": 0.25, "num_clicks": 1, "dataset": "kits21"}] * 2
    for tolerance in (1.0, 5.0, 2.5):
        settings = {"cases": 2, "protocols": ["1"], "click_placement": "per_lesion", "seed": 3,
                    "tolerance_mm": tolerance}  # fmt: skip
        summary = {"format": "sam3d-hf-evaluation-v1", "sam3d_hf_version": "9.9", "split": "test",
                   "settings": settings, "summary": summarize(records)}  # fmt: skip
        card = str(render_model_card(model_folder[0], evaluation=summary))
        metrics = [m for r in _front_matter(card)["model-index"][0]["results"] for m in r["metrics"]]
        (nsd,) = [m for m in metrics if m["type"] == "nsd"]
        assert nsd["name"] == f"NSD (3DSAM-adapter, 1 click (uniform), {tolerance:g} mm)"
        assert nsd["args"]["tolerance_mm"] == tolerance
        assert float(_table_row(card, "3DSAM-adapter, 1 click (uniform)")[2]) == tolerance
        assert (
            f"Settings recorded by the evaluation: 2 cases; protocols 1; clicks placed `per_lesion`; click seed 3; "
            f"NSD tolerance {tolerance:g} mm; sam3d-hf 9.9." in card
        )


def test_adapter_card_counts_the_adapter_file_and_names_the_base(adapter_folder):
    from safetensors.torch import load_file

    card = str(render_model_card(adapter_folder, adapter=True, base_model="my-lab/sam3d-vit-b"))
    count = sum(t.numel() for t in load_file(adapter_folder / "adapter_model.safetensors").values())
    assert f"{count:,} parameters" in card
    assert "Adapter: width 16" in card and 'from_pretrained("my-lab/sam3d-vit-b"' in card


def test_full_model_card_counts_parameters_not_buffers(model_folder, tiny_weights):
    from safetensors.torch import load_file

    card = str(render_model_card(model_folder[0]))
    count = sum(p.numel() for p in tiny_weights.parameters())
    stored = sum(t.numel() for t in load_file(model_folder[0] / "model.safetensors").values())
    assert stored > count  # the file also holds buffers (the frozen relative-position scales)
    assert f"({count:,} parameters)" in card


def test_synthetic_and_generic_dataset_cards(model_folder):
    synthetic = str(render_model_card(model_folder[0], dataset="synthetic"))
    assert "no patient data" in synthetic and _front_matter(synthetic)["licenses"]["training_data_confirmed"]
    assert "0 background, 1 organ, 2 lesion" in synthetic  # the generator's labels (synthetic.py)
    assert "generated volumes, not patients" in synthetic and "scanners and population" not in synthetic
    generic = str(render_model_card(model_folder[0], dataset=str(REPO / "hub_cards" / "generic.yaml")))
    assert "check the dataset's terms" in generic


# ----------------------------------------------------------------------------------------------------------------------
# Input errors (each before any Hub call)
# ----------------------------------------------------------------------------------------------------------------------
def test_push_input_errors(model_folder, adapter_folder, tmp_path, hub):
    folder = model_folder[0]
    with pytest.raises(ValueError, match="does not exist or is not a folder"):
        push_to_hub(tmp_path / "missing", "my-lab/x")
    with pytest.raises(TypeError, match="folder must be a path"):
        push_to_hub(123, "my-lab/x")
    for bad in ("no-namespace", "my-lab/a/b", "my lab/x", "my-lab/x--y"):
        with pytest.raises(ValueError, match="repo_id"):
            push_to_hub(folder, bad)
    with pytest.raises(TypeError, match="repo_id must be a string"):
        push_to_hub(folder, None)
    with pytest.raises(ValueError, match="adapter_only=True needs base_model_id"):
        push_to_hub(adapter_folder, "my-lab/x", adapter_only=True)
    with pytest.raises(ValueError, match=r"adapter_only=True but .* has no adapter_config.json"):
        push_to_hub(folder, "my-lab/x", adapter_only=True, base_model_id="my-lab/base")
    with pytest.raises(ValueError, match="base_model_id must be 'owner/name'"):
        push_to_hub(adapter_folder, "my-lab/x", adapter_only=True, base_model_id="just-a-name")
    only_adapter = tmp_path / "only-adapter"
    for name in ("adapter_config.json", "adapter_model.safetensors", "processor_config.json"):
        only_adapter.mkdir(exist_ok=True)
        (only_adapter / name).write_bytes((adapter_folder / name).read_bytes())
    with pytest.raises(ValueError, match="holds adapter files: pass adapter_only=True"):
        push_to_hub(only_adapter, "my-lab/x")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "processor_config.json").write_bytes((folder / "processor_config.json").read_bytes())
    with pytest.raises(ValueError, match=r"no model files .* model.save_pretrained"):
        push_to_hub(empty, "my-lab/x")
    no_processor = tmp_path / "no-processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_processor / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ValueError, match=r"no processor_config.json.*processor.save_pretrained"):
        push_to_hub(no_processor, "my-lab/x")
    assert hub == []


def test_card_input_errors(model_folder, adapter_folder, tmp_path):
    folder = model_folder[0]
    with pytest.raises(TypeError, match="source must be a folder path or a Sam3DProcessor"):
        render_model_card(42)
    with pytest.raises(ValueError, match="is not a folder"):
        render_model_card(tmp_path / "missing")
    with pytest.raises(ValueError, match="adapter card asked for"):
        render_model_card(folder, adapter=True, base_model="my-lab/base")
    with pytest.raises(ValueError, match="an adapter card needs base_model"):
        render_model_card(adapter_folder, adapter=True)
    with pytest.raises(ValueError, match="unknown dataset 'kits'; expected one of"):
        render_model_card(folder, dataset="kits")
    with pytest.raises(ValueError, match=r"dataset file .* does not exist"):
        render_model_card(folder, dataset=str(tmp_path / "mine.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: mine\n")
    with pytest.raises(ValueError, match=r"lacks the keys .*'data_license'"):
        render_model_card(folder, dataset=broken)
    with pytest.raises(ValueError, match="preset 'kits21' but dataset 'msd_colon'"):
        render_model_card(folder, dataset="msd_colon")
    with pytest.raises(ValueError, match="evaluation summary is for dataset 'lits17'"):
        render_model_card(folder, evaluation={**SUMMARY, "dataset": "lits17"})
    with pytest.raises(ValueError, match="license must be a Hub licence id"):
        render_model_card(folder, license="")
    with pytest.raises(ValueError, match="base_model must be 'owner/name'"):
        render_model_card(folder, base_model="just-a-name")
    with pytest.raises(ValueError, match=r"training record file .* does not exist"):
        render_model_card(folder, training=tmp_path / "args.json")


def test_evaluation_summary_errors(tmp_path):
    one = SUMMARY["protocols"]["1 click"]
    bad = {
        "non-empty 'protocols'": {"dataset": "kits21"},
        "protocol '1 click' must be an object": {"protocols": {"1 click": 0.7}},
        r"needs 'nsd': \{'mean'": {"protocols": {"1 click": {**one, "nsd": {"mean": 0.6}}}},
        r"1 click.dice.mean must be a number, got '0.7'": {
            "protocols": {"1 click": {**one, "dice": {"mean": "0.7", "std": 0.1}}}
        },
        "needs 'n', the number of cases": {"protocols": {"1 click": {**one, "n": 0}}},
        "1 click.tolerance_mm must be a number, got None": {
            "protocols": {"1 click": {k: v for k, v in one.items() if k != "tolerance_mm"}}
        },
    }
    for message, summary in bad.items():
        with pytest.raises(ValueError, match=message):
            load_evaluation_summary(summary)
    with pytest.raises(TypeError, match="evaluation summary must be a path to a JSON file or a dict, got list"):
        load_evaluation_summary([SUMMARY])
    path = tmp_path / "summary.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        load_evaluation_summary(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        load_evaluation_summary(path)


# ----------------------------------------------------------------------------------------------------------------------
# The example script
# ----------------------------------------------------------------------------------------------------------------------
def _example():
    spec = importlib.util.spec_from_file_location("push_to_hub_example", REPO / "examples" / "push_to_hub.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_script_pushes_the_adapter(adapter_folder, tmp_path, hub, capsys):
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps(SUMMARY))
    card_out = tmp_path / "card.md"
    argv = [
        str(adapter_folder),
        "--repo-id",
        "my-lab/kits21-adapter",
        "--adapter-only",
        "--base-model-id",
        "my-lab/sam3d-vit-b",
        "--evaluation",
        str(summary),
        "--card-out",
        str(card_out),
    ]
    assert _example().main([*argv, "--dry-run"]) == 0
    assert hub == [] and "adapter_model.safetensors" in capsys.readouterr().out
    assert _front_matter(card_out.read_text())["base_model"] == "my-lab/sam3d-vit-b"
    assert _example().main(argv) == 0
    assert set(_uploaded(hub)) == {
        "adapter_config.json",
        "adapter_model.safetensors",
        "processor_config.json",
        "README.md",
    }
    assert _example().main([str(adapter_folder), "--repo-id", "my-lab/x", "--adapter-only"]) == 1
    assert "--adapter-only needs --base-model-id" in capsys.readouterr().err
