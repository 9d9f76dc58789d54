"""Every artefact loads by Hub id, offline, from a Hub cache laid out as `huggingface_hub` lays it out
(`models--org--name/refs/main` -> `snapshots/<commit>/...`): what a user gets after one online download."""

import os

import pytest
import torch
from conftest import TINY, randomize

from sam3d_hf import (
    Sam3DAdapterConfig,
    Sam3DAdapterModel,
    Sam3DConfig,
    Sam3DForPromptableSegmentation,
    Sam3DProcessor,
    get_adapter_model,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cached_repo(cache, repo_id: str):
    """The snapshot folder of `repo_id` at `main` in a Hub cache (created if needed)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


def test_model_processor_and_adapter_load_by_id_offline(tmp_path, monkeypatch, tiny_inputs):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "hub-cache"
    config = Sam3DConfig(
        **{**TINY, "prompt_encoder_config": {**TINY["prompt_encoder_config"], "use_point_labels": True}}
    )
    model = randomize(Sam3DForPromptableSegmentation(config)).eval()
    model.save_pretrained(cached_repo(cache, "org/sam3d-tiny"))
    Sam3DProcessor.from_preset("kits21", patch_size=(40, 24, 44), cluster_margin=4).save_pretrained(
        cached_repo(cache, "org/sam3d-tiny")
    )

    adapted = get_adapter_model(randomize(Sam3DForPromptableSegmentation(config), seed=5), Sam3DAdapterConfig())
    adapted.save_pretrained(cached_repo(cache, "org/sam3d-tiny-adapter"))

    loaded = Sam3DForPromptableSegmentation.from_pretrained("org/sam3d-tiny", cache_dir=cache).eval()
    with torch.no_grad():
        assert torch.equal(loaded(**tiny_inputs).logits, model(**tiny_inputs).logits)
    processor = Sam3DProcessor.from_pretrained("org/sam3d-tiny", cache_dir=cache)
    assert processor.patch_size == (40, 24, 44) and processor.image_processor.target_label == 2

    base = randomize(Sam3DForPromptableSegmentation(config), seed=9).eval()
    on_base = Sam3DAdapterModel.from_pretrained(base, "org/sam3d-tiny-adapter", cache_dir=cache)
    assert not any(p.requires_grad for p in on_base.parameters())  # inference mode by default
    assert not any(p.requires_grad for p in on_base.parameters())  # inference mode by default
    trained = set(adapted.trainable_parameter_names())
    assert all(torch.equal(base.state_dict()[n], adapted.model.state_dict()[n]) for n in trained)
    # SAM's inherited tensors stay the base's: only the adapter's groups came from the file.
    inherited = [n for n in base.state_dict() if n not in trained and not n.endswith("rel_pos_scale")]
    assert inherited and not all(torch.equal(base.state_dict()[n], adapted.model.state_dict()[n]) for n in inherited)

    with pytest.raises(ValueError, match="could not download the adapter 'org/not-cached'"):
        Sam3DAdapterModel.from_pretrained(base, "org/not-cached", cache_dir=cache)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
