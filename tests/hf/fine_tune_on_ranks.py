"""What test_fine_tuning.py's torchrun test runs on each rank: one Trainer step, 2 of the 4 rows on each rank;
rank 0 saves the weights (argv[1]/weights.safetensors)."""

import os
import sys

from safetensors.torch import save_file

from hf.test_fine_tuning import RANK_ROWS_MASKED, fine_tune, rows

out = sys.argv[1]
trainer = fine_tune(out, rows(4, RANK_ROWS_MASKED), per_device_train_batch_size=2, max_steps=1)
if os.environ["RANK"] == "0":
    save_file({name: p.detach().contiguous() for name, p in trainer.model.named_parameters()},
              os.path.join(out, "weights.safetensors"))
