"""Weight conversion: SAM 2D -> 3D initialisation, official snapshots -> from_pretrained folders, and their errors."""

import argparse
import importlib
import json
import os
import re
import stat
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from conftest import PATCH, TINY, randomize
from transformers import SamConfig, SamMaskDecoderConfig, SamModel, SamPromptEncoderConfig, SamVisionConfig

import sam3d_hf.convert_sam3d as convert
from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation, Sam3DProcessor, files
from sam3d_hf.cli import main

# ---------------------------------------------------------------- helpers


def targets_of(lines: list[str]) -> list[str]:
    return [line.rsplit(" -> ", 1)[1] for line in lines]


def assert_fully_accounted(report, source_keys, model):
    """Every target tensor is copied, transformed or initialised (exactly one); every source tensor is used by a
    target or ignored (exactly one)."""
    copied, transformed = targets_of(report.copied), targets_of(report.transformed)
    buckets = copied + transformed + list(report.initialized)
    assert len(buckets) == len(set(buckets)), "a target tensor is in two buckets"
    assert set(buckets) == set(model.state_dict())
    assert set(report.sources) == set(copied + transformed)
    used = report.used_sources()
    assert not used & set(report.ignored), "a source tensor is both used and ignored"
    assert used | set(report.ignored) == set(source_keys)


def is_new_in_3d(key: str) -> bool:
    """Model tensors that SAM does not provide (docs/design.md "Initialisation from SAM and what is trained")."""
    new = ("adapter.", "necks.", "prompt_encoder.", "mask_decoder.", "depth_weight", "depth_bias", "depth_embed")
    return key.startswith(new) or any(part in key for part in new) or key.endswith("rel_pos_scale")


def logits_of(model, inputs):
    # no_grad, not inference_mode: modeling_sam3d caches its float64 interpolation matrix, and a copy created in
    # inference mode cannot be used by later autograd (float64) computations in the same process.
    with torch.no_grad():
        return model(**inputs).logits


# Tiny transformers SamModel whose vision part matches conftest.TINY (width 48, 4 blocks, 2 heads, SAM windows of 4,
# global blocks 1 and 3, 256-pixel SAM input -> 16x16 position table).
TINY_SAM = SamConfig(
    vision_config=SamVisionConfig(
        hidden_size=48,
        num_hidden_layers=4,
        num_attention_heads=2,
        mlp_dim=96,
        image_size=256,
        global_attn_indexes=[1, 3],
        window_size=4,
        output_channels=32,
        num_pos_feats=16,
    ),
    prompt_encoder_config=SamPromptEncoderConfig(hidden_size=32, image_size=256, patch_size=16),
    mask_decoder_config=SamMaskDecoderConfig(hidden_size=32),
)


@pytest.fixture(scope="module")
def tiny_sam_folder(tmp_path_factory):
    """A random tiny transformers SamModel saved with save_pretrained (random values everywhere: SAM initialises
    its position and relative-position tables to zeros, which would make bit-identity checks vacuous)."""
    torch.manual_seed(0)
    model = randomize(SamModel(TINY_SAM), seed=3)
    folder = tmp_path_factory.mktemp("tiny_sam")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_sam_state_dict(tiny_sam_folder):
    return safetensors.torch.load_file(tiny_sam_folder / "model.safetensors")


# ---------------------------------------------------------------- segment_anything (Meta's original code)


@pytest.fixture(scope="module")
def sam_model_registry():
    """`segment_anything.sam_model_registry`; its package imports torchvision (for the predictor's resizing and the
    automatic mask generator's NMS), which is not a dependency here: stub those two modules if it is absent."""
    import datasets  # noqa: F401  (at import it asks importlib whether torchvision exists: before the stub, not under it)

    with pytest.MonkeyPatch.context() as patch:
        try:
            import torchvision  # noqa: F401
        except ImportError:

            def unavailable(*args, **kwargs):
                raise RuntimeError("torchvision stub: not available in this test")

            stubs = {
                "torchvision": {},
                "torchvision.transforms": {},
                "torchvision.transforms.functional": {"resize": unavailable, "to_pil_image": unavailable},
                "torchvision.ops": {},
                "torchvision.ops.boxes": {"batched_nms": unavailable, "box_area": unavailable},
            }
            for name, attributes in stubs.items():
                module = types.ModuleType(name)
                module.__dict__.update(attributes)
                patch.setitem(sys.modules, name, module)
        from segment_anything import sam_model_registry

        yield sam_model_registry


@pytest.fixture(scope="module")
def sam_vit_b(sam_model_registry, tmp_path_factory):
    """A random-weight segment_anything ViT-B checkpoint file (`sam_vit_b_01ec64.pth` layout) and its tensors."""
    torch.manual_seed(0)
    state_dict = sam_model_registry["vit_b"]().state_dict()
    generator = torch.Generator().manual_seed(1)
    state_dict = {key: torch.randn(value.shape, generator=generator) for key, value in state_dict.items()}
    path = tmp_path_factory.mktemp("sam") / "sam_vit_b_random.pth"
    torch.save(state_dict, path)
    return path, state_dict


def test_segment_anything_vit_b_converts_exactly(sam_vit_b):
    path, source = sam_vit_b
    model, report = convert.load_sam_checkpoint(path)
    assert report.details["source format"] == "segment_anything"
    assert report.details["detected size"] == "vit_b"
    assert model.config.vision_config.hidden_size == 768 and model.config.vision_config.num_hidden_layers == 12
    assert_fully_accounted(report, source, model)
    # Only SAM's neck, prompt encoder and mask decoder are left out.
    unused = {key for key in source if key.startswith(("image_encoder.neck.", "prompt_encoder.", "mask_decoder."))}
    assert set(report.ignored) == unused and len(unused) > 100
    # Everything the 3D model adds is freshly initialised, and nothing else.
    state = model.state_dict()
    assert set(report.initialized) == {key for key in state if is_new_in_3d(key)}

    # Inherited tensors are bit-identical; the three inflated ones follow docs/design.md exactly.
    def same(target, source_key):
        assert torch.equal(state[target], source[source_key]), target

    same("vision_encoder.pos_embed", "image_encoder.pos_embed")
    same("vision_encoder.patch_embed.projection_bias", "image_encoder.patch_embed.proj.bias")
    kernel = source["image_encoder.patch_embed.proj.weight"]
    assert kernel.shape == (768, 3, 16, 16)
    assert torch.equal(state["vision_encoder.patch_embed.projection_weight"], kernel.sum(1, keepdim=True))
    for i in range(12):
        ours, sam = f"vision_encoder.layers.{i}.", f"image_encoder.blocks.{i}."
        for a, b in [("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("attn.qkv", "attn.qkv")]:
            same(f"{ours}{a}.weight", f"{sam}{b}.weight")
            same(f"{ours}{a}.bias", f"{sam}{b}.bias")
        for name in ("attn.proj.weight", "attn.proj.bias", "mlp.lin1.weight", "mlp.lin1.bias", "mlp.lin2.weight"):
            same(ours + name, sam + name)
        same(ours + "attn.rel_pos_h", sam + "attn.rel_pos_h")
        same(ours + "attn.rel_pos_w", sam + "attn.rel_pos_w")
        expected_d = 0.5 * (source[sam + "attn.rel_pos_h"] + source[sam + "attn.rel_pos_w"])
        assert torch.equal(state[ours + "attn.rel_pos_d"], expected_d)
        assert state[ours + "attn.rel_pos_d"].shape == ((127, 64) if i in (2, 5, 8, 11) else (27, 64))
        assert state[ours + "attn.rel_pos_scale"].item() == 1.0
    assert torch.count_nonzero(state["vision_encoder.depth_embed"]) == 0
    # And every tensor the report calls copied is the source tensor, bit for bit (170 of them at ViT-B).
    copied = [line.split(" -> ") for line in report.copied]
    assert len(copied) == 2 + 12 * 14  # pos_embed, patch bias; per block 2 norms, qkv, proj, mlp (w+b), rel_pos_h/w
    for source_key, target in copied:
        assert torch.equal(state[target], source[source_key]), target
    summary = report.summary()
    assert "12 x rel_pos_d = 0.5 * (rel_pos_h + rel_pos_w)" in summary and "1 x sum over RGB" in summary


@pytest.mark.parametrize("size", ["vit_b", "vit_l", "vit_h"])
def test_sam_size_is_detected_from_the_tensors(sam_model_registry, size):
    """Each SAM size is recognised from its tensors' shapes alone (built on the meta device: no 2.5 GB ViT-H), and
    the preset it maps to has SAM's own widths, depths and global blocks."""
    with torch.device("meta"):
        source = sam_model_registry[size]().state_dict()
    fmt = convert._sam_format(source)
    assert fmt == "segment_anything"
    tensors = {}
    for key, tensor in source.items():
        for pattern, template, transform in convert._SAM_RULES[fmt]:
            match = re.fullmatch(pattern, key)
            if match:
                tensors[match.expand(template)] = convert._TRANSFORMS[transform](tensor)
                break
    architecture = convert._sam_architecture(tensors)
    expected = {"vit_b": (768, 12, 12, [2, 5, 8, 11]), "vit_l": (1024, 24, 16, [5, 11, 17, 23])}
    expected["vit_h"] = (1280, 32, 16, [7, 15, 23, 31])
    found = tuple(architecture[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads"))
    assert (*found, architecture["global_attn_indexes"]) == expected[size]
    assert architecture["sam_window_size"] == 14 and architecture["sam_image_size"] == 1024
    assert convert._sam_preset(architecture) == size


def test_from_sam_pretrained_overrides_the_preset(sam_vit_b):
    path, source = sam_vit_b
    model = Sam3DForPromptableSegmentation.from_sam_pretrained(
        path, vision_config={"image_size": (64, 128, 96)}, mask_decoder_config={"hidden_size": 64}
    )
    assert model.config.vision_config.image_size == (64, 128, 96)
    assert model.mask_decoder.heads[0][0].out_channels == 64
    assert torch.equal(model.vision_encoder.layers[7].mlp.lin2.bias, source["image_encoder.blocks.7.mlp.lin2.bias"])


# ---------------------------------------------------------------- transformers SamModel


def test_transformers_sam_folder_converts_exactly(tiny_sam_folder, tiny_sam_state_dict):
    source = tiny_sam_state_dict
    model, report = convert.load_sam_checkpoint(tiny_sam_folder, config=Sam3DConfig(**TINY))
    assert report.details["source format"] == "transformers"
    assert_fully_accounted(report, source, model)
    unused = ("vision_encoder.neck.", "prompt_encoder.", "mask_decoder.", "shared_image_embedding.")
    assert set(report.ignored) == {key for key in source if key.startswith(unused)}
    state = model.state_dict()
    assert set(report.initialized) == {key for key in state if is_new_in_3d(key)}
    for key, value in source.items():
        if key.startswith("vision_encoder.") and ".neck." not in key and "patch_embed" not in key:
            assert torch.equal(state[key], value), key  # same names in transformers' layout
    kernel = source["vision_encoder.patch_embed.projection.weight"]
    assert torch.equal(state["vision_encoder.patch_embed.projection_weight"], kernel.sum(1, keepdim=True))
    assert torch.equal(
        state["vision_encoder.patch_embed.projection_bias"], source["vision_encoder.patch_embed.projection.bias"]
    )
    for i in range(4):
        attn = f"vision_encoder.layers.{i}.attn."
        assert torch.equal(state[attn + "rel_pos_d"], (source[attn + "rel_pos_h"] + source[attn + "rel_pos_w"]) / 2)


def test_single_safetensors_file_and_classmethod_agree(tiny_sam_folder, tiny_inputs):
    torch.manual_seed(5)
    from_folder = Sam3DForPromptableSegmentation.from_sam_pretrained(tiny_sam_folder, config=Sam3DConfig(**TINY))
    torch.manual_seed(5)
    from_file, _ = convert.load_sam_checkpoint(tiny_sam_folder / "model.safetensors", config=Sam3DConfig(**TINY))
    for (key, a), b in zip(from_folder.state_dict().items(), from_file.state_dict().values(), strict=True):
        assert torch.equal(a, b), key  # same seed: even the fresh parts agree
    logits = logits_of(from_folder, tiny_inputs)
    assert logits.shape == (2, 2, *PATCH) and torch.isfinite(logits).all()


def test_both_key_styles_give_the_same_model(tiny_sam_state_dict):
    """The transformers layout renamed to segment_anything's converts to the same tensors."""
    renames = [
        (r"vision_encoder\.layers\.(\d+)\.layer_norm([12])\.", r"image_encoder.blocks.\1.norm\2."),
        (r"vision_encoder\.layers\.", "image_encoder.blocks."),
        (r"vision_encoder\.patch_embed\.projection\.", "image_encoder.patch_embed.proj."),
        (r"vision_encoder\.neck\.conv1\.", "image_encoder.neck.0."),
        (r"vision_encoder\.neck\.layer_norm1\.", "image_encoder.neck.1."),
        (r"vision_encoder\.neck\.conv2\.", "image_encoder.neck.2."),
        (r"vision_encoder\.neck\.layer_norm2\.", "image_encoder.neck.3."),
        (r"vision_encoder\.pos_embed", "image_encoder.pos_embed"),
    ]
    original = {}
    for key, value in tiny_sam_state_dict.items():
        if key.startswith("vision_encoder."):
            for pattern, replacement in renames:
                key = re.sub(pattern, replacement, key, count=1) if re.match(pattern, key) else key
            original[key] = value
    assert all(key.startswith("image_encoder.") for key in original)
    a, report_a = convert.convert_sam_state_dict(tiny_sam_state_dict, config=Sam3DConfig(**TINY))
    b, report_b = convert.convert_sam_state_dict(original, config=Sam3DConfig(**TINY))
    assert report_b.details["source format"] == "segment_anything"
    assert set(report_a.sources) == set(report_b.sources)
    for target in report_a.sources:
        assert torch.equal(a.state_dict()[target], b.state_dict()[target]), target


def test_summed_kernel_equals_three_identical_channels(tiny_sam_folder, tiny_sam_state_dict):
    """The official code feeds the CT channel 3 times to SAM's RGB kernel; the converted 1-channel model must give
    the same tokens (up to float rounding) through its folded patch embedding."""
    model, _ = convert.load_sam_checkpoint(tiny_sam_folder, config=Sam3DConfig(**TINY))
    embed = model.vision_encoder.patch_embed.double()
    pixel_values = torch.randn(1, 1, 8, 12, 16, dtype=torch.float64)
    rgb = tiny_sam_state_dict["vision_encoder.patch_embed.projection.weight"].double()
    bias = tiny_sam_state_dict["vision_encoder.patch_embed.projection.bias"].double()
    up = F.interpolate(pixel_values, scale_factor=4, mode="trilinear", align_corners=False)  # (1, 1, 32, 48, 64)
    slices = up[0].permute(1, 0, 2, 3).repeat(1, 3, 1, 1)  # (32 slices, 3 identical channels, 48, 64)
    planes = F.conv2d(slices, rgb, bias, stride=16).permute(1, 0, 2, 3)[None]  # (1, 48, 32, 3, 4)
    depth = embed.depth_weight[:, None, :, None, None]
    reference = F.conv3d(planes, depth, embed.depth_bias, stride=(16, 1, 1), groups=48).permute(0, 2, 3, 4, 1)
    tokens = embed(pixel_values)
    assert tokens.shape == (1, 2, 3, 4, 48) == reference.shape
    # float32 rounding of the summed kernel (~1e-7 relative); a mean, transposed kernel or dropped channel gives O(1)
    assert (tokens - reference).abs().max() < 1e-6 * reference.abs().max()


# ---------------------------------------------------------------- SAM errors


def test_sam_errors(tiny_sam_folder, tiny_sam_state_dict, tmp_path):
    tiny = Sam3DConfig(**TINY)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"could not read .*notes.pth.* as a tensor-only PyTorch checkpoint"):
        convert.load_sam_checkpoint(text)
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x00" * 32)
    with pytest.raises(ValueError, match=r"could not read .*broken.safetensors.* as safetensors"):
        convert.load_sam_checkpoint(bad)
    pickled = tmp_path / "object.pth"
    torch.save(argparse.Namespace(weights=torch.ones(2)), pickled)  # weights_only refuses arbitrary objects
    with pytest.raises(ValueError, match="weights_only=True"):
        convert.load_sam_checkpoint(pickled)
    unrelated = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.ones(4, 3, 7, 7), "fc.bias": torch.ones(10)}, unrelated)
    with pytest.raises(ValueError, match=r"does not look like a SAM checkpoint .*conv1\.weight.*image_encoder"):
        convert.load_sam_checkpoint(unrelated)
    with pytest.raises(ValueError, match=r"not SAM ViT-B/L/H \(found .*'hidden_size': 48.*--config"):
        convert.load_sam_checkpoint(tiny_sam_folder)
    with pytest.raises(
        ValueError, match=r"does not match the SAM checkpoint .*hidden_size: config 768 vs checkpoint 48"
    ):
        convert.load_sam_checkpoint(tiny_sam_folder, config=Sam3DConfig.from_sam_preset("vit_b"))
    with pytest.raises(ValueError, match="either a config or config overrides"):
        convert.load_sam_checkpoint(tiny_sam_folder, config=tiny, vision_config={"image_size": 64})
    with pytest.raises(TypeError, match="config must be a Sam3DConfig"):
        convert.convert_sam_state_dict(tiny_sam_state_dict, config=TINY)
    extra = dict(tiny_sam_state_dict, **{"vision_encoder.layers.0.attn.lora_A": torch.ones(2)})
    with pytest.raises(ValueError, match=r"not part of SAM, e\.g\. \['vision_encoder\.layers\.0\.attn\.lora_A"):
        convert.convert_sam_state_dict(extra, config=tiny)
    with pytest.raises(TypeError, match="is a str, expected a tensor"):
        convert.convert_sam_state_dict({**tiny_sam_state_dict, "vision_encoder.pos_embed": "x"}, config=tiny)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"holds no model.safetensors"):
        convert.load_sam_checkpoint(tmp_path / "empty", config=tiny)
    with pytest.raises(ValueError, match="neither a local file or folder nor a Hub repo id"):
        convert.load_sam_checkpoint(tmp_path / "missing" / "sam_vit_b.pth")


def test_sam_loader_points_to_the_right_tool(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "sam3d")
    with pytest.raises(ValueError, match=r"already a sam3d checkpoint: load it with .*from_pretrained"):
        convert.load_sam_checkpoint(tmp_path / "sam3d")
    snapshot = tmp_path / "official.pth.tar"
    torch.save({"encoder_dict": {}, "feature_dict": [], "decoder_dict": {}}, snapshot)
    with pytest.raises(ValueError, match="official 3DSAM-adapter snapshot: use `sam3d convert official`"):
        convert.load_sam_checkpoint(snapshot)


# ---------------------------------------------------------------- official 3DSAM-adapter snapshots

OFFICIAL_TINY = {**TINY, "prompt_encoder_config": {**TINY["prompt_encoder_config"], "num_attention_heads": 8}}


def official_tensors(config: Sam3DConfig, seed: int = 0) -> tuple[dict, dict, dict]:
    """Random `encoder_dict`, `feature_dict[3]` and `decoder_dict` in the official layout (docs/design.md "Official
    checkpoint layout"; 3D kernels `(out, in, kH, kW, kD)`), including the tensors the importer must drop."""
    vision, prompt, decoder = config.vision_config, config.prompt_encoder_config, config.mask_decoder_config
    c, p, a, o = vision.hidden_size, vision.patch_size, vision.adapter_dim, vision.output_channels
    shapes = {
        "pos_embed": (1, vision.pos_embed_size, vision.pos_embed_size, c),
        "depth_embed": (1, vision.depth_embed_size, c),
        "patch_embed.proj.weight": (c, 3, p, p),
        "patch_embed.proj.bias": (c,),
        "slice_embed.weight": (c, 1, 1, 1, p),
        "slice_embed.bias": (c,),
    }
    for i in range(vision.num_hidden_layers):
        b = f"blocks.{i}."
        rows = vision.rel_pos_size(i)
        shapes.update({b + f"norm{n}.{w}": (c,) for n in (1, 2) for w in ("weight", "bias")})
        shapes.update({b + "attn.qkv.weight": (3 * c, c), b + "attn.qkv.bias": (3 * c,)})
        shapes.update({b + "attn.proj.weight": (c, c), b + "attn.proj.bias": (c,), b + "attn.lr": ()})
        shapes.update({b + f"attn.rel_pos_{axis}": (rows, vision.head_dim) for axis in "hwd"})
        shapes.update({b + "mlp.lin1.weight": (vision.mlp_dim, c), b + "mlp.lin1.bias": (vision.mlp_dim,)})
        shapes.update({b + "mlp.lin2.weight": (c, vision.mlp_dim), b + "mlp.lin2.bias": (c,)})
        shapes.update({b + "adapter.linear1.weight": (a, c), b + "adapter.linear1.bias": (a,)})
        shapes.update({b + "adapter.conv.weight": (a, 1, 3, 3, 3), b + "adapter.conv.bias": (a,)})
        shapes.update({b + "adapter.linear2.weight": (c, a), b + "adapter.linear2.bias": (c,)})
        if i % 2 == 0:
            shapes[b + "attn_mask"] = (8, 512, 512)  # a buffer of the shifted blocks: must be dropped, not imported
    for k in range(4):
        shapes.update({f"neck_3d.{k}.0.weight": (o, c, 1, 1, 1), f"neck_3d.{k}.2.weight": (o, o, 3, 3, 3)})
        shapes.update({f"neck_3d.{k}.{n}.{w}": (o,) for n in (1, 3) for w in ("weight", "bias")})
    h, inner, m = prompt.hidden_size, prompt.hidden_size // prompt.attention_downsample_rate, prompt.mlp_dim
    prompt_shapes = {"positional_encoding_gaussian_matrix": (3, 128)}
    for layer in range(prompt.num_hidden_layers):
        t = f"transformer.layers.{layer}."
        prompt_shapes[t + "global_query"] = (1, prompt.num_global_queries, h)
        for name, width in (
            ("self_attn", h),
            ("cross_attn_image_to_token", inner),
            ("cross_attn_token_to_image", inner),
        ):
            for proj in ("q_proj", "k_proj", "v_proj"):
                prompt_shapes.update({f"{t}{name}.{proj}.weight": (width, h), f"{t}{name}.{proj}.bias": (width,)})
            prompt_shapes.update({f"{t}{name}.out_proj.weight": (h, width), f"{t}{name}.out_proj.bias": (h,)})
        prompt_shapes.update({t + f"norm{n}.{w}": (h,) for n in range(1, 5) for w in ("weight", "bias")})
        prompt_shapes.update({t + "mlp.lin1.weight": (m, h), t + "mlp.lin1.bias": (m,)})
        prompt_shapes.update({t + "mlp.lin2.weight": (h, m), t + "mlp.lin2.bias": (h,)})
    d = decoder.hidden_size
    decoder_shapes = {f"mlahead.head{k}.0.weight": (d, o, 3, 3, 3) for k in range(2, 6)}
    decoder_shapes.update({f"mlahead.head{k}.3.weight": (d, d, 3, 3, 3) for k in range(2, 6)})
    decoder_shapes.update({"cls.0.weight": (d, 4 * d + 1, 3, 3, 3), "cls.3.weight": (2, d, 3, 3, 3)})
    generator = torch.Generator().manual_seed(seed)

    def draw(key, shape):
        if key.endswith("attn.lr"):
            return 1 + 0.1 * torch.randn((), generator=generator)  # stored values are imported, not assumed 1.0
        return torch.randn(shape, generator=generator) * 0.2 + (
            1 if re.search(r"norm\d?\.weight|neck_3d\.\d\.[13]\.weight", key) else 0
        )

    return tuple({key: draw(key, shape) for key, shape in s.items()} for s in (shapes, prompt_shapes, decoder_shapes))


@pytest.fixture(scope="module")
def official():
    return official_tensors(Sam3DConfig(**OFFICIAL_TINY))


@pytest.fixture(scope="module")
def official_snapshot(official, tmp_path_factory):
    """A `*.pth.tar` as the official training script writes it: weights, 4 prompt modules, optimiser states, epoch
    and a numpy `best_val_loss`."""
    encoder, prompt, decoder = official
    others = [{k: v + 1 for k, v in prompt.items()} for _ in range(3)]
    optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 1e-4}]}
    snapshot = {
        "epoch": 7,
        "best_val_loss": np.float64(0.25),
        "encoder_dict": encoder,
        "feature_dict": [*others, prompt],
        "decoder_dict": decoder,
        "encoder_opt": optimizer,
        "feature_opt": optimizer,
        "decoder_opt": optimizer,
    }
    path = tmp_path_factory.mktemp("official") / "best.pth.tar"
    torch.save(snapshot, path)
    return path


def test_official_import_accounts_for_every_tensor(official):
    encoder, prompt, decoder = official
    model, report = convert.convert_official_state_dicts(encoder, prompt, decoder)
    sources = [f"encoder_dict.{k}" for k in encoder] + [f"feature_dict[3].{k}" for k in prompt]
    assert_fully_accounted(report, sources + [f"decoder_dict.{k}" for k in decoder], model)
    assert report.initialized == []
    dropped = {k for k in report.ignored}
    assert dropped == {f"encoder_dict.blocks.{i}.attn_mask" for i in (0, 2)} | {
        f"feature_dict[3].{k}" for k in prompt if "token_to_image" in k or "gaussian" in k
    }
    state = model.state_dict()
    assert (
        model.config.prompt_encoder_config.num_attention_heads == 8
        and model.config.vision_config.num_attention_heads == 2
    )
    for i in range(4):
        assert state[f"vision_encoder.layers.{i}.attn.rel_pos_scale"] == encoder[f"blocks.{i}.attn.lr"] != 1.0
        assert torch.equal(state[f"vision_encoder.layers.{i}.attn.rel_pos_d"], encoder[f"blocks.{i}.attn.rel_pos_d"])


def test_official_kernels_land_in_dhw_order(official):
    """Official 3D kernels are (out, in, kH, kW, kD): the element at (kH, kW, kD) = (0, 1, 2) must land at
    (kD, kH, kW) = (2, 0, 1) in every converted kernel; depth taps (C, 1, 1, 1, 16) become (C, 16)."""
    encoder, prompt, decoder = official
    model, _ = convert.convert_official_state_dicts(encoder, prompt, decoder)
    state = model.state_dict()
    pairs = [
        ("vision_encoder.layers.3.adapter.conv.weight", encoder["blocks.3.adapter.conv.weight"]),
        ("vision_encoder.necks.1.conv2.weight", encoder["neck_3d.1.2.weight"]),
        ("mask_decoder.heads.0.0.weight", decoder["mlahead.head2.0.weight"]),
        ("mask_decoder.heads.3.3.weight", decoder["mlahead.head5.3.weight"]),
        ("mask_decoder.fuse.0.weight", decoder["cls.0.weight"]),
        ("mask_decoder.fuse.3.weight", decoder["cls.3.weight"]),
    ]
    for key, official_kernel in pairs:
        assert torch.equal(state[key][:, :, 2, 0, 1], official_kernel[:, :, 0, 1, 2]), key
        assert torch.equal(state[key][:, :, 0, 1, 2], official_kernel[:, :, 1, 2, 0]), key
    taps = encoder["slice_embed.weight"]
    assert torch.equal(state["vision_encoder.patch_embed.depth_weight"][:, 5], taps[:, 0, 0, 0, 5])
    # A non-cubic kernel: the official convolution of an (H, W, D) volume equals ours on the (D, H, W) volume.
    kernel = torch.randn(2, 3, 3, 5, 1)  # (out, in, kH, kW, kD)
    converted = convert._kernel_dhw(kernel)
    assert converted.shape == (2, 3, 1, 3, 5) and converted[1, 2, 0, 2, 4] == kernel[1, 2, 2, 4, 0]
    volume_hwd = torch.randn(1, 3, 6, 7, 4)
    official_out = F.conv3d(volume_hwd, kernel).permute(0, 1, 4, 2, 3)
    ours = F.conv3d(volume_hwd.permute(0, 1, 4, 2, 3), converted)
    assert torch.allclose(ours, official_out, atol=1e-5)


def test_export_to_official_layout_is_the_exact_inverse(official):
    """to_official_state_dicts writes the official key set and shapes (checked against the independent layout above)
    and converts back bit for bit."""
    config = Sam3DConfig(**OFFICIAL_TINY)
    model = randomize(Sam3DForPromptableSegmentation(config), seed=4)
    exported = convert.to_official_state_dicts(model)
    for ours, reference in zip(exported, official, strict=True):
        used = {k: v for k, v in reference.items() if not re.search("attn_mask|token_to_image|gaussian", k)}
        assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in used.items()}
    assert torch.equal(exported[0]["patch_embed.proj.weight"][:, 1:], torch.zeros(48, 2, 16, 16))
    back, report = convert.convert_official_state_dicts(*exported, config=config)
    assert report.ignored == {}
    for (key, a), b in zip(model.state_dict().items(), back.state_dict().values(), strict=True):
        assert torch.equal(a, b), key
    with pytest.raises(ValueError, match=r"only the official architecture exports: .*adapter_layers=\[0\]"):
        convert.to_official_state_dicts(
            Sam3DForPromptableSegmentation(
                Sam3DConfig(**{**TINY, "vision_config": {**TINY["vision_config"], "adapter_layers": [0]}})
            )
        )


def test_convert_official_cli_round_trip(official, official_snapshot, tmp_path, tiny_inputs, capsys):
    encoder, prompt, decoder = official
    in_memory, _ = convert.convert_official_state_dicts(encoder, prompt, decoder)
    output = tmp_path / "converted"
    argv = ["convert", "official", "--checkpoint", str(official_snapshot), "--output", str(output)]
    assert main([*argv, "--image-size", "40", "24", "44"]) == 0
    printed = capsys.readouterr().out
    assert "ignored 3 entries, e.g. feature_dict[0]: prompt modules 0-2 are never used" in printed
    assert "ignored 2 entries, e.g. encoder_dict.blocks.0.attn_mask" in printed
    assert {p.name for p in output.iterdir()} >= {"config.json", "model.safetensors", "conversion_report.json"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary folder left behind"
    loaded = Sam3DForPromptableSegmentation.from_pretrained(output)
    assert loaded.config.vision_config.image_size == PATCH
    assert torch.equal(logits_of(loaded, tiny_inputs), logits_of(in_memory, tiny_inputs))
    report = json.loads((output / "conversion_report.json").read_text())
    for key in ("epoch", "best_val_loss", "encoder_opt", "feature_opt", "decoder_opt", "feature_dict[2]"):
        assert key in report["ignored"]
    assert "encoder_dict.blocks.2.attn_mask" in report["ignored"]
    assert report["details"]["source format"] == "official 3DSAM-adapter snapshot"
    assert len(report["copied"]) + len(report["transformed"]) == len(loaded.state_dict())
    # A second run does not overwrite silently; --overwrite replaces the folder.
    assert main(argv) == 1
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0
    assert Sam3DForPromptableSegmentation.from_pretrained(output).config.vision_config.image_size == (128, 128, 128)
    # --dataset: the official preprocessing of that dataset travels with the weights
    assert not (output / "processor_config.json").exists()
    assert main([*argv, "--overwrite", "--dataset", "pancreas", "--image-size", "40", "24", "44"]) == 0
    processor = Sam3DProcessor.from_pretrained(output)
    assert processor.image_processor.preset == "official_pancreas" and processor.patch_size == PATCH
    assert (processor.image_processor.resampling, processor.image_processor.stored_axes) == ("official", (2, 1, 0))
    assert "processor_config.json" in capsys.readouterr().out


def test_convert_sam_cli_with_a_config(tiny_sam_folder, tiny_sam_state_dict, tmp_path, tiny_inputs):
    Sam3DConfig(**TINY).save_pretrained(tmp_path / "config")
    output = tmp_path / "from_sam"
    argv = ["convert", "sam", "--checkpoint", str(tiny_sam_folder), "--output", str(output)]
    assert main([*argv, "--config", str(tmp_path / "config")]) == 0
    loaded = Sam3DForPromptableSegmentation.from_pretrained(output)
    qkv = tiny_sam_state_dict["vision_encoder.layers.2.attn.qkv.weight"]
    assert torch.equal(loaded.vision_encoder.layers[2].attn.qkv.weight.detach(), qkv)
    report = json.loads((output / "conversion_report.json").read_text())
    assert set(report["ignored"]) | {s for v in report["sources"].values() for s in v} == set(tiny_sam_state_dict)
    assert torch.isfinite(logits_of(loaded, tiny_inputs)).all()


def test_official_errors(official, tmp_path, capsys):
    encoder, prompt, decoder = official
    wrong = tmp_path / "wrong.pth.tar"
    torch.save({"encoder_dict": encoder, "feature_dict": [prompt] * 4}, wrong)
    with pytest.raises(ValueError, match=r"not an official 3DSAM-adapter snapshot: expected keys .*decoder_dict"):
        convert.load_official_checkpoint(wrong)
    torch.save({"encoder_dict": encoder, "feature_dict": [prompt], "decoder_dict": decoder}, wrong)
    with pytest.raises(ValueError, match=r"feature_dict must be a list of 4 .* of length 1"):
        convert.load_official_checkpoint(wrong)
    torch.save({"image_encoder.pos_embed": torch.ones(1)}, wrong)
    with pytest.raises(ValueError, match="looks like a SAM 2D checkpoint: use `sam3d convert sam`"):
        convert.load_official_checkpoint(wrong)
    with pytest.raises(ValueError, match=r"'blocks.0.extra' .* not part of the official"):
        convert.convert_official_state_dicts({**encoder, "blocks.0.extra": torch.ones(1)}, prompt, decoder)
    torch.save(argparse.Namespace(encoder_dict={}), wrong)
    argv = ["convert", "official", "--checkpoint", str(wrong), "--output", str(tmp_path / "out")]
    assert main(argv) == 1
    assert "tensor-only PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*argv, "--config", "x"]) == 1
    assert "--config and --revision are for `sam3d convert sam`" in capsys.readouterr().err


def test_prompt_free_train_auto_snapshot_round_trip(tmp_path):
    """A train_auto.py snapshot (encoder_dict and decoder_dict, no feature_dict) imports as the prompt-free model, by
    default at that script's 256³ crops with token stride 8, and gives the exported model's logits."""
    size = (32, 48, 40)
    vision = {**OFFICIAL_TINY["vision_config"], "image_size": size, "token_stride": 8}
    config = Sam3DConfig(**{**OFFICIAL_TINY, "vision_config": vision}, use_prompt_encoder=False)
    model = randomize(Sam3DForPromptableSegmentation(config)).eval()
    encoder, prompt, decoder = convert.to_official_state_dicts(model)
    assert prompt is None
    path = tmp_path / "last.pth.tar"
    torch.save({"epoch": 500, "encoder_dict": encoder, "decoder_dict": decoder, "encoder_opt": {}}, path)
    default, report = convert.load_official_checkpoint(path)
    assert default.config.use_prompt_encoder is False
    assert (default.config.vision_config.image_size, default.config.vision_config.token_stride) == ((256,) * 3, 8)
    assert "prompt-free" in report.details["source format"] and "feature_dict[0]" not in report.ignored
    imported, _ = convert.load_official_checkpoint(path, vision_config={"image_size": size})
    pixel_values = torch.randn(1, 1, *size)
    with torch.no_grad():
        torch.testing.assert_close(imported(pixel_values=pixel_values).logits, model(pixel_values=pixel_values).logits)


def test_malformed_official_snapshots(official, tmp_path):
    encoder, prompt, decoder = official
    without = {k: v for k, v in encoder.items() if k != "patch_embed.proj.weight"}
    with pytest.raises(ValueError, match=r"lacks or mis-stores .*\(KeyError: 'patch_embed.proj.weight'\)"):
        convert.config_from_official(without, prompt, decoder)
    without = {k: v for k, v in encoder.items() if not k.endswith("mlp.lin1.weight")}  # mlp_dim has no source left
    with pytest.raises(ValueError, match=r"lacks or mis-stores .*\(IndexError: "):
        convert.config_from_official(without, prompt, decoder)
    with pytest.raises(ValueError, match=r"lacks or mis-stores .*\(AttributeError: .*'shape'\)"):
        convert.config_from_official({**encoder, "pos_embed": [1.0]}, prompt, decoder)
    with pytest.raises(ValueError, match=r"feature_dict\[3\] is a tuple, expected a state dict"):
        convert.convert_official_state_dicts(encoder, tuple(prompt.values()), decoder)
    path = tmp_path / "snapshot.pth.tar"
    torch.save({"encoder_dict": encoder, "feature_dict": [prompt, prompt, prompt, None], "decoder_dict": {}}, path)
    with pytest.raises(ValueError, match=r"feature_dict\[3\] is a NoneType, expected a state dict"):
        convert.load_official_checkpoint(path, vision_config={"image_size": PATCH})


@pytest.mark.parametrize(
    "key, shape",
    [
        ("blocks.0.mlp.lin1.weight", (1, 48)),  # a tensor sizes are read from (mlp_dim)
        ("blocks.2.attn.proj.bias", (47,)),
        ("neck_3d.1.2.weight", (32, 32, 3, 3, 1)),  # a 3D kernel: shapes in the official (kH, kW, kD) order
    ],
)
def test_one_mis_sized_tensor_is_named_by_its_official_key(official, key, shape):
    """A damaged snapshot with one tensor of the wrong size: the error names that tensor (not the others, which a size
    read from the damaged one would make look wrong), by the key the user's file uses, with the file's shape and the
    shape the model needs, both in the official layout."""
    encoder, prompt, decoder = (dict(section) for section in official)
    right = tuple(encoder[key].shape)
    encoder[key] = torch.ones(shape)
    with pytest.raises(ValueError) as error:
        convert.convert_official_state_dicts(encoder, prompt, decoder)
    message = str(error.value)
    assert message.startswith("1 tensors of the official snapshot do not have the shape the model needs")
    assert f"[('encoder_dict.{key}', {shape}, {right})]" in message


def test_a_missing_tensor_is_named_by_its_official_key(official):
    encoder, prompt, decoder = (dict(section) for section in official)
    del encoder["blocks.1.norm1.weight"]
    del encoder["blocks.0.mlp.lin1.weight"]  # one of the tensors mlp_dim is read from
    del prompt["transformer.layers.0.norm3.bias"]
    with pytest.raises(ValueError) as error:
        convert.convert_official_state_dicts(encoder, prompt, decoder)
    assert str(error.value) == (
        "the official snapshot lacks 3 tensors the model needs, e.g. ['encoder_dict.blocks.0.mlp.lin1.weight', "
        "'encoder_dict.blocks.1.norm1.weight', 'feature_dict[3].transformer.layers.0.norm3.bias']"
    )


def test_unreadable_checkpoints_never_get_torchs_weights_only_false_advice(tmp_path, capsys):
    """torch's message for a refused file says re-running with weights_only=False "will likely succeed": misleading
    for a file that is no checkpoint at all, and unsafe advice for one with pickled objects. Neither is passed on."""
    garbage = tmp_path / "garbage.pth.tar"
    garbage.write_bytes(bytes(range(256)) * 4)
    truncated = tmp_path / "truncated.pth"
    torch.save({"encoder_dict": {"pos_embed": torch.ones(4)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    pickled = tmp_path / "object.pth"
    torch.save({"args": argparse.Namespace(lr=1e-4), "encoder_dict": {}}, pickled)
    for path, message in (
        (garbage, r"garbage.pth.tar' as a tensor-only PyTorch checkpoint: it is not a file torch.save wrote"),
        (truncated, r"truncated.pth' .* not a file torch.save wrote .*, or it is truncated \(RuntimeError: "),
        (pickled, r"object.pth' .* holds pickled Python objects \(e.g. argparse.Namespace\), which sam3d-hf never"),
    ):
        with pytest.raises(ValueError, match=message) as error:
            convert.load_official_checkpoint(path)
        assert "False" not in str(error.value) and error.value.__cause__ is None
        assert main(["convert", "official", "--checkpoint", str(path), "--output", str(tmp_path / "out")]) == 1
        printed = capsys.readouterr().err
        assert printed.count("\n") == 1 and "could not read" in printed and "False" not in printed


def test_conversion_checks_the_output_first(tmp_path, monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output was checked")

    monkeypatch.setattr(convert, "load_sam_checkpoint", must_not_run)
    monkeypatch.setattr(convert, "load_official_checkpoint", must_not_run)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "model.safetensors").write_bytes(b"")
    (tmp_path / "file").write_text("x")
    for function in (convert.convert_sam_checkpoint, convert.convert_official_checkpoint):
        with pytest.raises(ValueError, match=r"already exists and is not an empty folder; .* \(--overwrite\)"):
            function("checkpoint", tmp_path / "taken")
        with pytest.raises(ValueError, match="is an existing file, not a folder; choose a folder to write into"):
            function("checkpoint", tmp_path / "file", overwrite=True)
        with pytest.raises(ValueError, match=r"cannot create '.*file/deeper/out': '.*file' is a file, not a folder"):
            function("checkpoint", tmp_path / "file" / "deeper" / "out")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_get_the_usual_modes(tiny_model, tmp_path, umask):
    previous = os.umask(umask)
    try:
        output = convert.save_converted(tiny_model, convert.ConversionReport(), tmp_path / "a" / "converted")
        files.atomic_write(tmp_path / "note.txt", lambda temporary: open(temporary, "w").write("hello"))
    finally:
        os.umask(previous)
    for path in [tmp_path / "a", output, *output.iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) == (0o777 if path.is_dir() else 0o666) & ~umask, path
    assert stat.S_IMODE((tmp_path / "note.txt").stat().st_mode) == 0o666 & ~umask
    assert (tmp_path / "note.txt").read_text() == "hello"


def test_design_document_matches_the_code():
    """docs/design.md ships with the package's source: every section the code cites exists, and every class or
    function its map names is defined by the package in the module it names (a method by one of the package's own
    classes, not inherited from transformers or torch)."""
    root = Path(__file__).resolve().parents[1]
    design = (root / "docs" / "design.md").read_text()
    headings = set(re.findall(r"^#+ (.+)$", design, flags=re.M))
    sources = [*(root / "sam3d_hf").glob("*.py"), *(root / "tests").glob("*.py"), root / "README.md"]
    quoted = r"docs/design\.md\s*[\"']([A-Z][\w\s]+)[\"']"  # a cited section, in quotes after the path
    cited = {" ".join(m.split()) for path in sources for m in re.findall(quoted, path.read_text())}
    assert cited and cited <= headings, cited - headings
    table = design.split("## Where each part lives")[1]
    checked = 0
    for module, names in re.findall(r"^\| [^|]+ \| `(\w+)\.py`[^|]* \| (.+) \|$", table, flags=re.M):
        imported = importlib.import_module(f"sam3d_hf.{module}")
        for name in re.findall(r"`(\w+(?:\.\w+)?)`", names):
            owner, _, attribute = name.partition(".")
            defined = vars(imported).get(owner)
            assert defined is not None and getattr(defined, "__module__", "sam3d_hf").startswith("sam3d_hf"), name
            if attribute:
                own_classes = [c for c in defined.__mro__ if c.__module__.startswith("sam3d_hf")]
                assert any(attribute in vars(c) for c in own_classes), name
            checked += 1
    assert checked >= 30


def test_design_document_is_installed_where_the_messages_say(monkeypatch):
    """Error messages send pip users to sam3d_hf/docs/design.md: setup.py (run with `setuptools.setup` replaced, so
    nothing is built) installs docs/ as the package data `sam3d_hf.docs`, with design.md in it."""
    import runpy

    import setuptools

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # setup.py reads README.md from the working folder
    arguments = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: arguments.update(kwargs))
    runpy.run_path(str(root / "setup.py"))
    assert "sam3d_hf.docs" in arguments["packages"]
    assert (root / arguments["package_dir"]["sam3d_hf.docs"] / "design.md").is_file()
    assert "*.md" in arguments["package_data"]["sam3d_hf.docs"]
    with pytest.raises(ValueError, match=r"docs/design.md 'Official checkpoint layout' \(installed with the package "):
        convert.config_from_official({}, {}, {})
