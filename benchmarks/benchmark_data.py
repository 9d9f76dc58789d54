"""Speed of the training data pipeline on generated data: generation, then Sam3DTrainingDataset cold vs warm cache.

    python benchmarks/benchmark_data.py --num-cases 20 --patch 64

Prints:
- the time to generate the synthetic set (`sam3d_hf.synthetic.generate_dataset`);
- samples/second of `Sam3DTrainingDataset` over one epoch with an empty cache (every case is preprocessed by the
  processor once, then stored) and over the next epoch with the cache filled (load + crop + augment + clicks);
- with `--num-workers N`, the warm epoch again through a `DataLoader` with N worker processes.
Everything is written to a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sam3d_hf import Sam3DImageProcessor
from sam3d_hf.data import index_dataset
from sam3d_hf.sampling import Sam3DTrainingDataset, sam3d_collate
from sam3d_hf.synthetic import SYNTHETIC_PROCESSOR_KWARGS, generate_dataset


def epoch(dataset: Sam3DTrainingDataset, number: int) -> float:
    """Samples per second of one pass over `dataset` in this process."""
    dataset.set_epoch(number)
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return len(dataset) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-cases", type=int, default=20)
    parser.add_argument("--patch", type=int, default=64, help="cubic patch side in voxels")
    parser.add_argument("--samples-per-volume", type=int, default=2)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--no-augment", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        root = generate_dataset(Path(tmp) / "synthetic", num_cases=args.num_cases, seed=0)
        print(f"generate_dataset: {args.num_cases} cases in {time.perf_counter() - start:.2f} s")

        processor = Sam3DImageProcessor(**SYNTHETIC_PROCESSOR_KWARGS)
        dataset = Sam3DTrainingDataset(
            index_dataset(root),
            processor,
            patch_size=(args.patch,) * 3,
            augment=not args.no_augment,
            cache_dir=Path(tmp) / "cache",
            samples_per_volume=args.samples_per_volume,
        )
        print(
            f"Sam3DTrainingDataset: {len(dataset)} samples per epoch, patch {args.patch}^3, "
            f"augment={not args.no_augment}, torch threads {torch.get_num_threads()}"
        )
        print(f"  cold cache (preprocess + store): {epoch(dataset, 0):7.2f} samples/s")
        print(f"  warm cache:                      {epoch(dataset, 1):7.2f} samples/s")
        if args.num_workers:
            dataset.set_epoch(2)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=2, num_workers=args.num_workers, collate_fn=sam3d_collate
            )
            start = time.perf_counter()
            count = sum(len(batch["pixel_values"]) for batch in loader)
            rate = count / (time.perf_counter() - start)
            print(f"  warm cache, DataLoader with {args.num_workers} workers: {rate:7.2f} samples/s")


if __name__ == "__main__":
    main()
