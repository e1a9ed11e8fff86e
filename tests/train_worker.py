"""A training process for the tests: `rwkv-dist train` plus
- the trained model's logits on fixed tokens (rank 0 saves them to OUT/engine_logits.pt), which the export test
  compares with the consolidated checkpoint;
- a record of every torch.distributed collective that rwkv_dist code issues itself (OUT/collectives/rank_R.json):
  which file called it and on which device its tensors were, so a test can check they all go through the one place
  that puts them on the run's communication device."""

import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import rwkv_dist
from rwkv_dist.config import load_run_config
from rwkv_dist.train.distributed import finish
from rwkv_dist.train.trainer import Trainer

PACKAGE = Path(rwkv_dist.__file__).resolve().parent
calls: list[dict] = []


def recorded(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        caller = Path(sys._getframe(1).f_code.co_filename).resolve()
        if caller.is_relative_to(PACKAGE):
            tensors = [a for a in (*args, *kwargs.values()) if torch.is_tensor(a)]
            devices = [str(t.device) for t in tensors]
            if "device" in kwargs:
                devices.append(str(kwargs["device"]))
            calls.append({"op": name, "file": str(caller.relative_to(PACKAGE)), "devices": devices})
        return fn(*args, **kwargs)
    return wrapper


for op in ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce",
           "broadcast_object_list", "all_gather_object", "gather_object", "barrier", "send", "recv", "isend", "irecv"):
    setattr(dist, op, recorded(op, getattr(dist, op)))

config, *overrides = sys.argv[1:]
trainer = Trainer(load_run_config(config, overrides), source=config)
trainer.run()
tokens = torch.randint(0, trainer.cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
logits = trainer.logits(tokens)
if logits is not None:  # on the rank that reports (under a pipeline: the last stage)
    torch.save({"tokens": tokens, "logits": logits}, trainer.out / "engine_logits.pt")
folder = trainer.out / "collectives"
folder.mkdir(exist_ok=True)
(folder / f"rank_{trainer.world.rank}.json").write_text(json.dumps({"device": str(trainer.world.device),
                                                                    "calls": calls}))
finish()
