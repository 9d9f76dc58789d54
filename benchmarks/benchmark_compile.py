"""Time `torch.compile(model, fullgraph=True)` with a real backend (inductor by default) and compare it with eager.

The test suite checks `fullgraph=True` with the `eager` backend only (tests/test_modeling.py::
test_fullgraph_compile_matches_eager: dynamo traces the whole forward as one graph), because an inductor compile takes
minutes on a CPU runner. This script does the inductor part: on a random-weight model it prints the first compiled
call (the compilation), a second call, the eager forward and the largest difference of the logits, relative to their
scale. The compile cache goes to a fresh folder unless `--warm_cache` is given, so the time is what a new machine pays.

    OMP_NUM_THREADS=1 python benchmarks/benchmark_compile.py                     # tiny model, (40, 24, 44) patch
    python benchmarks/benchmark_compile.py --preset vit_b --patch 128 128 128 --backend inductor
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
from benchmark_inference import TINY, randomize  # the small model of the other benchmarks (run from any folder)

from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "vit_b"], default="tiny", help="model size (random weights)")
    parser.add_argument("--patch", type=int, nargs=3, default=(40, 24, 44), help="(D, H, W) patch")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--warm_cache", action="store_true", help="reuse torch's compile cache (default: a fresh one)")
    args = parser.parse_args()
    if not args.warm_cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="sam3d-compile-")
    config = Sam3DConfig.from_preset("tiny", **TINY) if args.preset == "tiny" else Sam3DConfig()
    model = randomize(Sam3DForPromptableSegmentation(config), std=0.05).eval()
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 1, *args.patch, generator=generator)
    input_points = torch.tensor([[[p / 2 for p in args.patch], [p / 3 for p in args.patch]]])
    inputs = {"pixel_values": pixel_values, "input_points": input_points}
    model.validate_inputs(**inputs)  # the value checks are skipped inside the compiled call
    compiled = torch.compile(model, fullgraph=True, backend=args.backend)
    with torch.no_grad():
        start = time.perf_counter()
        reference = model(**inputs).logits
        eager = time.perf_counter() - start
        start = time.perf_counter()
        logits = compiled(**inputs).logits
        first = time.perf_counter() - start
        start = time.perf_counter()
        compiled(**inputs)
        second = time.perf_counter() - start
    difference = ((logits - reference).abs().max() / reference.abs().max()).item()
    print(f"{args.preset} model, patch {tuple(args.patch)}, backend {args.backend}, {torch.get_num_threads()} threads")
    print(f"first compiled call (compiles): {first:.1f} s")
    print(f"second compiled call:           {second:.3f} s")
    print(f"eager forward:                  {eager:.3f} s")
    print(f"max |compiled - eager| / max |eager| logits: {difference:.1e}")


if __name__ == "__main__":
    main()
