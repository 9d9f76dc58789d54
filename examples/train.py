#!/usr/bin/env python
"""Fine-tune 3DSAM-adapter on your own CT scans: the documented entry point of `sam3d_hf.training`.

Launch with Accelerate (configs in `examples/accelerate_configs/`) on one CPU, one GPU, several GPUs or machines:

    accelerate launch --config_file examples/accelerate_configs/cpu.yaml examples/train.py \
        --data_dir my_msd_task --output_dir runs/kits --model_config vit_b --sam_checkpoint sam_vit_b_01ec64.pth

`accelerate launch -m sam3d_hf.training ...` and `sam3d train ...` run the same code with the same options (an
installed package has no examples/ folder). `python examples/train.py --help` lists them; the outputs are described
in `sam3d_hf/training.py`.
"""

from sam3d_hf.training import main

if __name__ == "__main__":
    main()
