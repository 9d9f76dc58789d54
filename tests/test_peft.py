"""The paper's spatial-adapter scheme (own API, peft-shaped files) and the LoRA / full fine-tuning baselines (peft)."""

import dataclasses
import json
import logging
import os
import re
import shutil
import stat

import peft
import pytest
import torch
from conftest import PATCH, TINY, randomize
from safetensors.torch import load_file
from transformers import AutoModel

from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation, peft_sam3d
from sam3d_hf.peft_sam3d import (
    ADAPTER_WEIGHTS_NAME,
    Sam3DAdapterConfig,
    Sam3DAdapterModel,
    enable_full_finetuning,
    get_adapter_model,
    lora_config,
    parameter_group,
)


def base_model(seed: int, **vision) -> Sam3DForPromptableSegmentation:
    """A stand-in for a fresh SAM conversion: SAM's inherited tensors are the same for every seed (seed 0), the new
    parts (adapters, norms, 3D parts, prompt encoder, decoder) differ by seed."""
    config = Sam3DConfig(**{**TINY, "vision_config": {**TINY["vision_config"], **vision}})
    inherited = randomize(Sam3DForPromptableSegmentation(config), seed=0).state_dict()
    model = randomize(Sam3DForPromptableSegmentation(config), seed=seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if parameter_group(name) is None:
                tensor.copy_(inherited[name])
    return model.eval()


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def training_step(model, inputs):
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    labels = (inputs["pixel_values"][:, 0] > 0.5).long()
    model.train()
    model(**inputs, labels=labels).loss.backward()
    optimizer.step()
    model.eval()


def test_vit_b_groups_match_the_paper():
    with torch.device("meta"):
        model = Sam3DForPromptableSegmentation(Sam3DConfig())
    wrapped = get_adapter_model(model, Sam3DAdapterConfig())
    counts = wrapped.parameter_counts()
    assert counts["adapters"] + counts["norms"] + counts["new_3d"] == 15_209_984  # image encoder, trained
    assert counts["prompt_encoder"] == 2_900_736
    assert counts["mask_decoder"] == 7_088_256
    assert counts["frozen"] == 88_453_376
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == 25_198_976
    assert sum(p.numel() for p in wrapped.adapter_state_dict().values()) == trainable
    assert round(trainable * 4 / 1e6, 1) == 100.8  # the float32 adapter file, MB
    assert not model.vision_encoder.patch_embed.projection_weight.requires_grad
    assert not model.vision_encoder.layers[0].attn.qkv.weight.requires_grad
    assert model.vision_encoder.layers[0].attn.rel_pos_d.requires_grad
    assert not model.vision_encoder.layers[0].attn.rel_pos_h.requires_grad


def test_vit_b_adapter_file_holds_only_the_trained_tensors(tmp_path):
    with torch.device("meta"):
        model = Sam3DForPromptableSegmentation(Sam3DConfig())
    wrapped = get_adapter_model(model.to_empty(device="cpu"), Sam3DAdapterConfig())  # storage without initialisation
    wrapped.save_pretrained(tmp_path / "vit-b")
    path = tmp_path / "vit-b" / ADAPTER_WEIGHTS_NAME
    stored = load_file(path)
    trained = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert set(stored) == trained
    assert sum(tensor.numel() for tensor in stored.values()) == 25_198_976
    assert all(tensor.dtype == torch.float32 for tensor in stored.values())
    size = path.stat().st_size
    assert 25_198_976 * 4 < size < 25_198_976 * 4 + 200_000  # the tensors plus a JSON header
    assert round(size / 1e6, 1) == 100.8


def test_print_trainable_parameters(capsys, tiny_model):
    get_adapter_model(tiny_model, Sam3DAdapterConfig()).print_trainable_parameters()
    printed = capsys.readouterr().out
    trainable = sum(p.numel() for p in tiny_model.parameters() if p.requires_grad)
    assert (
        f"trainable params: {trainable:,d} || all params: {sum(p.numel() for p in tiny_model.parameters()):,d}"
        in printed
    )
    for group in ("adapters", "norms", "new_3d", "prompt_encoder", "mask_decoder"):
        count = sum(p.numel() for n, p in tiny_model.named_parameters() if parameter_group(n) == group)
        assert re.search(rf"^{group} +{count:,d}$", printed, flags=re.M), group


def test_inference_mode_freezes_everything(tiny_model):
    wrapped = get_adapter_model(tiny_model, Sam3DAdapterConfig(inference_mode=True))
    assert not any(p.requires_grad for p in tiny_model.parameters())
    assert wrapped.trainable_parameter_names()  # still the tensors its file holds


@pytest.mark.parametrize(
    "groups", [None, ["adapters", "norms", "new_3d", "prompt_encoder"], ["adapters", "mask_decoder"]]
)
def test_one_step_changes_exactly_the_trainable_tensors(tiny_inputs, groups):
    model = base_model(seed=1)
    config = Sam3DAdapterConfig() if groups is None else Sam3DAdapterConfig(trainable_groups=groups)
    wrapped = get_adapter_model(model, config)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    training_step(wrapped, tiny_inputs)
    trainable = set(wrapped.trainable_parameter_names())
    assert trainable and {parameter_group(n) for n in trainable} == set(config.trainable_groups)
    for name, tensor in model.state_dict().items():
        changed = not torch.equal(tensor, before[name])
        assert changed == (name in trainable), name


def test_adapter_round_trip_is_bit_identical_on_a_fresh_base(tiny_inputs, tmp_path):
    trained = get_adapter_model(base_model(seed=1), Sam3DAdapterConfig())
    training_step(trained, tiny_inputs)
    trained.save_pretrained(tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    stored = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS_NAME)
    assert set(stored) == set(trained.trainable_parameter_names())
    assert not any(parameter_group(name) is None for name in stored)  # no SAM tensor in the file

    fresh = base_model(seed=2)  # same SAM tensors, different new parts
    assert not torch.equal(logits(fresh, tiny_inputs), logits(trained, tiny_inputs))
    loaded = Sam3DAdapterModel.from_pretrained(fresh, tmp_path / "adapter")
    assert torch.equal(logits(loaded, tiny_inputs), logits(trained, tiny_inputs))
    assert not any(p.requires_grad for p in fresh.parameters())  # inference mode by default
    trainable_again = Sam3DAdapterModel.from_pretrained(base_model(seed=3), tmp_path / "adapter", is_trainable=True)
    assert set(trainable_again.trainable_parameter_names()) == set(stored)


def test_merge_gives_a_standalone_model(tiny_inputs, tmp_path):
    wrapped = get_adapter_model(base_model(seed=1), Sam3DAdapterConfig(adapter_dim=8, adapter_layers=[0, 2]))
    training_step(wrapped, tiny_inputs)
    expected = logits(wrapped, tiny_inputs)
    merged = wrapped.merge_and_unload()
    assert type(merged) is Sam3DForPromptableSegmentation
    assert all(p.requires_grad for p in merged.parameters())
    assert torch.equal(logits(merged, tiny_inputs), expected)
    merged.save_pretrained(tmp_path / "merged")
    assert not list((tmp_path / "merged").glob("adapter_*"))
    reloaded = Sam3DForPromptableSegmentation.from_pretrained(tmp_path / "merged").eval()
    assert reloaded.config.vision_config.adapter_layers == [0, 2]
    assert torch.equal(logits(reloaded, tiny_inputs), expected)


def test_adapter_layers_and_width_rebuild_the_adapters(tiny_model):
    get_adapter_model(tiny_model, Sam3DAdapterConfig(adapter_dim=8, adapter_layers=[0, 2]))
    adapters = [layer.adapter for layer in tiny_model.vision_encoder.layers]
    assert adapters[1] is None and adapters[3] is None
    assert adapters[0].linear1.out_features == 8 and adapters[2].conv.weight.shape == (8, 1, 3, 3, 3)
    assert tiny_model.config.vision_config.adapter_dim == 8
    assert tiny_model.config.vision_config.adapter_layers == [0, 2]


def test_config_round_trip_and_errors(tmp_path):
    config = Sam3DAdapterConfig(adapter_dim=64, adapter_layers=[3, 1], base_model_name_or_path="sam3d-vit-b")
    config.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "SAM3D_SPATIAL_ADAPTER"
    assert Sam3DAdapterConfig.from_pretrained(tmp_path) == config
    assert config.adapter_layers == [1, 3]

    with pytest.raises(ValueError, match=r"unknown trainable_groups \['decoder'\]"):
        Sam3DAdapterConfig(trainable_groups=["adapters", "decoder"])
    with pytest.raises(ValueError, match=r"positive int or None \(the base model's width\), got 0"):
        Sam3DAdapterConfig(adapter_dim=0)
    with pytest.raises(ValueError, match=r"non-negative block indices, got \[-1\]"):
        Sam3DAdapterConfig(adapter_layers=[-1])
    with pytest.raises(ValueError, match="repeated block indices"):
        Sam3DAdapterConfig(adapter_layers=[1, 1])
    with pytest.raises(ValueError, match="put 'adapters' in trainable_groups"):
        Sam3DAdapterConfig(trainable_groups=["mask_decoder"])
    with pytest.raises(ValueError, match="peft_type must be"):
        Sam3DAdapterConfig(peft_type="LORA")
    with pytest.raises(TypeError, match=r"for one group write \['norms'\]"):
        Sam3DAdapterConfig(trainable_groups="norms")
    with pytest.raises(TypeError, match=r"adapter_layers must be a list of block indices or None, got 3"):
        Sam3DAdapterConfig(adapter_layers=3)
    with pytest.raises(ValueError, match=r"non-negative block indices, got \[0, 1.5\]"):
        Sam3DAdapterConfig(adapter_layers=[0, 1.5])
    with pytest.raises(ValueError, match=r"adapter_dim must be a positive int or None .*, got -4"):
        Sam3DAdapterConfig(adapter_dim=-4)
    with pytest.raises(TypeError, match="inference_mode must be True or False, got 'yes'"):
        Sam3DAdapterConfig(inference_mode="yes")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(ValueError, match=r"is a peft 'LORA' adapter.*peft.PeftModel.from_pretrained"):
        Sam3DAdapterConfig.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"neither an adapter folder nor a Hub repo id"):
        Sam3DAdapterConfig.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no adapter_config\.json"):
        Sam3DAdapterConfig.from_pretrained(tmp_path / "empty")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"adapter_dim": 8, "rank": 4}))
    with pytest.raises(ValueError, match=r"unknown keys \['rank'\]"):
        Sam3DAdapterConfig.from_pretrained(tmp_path)


def test_adapter_state_dict_is_checked_before_the_model_changes(tiny_inputs):
    trained = get_adapter_model(base_model(seed=1), Sam3DAdapterConfig(adapter_dim=8))
    tensors = trained.adapter_state_dict()
    fresh = base_model(seed=2)
    before = snapshot(fresh)
    with pytest.raises(TypeError, match=r"adapter_state_dict must be a dict of tensors, got list"):
        Sam3DAdapterModel(fresh, Sam3DAdapterConfig(adapter_dim=8), list(tensors.values()))
    with pytest.raises(TypeError, match=r"values must be tensors; \['mask_decoder.fuse.0.weight'\] are not"):
        Sam3DAdapterModel(fresh, Sam3DAdapterConfig(adapter_dim=8), {**tensors, "mask_decoder.fuse.0.weight": 1.0})
    with pytest.raises(ValueError, match=r"shape mismatch .*\(8, 48\), \(16, 48\)"):
        Sam3DAdapterModel(fresh, Sam3DAdapterConfig(), tensors)
    assert_unchanged(fresh, before)
    loaded = Sam3DAdapterModel(fresh, Sam3DAdapterConfig(adapter_dim=8), tensors)
    assert torch.equal(logits(loaded, tiny_inputs), logits(trained, tiny_inputs))


def test_block_indices_are_checked_against_the_model(tiny_model):
    with pytest.raises(ValueError, match=r"block indices \[4\] outside \[0, 4\)"):
        get_adapter_model(tiny_model, Sam3DAdapterConfig(adapter_layers=[0, 4]))
    with pytest.raises(TypeError, match="Sam3DForPromptableSegmentation"):
        get_adapter_model(torch.nn.Linear(2, 2), Sam3DAdapterConfig())


def test_adapter_file_must_match_its_config(tiny_inputs, tmp_path):
    wrapped = get_adapter_model(base_model(seed=1), Sam3DAdapterConfig(trainable_groups=["adapters", "mask_decoder"]))
    wrapped.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["trainable_groups"] = ["adapters", "mask_decoder", "norms"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing \['vision_encoder.layers.0.layer_norm1.bias'"):
        Sam3DAdapterModel.from_pretrained(base_model(seed=2), tmp_path)

    config["trainable_groups"] = ["adapters"]  # the file also holds the decoder
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected \['mask_decoder"):
        Sam3DAdapterModel.from_pretrained(base_model(seed=2), tmp_path)

    config["trainable_groups"], config["adapter_dim"] = ["adapters", "mask_decoder"], 8  # the file holds width 16
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(
        ValueError, match=r"shape mismatch .*adapter.conv.weight', \(16, 1, 3, 3, 3\), \(8, 1, 3, 3, 3\)"
    ):
        Sam3DAdapterModel.from_pretrained(base_model(seed=2), tmp_path)

    (tmp_path / ADAPTER_WEIGHTS_NAME).unlink()
    with pytest.raises(ValueError, match=r"no adapter_model\.safetensors"):
        Sam3DAdapterModel.from_pretrained(base_model(seed=2), tmp_path)


def test_save_replaces_only_the_adapter_files(tiny_inputs, tmp_path):
    """A second save replaces the adapter's two files and nothing else: unrelated files in the folder survive bit for
    bit, and no temporary file is left behind."""
    wrapped = get_adapter_model(base_model(seed=1), Sam3DAdapterConfig(trainable_groups=["adapters", "mask_decoder"]))
    folder = tmp_path / "run"
    wrapped.save_pretrained(folder)
    (folder / "notes.txt").write_text("from an earlier run")
    (folder / "processor_config.json").write_text("{}")
    first = load_file(folder / ADAPTER_WEIGHTS_NAME)
    training_step(wrapped, tiny_inputs)
    wrapped.save_pretrained(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["notes.txt", "processor_config.json", "adapter_config.json", ADAPTER_WEIGHTS_NAME]
    )  # no temporary file left behind
    assert (folder / "notes.txt").read_text() == "from an earlier run"
    assert (folder / "processor_config.json").read_text() == "{}"
    stored = load_file(folder / ADAPTER_WEIGHTS_NAME)
    assert torch.equal(stored["mask_decoder.fuse.3.weight"], wrapped.model.mask_decoder.fuse[3].weight)
    assert not torch.equal(stored["mask_decoder.fuse.3.weight"], first["mask_decoder.fuse.3.weight"])
    reloaded = Sam3DAdapterModel.from_pretrained(base_model(seed=1), folder)
    assert torch.equal(logits(reloaded, tiny_inputs), logits(wrapped, tiny_inputs))

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(ValueError, match=r"save_directory .*a-file' is an existing file, not a folder"):
        wrapped.save_pretrained(tmp_path / "a-file")
    assert (tmp_path / "a-file").read_text() == "x"


def test_adapter_save_into_a_model_folder_is_refused_and_the_model_still_loads(tiny_inputs, tmp_path):
    """A peft habit: saving the adapter next to the model. transformers would then read the folder as a peft adapter
    (and fail), so the save is refused before anything is written, and the model folder keeps loading."""
    base = base_model(seed=1)
    folder = tmp_path / "model"
    base.save_pretrained(folder)
    model_files = {p.name: p.read_bytes() for p in folder.iterdir()}
    wrapped = get_adapter_model(base_model(seed=1), Sam3DAdapterConfig(trainable_groups=["adapters", "mask_decoder"]))
    refused = r"'.*model' holds a model \(config.json, model.safetensors\);.*peft adapter.*e.g. '.*model/adapter'"
    with pytest.raises(ValueError, match=refused):
        wrapped.save_pretrained(folder)
    with pytest.raises(ValueError, match=refused):
        wrapped.adapter_config.save_pretrained(folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == model_files  # nothing written
    for loader in (Sam3DForPromptableSegmentation.from_pretrained, AutoModel.from_pretrained):
        assert torch.equal(logits(loader(folder).eval(), tiny_inputs), logits(base, tiny_inputs))

    (folder / "config.json").rename(tmp_path / "config.json")  # weights alone also make a model folder
    with pytest.raises(ValueError, match=r"holds a model \(model.safetensors\)"):
        wrapped.save_pretrained(folder)
    (tmp_path / "config.json").rename(folder / "config.json")

    wrapped.save_pretrained(folder / "adapter")  # what the message says to do
    # The other order: a model saved into a folder that holds an adapter is refused too, writing nothing.
    with pytest.raises(ValueError, match=r"'.*adapter' holds a Sam3D adapter .*could not be loaded.*Nothing was"):
        base.save_pretrained(folder / "adapter")
    assert {p.name for p in (folder / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    loaded = Sam3DAdapterModel.from_pretrained(
        Sam3DForPromptableSegmentation.from_pretrained(folder), folder / "adapter"
    )
    assert torch.equal(logits(loaded, tiny_inputs), logits(wrapped, tiny_inputs))


def test_a_folder_holding_a_sam3d_adapter_is_refused_by_from_pretrained(tmp_path):
    """transformers hands any folder with an adapter_config.json to peft, which does not know this scheme (a bare
    KeyError 'SAM3D_SPATIAL_ADAPTER'): the model's from_pretrained, direct or through AutoModel, says what to do."""
    base = base_model(seed=1)
    base.save_pretrained(tmp_path / "model")
    on_disk = Sam3DForPromptableSegmentation.from_pretrained(tmp_path / "model")  # records its path as the base
    get_adapter_model(on_disk, Sam3DAdapterConfig()).save_pretrained(tmp_path / "adapter")
    both = tmp_path / "both"  # a folder from before the refusal: model and adapter side by side
    shutil.copytree(tmp_path / "model", both)
    for path in (tmp_path / "adapter").iterdir():
        shutil.copy(path, both / path.name)
    for loader in (Sam3DForPromptableSegmentation.from_pretrained, AutoModel.from_pretrained):
        with pytest.raises(ValueError, match=r"'.*both' holds a model and a Sam3D adapter .*into a subfolder"):
            loader(both)
        with pytest.raises(
            ValueError,
            match=r"'.*adapter' holds a Sam3D adapter, not a model: load its base model \('.*model'\), then the "
            r"adapter with Sam3DAdapterModel.from_pretrained\(base, '.*adapter'\)",
        ):
            loader(tmp_path / "adapter")


def test_interrupted_save_keeps_the_earlier_files(tmp_path, monkeypatch):
    """Weights go first, the config last, each through a temporary file: a save that fails while writing the
    weights leaves the earlier weights and the earlier config (not the new one) in place, and no temporary file."""
    wrapped = get_adapter_model(base_model(seed=1), Sam3DAdapterConfig(trainable_groups=["adapters", "mask_decoder"]))
    wrapped.save_pretrained(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    written = []

    def failing_save_file(tensors, filename, metadata=None):
        written.append(filename)
        with open(filename, "wb") as file:
            file.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(peft_sam3d, "save_file", failing_save_file)
    with torch.no_grad():
        wrapped.model.mask_decoder.fuse[3].weight.add_(1)
    wrapped.adapter_config = dataclasses.replace(wrapped.adapter_config, base_model_name_or_path="another-base")
    with pytest.raises(OSError, match="disk full"):
        wrapped.save_pretrained(tmp_path)
    assert len(written) == 1 and written[0] != str(tmp_path / ADAPTER_WEIGHTS_NAME)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_get_the_usual_modes(tmp_path, umask):
    wrapped = get_adapter_model(base_model(seed=1), Sam3DAdapterConfig(adapter_layers=[1]))
    previous = os.umask(umask)
    try:
        wrapped.save_pretrained(tmp_path / "new" / "adapter")
        Sam3DAdapterConfig(adapter_dim=4).save_pretrained(tmp_path / "config-only")
    finally:
        os.umask(previous)
    for folder in (tmp_path / "new", tmp_path / "new" / "adapter", tmp_path / "config-only"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~umask, folder
    for path in [*(tmp_path / "new" / "adapter").iterdir(), tmp_path / "config-only" / "adapter_config.json"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_adapter_width_comes_from_the_base(tiny_model, caplog):
    """`Sam3DAdapterConfig()` keeps the base's adapters (tiny: width 16) instead of rebuilding them at 384."""
    before = {name: tensor.clone() for name, tensor in tiny_model.state_dict().items()}
    adapters = [layer.adapter for layer in tiny_model.vision_encoder.layers]
    with caplog.at_level(logging.WARNING, logger="sam3d_hf.peft_sam3d"):
        wrapped = get_adapter_model(tiny_model, Sam3DAdapterConfig())
    assert not caplog.records
    assert wrapped.adapter_config.adapter_dim == 16 == tiny_model.config.vision_config.adapter_dim
    assert [layer.adapter for layer in tiny_model.vision_encoder.layers] == adapters  # the same modules
    assert all(torch.equal(tensor, before[name]) for name, tensor in tiny_model.state_dict().items())


def test_rebuilding_adapters_is_announced(caplog):
    cases = [
        ({}, {"adapter_dim": 8}, r"blocks \[0, 1, 2, 3\] rebuilt at width 8 \(they had widths \[16\]\)"),
        ({}, {"adapter_layers": [0, 2]}, r"blocks \[1, 3\] lose their adapter"),
        ({"adapter_layers": [1]}, {}, r"blocks \[0, 2, 3\] get a new adapter"),
        ({"adapter_layers": [1]}, {"adapter_dim": 4, "adapter_layers": [1, 2]}, r"blocks \[1\] rebuilt .*\[2\] get a"),
    ]
    for base_vision, adapter, message in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="sam3d_hf.peft_sam3d"):
            get_adapter_model(base_model(seed=1, **base_vision), Sam3DAdapterConfig(**adapter))
        assert len(caplog.records) == 1, (base_vision, adapter)
        assert re.search(message, caplog.records[0].getMessage()), caplog.records[0].getMessage()
        assert "fresh random weights" in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sam3d_hf.peft_sam3d"):  # the base's own layout: nothing rebuilt
        get_adapter_model(base_model(seed=1, adapter_layers=[0, 2]), Sam3DAdapterConfig(adapter_layers=[2, 0]))
    assert not caplog.records


def test_saved_config_records_the_width_used(tmp_path, tiny_inputs):
    wrapped = get_adapter_model(base_model(seed=1), Sam3DAdapterConfig())
    wrapped.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["adapter_dim"] == 16
    wide = get_adapter_model(base_model(seed=2), Sam3DAdapterConfig(adapter_dim=24)).merge_and_unload()
    assert wide.config.vision_config.adapter_dim == 24  # a base of another width: the file's width wins
    loaded = Sam3DAdapterModel.from_pretrained(wide, tmp_path)
    assert wide.config.vision_config.adapter_dim == 16
    assert torch.equal(logits(loaded, tiny_inputs), logits(wrapped, tiny_inputs))


def snapshot(model):
    return (
        {name: tensor.clone() for name, tensor in model.state_dict().items()},
        {name: parameter.requires_grad for name, parameter in model.named_parameters()},
        model.config.to_dict(),
        [layer.adapter for layer in model.vision_encoder.layers],
    )


def assert_unchanged(model, before):
    state, flags, config, adapters = before
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[name], tensor) for name, tensor in state.items())
    assert {name: parameter.requires_grad for name, parameter in model.named_parameters()} == flags
    assert model.config.to_dict() == config
    assert [layer.adapter for layer in model.vision_encoder.layers] == adapters


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "kind, message",
    [
        ("wrong-size base", r"shape mismatch .*\(48,\), \(64,\)"),
        ("other width in the config", r"shape mismatch .*\(16, 48\), \(8, 48\)"),
        ("fewer adapter blocks in the config", r"unexpected \['vision_encoder.layers.1.adapter"),
        ("more groups in the config", r"missing \['vision_encoder.layers.0.layer_norm1.bias'"),
        ("block outside the base", r"block indices \[5\] outside \[0, 4\)"),
        ("corrupt weights", r"could not read .*adapter_model.safetensors' as safetensors"),
    ],
)
def test_failed_load_leaves_the_model_as_it_was(tmp_path, kind, message):
    saved = get_adapter_model(base_model(seed=1), Sam3DAdapterConfig(trainable_groups=["adapters", "mask_decoder"]))
    saved.save_pretrained(tmp_path)
    target = base_model(seed=2, hidden_size=64) if kind == "wrong-size base" else base_model(seed=2)
    if kind == "other width in the config":
        _edit_config(tmp_path, adapter_dim=8)
    elif kind == "fewer adapter blocks in the config":
        _edit_config(tmp_path, adapter_layers=[0, 2])
    elif kind == "more groups in the config":
        _edit_config(tmp_path, trainable_groups=["adapters", "mask_decoder", "norms"])
    elif kind == "block outside the base":
        _edit_config(tmp_path, adapter_layers=[0, 5])
    elif kind == "corrupt weights":
        (tmp_path / ADAPTER_WEIGHTS_NAME).write_bytes(b"not safetensors")
    target.requires_grad_(True)
    target.mask_decoder.requires_grad_(False)  # flags a load would change
    before = snapshot(target)
    with pytest.raises(ValueError, match=message):
        Sam3DAdapterModel.from_pretrained(target, tmp_path)
    assert_unchanged(target, before)


def test_lora_baseline_trains_saves_reloads_and_merges(tiny_inputs, tmp_path):
    base = base_model(seed=1, adapter_layers=[])
    model = peft.get_peft_model(base, lora_config(r=4, init_lora_weights=False))  # non-zero B: LoRA active at once
    lora_wrapped = sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A"))
    expected_targets = [f"vision_encoder.layers.{i}.attn.{m}" for i in range(4) for m in ("proj", "qkv")]
    assert [name.removeprefix("base_model.model.") for name in lora_wrapped] == expected_targets  # not q_proj/out_proj
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    wrapped_in_full = {n.split(".modules_to_save.")[0].removeprefix("base_model.model.") for n in trainable}
    assert wrapped_in_full - {n for n in wrapped_in_full if ".lora_" in n} == {
        "prompt_encoder",
        "mask_decoder",
        "vision_encoder.patch_embed",
        *(f"vision_encoder.necks.{k}" for k in range(4)),
    }

    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    training_step(model, tiny_inputs)
    for name, tensor in model.state_dict().items():  # exactly LoRA and the modules_to_save copies changed
        assert (not torch.equal(tensor, before[name])) == (name in trainable), name
    expected = logits(model, tiny_inputs)
    model.save_pretrained(tmp_path / "lora")
    saved = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    fully_trained = ("prompt_encoder.", "mask_decoder.", "vision_encoder.patch_embed.", "vision_encoder.necks.")
    assert {n.removeprefix("base_model.model.") for n in saved if ".lora_" not in n} == {
        n for n, _ in base_model(seed=1, adapter_layers=[]).named_parameters() if n.startswith(fully_trained)
    }  # SAM's qkv / proj / MLP, the norms and the position tables are not in the file
    assert sum(t.numel() for t in saved.values()) == sum(
        p.numel() for n, p in model.named_parameters() if n in trainable
    )

    # LoRA's base is everything outside LoRA and modules_to_save (norms, depth table, rel_pos_d included): the same
    # base, with every fully trained module perturbed to show that they come from the saved folder.
    fresh = base_model(seed=1, adapter_layers=[])
    with torch.no_grad():
        for module in (
            fresh.mask_decoder,
            fresh.prompt_encoder,
            fresh.vision_encoder.patch_embed,
            fresh.vision_encoder.necks,
        ):
            for parameter in module.parameters():
                parameter.add_(0.5)
    assert not torch.allclose(logits(fresh, tiny_inputs), expected, atol=1e-3)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "lora")
    assert not any(p.requires_grad for p in reloaded.parameters())
    assert torch.equal(logits(reloaded, tiny_inputs), expected)
    merged = reloaded.merge_and_unload()
    assert type(merged) is Sam3DForPromptableSegmentation
    assert not any("lora" in name or "modules_to_save" in name for name in merged.state_dict())
    # merging adds B @ A into SAM's weights: equal up to float32 rounding (1.2e-5 on logits up to 17.4 here)
    assert (logits(merged, tiny_inputs) - expected).abs().max() <= 5e-6 * expected.abs().max()


def test_lora_counts_at_vit_b():
    with torch.device("meta"):
        base = Sam3DForPromptableSegmentation(Sam3DConfig(vision_config={"adapter_layers": []}))
    in_full = sum(
        p.numel()
        for n, p in base.named_parameters()
        if n.startswith(("prompt_encoder.", "mask_decoder.", "vision_encoder.patch_embed.", "vision_encoder.necks."))
    )
    model = peft.get_peft_model(base, lora_config(r=16))
    lora = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".lora_" in n)
    assert lora == 12 * 16 * ((768 + 3 * 768) + (768 + 768))  # r x (in + out) for qkv and proj of 12 blocks
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora + in_full == 18_952_576


def test_full_finetuning_trains_everything(tiny_inputs):
    model = base_model(seed=1)
    assert enable_full_finetuning(model) == sum(p.numel() for p in model.parameters())
    before = {name: tensor.clone() for name, tensor in model.named_parameters()}
    training_step(model, tiny_inputs)
    unchanged = [name for name, tensor in model.named_parameters() if torch.equal(tensor, before[name])]
    assert not unchanged
    assert logits(model, tiny_inputs).shape == (2, 2, *PATCH)


def test_adapter_loads_by_hub_id_with_revision_and_records_the_package_version(tiny_inputs, tmp_path, monkeypatch):
    """A Hub id goes through huggingface_hub's download (patched here: a local folder laid out like the repo), with the
    revision and only the two adapter files asked for; the saved config records the package version, as peft does."""
    import huggingface_hub

    import sam3d_hf

    trained = get_adapter_model(base_model(seed=1), Sam3DAdapterConfig())
    training_step(trained, tiny_inputs)
    repo = tmp_path / "hub" / "org" / "sam3d-tiny-adapter"
    trained.save_pretrained(repo)
    (repo / "README.md").write_text("card")  # a real repo holds more than the adapter
    assert json.loads((repo / "adapter_config.json").read_text())["sam3d_hf_version"] == sam3d_hf.__version__

    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.append((repo_id, revision, sorted(allow_patterns), kwargs))
        if repo_id != "org/sam3d-tiny-adapter":
            raise huggingface_hub.errors.LocalEntryNotFoundError(f"offline and {repo_id} is not cached")
        return str(repo)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = Sam3DAdapterModel.from_pretrained(base_model(seed=2), "org/sam3d-tiny-adapter", revision="v1")
    assert torch.equal(logits(loaded, tiny_inputs), logits(trained, tiny_inputs))
    assert calls[0][:3] == ("org/sam3d-tiny-adapter", "v1", ["adapter_config.json", "adapter_model.safetensors"])

    model = base_model(seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"could not download the adapter 'org/missing'.*LocalEntryNotFoundError"):
        Sam3DAdapterModel.from_pretrained(model, "org/missing")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="neither an adapter folder nor a Hub repo id"):
        Sam3DAdapterModel.from_pretrained(model, tmp_path / "not" / "here" / "at-all")
