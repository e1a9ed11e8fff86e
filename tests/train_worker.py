"""A training process for the tests: `rwkv-dist train` plus the trained model's logits on fixed tokens (rank 0 saves
them to OUT/engine_logits.pt), which the export test compares with the consolidated checkpoint."""

import sys

import torch

from rwkv_dist.config import load_run_config
from rwkv_dist.train.distributed import finish
from rwkv_dist.train.trainer import Trainer

config, *overrides = sys.argv[1:]
trainer = Trainer(load_run_config(config, overrides), source=config)
trainer.run()
tokens = torch.randint(0, trainer.cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
logits = trainer.logits(tokens)
if trainer.world.is_main:
    torch.save({"tokens": tokens, "logits": logits}, trainer.out / "engine_logits.pt")
finish()
