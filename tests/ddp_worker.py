"""Run by tests/test_ddp.py under torchrun (``-m tests.ddp_worker``, 2 processes, gloo): decay with different data
per rank, then check that masks and decay state are identical on every rank."""
import gc

import torch
import torch.distributed as dist
import torch.nn.functional as F

import maskdecay as md
from tests.nets import resnet_cifar


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = resnet_cifar(8, width=8).train()
    masks = md.ChannelMasks(model, torch.randn(1, 3, 32, 32))
    plan = md.plan(masks, macs=0.5)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    decay = md.MaskDecay(masks, plan, steps=6, regularizer=md.SparsityLoss(strength=0.5))
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    while not decay.done:
        x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)
        loss = F.cross_entropy(ddp(x), y) + decay.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        decay.step()
        flat = torch.cat([v.detach() for v in masks.values])
        gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], t) for t in gathered), "masks differ across ranks"
        assert bool((flat < 1).any()) or decay.t == 0
    if rank == 0:
        print("DDP-OK", decay.t)
    # free DDP's reducer (a reference cycle) before leaving gloo, as the EVC example's close_distributed does: otherwise
    # a gloo thread still holding its Python objects at interpreter exit can abort a rank
    del ddp, opt
    gc.collect()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
