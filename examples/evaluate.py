#!/usr/bin/env python
"""Evaluate a Sam3D model on a test set as the 3DSAM-adapter paper reports it: the entry point of
`sam3d_hf.evaluation`.

    python examples/evaluate.py --model my-model --data_dir Task07_Pancreas --split_file split.json --output_dir eval
    accelerate launch --multi_gpu --num_processes 4 examples/evaluate.py --model my-model ...   # 4 GPUs

`sam3d evaluate ...` and `accelerate launch -m sam3d_hf.evaluation ...` run the same code with the same options.
`python examples/evaluate.py --help` lists the protocols, the outputs and the options.
"""

from sam3d_hf.evaluation import main

if __name__ == "__main__":
    main()
