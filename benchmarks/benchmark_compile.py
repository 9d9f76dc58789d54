"""Time `torch.compile` with a real backend (inductor by default) against eager, for the full forward, the encoder
or a new click.

The test suite checks `fullgraph=True` with the `eager` backend only (tests/test_modeling.py::
test_fullgraph_compile_matches_eager: dynamo traces the whole forward as one graph), because an inductor compile takes
minutes on a CPU runner. This script does the inductor part on a random-weight model: the first compiled call (the
compilation), then `--repeats` eager and compiled calls alternating (min and median of each, and their ratio), and the
largest difference of the outputs relative to their scale. `--part encoder` compiles `get_image_embeddings`,
`--part click` the model on cached embeddings (what a new click runs), `--part full` the whole forward. On the CPU,
`--freezing` lets inductor treat the weights as constants and pre-pack them for oneDNN (inference only), whose fp32
GEMM is faster than MKL's on AMD CPUs. The compile cache goes to a fresh folder unless `--warm_cache` is given, so the
compile time is what a new machine pays.

    OMP_NUM_THREADS=1 python benchmarks/benchmark_compile.py                     # tiny model, (40, 24, 44) patch
    OMP_NUM_THREADS=2 python benchmarks/benchmark_compile.py --preset vit_b --patch 128 128 128 --part click
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from benchmark_inference import randomize  # as the other benchmarks (run from any folder)

from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "vit_b"], default="tiny", help="model size (random weights)")
    parser.add_argument("--patch", type=int, nargs=3, default=(40, 24, 44), help="(D, H, W) patch")
    parser.add_argument("--part", choices=["full", "encoder", "click"], default="full", help="what is compiled")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--freezing", action="store_true", help="inductor freezing (constant, pre-packed weights)")
    parser.add_argument("--repeats", type=int, default=3, help="timed eager and compiled calls, alternating")
    parser.add_argument("--warm_cache", action="store_true", help="reuse torch's compile cache (default: a fresh one)")
    args = parser.parse_args(argv)
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sam3d-compile-")
    if args.freezing:
        torch._inductor.config.freezing = True
    vision = {"image_size": tuple(args.patch)}
    config = Sam3DConfig.from_preset("tiny" if args.preset == "tiny" else "vit_b", vision_config=vision)
    model = randomize(Sam3DForPromptableSegmentation(config), std=0.05).eval()
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 1, *args.patch, generator=generator)
    input_points = torch.tensor([[[p / 2 for p in args.patch], [p / 3 for p in args.patch]]])
    inputs = {"pixel_values": pixel_values, "input_points": input_points}
    model.validate_inputs(**inputs)  # the value checks are skipped inside the compiled call
    with torch.no_grad():
        embeddings = model.get_image_embeddings(pixel_values)
        calls = {
            "full": (model, lambda f: f(**inputs).logits),
            "encoder": (model.get_image_embeddings, lambda f: f(pixel_values).feature_maps[3]),
            "click": (model, lambda f: f(image_embeddings=embeddings, input_points=input_points).logits),
        }
        function, run = calls[args.part]
        compiled = torch.compile(function, fullgraph=True, backend=args.backend)
        reference = run(function)
        start = time.perf_counter()
        output = run(compiled)
        first = time.perf_counter() - start
        times = {"eager": [], "compiled": []}
        for _ in range(args.repeats):
            for name, f in (("eager", function), ("compiled", compiled)):
                start = time.perf_counter()
                run(f)
                times[name].append(time.perf_counter() - start)
    difference = ((output - reference).abs().max() / reference.abs().max()).item()
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"{args.preset} model, patch {tuple(args.patch)}, part {args.part}, backend {args.backend}"
        f"{' (freezing)' if args.freezing else ''}, {torch.get_num_threads()} threads, load average {os.getloadavg()}"
    )
    print(f"first compiled call (compiles): {first:.1f} s")
    for name, values in times.items():
        print(f"{name:9s} min {min(values):.3f} s  median {medians[name]:.3f} s")
    print(f"compiled is {medians['eager'] / medians['compiled']:.2f}x eager (ratio of medians)")
    print(f"max |compiled - eager| / max |eager|: {difference:.1e}")
    return {"compile_s": first, "median_s": medians, "difference": difference}


if __name__ == "__main__":
    main()
