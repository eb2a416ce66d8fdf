"""Run under `torchrun --nproc_per_node=2`: each rank dumps the micro-batches its loader serves.

    loader_dist_helper.py DATA_DIR OUT_DIR --steps N --batch B --accum A --block T --seed S --resume_at K

Steps [0, K) come from one loader; its state (taken at step K) is loaded into a fresh loader that
serves the remaining steps, so the dump also shows a resume inside a real process group. The
loaders get the DistContext, so rank 0's scan of the directory is what every rank uses.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

from common.data import ShardedTrainLoader
from common.dist import destroy, init_distributed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("data_dir")
    p.add_argument("out_dir")
    for name in ("steps", "batch", "accum", "block", "seed", "resume_at"):
        p.add_argument(f"--{name}", type=int, required=True)
    args = p.parse_args()
    ctx = init_distributed("cpu", cpu_threads=1)
    rank, world = ctx.rank, ctx.world_size

    def make() -> ShardedTrainLoader:
        return ShardedTrainLoader(args.data_dir, block_size=args.block, micro_batch_size=args.batch,
                                  grad_accum_steps=args.accum, rank=rank, world_size=world, seed=args.seed, ctx=ctx)

    try:  # without ctx the ranks could disagree on an epoch's shards: refused
        ShardedTrainLoader(args.data_dir, block_size=args.block, micro_batch_size=args.batch, rank=rank,
                           world_size=world)
    except ValueError:
        pass
    else:
        raise SystemExit("a loader without ctx= was accepted inside a process group")
    loader = make()
    batches, epochs = [], []
    for step in range(args.steps):
        if step == args.resume_at:
            state = loader.state_dict()
            loader.close()
            loader = make()
            loader.load_state_dict(state)
        micro = []
        for _ in range(args.accum):
            x, y = loader.next_batch()
            micro.append(torch.cat([x, y[:, -1:]], dim=1))
        batches.append(micro)
        epochs.append(loader.epoch)
    torch.save({"batches": batches, "epochs": epochs, "state": loader.state_dict(), "world": world,
                "local_rank": int(os.environ["LOCAL_RANK"])}, Path(args.out_dir) / f"rank{rank}.pt")
    loader.close()
    destroy(ctx)


if __name__ == "__main__":
    main()
