"""The benchmark scripts parse their arguments and run end to end on tiny models. Their figures are not checked
(speed is for the scripts to print, never for a test): these tests only make sure a later session, a GPU one above
all, can run them in one call."""

import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import benchmark_encoder
import benchmark_gpu
import benchmark_precision

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

GPU_FIGURES = {
    "encode/plain_fp32",
    *(f"{part}/{dtype}{c}" for part in ("encode", "click") for dtype in ("fp32", "bf16") for c in ("", "_compiled")),
    *(f"train/{dtype}{c}" for dtype in ("fp32", "bf16") for c in ("", "_checkpointing")),
}


@pytest.mark.parametrize("script", sorted(path.stem for path in BENCHMARKS.glob("benchmark_*.py")))
def test_every_benchmark_script_imports(script):
    """A script whose imports broke (a name moved out of the library or another script) fails here, not in the next
    session that needs its figures."""
    assert callable(importlib.import_module(script).main)


def test_gpu_script_arguments():
    args = benchmark_gpu.parse_args(["--output", "figures.json"])
    assert (args.device, args.size, args.repeats, args.dry_run, args.skip_compile) == ("cuda", 128, 10, False, False)
    dry = benchmark_gpu.parse_args(["--output", "figures.json", "--dry_run"])
    assert (dry.device, dry.repeats) == ("cpu", 1)
    for bad in ([], ["--output", "figures.json", "--repeats", "0"]):  # --output is required; repeats >= 1
        with pytest.raises(SystemExit):
            benchmark_gpu.parse_args(bad)


def test_gpu_script_dry_run_measures_every_figure(tmp_path):
    output = tmp_path / "figures.json"
    returned = benchmark_gpu.main(["--dry_run", "--output", str(output)])
    saved = json.loads(output.read_text())
    assert saved == json.loads(json.dumps(returned))
    assert set(saved["figures"]) == GPU_FIGURES
    assert {name: figure["error"] for name, figure in saved["figures"].items() if "error" in figure} == {}
    assert all(figure["median_ms"] > 0 for figure in saved["figures"].values())
    assert saved["dry_run"] and saved["patch"] == [40, 24, 44]


def test_encoder_benchmark_runs_both_paths():
    results = benchmark_encoder.main(
        ["--preset", "tiny", "--size", "40", "24", "44", "--repeats", "1", "--click_repeats", "1", "--peak_size", "256"]
    )
    assert results["encode_plain"]["runs"] == results["encode_default"]["runs"] == 1
    assert results["encode_useful_gflop"] > 0 and results["encode_speedup"] > 0


def test_precision_benchmark_runs_every_variant():
    arguments = ["--preset", "tiny", "--patch", "40", "24", "44", "--cases", "1", "--repeats", "1"]
    results = benchmark_precision.main(arguments)
    assert {"fp32", "int8"} <= set(results["summary"]["encode_median_s"])
    assert 0.9 < results["summary"]["min_argmax_agreement"]["int8"] <= 1


@pytest.mark.parametrize("part", ["full", "encoder", "click"])
def test_compile_benchmark_runs_every_part(part):
    import benchmark_compile

    results = benchmark_compile.main(["--part", part, "--backend", "eager", "--repeats", "1", "--warm_cache"])
    assert results["difference"] < 1e-5 and results["median_s"]["compiled"] > 0
