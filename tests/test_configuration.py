import pytest
from conftest import TINY

from sam3d_hf import Sam3DConfig, Sam3DMaskDecoderConfig, Sam3DPromptEncoderConfig, Sam3DVisionConfig


def test_default_is_the_paper_vit_b_model():
    config = Sam3DConfig()
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.mlp_dim) == (
        768,
        12,
        12,
        3072,
    )
    assert vision.image_size == (128, 128, 128) and vision.token_grid == (32, 32, 32)
    assert vision.window_size == (8, 8, 8) and vision.shift_size == (4, 4, 4)
    assert vision.global_attn_indexes == [2, 5, 8, 11] and vision.feature_indexes == [2, 5, 8, 11]
    assert (vision.adapter_dim, vision.output_channels, vision.layer_norm_eps) == (384, 256, 1e-6)
    assert [vision.rel_pos_size(i) for i in (0, 2)] == [27, 127]
    prompt = config.prompt_encoder_config
    assert (prompt.hidden_size, prompt.num_hidden_layers, prompt.num_attention_heads, prompt.num_global_queries) == (
        256,
        2,
        8,
        10,
    )
    assert prompt.use_point_labels is False and prompt.layer_norm_eps == 1e-5
    assert config.mask_decoder_config.hidden_size == 128


def test_sizes_are_normalised_to_dhw_tuples():
    vision = Sam3DVisionConfig(image_size=[64, 128, 96], window_size=8)
    assert vision.image_size == (64, 128, 96) and vision.window_size == (8, 8, 8)


def test_round_trip_keeps_every_setting(tmp_path):
    config = Sam3DConfig(**TINY)
    config.save_pretrained(tmp_path)
    loaded = Sam3DConfig.from_pretrained(tmp_path)
    for name in ("vision_config", "prompt_encoder_config", "mask_decoder_config"):
        assert getattr(loaded, name).to_dict() == getattr(config, name).to_dict()
    assert isinstance(loaded.vision_config.image_size, tuple)


def test_presets():
    large = Sam3DConfig.from_sam_preset("vit_l", vision_config={"image_size": (64, 128, 128)})
    assert large.vision_config.hidden_size == 1024 and large.vision_config.mlp_dim == 4096
    assert large.vision_config.image_size == (64, 128, 128)
    huge = Sam3DConfig.from_sam_preset("vit_h")
    assert huge.vision_config.global_attn_indexes == huge.vision_config.feature_indexes == [7, 15, 23, 31]


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: Sam3DVisionConfig(hidden_size=100, num_attention_heads=12), r"hidden_size \(100\) must be divisible"),
        (lambda: Sam3DVisionConfig(image_size=(128, 130, 128)), r"divisible by token_stride 4"),
        (lambda: Sam3DVisionConfig(image_size=(128, 128)), r"3 positive ints"),
        (lambda: Sam3DVisionConfig(image_size=0), r"3 positive ints"),
        (lambda: Sam3DVisionConfig(num_hidden_layers=0), r"num_hidden_layers must be a positive int, got 0"),
        (lambda: Sam3DVisionConfig(global_attn_indexes=[2, 12]), r"block indices \[12\] outside \[0, 12\)"),
        (lambda: Sam3DVisionConfig(feature_indexes=[2, 5, 8]), r"4 strictly increasing block indices"),
        (lambda: Sam3DVisionConfig(feature_indexes=[0, 0, 1, 1]), r"strictly increasing .* got \[0, 0, 1, 1\]"),
        (lambda: Sam3DVisionConfig(feature_indexes=[2, 5, 11, 8]), r"strictly increasing .* got \[2, 5, 11, 8\]"),
        (lambda: Sam3DVisionConfig(adapter_layers=[-1]), r"adapter_layers .* \[-1\]"),
        (lambda: Sam3DVisionConfig(shift_size=8), r"shift_size .* must lie in \[0, window_size\)"),
        (lambda: Sam3DPromptEncoderConfig(num_attention_heads=7), r"divisible by num_attention_heads \(7\)"),
        (lambda: Sam3DMaskDecoderConfig(num_labels=3), r"must be 2 .* got 3"),
        (lambda: Sam3DConfig(prompt_encoder_config={"hidden_size": 128}), r"must equal prompt_encoder_config"),
        (lambda: Sam3DConfig.from_sam_preset("vit_s"), r"Unknown SAM preset 'vit_s'"),
    ],
)
def test_invalid_values_raise_value_errors(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_wrong_types_raise_type_errors():
    with pytest.raises(TypeError, match="vision_config must be a dict or a Sam3DVisionConfig, got list"):
        Sam3DConfig(vision_config=[1, 2])
    with pytest.raises(TypeError, match="image_size must be an int or a"):
        Sam3DVisionConfig(image_size=True)
