"""transformers' own model and config test suites (`ModelTesterMixin`, `ConfigTester`) run on this model.

Every model in transformers must pass these suites; they ship in transformers' source distribution, not in the wheel.
This module fetches them itself (once, into `~/.cache/sam3d-hf/`, outside the repository) for the installed
transformers version and applies them the way transformers' `tests/models/sam/test_modeling_sam.py` applies them to
`SamModel` (tiny config, composite model). If they cannot be fetched, `test_common_suite_is_available` FAILS with the
reason: the suite is never skipped silently.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import unittest
from pathlib import Path

import pytest
import torch
import transformers

from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation, Sam3DVisionConfig, Sam3DVisionModel

SUITE_PACKAGE = "hf_common_tests"
CACHE_ROOT = Path(os.environ.get("SAM3D_HF_CACHE", Path.home() / ".cache" / "sam3d-hf"))

# Stand-ins for the three modules the suites import but the sdist lacks (see ECOSYSTEM_NOTES.md).
_STAND_INS = {
    "exporters/test_export.py": (
        '"""Stand-in: the sdist lacks tests/exporters; ModelTesterMixin only inherits this mixin."""\n\n\n'
        "class ExportTesterMixin:\n    pass\n"
    ),
    "generation/test_utils.py": (
        '"""Stand-in: the sdist lacks tests/generation; only used in an issubclass check."""\n\n\n'
        "class GenerationTesterMixin:\n    pass\n"
    ),
    "utils/test_configuration_utils.py": (
        '"""Stand-in: common PretrainedConfig kwargs, each with a non-default value, for ConfigTester."""\n\n'
        "config_common_kwargs = {\n"
        '    "return_dict": False,\n'
        '    "output_hidden_states": True,\n'
        '    "output_attentions": True,\n'
        '    "dtype": "float16",\n'
        '    "chunk_size_feed_forward": 5,\n'
        '    "id2label": {0: "background", 1: "tumour"},\n'
        '    "label2id": {"background": 0, "tumour": 1},\n'
        '    "problem_type": "single_label_classification",\n'
        "}\n"
    ),
}


def fetch_common_suite(version: str = transformers.__version__) -> Path:
    """Directory holding the package `hf_common_tests` (transformers' `tests/` for `version`); downloads the sdist
    with pip the first time. Raises `RuntimeError` saying why if that fails."""
    target = CACHE_ROOT / f"transformers-{version}-tests"
    if (target / SUITE_PACKAGE / "test_modeling_common.py").is_file():
        return target
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_ROOT) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
        command += [f"transformers=={version}", "-d", tmp, "--quiet"]
        try:
            subprocess.run(command, check=True, capture_output=True, text=True, timeout=900)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
            detail = getattr(error, "stderr", "") or ""
            raise RuntimeError(
                f"could not download the transformers {version} source distribution, which holds the common test "
                f"suites ({' '.join(command)}): {error}\n{detail[-2000:]}\nCheck the network/package index access, or "
                f"unpack its tests/ folder as {target / SUITE_PACKAGE} yourself."
            ) from error
        sdist = next(Path(tmp).glob("transformers-*.tar.gz"))
        staging = Path(tmp) / "staging"
        prefix = f"transformers-{version}/tests/"
        with tarfile.open(sdist) as archive:
            for member in archive.getmembers():
                if member.isfile() and member.name.startswith(prefix):
                    path = staging / SUITE_PACKAGE / member.name[len(prefix) :]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(archive.extractfile(member).read())
        for relative, text in _STAND_INS.items():
            path = staging / SUITE_PACKAGE / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        for folder in [staging / SUITE_PACKAGE, *(staging / SUITE_PACKAGE).rglob("*")]:
            if folder.is_dir():
                (folder / "__init__.py").touch()
        if not (staging / SUITE_PACKAGE / "test_modeling_common.py").is_file():
            raise RuntimeError(f"{sdist.name} has no tests/test_modeling_common.py")
        try:
            os.replace(staging, target)  # atomic: a concurrent run either sees nothing or the whole folder
        except OSError:
            if not (target / SUITE_PACKAGE / "test_modeling_common.py").is_file():
                raise
            shutil.rmtree(staging, ignore_errors=True)
    return target


try:
    sys.path.insert(0, str(fetch_common_suite()))
    from hf_common_tests.test_configuration_common import ConfigTester
    from hf_common_tests.test_modeling_common import ModelTesterMixin, floats_tensor

    SUITE_ERROR = None
except Exception as error:  # any failure must surface as a failing test with its reason
    SUITE_ERROR = f"transformers' common test suite is unavailable: {type(error).__name__}: {error}"
    ModelTesterMixin = object


def test_common_suite_is_available():
    if SUITE_ERROR is not None:
        pytest.fail(SUITE_ERROR)


class Sam3DModelTester:
    """Tiny config that still runs every path: (16, 16, 24) patches give a (4, 4, 6) token grid, padded to (4, 4, 8)
    for 4³ windows; blocks 0 and 2 are shifted; the 4x4 position table is resized bicubically (width 6 > 4)."""

    def __init__(self, parent, batch_size: int = 2):
        self.parent = parent
        self.batch_size = batch_size
        self.patch = (16, 16, 24)
        self.num_hidden_layers = 4  # one level per block: the decoder needs 4 levels
        self.num_attention_heads = 2
        self.hidden_size = 32
        self.is_training = True
        self.seq_length = 4 * 4 * 6  # tokens per image, for the generic checks that need a sequence length

    def get_vision_config(self) -> Sam3DVisionConfig:
        return Sam3DVisionConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            mlp_dim=64,
            adapter_dim=8,
            output_channels=16,
            image_size=self.patch,
            sam_image_size=64,
            sam_window_size=2,
            global_attn_indexes=[1, 3],
            depth_embed_size=4,
            window_size=4,
            shift_size=2,
            attention_chunk_size=3,
        )

    def get_config(self) -> Sam3DConfig:
        return Sam3DConfig(
            vision_config=self.get_vision_config().to_dict(),
            prompt_encoder_config={"hidden_size": 16, "num_attention_heads": 2, "mlp_dim": 32, "num_global_queries": 3},
            mask_decoder_config={"hidden_size": 8},
        )

    def expected_windows(self) -> tuple[int, int]:
        """(windows per image, tokens per window) of the tiny config: grid (4, 4, 6) padded to (4, 4, 8), 4³ windows."""
        return 2, 64

    def prepare_config_and_inputs_for_common(self):
        pixel_values = floats_tensor([self.batch_size, 1, *self.patch])
        points = torch.tensor([[[3.0, 4.0, 5.0], [12.0, 10.0, 20.5]], [[15.0, 0.0, 23.0], [7.0, 8.0, 9.0]]])
        inputs = {"pixel_values": pixel_values, "input_points": points[: self.batch_size]}
        return self.get_config(), inputs


# Why each check that the suite skips on its own conditions (`self.skipTest`) cannot apply to these models, by test
# name (parameterized variants share their base name). `Sam3DCommonChecks.skipTest` fails any skip not listed here for
# its class, so a check that could run (after a regression, or with a new transformers version) never skips silently.
# Not listed: the checks that the suite's decorators skip for hardware or libraries absent from a CPU machine
# (accelerator, several accelerators, flash attention 2/3/4, the kernels library, MPS, deepspeed) or mark `@slow`
# (test_torch_compile_for_training); they never reach `skipTest` and run where those are present.
NO_LANGUAGE_MODEL = "no language-model head: the output is voxel logits"
NO_MIXTURE_OF_EXPERTS = "no mixture-of-experts layers (no grouped_mm, no router logits)"
NO_ROPE = "no rotary position embeddings: the position tables are learned and resized to the patch"
NO_VOCABULARY = "no token vocabulary to resize: the input embedding is a convolutional patch embedding"
NO_KEY_MAPPING = "no checkpoint key conversion mapping: checkpoints store the model's own keys"
NO_TP_PLAN = "no tensor-parallel plan"
SKIPPED_FOR_BOTH_MODELS = {
    "test_causal_lm_loss_honors_shift_labels": NO_LANGUAGE_MODEL,
    "test_encoder_decoder_loss_no_double_shift": NO_LANGUAGE_MODEL,
    "test_eager_matches_batched_and_grouped_inference": NO_MIXTURE_OF_EXPERTS,
    "test_moe_models_record_router_logits": NO_MIXTURE_OF_EXPERTS,
    "test_output_router_logits_from_config": NO_MIXTURE_OF_EXPERTS,
    "test_keep_in_fp32_modules": "no module has to stay in float32 (no `_keep_in_fp32_modules`)",
    "test_keep_in_fp32_modules_exist": "no module has to stay in float32 (no `_keep_in_fp32_modules`)",
    "test_model_rope_scaling_frequencies": NO_ROPE,
    "test_model_rope_scaling_from_config": NO_ROPE,
    "test_model_rope_with_partial_rotation": NO_ROPE,
    "test_vision_axial_rope": NO_ROPE,
    "test_resize_embeddings_untied": NO_VOCABULARY,
    "test_resize_embeddings_untied_no_reinit_on_post_init": NO_VOCABULARY,
    "test_resize_tokens_embeddings": NO_VOCABULARY,
    "test_resize_position_vector_embeddings": "no position-embedding vector to resize: the tables are resized to the "
    "token grid at every forward",
    "test_reverse_loading_mapping": NO_KEY_MAPPING,
    "test_can_load_from_already_mapped_keys": NO_KEY_MAPPING,
    "test_sliding_window_mask": "no sliding-window attention mask: the 3D windows partition the token grid",
    "test_tp_plan_matches_params": NO_TP_PLAN,
    "test_tied_head_has_a_tp_plan_entry": NO_TP_PLAN,
}
SKIPPED_FOR_THE_SEGMENTATION_MODEL = {
    "test_enable_input_require_grads_with_gradient_checkpointing": "the suite reads the gradient of "
    "`get_input_embeddings().weight`; the patch embedding (like SamPatchEmbeddings) has no `.weight`. tests/"
    "test_modeling.py::test_reentrant_checkpointing_with_frozen_embedding_trains_via_input_require_grads checks it",
    "test_sdpa_can_dispatch_composite_models": "written for vision-language models (a modality tower and a language "
    "model); test_attn_implementation_composite_models and test_can_set_attention_dynamically_composite_model check "
    "the dispatch to every sub-model",
    "test_sdpa_can_dispatch_non_composite_models": "the model is composite; Sam3DVisionModelTest runs it on the same "
    "encoder",
}
NOT_COMPOSITE = "the vision model is not composite: it has no sub-configs"
NO_TRAINING = "a headless feature model has no loss: training is checked on the segmentation model"
SKIPPED_FOR_THE_VISION_MODEL = {
    "test_attn_implementation_composite_models": NOT_COMPOSITE,
    "test_can_set_attention_dynamically_composite_model": NOT_COMPOSITE,
    "test_internal_model_config_and_subconfig_are_same": NOT_COMPOSITE,
    "test_sdpa_can_dispatch_composite_models": NOT_COMPOSITE,
    "test_training": NO_TRAINING,
    "test_training_gradient_checkpointing": NO_TRAINING,
    "test_training_gradient_checkpointing_use_reentrant_false": NO_TRAINING,
    "test_training_gradient_checkpointing_use_reentrant_true": NO_TRAINING,
    "test_enable_input_require_grads_with_gradient_checkpointing": NO_TRAINING,
}


if SUITE_ERROR is None:

    class Sam3DCommonChecks:
        """Overrides shared by both model classes, each replacing a generic check that assumes a token sequence."""

        suite_skips: dict[str, str]  # the class's share of the tables above

        # The suite skips this check for models whose configuration file has no "# Copyright 20xx" header (it reads
        # them as added before 2023); `_init_weights` covers every weight, so it runs.
        test_can_init_all_missing_weights_before_2023 = True

        def skipTest(self, reason):
            # Every skip the suite decides on its own goes through here: it needs a recorded reason (tables above).
            name = self._testMethodName
            why = next((why for key, why in self.suite_skips.items() if re.fullmatch(rf"{key}(_\d+_\w+)?", name)), None)
            if why is None:
                self.fail(f"the suite skipped {name} ({reason}), but no reason why it cannot apply is recorded")
            super().skipTest(f"{reason} [{why}]")

        def test_num_layers_is_small(self):
            # Overridden, as transformers' own list of exceptions does for BeitModelTest (4 out_indices): the suite
            # wants <= 2 blocks, but the 4 feature levels need 4 distinct blocks (feature_indexes are 4 strictly
            # increasing block indices), so 4 is the smallest model. A 5th block would fail here.
            self.assertLessEqual(self.model_tester.num_hidden_layers, 4)

        def test_model_get_set_embeddings(self):
            # As SamModel: the input embedding is the (convolutional) patch embedding, there is no output embedding.
            config, _ = self.model_tester.prepare_config_and_inputs_for_common()
            for model_class in self.all_model_classes:
                model = model_class(config)
                self.assertIs(model.get_input_embeddings(), model.vision_encoder.patch_embed)
                self.assertIsNone(model.get_output_embeddings())

        def _check_outputs(self, flag: str, check):
            config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
            tester = self.model_tester
            for model_class in self.all_model_classes:
                for via_config in (False, True):
                    model_config = config.__class__.from_dict(config.to_dict())
                    if via_config:
                        setattr(model_config, flag, True)
                    model = model_class._from_config(model_config, attn_implementation="eager").eval()
                    call = dict(inputs)
                    if not via_config:
                        call[flag] = True
                    with torch.no_grad():
                        outputs = model(**call)
                    check(outputs, tester)

        def test_hidden_states_output(self):
            # Token grids are (B, D', H', W', C), not (B, seq, C): the generic check reads a sequence length.
            def check(outputs, tester):
                self.assertEqual(len(outputs.hidden_states), tester.num_hidden_layers + 1)
                grid = tuple(s // 4 for s in tester.patch)
                for hidden in outputs.hidden_states:
                    self.assertEqual(tuple(hidden.shape), (tester.batch_size, *grid, tester.hidden_size))
                self.assertIsNone(outputs.attentions)

            self._check_outputs("output_hidden_states", check)

        def test_attention_outputs(self):
            # One (B * windows, heads, N, N) tensor per block, rows summing to 1 (softmax), not (B, heads, seq, seq).
            def check(outputs, tester):
                windows, tokens = tester.expected_windows()
                self.assertEqual(len(outputs.attentions), tester.num_hidden_layers)
                for weights in outputs.attentions:
                    shape = (tester.batch_size * windows, tester.num_attention_heads, tokens, tokens)
                    self.assertEqual(tuple(weights.shape), shape)
                    torch.testing.assert_close(weights.sum(-1), torch.ones(shape[:3]))
                self.assertIsNone(outputs.hidden_states)

            self._check_outputs("output_attentions", check)

        @unittest.skip(reason="pixel_values and clicks only: there are no input ids / inputs_embeds")
        def test_inputs_embeds(self):
            pass

        @unittest.skip(reason="pixel_values and clicks only: there are no input ids / inputs_embeds")
        def test_inputs_embeds_matches_input_ids(self):
            pass

    class Sam3DForPromptableSegmentationTest(Sam3DCommonChecks, ModelTesterMixin, unittest.TestCase):
        all_model_classes = (Sam3DForPromptableSegmentation,)
        suite_skips = SKIPPED_FOR_BOTH_MODELS | SKIPPED_FOR_THE_SEGMENTATION_MODEL
        additional_model_inputs = ["input_points"]  # the eager-vs-SDPA tests pass only these beside pixel_values
        test_resize_embeddings = False  # a convolutional patch embedding: no vocabulary to resize
        test_torch_exportable = False  # the export tests live in tests/exporters, absent from the sdist
        _is_composite = True

        def setUp(self):
            self.model_tester = Sam3DModelTester(self)
            self.config_tester = ConfigTester(
                self, config_class=Sam3DConfig, has_text_modality=False, common_properties=["initializer_range"]
            )

        def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
            inputs = dict(inputs_dict)
            if return_labels:  # 0/1 voxel labels of the patch (the suite knows no label format for this task)
                pixel_values = inputs["pixel_values"]
                inputs["labels"] = (pixel_values[:, 0] > pixel_values.mean()).long()
            return inputs

        def test_config(self):
            self.config_tester.run_common_tests()

    class Sam3DVisionModelTester(Sam3DModelTester):
        def __init__(self, parent):
            super().__init__(parent)
            self.is_training = False  # features only, no loss: training is tested through the segmentation model

        def get_config(self) -> Sam3DVisionConfig:
            return self.get_vision_config()

        def prepare_config_and_inputs_for_common(self):
            config, inputs = super().prepare_config_and_inputs_for_common()
            return config, {"pixel_values": inputs["pixel_values"]}

    class Sam3DVisionModelTest(Sam3DCommonChecks, ModelTesterMixin, unittest.TestCase):
        all_model_classes = (Sam3DVisionModel,)
        suite_skips = SKIPPED_FOR_BOTH_MODELS | SKIPPED_FOR_THE_VISION_MODEL
        test_resize_embeddings = False  # a convolutional patch embedding: no vocabulary to resize
        test_torch_exportable = False  # the export tests live in tests/exporters, absent from the sdist

        def setUp(self):
            self.model_tester = Sam3DVisionModelTester(self)
            self.config_tester = ConfigTester(
                self, config_class=Sam3DVisionConfig, has_text_modality=False, common_properties=["hidden_size"]
            )

        def test_config(self):
            self.config_tester.run_common_tests()
