"""Sam3DForPromptableSegmentation: every code path on a tiny config, against independent reference computations."""

import json
import math
import os
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


def test_attention_chunking_does_not_change_results(tiny_config, tiny_inputs):
    model = randomize(Sam3DForPromptableSegmentation(tiny_config)).eval()
    chunked = logits_of(model, **tiny_inputs)
    model.config.vision_config.attention_chunk_size = 1000
    assert_close(logits_of(model, **tiny_inputs), chunked)


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


# ---------------------------------------------------------------- patch embedding and position tables


def official_patch_embedding(embed, pixel_values):
    """The official path: trilinear x4 upsampling, SAM's 16x16/16 kernel per slice, 16-tap stride-16 depth filter."""
    up = F.interpolate(pixel_values, scale_factor=4, mode="trilinear", align_corners=False)
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


# ---------------------------------------------------------------- parameter counts (ARCHITECTURE.md)


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
