"""Fitting a head on an encoder's latents, streamed from a DataLoader."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from gmfast.head import GaussianMixtureHead


def device_of(module: nn.Module, device=None) -> torch.device:
    """``device`` if given, else where ``module``'s first parameter or buffer lives (CPU if none)."""
    if device is not None:
        return torch.device(device)
    for t in list(module.parameters()) + list(module.buffers()):
        return t.device
    return torch.device("cpu")


def split_batch(batch, what: str = "loader"):
    """``(inputs, labels)`` of a loader's batch: a pair (or longer tuple/list) or a dict with
    ``"x"`` and ``"y"``; ``what`` names the loader in the error."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict) and {"x", "y"} <= set(batch):
        return batch["x"], batch["y"]
    raise TypeError(f"{what} must yield (inputs, labels) pairs or dicts with 'x' and 'y'; got {type(batch).__name__}")


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Put ``module`` in eval mode for the block, then restore every submodule's mode."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield module
    finally:
        for m, was in modes.items():
            m.training = was


def encode(encoder: nn.Module, x: torch.Tensor, device, autocast=None) -> torch.Tensor:
    """Latents of a batch under ``no_grad``, as a 2-D floating tensor (flattened if needed)."""
    x = x.to(device, non_blocking=True)
    ctx = torch.autocast(device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        z = encoder(x)
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"the encoder must return a tensor of latents; got {type(z).__name__}")
    z = z.reshape(z.shape[0], -1)
    return z.float() if z.dtype in (torch.float16, torch.bfloat16) else z


def fit_head(encoder: nn.Module, loader, covariance_type: str = "tied", *, shrinkage=0.0, priors: str = "empirical",
             num_classes: int | None = None, device=None, progress: bool = True, autocast=None,
             backend: str = "auto") -> GaussianMixtureHead:
    """Fit a :class:`GaussianMixtureHead` on ``encoder``'s latents in one pass over ``loader``.

    The encoder runs in eval mode (its previous mode is restored) under ``no_grad`` on
    ``device`` (default: where its parameters are); latents are streamed into float64
    sufficient statistics and never all held in memory.

    Parameters
    ----------
    loader : iterable of (inputs, labels)
        E.g. a ``torch.utils.data.DataLoader``. Labels are ints in ``0..K-1``.
    autocast : torch.dtype, optional
        Run the encoder under ``torch.autocast`` with this dtype (e.g. ``torch.bfloat16``).
        The statistics are float64 whatever the latents' dtype.
    progress : bool
        A tqdm progress bar (on rank 0 only).

    Distributed: when a ``torch.distributed`` process group is initialised (as ``torchrun``
    does), give each rank its shard of the data (a ``DistributedSampler``); each rank
    accumulates its statistics and they are merged exactly with ``all_reduce`` (the same
    stable merge as ``partial_fit``), so every rank returns the same head. Note that a
    ``DistributedSampler`` pads the last shard by *repeating* samples when the dataset size is
    not a multiple of the world size; pass ``drop_last=True`` (or pad-free shards) if every
    sample must be counted exactly once.
    """
    from tqdm.auto import tqdm

    dev = device_of(encoder, device)
    head = GaussianMixtureHead(covariance_type, shrinkage=shrinkage, priors=priors, num_classes=num_classes,
                               backend=backend)
    rank, world = distributed_rank()
    total = len(loader) if hasattr(loader, "__len__") else None
    with eval_mode(encoder):
        for batch in tqdm(loader, total=total, disable=not progress or rank != 0, desc="fit_head", unit="batch"):
            x, y = split_batch(batch, "loader")
            head.partial_fit(encode(encoder, x, dev, autocast), torch.as_tensor(y))
    if world > 1:
        if head.statistics is None:
            raise ValueError(f"rank {rank} received no data; every rank needs a non-empty shard")
        head.statistics.allreduce_()
    return head.finalize()
