"""Corrections that build on the previous prediction: the mask prompt of the model, the simulated correction rounds of
the `interactive` recipe, and the predictor and app passing each patch's previous prediction."""

import copy
import json

import numpy as np
import pytest
import torch
from conftest import PATCH, TINY, call_training, randomize
from scipy import ndimage

from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation, Sam3DImageProcessor, Sam3DProcessor
from sam3d_hf.convert_sam3d import to_official_state_dicts
from sam3d_hf.inference import Sam3DPredictor
from sam3d_hf.synthetic import SYNTHETIC_PROCESSOR_KWARGS, generate_case, generate_dataset
from sam3d_hf.training import correction_rounds, simulate_corrections


def config(mask_prompt: bool, labels: bool = True) -> Sam3DConfig:
    values = copy.deepcopy(TINY)
    values["mask_decoder_config"]["use_mask_prompt"] = mask_prompt
    values["prompt_encoder_config"]["use_point_labels"] = labels
    return Sam3DConfig(**values)


def pair() -> tuple[Sam3DForPromptableSegmentation, Sam3DForPromptableSegmentation]:
    """A model without the mask prompt and the same weights with it (its new convolution at its initial zeros)."""
    plain = randomize(Sam3DForPromptableSegmentation(config(False)), seed=1).eval()
    prompted = Sam3DForPromptableSegmentation(config(True)).eval()
    missing = prompted.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing == ["mask_decoder.mask_prompt.weight"]
    return plain, prompted


def inputs(batch: int = 2) -> dict:
    generator = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.randn(batch, 1, *PATCH, generator=generator),
        "input_points": torch.tensor([[[20.0, 12, 22], [5, 3, 40]], [[30.0, 20, 10], [8, 8, 8]]])[:batch],
        "input_labels": torch.tensor([[1, 0], [1, 1]])[:batch],
    }


def click_maps(case: dict, size) -> torch.Tensor:
    """Positive and negative click Gaussians (sigma 3 patch voxels) on the decoder's grid, voxel by voxel in numpy."""
    out = np.zeros((len(case["input_points"]), 2, *size))
    step = np.asarray(PATCH) / np.asarray(size)
    for b, (points, labels) in enumerate(zip(case["input_points"].numpy(), case["input_labels"].numpy())):
        for index in np.ndindex(*size):
            where = (np.asarray(index) + 0.5) * step - 0.5  # the grid voxel's centre in patch voxels
            for point, label in zip(points, labels):
                value = np.exp(-np.sum((where - point) ** 2) / (2 * 3.0**2))
                channel = 0 if label == 1 else 1
                out[(b, channel, *index)] = max(out[(b, channel, *index)], value)
    return torch.from_numpy(out).float()


# ---------------------------------------------------------------------------------------------------- the model
def test_the_mask_prompt_starts_at_zero_and_changes_nothing_until_trained():
    plain, prompted = pair()
    assert Sam3DForPromptableSegmentation(config(True)).mask_decoder.mask_prompt.weight.abs().sum() == 0
    with torch.no_grad():
        reference = plain(**inputs()).logits
        none = prompted(**inputs()).logits
        some = prompted(**inputs(), input_masks=torch.rand(2, 1, *PATCH)).logits
    torch.testing.assert_close(none, reference, rtol=0, atol=0)
    torch.testing.assert_close(some, reference, rtol=0, atol=0)


def test_the_mask_reaches_the_logits_once_its_weights_are_not_zero():
    _, prompted = pair()
    with torch.no_grad():
        prompted.mask_decoder.mask_prompt.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(2))
        mask = torch.zeros(2, 1, *PATCH)
        mask[:, :, 10:30, 5:20, 10:30] = 1.0
        empty = prompted(**inputs()).logits
        with_mask = prompted(**inputs(), input_masks=mask).logits
        without_channel = prompted(**inputs(), input_masks=mask[:, 0]).logits
        # an independent computation of the decoder's fused input: resize the mask, convolve, add before the norm
        embeddings = prompted.get_image_embeddings(inputs()["pixel_values"])
        level3 = prompted.prompt_encoder(
            embeddings.feature_maps[3], inputs()["input_points"], inputs()["input_labels"], PATCH
        )
        decoder = prompted.mask_decoder
        hidden = decoder.heads[0][0].out_channels
        x = embeddings.decoder_context + torch.nn.functional.conv3d(
            decoder.level(3, level3), decoder.fuse[0].weight[:, 3 * hidden : 4 * hidden], padding=1
        )
        small = torch.nn.functional.interpolate(mask, size=x.shape[2:], mode="trilinear", align_corners=False)
        maps = torch.cat([small, click_maps(inputs(), x.shape[2:])], dim=1)
        x = x + torch.nn.functional.conv3d(maps, decoder.mask_prompt.weight, padding=1)
        x = decoder.fuse[3](decoder.fuse[2](decoder.fuse[1](x)))
        expected = torch.nn.functional.interpolate(x, scale_factor=2, mode="trilinear", align_corners=True)
    assert (with_mask - empty).abs().max() > 1e-3
    torch.testing.assert_close(with_mask, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(without_channel, with_mask, rtol=0, atol=0)


def test_mask_prompt_errors_say_what_to_give():
    plain, prompted = pair()
    with pytest.raises(ValueError, match="use_mask_prompt=True"):
        plain(**inputs(), input_masks=torch.zeros(2, 1, *PATCH))
    with pytest.raises(ValueError, match=r"input_masks must have shape \(batch, 1, D, H, W\)"):
        prompted(**inputs(), input_masks=torch.zeros(3, 1, *PATCH))
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        prompted(**inputs(), input_masks=torch.full((2, 1, *PATCH), 2.0))
    with pytest.raises(TypeError, match=r"float torch.Tensor"):
        prompted(**inputs(), input_masks=torch.zeros(2, 1, *PATCH, dtype=torch.long))
    with pytest.raises(ValueError, match="mask-prompt convolution the official model does not have"):
        to_official_state_dicts(Sam3DForPromptableSegmentation(config(True, labels=False)))


def test_the_mask_prompt_is_saved_and_a_model_without_it_gains_it_at_zero(tmp_path):
    plain, prompted = pair()
    with torch.no_grad():
        prompted.mask_decoder.mask_prompt.weight.fill_(0.25)
    prompted.save_pretrained(tmp_path / "with")
    again = Sam3DForPromptableSegmentation.from_pretrained(tmp_path / "with")
    assert again.config.mask_decoder_config.use_mask_prompt
    torch.testing.assert_close(again.mask_decoder.mask_prompt.weight, prompted.mask_decoder.mask_prompt.weight)
    plain.save_pretrained(tmp_path / "without")  # as training.build_model turns it on for --init_from
    grown_config = Sam3DConfig.from_pretrained(tmp_path / "without")
    grown_config.mask_decoder_config.use_mask_prompt = True
    grown = Sam3DForPromptableSegmentation.from_pretrained(tmp_path / "without", config=grown_config).eval()
    assert grown.mask_decoder.mask_prompt.weight.abs().sum() == 0
    with torch.no_grad():
        torch.testing.assert_close(grown(**inputs()).logits, plain(**inputs()).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- simulated corrections
class BoxModel(torch.nn.Module):
    """A stand-in whose prediction is a fixed box (probability 0.9 inside, 0.1 outside) and that records what each
    call received: the corrections must come from the model's own prediction."""

    def __init__(self, box):
        super().__init__()
        self.box, self.calls, self.encoded = box, [], 0

    def get_image_embeddings(self, pixel_values):
        self.encoded += 1
        return pixel_values

    def forward(self, image_embeddings, input_points, input_labels, input_masks):
        self.calls.append((input_points.clone(), input_labels.clone(), input_masks))
        probability = torch.full((image_embeddings.shape[0], *image_embeddings.shape[2:]), 0.1)
        probability[(slice(None), *self.box)] = 0.9
        logits = torch.stack([torch.zeros_like(probability), torch.logit(probability)], dim=1)
        return type("Output", (), {"logits": logits})()


def test_each_round_clicks_the_largest_error_of_the_models_own_prediction():
    shape = (20, 16, 24)
    label = torch.zeros(1, *shape, dtype=torch.long)
    label[0, 2:8, 2:8, 2:8] = 1  # the lesion: 216 voxels
    box = (slice(10, 19), slice(3, 15), slice(4, 20))  # the model's blob far from it: 1,728 false-positive voxels
    model = BoxModel(box)
    batch = {"pixel_values": torch.zeros(1, 1, *shape), "labels": label,
             "input_points": torch.tensor([[[4.0, 4, 4]]]), "input_labels": torch.tensor([[1]])}  # fmt: skip
    out = simulate_corrections(model, batch, rounds=2)
    assert model.encoded == 1 and len(model.calls) == 2  # the encoder once, one prediction per round
    # independently: the error regions of the prediction, the larger one's deepest voxel
    predicted = np.zeros(shape, bool)
    predicted[box] = True
    errors = predicted & ~label[0].numpy().astype(bool)
    depth = ndimage.distance_transform_edt(np.pad(errors, 1))[1:-1, 1:-1, 1:-1]
    click = out["input_points"][0, 1].numpy()
    assert predicted[tuple(click.astype(int))] and out["input_labels"][0, 1] == 0  # a negative click in the blob
    assert depth[tuple(click.astype(int))] == depth.max()
    # the ground truth alone would have asked for a positive click in the lesion
    assert not label[0].numpy()[tuple(click.astype(int))]
    # round 2 received round 1's click and round 1's prediction as its mask
    points, labels, mask = model.calls[1]
    assert points.shape == (1, 2, 3) and labels.tolist() == [[1, 0]]
    torch.testing.assert_close(mask[0, 0][box], torch.full(mask[0, 0][box].shape, 0.9))
    assert model.calls[0][2] is None  # the first round has no previous mask
    torch.testing.assert_close(out["input_masks"], mask)
    assert out["input_points"].shape == (1, 3, 3) and out["labels"] is label


def test_a_perfect_prediction_gets_a_padding_click_and_zero_rounds_change_nothing():
    shape = (12, 12, 12)
    label = torch.zeros(2, *shape, dtype=torch.long)
    box = (slice(2, 6), slice(2, 6), slice(2, 6))
    label[(0, *box)] = 1  # row 0: the model is right; row 1: the lesion is elsewhere
    label[1, 8:11, 8:11, 8:11] = 1
    points = torch.tensor([[[3.0, 3, 3]], [[9.0, 9, 9]]])
    batch = {"pixel_values": torch.zeros(2, 1, *shape), "labels": label, "input_points": points,
             "input_labels": torch.tensor([[1], [1]])}  # fmt: skip
    assert simulate_corrections(BoxModel(box), batch, rounds=0) is batch
    out = simulate_corrections(BoxModel(box), batch, rounds=1)
    assert out["input_labels"][:, 1].tolist() == [-1, 0]  # row 1: the blob (64 voxels) beats the miss (27)


def test_rounds_without_gradient_change_no_weight_and_the_last_prediction_trains():
    model = randomize(Sam3DForPromptableSegmentation(config(True)), seed=3).train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    case = inputs(1)
    label = torch.zeros(1, *PATCH, dtype=torch.long)
    label[0, 15:25, 8:16, 15:30] = 1
    batch = {**case, "labels": label}
    out = simulate_corrections(model, batch, rounds=3)
    assert all(p.grad is None for p in model.parameters())
    assert not out["input_masks"].requires_grad and not out["input_points"].requires_grad  # no graph through rounds
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert out["input_points"].shape[1] == 2 + 3 and out["input_masks"].shape == (1, 1, *PATCH)
    model(**out).loss.backward()
    assert model.mask_decoder.mask_prompt.weight.grad.abs().sum() > 0  # the mask input learns from the last round


def test_the_number_of_rounds_is_a_function_of_seed_step_and_process():
    draws = [correction_rounds(0, step, 0, 5) for step in range(200)]
    assert set(draws) == set(range(6)) and draws == [correction_rounds(0, s, 0, 5) for s in range(200)]
    assert draws != [correction_rounds(1, step, 0, 5) for step in range(200)]
    assert {correction_rounds(0, step, 0, 0) for step in range(20)} == {0}


def test_an_interactive_run_trains_the_mask_prompt_and_records_its_rounds(tmp_path):
    data = generate_dataset(tmp_path / "data", num_cases=4, seed=0)
    call_training(["--recipe", "interactive", "--data_dir", str(data), "--output_dir", str(tmp_path / "run"),
                   "--cache_dir", str(tmp_path / "cache"), "--model_config", "tiny", "--patch_size", "32", "24", "40",
                   "--report_to", "jsonl", "--seed", "2", "--max_train_steps", "4", "--max_validation_cases", "1",
                   "--learning_rate", "1e-3"])  # fmt: skip
    folder = tmp_path / "run" / "final_model"
    model = Sam3DForPromptableSegmentation.from_pretrained(folder)
    assert model.config.mask_decoder_config.use_mask_prompt
    assert model.mask_decoder.mask_prompt.weight.abs().sum() > 0  # trained from zero: it received gradients
    values = json.loads((folder / "training_info.json").read_text())["recipe"]["values"]
    assert values["use_mask_prompt"] is True and values["correction_rounds"] == 5
    assert any(correction_rounds(2, step, 0, 5) for step in range(4))  # some step of this run had rounds


# -------------------------------------------------------------------------------------------- predictor and app
def predictor_with_mask_prompt() -> Sam3DPredictor:
    _, model = pair()
    with torch.no_grad():
        model.mask_decoder.mask_prompt.weight.normal_(std=0.5, generator=torch.Generator().manual_seed(4))
    processor = Sam3DProcessor(Sam3DImageProcessor(**SYNTHETIC_PROCESSOR_KWARGS), patch_size=PATCH, cluster_margin=4)
    return Sam3DPredictor(model, processor)


def test_the_predictor_passes_the_same_patchs_previous_prediction():
    predictor = predictor_with_mask_prompt()
    image, label = generate_case(3, orientation="oblique", num_lesions=1)
    predictor.set_image(image)
    lesion = np.argwhere(np.asarray(label.dataobj) == 2)
    first_click = lesion[len(lesion) // 2].tolist()
    first = predictor.predict([first_click])
    clicks = [first_click, (lesion[0] + 1).tolist()]
    fresh = predictor.predict(clicks, [1, 0])
    seen = []
    original = predictor.model.forward
    predictor.model.forward = lambda *a, **k: seen.append(k["input_masks"]) or original(*a, **k)
    corrected = predictor.predict(clicks, [1, 0], previous=first)
    assert np.array_equal(corrected.inputs["patch_origins"], first.inputs["patch_origins"])  # the cached patch
    torch.testing.assert_close(seen[0][:, 0].cpu(), torch.softmax(first.logits, 1)[:, 1])
    assert not torch.equal(corrected.logits, fresh.logits)  # the previous mask changed the prediction
    as_mapping = {tuple(first.inputs["patch_origins"][0].tolist()): torch.softmax(first.logits, 1)[0, 1]}
    torch.testing.assert_close(predictor.predict(clicks, [1, 0], previous=as_mapping).logits, corrected.logits)
    elsewhere = {(0, 0, 0): torch.ones(PATCH)}  # a patch the clicks do not use: no mask, as a first prediction
    torch.testing.assert_close(predictor.predict(clicks, [1, 0], previous=elsewhere).logits, fresh.logits)
    with pytest.raises(TypeError, match="Sam3DPrediction"):
        predictor.predict(clicks, [1, 0], previous="mask.nii.gz")
