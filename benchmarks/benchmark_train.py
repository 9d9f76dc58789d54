"""Is the data pipeline the bottleneck of training? Steps per second with the real pipeline vs tensors in memory.

    python benchmarks/benchmark_train.py --steps 40 --patch_size 48 48 48 --batch_size 2 --num_workers 0

Generates a synthetic dataset (`sam3d_hf.synthetic`), fills the preprocessed-volume cache once (timed apart: it is a
one-off cost per dataset), then times the same training steps of the tiny config (adapter fine-tuning, AdamW,
gradient clipping, as `examples/train.py`):
- with batches from `DataLoader(Sam3DTrainingDataset(...), collate_fn=sam3d_collate)` (crop, augmentation, clicks);
- on the same batches already collated in memory (the two alternate in blocks of 5 steps);
- and the data pipeline alone (no model).
A ratio near 1 means the model, not the data, sets the pace. Add `--model_config vit_b` for the paper's model.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sam3d_hf import Sam3DAdapterConfig, Sam3DProcessor, get_adapter_model
from sam3d_hf.data import index_dataset
from sam3d_hf.sampling import Sam3DTrainingDataset, sam3d_collate
from sam3d_hf.synthetic import generate_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--patch_size", type=int, nargs=3, default=[48, 48, 48])
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--num_cases", type=int, default=10)
    parser.add_argument("--model_config", choices=["tiny", "vit_b"], default="tiny")
    args = parser.parse_args()
    torch.manual_seed(0)
    patch = tuple(args.patch_size)

    from sam3d_hf import Sam3DConfig, Sam3DForPromptableSegmentation

    # The preset `sam3d train --model_config` builds: both time the same model.
    config = Sam3DConfig.from_preset(
        args.model_config, vision_config={"image_size": patch}, prompt_encoder_config={"use_point_labels": True}
    )
    model = get_adapter_model(
        Sam3DForPromptableSegmentation(config), Sam3DAdapterConfig(adapter_dim=config.vision_config.adapter_dim)
    ).train()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=1e-5)

    def train_step(batch: dict) -> float:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        return loss.item()

    with tempfile.TemporaryDirectory() as folder:
        root = generate_dataset(Path(folder) / "data", num_cases=args.num_cases, seed=0)
        processor = Sam3DProcessor.from_preset("kits21", patch_size=patch, cluster_margin=min(patch) // 8)
        dataset = Sam3DTrainingDataset(index_dataset(root), processor, patch_size=patch, cache_dir=Path(folder) / "c")
        start = time.perf_counter()
        for row in dataset.rows:
            dataset.cache.get(row)
        cache_seconds = time.perf_counter() - start

        loader = torch.utils.data.DataLoader(
            dataset, batch_size=args.batch_size, shuffle=True, collate_fn=sam3d_collate, num_workers=args.num_workers
        )

        def batches():
            epoch = 0
            while True:
                dataset.set_epoch(epoch)
                yield from loader
                epoch += 1

        stream = batches()
        start = time.perf_counter()
        kept = [next(stream) for _ in range(args.steps)]
        data_seconds = time.perf_counter() - start

        train_step(kept[0])  # warm-up (allocator, first-call overheads)
        # The two kinds of steps alternate in blocks of 5, so that a change of load on a shared machine falls on both.
        stream = batches()
        pipeline_seconds = memory_seconds = 0.0
        for first in range(0, args.steps, 5):
            block = range(first, min(first + 5, args.steps))
            start = time.perf_counter()
            for _ in block:
                train_step(next(stream))
            pipeline_seconds += time.perf_counter() - start
            start = time.perf_counter()
            for i in block:
                train_step(kept[i])
            memory_seconds += time.perf_counter() - start

    print(
        f"{args.model_config} model, patch {patch}, batch {args.batch_size}, {args.steps} steps, "
        f"{args.num_workers} DataLoader workers, {torch.get_num_threads()} torch threads"
    )
    print(f"  preprocessing {args.num_cases} scans into the cache (once): {cache_seconds:8.2f} s")
    print(f"  data pipeline alone:                {args.steps / data_seconds:8.2f} batches/s")
    print(f"  training, real data pipeline:       {args.steps / pipeline_seconds:8.2f} steps/s")
    print(f"  training, tensors in memory:        {args.steps / memory_seconds:8.2f} steps/s")
    print(f"  pipeline / in-memory speed:         {memory_seconds / pipeline_seconds:8.3f}")


if __name__ == "__main__":
    main()
