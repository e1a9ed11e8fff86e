"""One rank of test_data's 2-process test: read epoch 0 with 2 DataLoader workers, all_gather documents over gloo."""

import json
import sys

import torch.distributed as dist

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from test_data import epoch0_documents  # noqa: E402

from rwkv_dist.data import TokenLoader  # noqa: E402


def main() -> None:
    location, rank, world, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loader = TokenLoader(location, ctx_len=8, batch_size=3, rank=dist.get_rank(), world_size=dist.get_world_size(),
                         num_workers=2, seed=5)
    mine = [list(doc) for doc, count in epoch0_documents(loader).items() for _ in range(count)]
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
