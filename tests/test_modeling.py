"""Sam3DForPromptableSegmentation: every code path on a tiny config, against independent reference computations."""

import doctest
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import PATCH, TINY, randomize
from monai.losses import DiceCELoss
from transformers import AutoConfig, AutoModel, AutoModelForMaskGeneration
from transformers.testing_utils import CaptureLogger
from transformers.utils import logging as transformers_logging

import sam3d_hf.configuration_sam3d as configuration
import sam3d_hf.modeling_sam3d as modeling
from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation, Sam3DImageEmbeddings, Sam3DSegmentationOutput


def logits_of(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


def assert_close(actual, expected, rtol=1e-5):
    """Equal up to float32 rounding, relative to the scale of the expected values."""
    scale = expected.abs().max().item()
    assert scale > 0, "reference is identically zero: the test would prove nothing"
    assert (actual - expected).abs().max().item() <= rtol * scale + 1e-6


# ---------------------------------------------------------------- shapes, batching, prompts


def test_output_fields_and_shapes(tiny_model, tiny_inputs):
    labels = torch.randint(0, 2, (2, *PATCH))
    out = tiny_model(**tiny_inputs, labels=labels)
    assert isinstance(out, Sam3DSegmentationOutput)
    assert out.logits.shape == (2, 2, *PATCH)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    embeddings = out.image_embeddings
    assert isinstance(embeddings, Sam3DImageEmbeddings)
    assert [tuple(m.shape) for m in embeddings.feature_maps] == [(2, 32, 10, 6, 11)] * 4
    assert embeddings.decoder_context.shape == (2, 16, 20, 12, 22)
    as_tuple = tiny_model(**tiny_inputs, labels=labels, return_dict=False)
    assert torch.equal(as_tuple[0], out.loss) and torch.equal(as_tuple[1], out.logits)


def test_tiny_config_runs_shifted_padded_windows(tiny_model):
    grid = tiny_model.config.vision_config.token_grid
    assert grid == (10, 6, 11) and any(g % 8 for g in grid)  # padding happens
    shifted = [layer.shift is not None for layer in tiny_model.vision_encoder.layers]
    assert shifted == [True, False, True, False]
    rows = [layer.attn.rel_pos_d.shape[0] for layer in tiny_model.vision_encoder.layers]
    assert rows == [7, 31, 7, 31]  # SAM's windowed and "global" table lengths, both resized to 15


def test_batch_of_two_equals_two_single_runs(tiny_model, tiny_inputs):
    batched = logits_of(tiny_model, **tiny_inputs)
    first = logits_of(
        tiny_model, pixel_values=tiny_inputs["pixel_values"][:1], input_points=tiny_inputs["input_points"][:1]
    )
    # the second prompt set has one real point; the padding point must not matter
    second = logits_of(
        tiny_model, pixel_values=tiny_inputs["pixel_values"][1:], input_points=tiny_inputs["input_points"][1:, :1]
    )
    assert_close(batched[:1], first)
    assert_close(batched[1:], second)


def test_padding_points_change_nothing_even_outside_the_patch(tiny_model, tiny_inputs):
    reference = logits_of(tiny_model, **tiny_inputs)
    points = tiny_inputs["input_points"].clone()
    points[1, 1] = torch.tensor([-50.0, 999.0, 7.0])  # padding points are never checked nor sampled
    moved = logits_of(tiny_model, **{**tiny_inputs, "input_points": points})
    assert torch.equal(moved, reference)


def test_several_points_all_matter(tiny_model, tiny_inputs):
    two = logits_of(tiny_model, **tiny_inputs)
    one = logits_of(tiny_model, **{**tiny_inputs, "input_labels": torch.tensor([[1, -1], [1, -1]])})
    assert (two[0] - one[0]).abs().max() > 1e-3  # dropping a real click changes the first row
    assert_close(two[1], one[1])  # the second row had only one real click anyway


def test_negative_clicks_are_refused_without_use_point_labels(tiny_model, tiny_inputs):
    # The official model has no labels: a negative click would silently act as a positive one.
    negative = {**tiny_inputs, "input_labels": torch.tensor([[0, 1], [1, -1]])}
    match = r"negative clicks \(label 0\) at \(batch, point\) \[\[0, 0\]\].*use_point_labels"
    with pytest.raises(ValueError, match=match):
        tiny_model(**negative)


def test_point_labels_extension_distinguishes_clicks(tiny_inputs):
    config = Sam3DConfig(
        **{**TINY, "prompt_encoder_config": {**TINY["prompt_encoder_config"], "use_point_labels": True}}
    )
    model = randomize(Sam3DForPromptableSegmentation(config)).eval()
    positive = logits_of(model, **tiny_inputs)
    negative = logits_of(model, **{**tiny_inputs, "input_labels": torch.tensor([[0, 1], [1, -1]])})
    assert (positive - negative)[:1].abs().max() > 1e-3
    assert torch.equal(positive[1:], negative[1:])
    with pytest.raises(ValueError, match=r"at least one positive click \(label 1\); input_labels rows \[1\]"):
        model(**{**tiny_inputs, "input_labels": torch.tensor([[0, 1], [0, -1]])})


def test_cached_embeddings_equal_full_forward(tiny_model, tiny_inputs):
    full = logits_of(tiny_model, **tiny_inputs)
    with torch.no_grad():
        embeddings = tiny_model.get_image_embeddings(tiny_inputs["pixel_values"])
    cached = logits_of(
        tiny_model,
        image_embeddings=embeddings,
        input_points=tiny_inputs["input_points"],
        input_labels=tiny_inputs["input_labels"],
    )
    assert torch.equal(cached, full)


def test_one_patch_broadcast_over_several_prompt_sets(tiny_model, tiny_inputs):
    pixel_values = tiny_inputs["pixel_values"][:1]
    points = torch.tensor([[[3.0, 4.0, 5.0]], [[20.0, 12.0, 22.0]], [[39.0, 23.0, 43.0]]])
    with torch.no_grad():
        embeddings = tiny_model.get_image_embeddings(pixel_values)
    together = logits_of(tiny_model, image_embeddings=embeddings, input_points=points)
    assert together.shape == (3, 2, *PATCH)
    for row in range(3):
        alone = logits_of(tiny_model, pixel_values=pixel_values, input_points=points[row : row + 1])
        assert_close(together[row : row + 1], alone)


# ---------------------------------------------------------------- attention paths


def test_eager_equals_sdpa_and_eager_really_runs(tiny_model, tiny_inputs, monkeypatch):
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(modeling.F, "scaled_dot_product_attention", spy)
    sdpa = logits_of(tiny_model, **tiny_inputs)
    assert calls, "the default path never called SDPA: the comparison would be eager against eager"
    tiny_model.set_attn_implementation("eager")
    sub_configs = (tiny_model.config.vision_config, tiny_model.config.prompt_encoder_config)
    assert all(sub._attn_implementation == "eager" for sub in sub_configs)

    def refuse(*args, **kwargs):
        raise AssertionError("SDPA called on the eager path")

    monkeypatch.setattr(modeling.F, "scaled_dot_product_attention", refuse)
    eager = logits_of(tiny_model, **tiny_inputs)
    assert_close(eager, sdpa)


def test_default_attention_builds_no_dense_bias_and_shares_window_partitions(tiny_model, tiny_inputs, monkeypatch):
    # The folded path: relative positions inside q'·k', one partition (gathers and mask) per block kind and forward,
    # and an SDPA mask of one (N, N) per window, shared by its heads.
    builds, masks = [], []
    real_build = modeling.Sam3DWindowPartition.build.__func__
    real_sdpa = F.scaled_dot_product_attention

    def build(cls, grid, window, shift, device):
        builds.append(shift)
        return real_build(cls, grid, window, shift, device)

    def refuse(*args, **kwargs):
        raise AssertionError("the dense (N x N per head) bias was built on the default path")

    def sdpa(query, key, value, attn_mask=None, **kwargs):
        masks.append(None if attn_mask is None else tuple(attn_mask.shape))
        return real_sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(modeling.Sam3DWindowPartition, "build", classmethod(build))
    monkeypatch.setattr(modeling.Sam3DWindowAttention, "relative_position_bias", refuse)
    monkeypatch.setattr(modeling.F, "scaled_dot_product_attention", sdpa)
    logits_of(tiny_model, **tiny_inputs)
    assert builds == [(4, 4, 4), None]  # 4 blocks: shifted and unshifted share theirs
    window_masks = [m for m in masks if m is not None and m[-1] == 512]
    assert window_masks and all(m[1] == 1 and m[2:] == (512, 512) for m in window_masks)


def test_default_attention_gives_the_gradients_of_the_dense_reference(tiny_config, tiny_inputs):
    labels = (tiny_inputs["pixel_values"][:, 0] > 0.5).long()
    grads = {}
    for implementation in ("sdpa", "eager"):
        model = randomize(Sam3DForPromptableSegmentation(tiny_config)).train()
        model.set_attn_implementation(implementation)
        model(**tiny_inputs, labels=labels).loss.backward()
        grads[implementation] = {n: p.grad for n, p in model.named_parameters()}
    for name, grad in grads["eager"].items():
        assert_close(grads["sdpa"][name], grad, rtol=1e-4)


def test_cpu_chunks_do_not_change_results(tiny_model, tiny_inputs, monkeypatch):
    calls = []
    real_sdpa = F.scaled_dot_product_attention

    def sdpa(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(modeling.F, "scaled_dot_product_attention", sdpa)
    whole = logits_of(tiny_model, **tiny_inputs)
    assert max(calls) == 8  # all 2 x 4 windows of a block in one call
    calls.clear()
    monkeypatch.setattr(modeling, "CPU_CHUNK_BYTES", 1)  # one window, and one token row of the MLP, per chunk
    chunked = logits_of(tiny_model, **tiny_inputs)
    assert max(c for c in calls if c != 2) == 1  # (prompt-encoder calls have the prompt batch 2)
    assert_close(chunked, whole)


def test_attention_chunking_does_not_change_results(tiny_config, tiny_inputs):
    model = randomize(Sam3DForPromptableSegmentation(tiny_config)).eval()
    chunked = logits_of(model, **tiny_inputs)
    model.config.vision_config.attention_chunk_size = 1000
    assert_close(logits_of(model, **tiny_inputs), chunked)


def test_eager_keeps_attention_weights_only_when_asked_and_still_chunks(tiny_model, tiny_inputs):
    # Eager computes every window's weights; unless asked for they must not be kept (at ViT-B/128³ they are ~0.8 GB per
    # block), and the windows must still go in chunks of attention_chunk_size (3 here), which bound that memory.
    tiny_model.set_attn_implementation("eager")
    attention = tiny_model.vision_encoder.layers[0].attn
    windows = torch.randn(8, 512, 48)  # 2 images x 4 windows of 8³ tokens
    calls = []
    real_eager = modeling.eager_attention_forward

    def spy(*args, **kwargs):
        calls.append(args[1].shape[0])  # windows in this call
        return real_eager(*args, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling, "eager_attention_forward", spy)
        output, weights = attention(windows, None)
        assert weights is None and calls == [3, 3, 2]
        calls.clear()
        output_with_weights, weights = attention(windows, None, output_attentions=True)
        assert weights.shape == (8, 2, 512, 512) and calls == [8]
        calls.clear()
        out = tiny_model(**tiny_inputs)
    assert out.attentions is None and calls and max(calls) <= 3
    assert_close(output, output_with_weights)


def test_sdpa_warns_that_it_has_no_attention_weights(tiny_model, tiny_inputs):
    # As transformers' ViT: output_attentions reaches the attention implementation, and SDPA says it has no weights.
    transformers_logging.warning_once.cache_clear()  # the warning is logged once per process
    with CaptureLogger(transformers_logging.get_logger("transformers")) as captured, torch.no_grad():
        out = tiny_model(**tiny_inputs, output_attentions=True)
    assert "`sdpa` attention does not support `output_attentions=True`" in captured.out
    assert out.attentions == ()


def reference_window_mask(grid, window, shift):
    """Per token pair of the rolled, padded grid: -100 across shift regions, -100 for padded keys."""
    padded = [math.ceil(g / w) * w for g, w in zip(grid, window, strict=True)]
    positions = list(np.ndindex(*padded))

    def region(p):
        if shift is None:
            return (0, 0, 0)
        return tuple(0 if c < s_ - w else (1 if c < s_ - sh else 2) for c, s_, w, sh in zip(p, padded, window, shift))

    def valid(p):  # original (un-rolled) position inside the real grid
        original = [(c + (sh if shift else 0)) % s_ for c, sh, s_ in zip(p, shift or (0, 0, 0), padded)]
        return all(o < g for o, g in zip(original, grid))

    windows = {}
    for p in positions:
        key = tuple(c // w for c, w in zip(p, window))
        windows.setdefault(key, []).append(p)
    masks = []
    for key in sorted(windows):
        tokens = sorted(windows[key])
        mask = np.zeros((len(tokens), len(tokens)))
        for i, a in enumerate(tokens):
            for j, b in enumerate(tokens):
                mask[i, j] = (-100.0 if region(a) != region(b) else 0.0) + (0.0 if valid(b) else -100.0)
        masks.append(mask)
    return torch.tensor(np.stack(masks), dtype=torch.float32)


@pytest.mark.parametrize("shift", [(2, 2, 2), None])
def test_window_mask_matches_brute_force(shift):
    grid, window = (5, 3, 6), (4, 4, 4)
    built = modeling.window_masks(grid, window, shift, "cpu")
    assert torch.equal(built, reference_window_mask(grid, window, shift))


def test_window_mask_absent_when_nothing_is_masked():
    assert modeling.window_masks((8, 16, 8), (8, 8, 8), None, "cpu") is None


def linear_resize(table: np.ndarray, length: int) -> np.ndarray:
    """1D linear resize along rows with align_corners=False (PyTorch's convention), written out."""
    rows = table.shape[0]
    out = np.empty((length, table.shape[1]))
    for o in range(length):
        source = max((o + 0.5) * rows / length - 0.5, 0.0)
        low = min(math.floor(source), rows - 1)
        high = min(low + 1, rows - 1)
        weight = source - low
        out[o] = (1 - weight) * table[low] + weight * table[high]
    return out


@pytest.mark.parametrize("layer", [0, 1])  # SAM's 7-row windowed and 31-row "global" tables, both resized to 15
def test_relative_position_bias_matches_per_pair_formula(tiny_model, layer):
    attention = tiny_model.vision_encoder.layers[layer].attn
    query = torch.randn(2, attention.num_heads, 512, attention.head_dim, dtype=torch.float64)
    attention.double()
    bias = attention.relative_position_bias(query, None)
    tables = [
        linear_resize(t.detach().numpy(), 15) for t in (attention.rel_pos_d, attention.rel_pos_h, attention.rel_pos_w)
    ]
    scale = attention.rel_pos_scale.item()
    coords = list(np.ndindex(8, 8, 8))
    q = query.numpy()
    for window, head, i in [(0, 0, 0), (1, 1, 77), (0, 1, 511), (1, 0, 300)]:
        expected = np.array(
            [
                scale
                * sum(q[window, head, i] @ tables[axis][coords[i][axis] - coords[j][axis] + 7] for axis in range(3))
                for j in range(512)
            ]
        )
        np.testing.assert_allclose(bias[window, head, i].detach().numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("channels_last", [False, True])  # the neck's maps come in both layouts
def test_neck_layer_norm_is_the_per_voxel_formula(channels_last):
    norm = modeling.Sam3DLayerNorm(16, eps=1e-6).double()
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 16, 5, 6, 7, dtype=torch.float64) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    mean = x.mean(1, keepdim=True)
    variance = ((x - mean) ** 2).mean(1, keepdim=True)  # biased
    weight, bias = norm.weight[:, None, None, None], norm.bias[:, None, None, None]
    expected = weight * (x - mean) / torch.sqrt(variance + 1e-6) + bias
    assert_close(norm(x), expected, rtol=1e-12)


# ---------------------------------------------------------------- patch embedding and position tables


def official_patch_embedding(embed, pixel_values, upsampling=4):
    """The official path: trilinear x4 upsampling (x2 for the prompt-free model at 256³), SAM's 16x16/16 kernel per
    slice, 16-tap stride-16 depth filter."""
    up = F.interpolate(pixel_values, scale_factor=upsampling, mode="trilinear", align_corners=False)
    batch, _, depth, height, width = up.shape
    slices = up.permute(0, 2, 1, 3, 4).reshape(batch * depth, 1, height, width)
    planes = F.conv2d(slices, embed.projection_weight, embed.projection_bias, stride=16)
    channels = planes.shape[1]
    planes = planes.reshape(batch, depth, channels, *planes.shape[2:]).permute(0, 2, 1, 3, 4)
    tokens = F.conv3d(
        planes, embed.depth_weight[:, None, :, None, None], embed.depth_bias, stride=(16, 1, 1), groups=channels
    )
    return tokens.permute(0, 2, 3, 4, 1)


def test_folded_patch_embedding_equals_explicit_upsampling(tiny_model):
    embed = tiny_model.vision_encoder.patch_embed.double()
    pixel_values = torch.randn(2, 1, 12, 20, 16, dtype=torch.float64)
    folded = embed(pixel_values)
    assert folded.shape == (2, 3, 5, 4, 48)
    assert (folded - official_patch_embedding(embed, pixel_values)).abs().max() < 1e-10


def test_folded_patch_embedding_at_token_stride_8_equals_explicit_x2_upsampling():
    """The prompt-free model of train_auto.py: 256³ crops upsampled x2, so one token per 8 voxels (a 10³ kernel)."""
    config = Sam3DConfig.from_preset("tiny", vision_config={"token_stride": 8, "image_size": (32, 48, 40)})
    embed = randomize(Sam3DForPromptableSegmentation(config)).vision_encoder.patch_embed.double()
    pixel_values = torch.randn(2, 1, 24, 40, 16, dtype=torch.float64)
    folded = embed(pixel_values)
    assert folded.shape == (2, 3, 5, 2, 48)
    assert (folded - official_patch_embedding(embed, pixel_values, upsampling=2)).abs().max() < 1e-10


def test_folded_patch_embedding_gradients_reach_the_stored_parameters(tiny_model):
    embed = tiny_model.vision_encoder.patch_embed.double()
    pixel_values = torch.randn(1, 1, 8, 12, 8, dtype=torch.float64)
    weights = torch.randn(1, 2, 3, 2, 48, dtype=torch.float64)
    grads = []
    for path in (embed, lambda x: official_patch_embedding(embed, x)):
        embed.zero_grad()
        (path(pixel_values) * weights).sum().backward()
        grads.append([p.grad.clone() for p in embed.parameters()])
    for folded, official in zip(*grads, strict=True):
        assert (folded - official).abs().max() < 1e-9


def test_position_table_is_the_official_pooling_at_32(tiny_config):
    encoder = randomize(Sam3DForPromptableSegmentation(tiny_config)).vision_encoder
    table = encoder.pos_embed.detach()  # (1, 16, 16, C): pooling 2x2 gives 8x8
    positions = encoder.position_embeddings((8, 8, 8)).detach()
    pooled = F.avg_pool2d(table.permute(0, 3, 1, 2), 2).permute(0, 2, 3, 1)  # the official 2x2 pooling
    depth = encoder.depth_embed.detach()  # 8 rows: used as they are at depth 8
    assert torch.allclose(positions, pooled[:, None] + depth[:, :, None, None], atol=1e-6)
    resized = encoder.position_embeddings((10, 6, 11)).detach()
    expected_depth = torch.tensor(linear_resize(depth[0].double().numpy(), 10)).float()
    plane = F.adaptive_avg_pool2d(table.permute(0, 3, 1, 2), (6, 11)).permute(0, 2, 3, 1)[0]
    assert torch.allclose(resized[0], plane[None] + expected_depth[:, None, None], atol=1e-5)


# ---------------------------------------------------------------- loss, training, precision


@pytest.mark.parametrize("with_channel", [False, True])
def test_loss_is_monai_dice_ce(tiny_model, tiny_inputs, with_channel):
    labels = (tiny_inputs["pixel_values"][:, 0] > 0.5).long()
    out = tiny_model(**tiny_inputs, labels=labels[:, None] if with_channel else labels)
    criterion = DiceCELoss(include_background=False, softmax=True, to_onehot_y=True, lambda_dice=0.5, lambda_ce=0.5)
    assert torch.allclose(out.loss, criterion(out.logits, labels[:, None]), atol=1e-6)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_config, tiny_inputs):
    labels = (tiny_inputs["pixel_values"][:, 0] > 0.5).long()
    results = []
    for checkpointing in (False, True):
        model = randomize(Sam3DForPromptableSegmentation(tiny_config)).train()
        if checkpointing:  # transformers 5 name; gradient_checkpointing_enable is its deprecated alias
            model.activation_checkpointing_enable()
            assert model.is_activation_checkpointing
            assert all(layer.gradient_checkpointing for layer in model.vision_encoder.layers)
        block_runs = []
        hook = model.vision_encoder.layers[0].attn.register_forward_hook(lambda *args, runs=block_runs: runs.append(1))
        loss = model(**tiny_inputs, labels=labels).loss
        loss.backward()
        hook.remove()
        assert len(block_runs) == (2 if checkpointing else 1)  # checkpointing recomputes the block in backward
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, atol=1e-6)
    assert grads_a.keys() == grads_b.keys()
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], rtol=1e-4, atol=1e-6), name


def test_every_parameter_gets_a_gradient(tiny_model, tiny_inputs):
    labels = (tiny_inputs["pixel_values"][:, 0] > 0.5).long()
    tiny_model.train()
    tiny_model(**tiny_inputs, labels=labels).loss.backward()
    missing = [n for n, p in tiny_model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing  # DDP without find_unused_parameters relies on it


def test_bf16_autocast_runs_and_agrees(tiny_model, tiny_inputs):
    reference = logits_of(tiny_model, **tiny_inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = logits_of(tiny_model, **tiny_inputs)
    assert torch.isfinite(low).all()
    agreement = (low.float().argmax(1) == reference.argmax(1)).float().mean()
    assert agreement > 0.9
    correlation = torch.corrcoef(torch.stack([low.float().flatten(), reference.flatten()]))[0, 1]
    assert correlation > 0.98


# ---------------------------------------------------------------- saving, loading, auto classes


def test_auto_classes_are_registered(tiny_config):
    assert isinstance(AutoConfig.for_model("sam3d"), Sam3DConfig)
    assert isinstance(AutoModel.from_config(tiny_config), Sam3DForPromptableSegmentation)
    assert isinstance(AutoModelForMaskGeneration.from_config(tiny_config), Sam3DForPromptableSegmentation)


def test_save_and_load_round_trip(tiny_model, tiny_inputs, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    for loader in (Sam3DForPromptableSegmentation, AutoModel, AutoModelForMaskGeneration):
        loaded = loader.from_pretrained(tmp_path).eval()
        assert loaded.config.vision_config.image_size == PATCH
        assert torch.equal(logits_of(loaded, **tiny_inputs), logits_of(tiny_model, **tiny_inputs))
    state = Sam3DForPromptableSegmentation.from_pretrained(tmp_path).state_dict()
    for name, tensor in tiny_model.state_dict().items():
        assert torch.equal(state[name], tensor), name  # rel_pos_scale (a buffer) included


def test_trust_remote_code_loads_without_the_package(tiny_model, tiny_inputs, tmp_path):
    folder = tmp_path / "sam3d-remote"
    tiny_model.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_sam3d.Sam3DForPromptableSegmentation"
    torch.save({k: v for k, v in tiny_inputs.items()}, tmp_path / "inputs.pt")
    script = textwrap.dedent(
        f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "sam3d_hf":
                    raise ImportError("sam3d_hf is blocked in this test")
        sys.meta_path.insert(0, Block())
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(folder)!r}, trust_remote_code=True).eval()
        assert not any(name.split(".")[0] == "sam3d_hf" for name in sys.modules)
        inputs = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        with torch.no_grad():
            torch.save(model(**inputs).logits, {str(tmp_path / "logits.pt")!r})
        print(type(model).__module__)
        """
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "transformers_modules" in result.stdout
    remote = torch.load(tmp_path / "logits.pt", weights_only=True)
    assert torch.equal(remote, logits_of(tiny_model, **tiny_inputs))


# ---------------------------------------------------------------- parameter counts (docs/design.md)


def test_vit_b_parameter_counts_match_the_paper():
    with torch.device("meta"):
        model = Sam3DForPromptableSegmentation(Sam3DConfig())
    inherited = ("patch_embed.projection", "pos_embed", "attn.qkv", "attn.proj", "mlp.", "rel_pos_h", "rel_pos_w")
    encoder = dict(model.vision_encoder.named_parameters())
    frozen = sum(p.numel() for n, p in encoder.items() if any(s in n for s in inherited))
    trained = sum(p.numel() for n, p in encoder.items() if not any(s in n for s in inherited))
    assert frozen == 88_453_376
    assert trained == 15_209_984  # the paper's 15.21 M
    assert sum(p.numel() for p in model.prompt_encoder.parameters()) == 2_900_736  # 3.16 M less the unused block
    assert sum(p.numel() for p in model.mask_decoder.parameters()) == 7_088_256
    assert trained + 2_900_736 + 7_088_256 == 25_198_976  # 25.20 M trainable
    assert model.vision_encoder.layers[2].attn.rel_pos_d.shape == (127, 64)
    assert model.vision_encoder.layers[0].attn.rel_pos_d.shape == (27, 64)


def test_larger_sam_presets_build_on_meta():
    for preset, width, depth, levels in (("vit_l", 1024, 24, [5, 11, 17, 23]), ("vit_h", 1280, 32, [7, 15, 23, 31])):
        config = Sam3DConfig.from_sam_preset(preset)
        with torch.device("meta"):
            model = Sam3DForPromptableSegmentation(config)
        assert model.vision_encoder.pos_embed.shape == (1, 64, 64, width)
        assert len(model.vision_encoder.layers) == depth
        assert config.vision_config.feature_indexes == levels
        assert [
            i for i, layer in enumerate(model.vision_encoder.layers) if layer.attn.rel_pos_h.shape[0] == 127
        ] == levels


# ---------------------------------------------------------------- errors at the public boundary


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"pixel_values": torch.zeros(2, 40, 24, 44)}, ValueError, r"shape \(batch, 1, depth, height, width\)"),
        ({"pixel_values": torch.zeros(2, 3, 40, 24, 44)}, ValueError, r"got \(2, 3, 40, 24, 44\)"),
        ({"pixel_values": np.zeros((2, 1, 40, 24, 44))}, TypeError, "must be a torch.Tensor"),
        ({"pixel_values": torch.zeros(2, 1, 40, 26, 44)}, ValueError, "multiples of 4.*H is not"),
        (
            {"input_points": torch.tensor([[[3.0, 4.0, 44.0]] * 2, [[1.0, 1.0, 1.0]] * 2])},
            ValueError,
            "outside the patch",
        ),
        (
            {"input_points": torch.tensor([[[1.0, 4.0, 5.0], [-1.0, 4.0, 5.0]], [[1.0] * 3] * 2])},
            ValueError,
            r"\[0, 1\]",
        ),
        ({"input_points": torch.zeros(2, 2)}, ValueError, r"\(batch, num_points >= 1, 3\)"),
        ({"input_points": torch.zeros(2, 0, 3)}, ValueError, "num_points >= 1"),
        ({"input_points": None}, ValueError, "input_points is required"),
        ({"input_points": torch.zeros(3, 1, 3)}, ValueError, "batch 3 but the image batch is 2"),
        ({"input_labels": torch.ones(2, 3, dtype=torch.long)}, ValueError, r"input_labels shape \(2, 3\) must match"),
        ({"input_labels": torch.tensor([[1, 2], [1, 1]])}, ValueError, r"1 \(positive\), 0 \(negative\) or -1"),
        ({"input_labels": torch.tensor([[1, 1], [-1, -1]])}, ValueError, r"rows \[1\] have none"),
        ({"pixel_values": None}, ValueError, "Give exactly one of pixel_values.*neither"),
        ({"labels": torch.zeros(2, 40, 24, 40, dtype=torch.long)}, ValueError, r"labels must have shape"),
        ({"labels": torch.zeros(2, 2, 40, 24, 44, dtype=torch.long)}, ValueError, r"got \(2, 2, 40, 24, 44\)"),
    ],
)
def test_bad_inputs_raise_clear_errors(tiny_model, tiny_inputs, change, error, match):
    with pytest.raises(error, match=match):
        tiny_model(**{**tiny_inputs, **change})


def test_both_pixel_values_and_embeddings_is_an_error(tiny_model, tiny_inputs):
    with torch.no_grad():
        embeddings = tiny_model.get_image_embeddings(tiny_inputs["pixel_values"])
    with pytest.raises(ValueError, match=r"exactly one.*both"):
        tiny_model(**tiny_inputs, image_embeddings=embeddings)
    with pytest.raises(TypeError, match="Sam3DImageEmbeddings"):
        tiny_model(image_embeddings=embeddings.feature_maps, input_points=tiny_inputs["input_points"])


def test_inference_mode_does_not_poison_later_training(tiny_model, tiny_inputs):
    with torch.inference_mode():
        tiny_model(**tiny_inputs)
    tiny_model.train()
    labels = (tiny_inputs["pixel_values"][:, 0] > 0.5).long()
    tiny_model(**tiny_inputs, labels=labels).loss.backward()
    assert tiny_model.vision_encoder.patch_embed.depth_weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- brute-force references (fast mutation catchers)


def reference_shifted_window_layer(layer, hidden):
    """One encoder block written out: explicit window loops over a grid that is padded, then read at the cyclically
    shifted positions `(r + shift) % S` (the roll, done by index arithmetic), per-pair relative positions and masks."""
    attn, window = layer.attn, layer.window
    shift = layer.shift or (0, 0, 0)
    x = layer.adapter(hidden) if layer.adapter is not None else hidden
    shortcut, grid = x, x.shape[1:4]
    normed = layer.layer_norm1(x)
    padded = [math.ceil(g / w) * w for g, w in zip(grid, window)]
    canvas = torch.zeros(x.shape[0], *padded, x.shape[-1], dtype=x.dtype)
    canvas[:, : grid[0], : grid[1], : grid[2]] = normed
    out = torch.zeros_like(canvas)
    tables = [
        torch.from_numpy(linear_resize(t.detach().double().numpy(), 2 * w - 1))
        for t, w in zip((attn.rel_pos_d, attn.rel_pos_h, attn.rel_pos_w), window)
    ]
    heads, head_dim = attn.num_heads, attn.head_dim
    for corner in np.ndindex(*[p // w for p, w in zip(padded, window)]):
        rolled = [[c * w + i for i in range(w)] for c, w in zip(corner, window)]  # positions in the rolled grid
        local = list(np.ndindex(*window))
        positions = [tuple(rolled[a][loc[a]] for a in range(3)) for loc in local]
        original = [tuple((p[a] + shift[a]) % padded[a] for a in range(3)) for p in positions]
        region = [
            tuple(0 if p[a] < padded[a] - window[a] else (1 if p[a] < padded[a] - shift[a] else 2) for a in range(3))
            for p in positions
        ]
        valid = torch.tensor([all(o[a] < grid[a] for a in range(3)) for o in original])
        mask = torch.tensor([[-100.0 * (ra != rb) for rb in region] for ra in region], dtype=x.dtype)
        mask = mask + torch.where(valid, 0.0, -100.0).to(x.dtype)[None, :]
        index = torch.tensor(original)
        tokens = canvas[:, index[:, 0], index[:, 1], index[:, 2]]  # (B, N, C)
        q, k, v = attn.qkv(tokens).reshape(x.shape[0], len(local), 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        loc = torch.tensor(local)
        bias = sum(
            torch.einsum("bhic,ijc->bhij", q, tables[a][loc[:, a][:, None] - loc[:, a][None, :] + window[a] - 1])
            for a in range(3)
        )
        logits = q @ k.transpose(-1, -2) * head_dim**-0.5 + attn.rel_pos_scale * bias + mask
        result = (logits.softmax(-1) @ v).transpose(1, 2).reshape(x.shape[0], len(local), -1)
        out[:, index[:, 0], index[:, 1], index[:, 2]] = attn.proj(result)
    x = shortcut + out[:, : grid[0], : grid[1], : grid[2]]
    return x + layer.mlp(layer.layer_norm2(x))


# float64 agreement: eager takes its softmax in float32, as transformers' eager attention does.
EXACT = {"sdpa": 1e-10, "eager": 1e-6}


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])  # the folded path and the dense reference
@pytest.mark.parametrize("index", [0, 1])  # block 0 is shifted, block 1 is not
def test_encoder_block_matches_explicit_window_loops(tiny_model, index, implementation):
    tiny_model.set_attn_implementation(implementation)
    layer = tiny_model.vision_encoder.layers[index].double()
    assert (layer.shift is not None) == (index == 0)
    hidden = torch.randn(2, 10, 6, 11, 48, dtype=torch.float64)  # padded to (16, 8, 16): padding on every axis
    with torch.no_grad():
        assert_close(layer(hidden), reference_shifted_window_layer(layer, hidden), rtol=EXACT[implementation])


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_anisotropic_windows_and_shifts_match_explicit_window_loops(implementation):
    # Every axis differs (window, shift, grid, padding), so a swapped axis or table anywhere changes the result.
    vision = {**TINY["vision_config"], "window_size": (4, 8, 2), "shift_size": (2, 4, 1), "image_size": (24, 40, 12)}
    model = randomize(Sam3DForPromptableSegmentation(Sam3DConfig(**{**TINY, "vision_config": vision}))).eval()
    model.set_attn_implementation(implementation)
    hidden = torch.randn(2, 6, 10, 3, 48, dtype=torch.float64)  # padded to (8, 16, 4)
    for index in (0, 1):
        layer = model.vision_encoder.layers[index].double()
        with torch.no_grad():
            assert_close(layer(hidden), reference_shifted_window_layer(layer, hidden), rtol=EXACT[implementation])


def sampled_point_embeddings(model, pixel_values, points):
    """The point embeddings the prompt encoder's first layer receives (the level-3 map sampled at the clicks)."""
    captured = {}

    def capture(module, args):
        captured["p"] = args[1]

    hook = model.prompt_encoder.layers[0].register_forward_pre_hook(capture)
    try:
        with torch.no_grad():
            model(pixel_values=pixel_values, input_points=points)
    finally:
        hook.remove()
    return captured["p"]


def test_point_sampler_reads_the_voxel_centre_trilinearly(tiny_model, monkeypatch):
    # A level-3 map whose channels 0, 1, 2 hold the feature-grid coordinate d, h, w of each cell: trilinear
    # interpolation of a linear function is exact, so the sample tells where on the grid the click was read.
    grid = tuple(s // 4 for s in PATCH)  # (10, 6, 11)
    coordinates = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in grid], indexing="ij"))
    encoding = torch.zeros(1, 32, *grid)
    encoding[0, :3] = coordinates
    real_forward = tiny_model.vision_encoder.forward

    def encoded(pixel_values, output_attentions=False):
        last, levels = real_forward(pixel_values, output_attentions)
        return last, (*levels[:3], encoding.expand(pixel_values.shape[0], -1, -1, -1, -1))

    monkeypatch.setattr(tiny_model.vision_encoder, "forward", encoded)
    points = torch.tensor([[[5.0, 9.0, 21.0], [17.5, 3.25, 30.0], [30.0, 20.0, 6.0]]])  # (z, y, x) patch voxels
    sampled = sampled_point_embeddings(tiny_model, torch.zeros(1, 1, *PATCH), points)[0, :, :3]
    # Voxel c of a patch axis covers [c, c + 1) in voxel units; its centre c + 0.5 lies at (c + 0.5) / 4 - 0.5 on
    # the stride-4 feature grid whose cell k is centred on voxel 4k + 1.5.
    expected = (points[0] + 0.5) / 4 - 0.5
    torch.testing.assert_close(sampled, expected, atol=1e-5, rtol=0)


def reference_logits(model, embeddings, prompted_level, pixel_values, stride=4):
    """The mask decoder unsplit, as docs/design.md states it: all four level heads upsampled x2 (align_corners=True),
    the image channel averaged over 2x2x2 voxels (= trilinear x0.5 with align_corners=False), 513 channels through the
    whole `fuse` stack, x2 upsampling. At token stride 8 (the official 256³ prompt-free model): the image channel at
    1/4 (trilinear x0.25 reads the mean of voxels 4k+1 and 4k+2 of each axis) and x4 upsampling at the end."""
    decoder = model.mask_decoder
    levels = [*embeddings.feature_maps[:3], prompted_level]
    heads = [
        F.interpolate(decoder.heads[k](level), scale_factor=2, mode="trilinear", align_corners=True)
        for k, level in enumerate(levels)
    ]
    b, c, d, h, w = pixel_values.shape
    if stride == 4:
        image = pixel_values.reshape(b, c, d // 2, 2, h // 2, 2, w // 2, 2).mean(dim=(3, 5, 7))
    else:
        middle = pixel_values.reshape(b, c, d // 4, 4, h // 4, 4, w // 4, 4)[:, :, :, 1:3, :, 1:3, :, 1:3]
        image = middle.mean(dim=(3, 5, 7))
    fused = decoder.fuse(torch.cat([*heads, image], dim=1))
    return F.interpolate(fused, scale_factor=stride // 2, mode="trilinear", align_corners=True)


def test_cached_embeddings_equal_the_unsplit_decoder(tiny_model, tiny_inputs):
    captured = {}

    def capture(module, args, output):
        captured["level3"] = output

    hook = tiny_model.prompt_encoder.register_forward_hook(capture)
    try:
        with torch.no_grad():
            embeddings = tiny_model.get_image_embeddings(tiny_inputs["pixel_values"])
            cached = tiny_model(
                image_embeddings=embeddings,
                input_points=tiny_inputs["input_points"],
                input_labels=tiny_inputs["input_labels"],
            ).logits
            expected = reference_logits(tiny_model, embeddings, captured["level3"], tiny_inputs["pixel_values"])
    finally:
        hook.remove()
    assert_close(cached, expected)


@pytest.mark.parametrize("stride", [4, 8])
def test_prompt_free_model_decodes_the_last_level_unchanged(stride):
    """use_prompt_encoder=False (train_auto.py): no prompt encoder; the decoder takes level 3 as the encoder gives it;
    at token stride 8 the output still has the input's size. Clicks are refused."""
    size = (32, 48, 40) if stride == 8 else PATCH
    config = Sam3DConfig.from_preset("tiny", vision_config={"token_stride": stride, "image_size": size},
                                     use_prompt_encoder=False)  # fmt: skip
    model = randomize(Sam3DForPromptableSegmentation(config)).eval()
    assert not hasattr(model, "prompt_encoder") and not any(n.startswith("prompt") for n, _ in model.named_parameters())
    pixel_values = torch.randn(2, 1, *size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(pixel_values=pixel_values, labels=torch.zeros(2, *size, dtype=torch.long))
        embeddings = model.get_image_embeddings(pixel_values)
        expected = reference_logits(model, embeddings, embeddings.feature_maps[3], pixel_values, stride)
        cached = model(image_embeddings=embeddings).logits
    assert out.logits.shape == (2, 2, *size) and out.loss is not None
    assert_close(out.logits, expected)
    assert torch.equal(cached, out.logits)
    with pytest.raises(ValueError, match=r"prompt-free .* takes no clicks"):
        model(pixel_values=pixel_values, input_points=torch.zeros(2, 1, 3))


def test_prompt_free_model_saves_and_reloads(tmp_path):
    config = Sam3DConfig.from_preset("tiny", vision_config={"image_size": PATCH}, use_prompt_encoder=False)
    model = randomize(Sam3DForPromptableSegmentation(config)).eval()
    model.save_pretrained(tmp_path)
    loaded = Sam3DForPromptableSegmentation.from_pretrained(tmp_path).eval()
    assert loaded.config.use_prompt_encoder is False
    pixel_values = torch.randn(1, 1, *PATCH)
    with torch.no_grad():
        assert torch.equal(loaded(pixel_values=pixel_values).logits, model(pixel_values=pixel_values).logits)


# ---------------------------------------------------------------- input validation (issue 8)


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (
            {"input_label": torch.ones(2, 2)},
            TypeError,
            r"unexpected keyword arguments \['input_label'\].*patch_origins",
        ),
        ({"pixel_values": torch.full((2, 1, *PATCH), float("nan"))}, ValueError, r"pixel_values holds \d+ NaN and 0"),
        ({"pixel_values": torch.full((2, 1, *PATCH), float("inf"))}, ValueError, r"holds 0 NaN and \d+ infinite"),
        (
            {"input_points": torch.tensor([[[3.0, float("nan"), 5.0]] * 2, [[1.0, 1.0, 1.0]] * 2])},
            ValueError,
            "input_points holds NaN or infinite",
        ),
        (
            {"labels": torch.randint(0, 3, (2, *PATCH), generator=torch.Generator().manual_seed(0))},
            ValueError,
            r"labels must be 0/1 .*found values \[0, 1, 2\]; binarise with labels == target_label",
        ),
        ({"labels": torch.full((2, *PATCH), 0.5)}, ValueError, r"found values \[0.5\]"),
        ({"labels": np.zeros((2, *PATCH))}, TypeError, "labels must be a torch.Tensor"),
        ({"input_labels": [[1, 1], [1, 1]]}, TypeError, "input_labels must be a torch.Tensor"),
    ],
)
def test_validation_errors(tiny_model, tiny_inputs, change, error, match):
    with pytest.raises(error, match=match):
        tiny_model(**{**tiny_inputs, **change})


def test_processor_geometry_keys_are_accepted_and_ignored(tiny_model, tiny_inputs):
    geometry = {key: torch.zeros(1) for key in modeling.PROCESSOR_GEOMETRY_KEYS}
    assert torch.equal(logits_of(tiny_model, **tiny_inputs, **geometry), logits_of(tiny_model, **tiny_inputs))


def test_binary_labels_of_any_dtype_give_the_same_loss(tiny_model, tiny_inputs):
    labels = tiny_inputs["pixel_values"][:, 0] > 0.5
    with torch.no_grad():
        losses = [tiny_model(**tiny_inputs, labels=labels.to(dtype)).loss for dtype in (torch.long, torch.bool)]
        losses.append(tiny_model(**tiny_inputs, labels=labels.float()).loss)  # exactly 0/1 floats are accepted
    assert losses[0] > 0 and losses[0] == losses[1] == losses[2]


def test_float64_and_integer_pixel_values_are_cast_to_the_model_dtype(tiny_model, tiny_inputs):
    rounded = tiny_inputs["pixel_values"].round()
    expected = logits_of(tiny_model, **{**tiny_inputs, "pixel_values": rounded})
    for dtype in (torch.float64, torch.int16):
        logits = logits_of(tiny_model, **{**tiny_inputs, "pixel_values": rounded.to(dtype)})
        assert logits.dtype == torch.float32
        assert torch.equal(logits, expected)


def test_validate_inputs_is_public_and_does_not_run_the_model(tiny_model, tiny_inputs):
    tiny_model.validate_inputs(**tiny_inputs)  # valid: no error
    with pytest.raises(ValueError, match="outside the patch"):
        tiny_model.validate_inputs(**{**tiny_inputs, "input_points": torch.full((2, 2, 3), 99.0)})


# ---------------------------------------------------------------- transformers conventions (issue 9)


def test_docstring_examples_run_and_show_what_they_print():
    # The ```python examples of the model and config docstrings, run as doctests (fences stripped).
    parser = doctest.DocTestParser()
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    report, examples = [], 0
    for module in (modeling, configuration):
        for docstring in doctest.DocTestFinder().find(module):
            for block in re.findall(r"```python\n(.*?)^\s*```", docstring.docstring or "", flags=re.S | re.M):
                test = parser.get_doctest(textwrap.dedent(block), {}, docstring.name, module.__file__, 0)
                examples += len(test.examples)
                runner.run(test, out=report.append)
    assert examples >= 16 and runner.failures == 0, "".join(report)


def test_fullgraph_compile_matches_eager(tiny_model, tiny_inputs):
    # The value checks are skipped while dynamo traces, so the whole forward is one graph. The "eager" backend checks
    # exactly that (graph breaks are a tracing matter) without the minutes an inductor compilation takes on a CPU
    # runner (about 4 with a cold cache on the 2-core test machine); benchmarks/benchmark_compile.py runs inductor.
    inputs = {key: value[:1] for key, value in tiny_inputs.items()}
    torch._dynamo.reset()
    compiled = torch.compile(tiny_model, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert_close(compiled(**inputs).logits, tiny_model(**inputs).logits)
    torch._dynamo.reset()


def test_hidden_states_are_the_encoder_blocks_tokens(tiny_model, tiny_inputs):
    with torch.no_grad():
        out = tiny_model(**tiny_inputs, output_hidden_states=True)
        encoder = tiny_model.vision_encoder
        tokens = encoder.patch_embed(tiny_inputs["pixel_values"])
        expected = [tokens + encoder.position_embeddings(tokens.shape[1:4])]
        for layer in encoder.layers:
            expected.append(layer(expected[-1]))
    assert len(out.hidden_states) == 5 and out.attentions is None
    for actual, reference in zip(out.hidden_states, expected, strict=True):
        assert actual.shape == (2, 10, 6, 11, 48)
        assert torch.equal(actual, reference)
    assert tiny_model(**tiny_inputs).hidden_states is None  # only when asked


def test_attentions_are_the_window_softmax_of_every_block(tiny_model, tiny_inputs):
    tiny_model.set_attn_implementation("eager")
    captured = []
    real_eager = modeling.eager_attention_forward

    def spy(*args, **kwargs):
        output, weights = real_eager(*args, **kwargs)
        captured.append(weights)
        return output, weights

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(modeling, "eager_attention_forward", spy)
        out = tiny_model(**tiny_inputs, output_attentions=True)
    # (10, 6, 11) tokens padded to (16, 8, 16): 4 windows of 512 tokens per image, 2 images, 2 heads
    assert len(out.attentions) == 4
    for weights in out.attentions:
        assert weights.shape == (8, 2, 512, 512)
        torch.testing.assert_close(weights.sum(-1), torch.ones(8, 2, 512))
    window_weights = [w for w in captured if w.shape[-1] == 512]
    assert len(window_weights) == 4 and all(a is b for a, b in zip(out.attentions, window_weights, strict=True))


def test_set_attn_implementation_switches_every_config_without_warning(tiny_model):
    # transformers' loggers do not propagate to the root logger (pytest's caplog never sees them): capture its own.
    configs = [tiny_model.config, *(getattr(tiny_model.config, key) for key in tiny_model.config.sub_configs)]
    for implementation in ("eager", "sdpa"):
        with CaptureLogger(transformers_logging.get_logger("transformers")) as captured:
            tiny_model.set_attn_implementation(implementation)
        assert [c._attn_implementation for c in configs] == [implementation] * 4
        assert captured.out == ""


def test_attn_implementation_at_load_reaches_every_module(tiny_model, tiny_inputs, tmp_path):
    tiny_model.save_pretrained(tmp_path)
    sdpa = logits_of(tiny_model, **tiny_inputs)
    model = Sam3DForPromptableSegmentation.from_pretrained(tmp_path, attn_implementation="eager").eval()
    configs = [model.config, model.config.vision_config, model.config.prompt_encoder_config]
    assert [c._attn_implementation for c in configs] == ["eager"] * 3
    assert_close(logits_of(model, **tiny_inputs), sdpa)


def test_input_embeddings_and_loss_follow_transformers(tiny_model):
    from transformers import PreTrainedModel

    assert tiny_model.get_input_embeddings() is tiny_model.vision_encoder.patch_embed
    assert "loss_function" not in Sam3DForPromptableSegmentation.__dict__  # PreTrainedModel's registry is not shadowed
    assert Sam3DForPromptableSegmentation.loss_function is PreTrainedModel.loss_function


def test_reentrant_checkpointing_with_frozen_embedding_trains_via_input_require_grads(tiny_model, tiny_inputs):
    # peft's pattern: frozen patch embedding, reentrant checkpointing; without input gradients nothing flows back.
    tiny_model.train()
    for parameter in tiny_model.vision_encoder.patch_embed.parameters():
        parameter.requires_grad_(False)
    tiny_model.vision_encoder.pos_embed.requires_grad_(False)
    tiny_model.vision_encoder.depth_embed.requires_grad_(False)
    tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    tiny_model.enable_input_require_grads()
    labels = (tiny_inputs["pixel_values"][:, 0] > 0.5).long()
    tiny_model(**tiny_inputs, labels=labels).loss.backward()
    grad = tiny_model.vision_encoder.layers[0].attn.qkv.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_vision_model_gives_the_full_models_features(tiny_model, tiny_inputs, tmp_path):
    from sam3d_hf import Sam3DVisionConfig, Sam3DVisionModel

    # A full checkpoint's `vision_encoder.*` weights are the vision model's own keys.
    tiny_model.save_pretrained(tmp_path)
    vision = Sam3DVisionModel.from_pretrained(tmp_path, config=tiny_model.config.vision_config).eval()
    with torch.no_grad():
        out = vision(tiny_inputs["pixel_values"], output_hidden_states=True)
        embeddings = tiny_model.get_image_embeddings(tiny_inputs["pixel_values"])
    assert out.last_hidden_state.shape == (2, 10, 6, 11, 48) and len(out.hidden_states) == 5
    assert torch.equal(out.last_hidden_state, out.hidden_states[-1])
    for ours, theirs in zip(out.feature_maps, embeddings.feature_maps, strict=True):
        assert torch.equal(ours, theirs)
    assert isinstance(AutoModel.from_config(Sam3DVisionConfig(**TINY["vision_config"])), Sam3DVisionModel)
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['input_points'\]"):
        vision(tiny_inputs["pixel_values"], input_points=tiny_inputs["input_points"])
