"""torchrun helpers: one code path for 1 or N processes (gloo on CPU, nccl on GPU).

Data parallelism follows the usual RL layout: every rank samples its own share of the prompts (whole
groups stay on one rank, so group statistics need no communication), scores them, and trains on them;
the statistics that span the batch (reward whitening, loss-normalising token counts, metrics) are
all-reduced, and gradients are averaged by DDP (or sharded by FSDP2's fully_shard with --fsdp).

A failed rank must not leave the others waiting forever: the process group is created with a finite
timeout, so a collective that a dead peer never joins raises on the survivors, and torchrun then
tears the job down and shows the failing rank's traceback.
"""

import datetime
import os

import torch
import torch.distributed as dist


def init(timeout_s=600):
    """Start the process group under torchrun; returns (rank, world_size, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    rank = dist.get_rank() if dist.is_initialized() else 0
    device = torch.device(f"cuda:{torch.cuda.current_device()}") if torch.cuda.is_available() else torch.device("cpu")
    return rank, world, device


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def is_main():
    return rank() == 0


def all_reduce(x, op="sum"):
    """In-place sum / max of a tensor over ranks; a no-op on one process. Returns x."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return x


def all_gather_cat(x):
    """Concatenate a 1-D tensor of any length from all ranks (entropy quantiles, logging)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return x
    n = torch.tensor([x.numel()], device=x.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    m = int(max(s.item() for s in sizes))
    padded = torch.zeros(m, dtype=x.dtype, device=x.device)
    padded[: x.numel()] = x
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)])


def broadcast_object(obj, src=0):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown():
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(policy, fsdp=False):
    """DDP (every rank holds the whole policy) or FSDP2 (each block's parameters sharded over ranks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return policy
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in policy.model.layers:
            fully_shard(block)
        return fully_shard(policy)
    from torch.nn.parallel import DistributedDataParallel as DDP

    dev = next(policy.parameters()).device
    return DDP(policy, device_ids=[dev.index] if dev.type == "cuda" else None)
