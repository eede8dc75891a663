"""Run under ``torchrun --nproc_per_node=2``: fit_head and certify on shards, write results.

argv: out_dir. Rank 0 writes head.safetensors (the merged fit) and cert.pt-free outputs as
safetensors (no pickle) for the parent test to compare with a one-process run.
"""

import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.distributed import DistributedSampler

import gmfast
from gmfast.certifier import gather_rows


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(601, 6, generator=g, dtype=torch.float64)
    y = torch.arange(601) % 4
    X = X + 3 * torch.nn.functional.one_hot(y, 6).double()  # class structure in the first dims
    return X, y


def main(out):
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    X, y = data()
    enc = torch.nn.Linear(6, 5).double()
    torch.manual_seed(0)
    with torch.no_grad():
        enc.weight.copy_(torch.randn(5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        enc.bias.zero_()
    ds = TensorDataset(X[:600], y[:600])  # divisible by 2: a DistributedSampler pads otherwise
    loader = DataLoader(ds, batch_size=37, sampler=DistributedSampler(ds, shuffle=False, drop_last=False))
    results = {}
    for kind, shrink in (("tied", 0.0), ("full", "ledoit-wolf"), ("diag", 0.1)):
        head = gmfast.fit_head(enc, loader, covariance_type=kind, shrinkage=shrink, progress=False)
        results[f"{kind}_means"] = head.means_
        results[f"{kind}_cov"] = head.covariances_
        # certify this rank's shard, gather on every rank
        idx = torch.arange(rank, X.shape[0], dist.get_world_size())
        cert = gmfast.Certifier(enc, head, lipschitz=2.0).certify(X[idx])
        i, p, r = gather_rows(idx, cert.prediction, cert.radius)
        order = torch.argsort(i)
        results[f"{kind}_pred"], results[f"{kind}_radius"] = p[order], r[order]
    if rank == 0:
        save_file({k: v.contiguous() for k, v in results.items()}, f"{out}/dist.safetensors")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
