"""Input-space certificates for an encoder + Gaussian-mixture head (the Lipschitz route)."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from gmfast._fp import round_down_to, slack_down
from gmfast.certificate import Certificate
from gmfast.fit import device_of, distributed_rank, encode, eval_mode, split_batch
from gmfast.head import GaussianMixtureHead


class Certifier:
    """Certify ``head(encoder(x))`` in input space with one forward pass per input.

    If the encoder ``h`` is ``L``-Lipschitz from ℓ2 to ℓ2, a latent ℓ2 certificate of radius
    ``R`` at ``z = h(x)`` gives the input certificate ``R / L``: ``‖h(x+δ) − h(x)‖ ≤ L‖δ‖ < R``
    whenever ``‖δ‖ < R/L``. ``L`` must be a sound *upper* bound:

    * ``lipschitz="auto"`` computes one with :func:`gmfast.lipschitz_bound` over the encoder's
      ``torch.fx`` graph (cached; an op without a rule is an error, never a guess);
    * a float is taken as given (the caller vouches for it).

    Radii are in the scale of the encoder's own input: if the encoder normalises
    (``(x − mean)/std``) inside its forward, that normalisation is part of ``L`` and the radius
    is in raw-input units; normalisation done *before* calling the encoder is not.

    What is not covered: the latent radius is sound for the computed latent ``ẑ``, and ``L``
    for the exact-arithmetic encoder; the encoder's own floating-point error ``‖ẑ − h(x)‖`` is
    not bounded by gmfast (as in the Lipschitz-certification literature). If you can bound it,
    pass it as ``encoder_error``: the radius becomes ``(R − encoder_error)/L``.

    Parameters
    ----------
    encoder : nn.Module mapping (N, *input_shape) to latents (N, d) (flattened if needed)
    head : fitted GaussianMixtureHead
    lipschitz : "auto" or float
    batch_size : int
        Inputs per forward pass.
    device : where the encoder runs (default: where its parameters are)
    """

    def __init__(self, encoder: nn.Module, head: GaussianMixtureHead, lipschitz="auto", *, batch_size: int = 256,
                 device=None, encoder_error: float = 0.0, backend: str | None = None):
        if not isinstance(head, GaussianMixtureHead):
            raise TypeError(f"head must be a GaussianMixtureHead; got {type(head).__name__}")
        head.n_features_in_  # noqa: B018 - raises NotFittedError for an unfitted head
        if not (lipschitz == "auto" or (isinstance(lipschitz, (int, float)) and not isinstance(lipschitz, bool)
                                        and math.isfinite(lipschitz) and lipschitz > 0)):
            raise ValueError(f"lipschitz must be 'auto' or a positive finite float; got {lipschitz!r}")
        if not (isinstance(batch_size, int) and batch_size > 0):
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        if not (encoder_error >= 0 and math.isfinite(encoder_error)):
            raise ValueError(f"encoder_error must be a finite number >= 0; got {encoder_error!r}")
        self.encoder = encoder
        self.head = head
        self.lipschitz = lipschitz
        self.batch_size = batch_size
        self.device = device_of(encoder, device)
        self.encoder_error = float(encoder_error)
        self.backend = backend
        self._bounds = {}

    def lipschitz_bound(self, input_shape, points=None):
        """The Lipschitz bound used for inputs of ``input_shape`` (a float, or the
        :class:`gmfast.lipschitz.LipschitzBound` report when computed; the encoder is put in
        eval mode for it, as for certification). ``points``: inputs at which the reported
        lower estimate is evaluated (the first inputs certified, by default)."""
        if self.lipschitz != "auto":
            return float(self.lipschitz)
        key = tuple(input_shape)
        if key not in self._bounds:
            from gmfast.lipschitz import lipschitz_bound

            with eval_mode(self.encoder):
                self._bounds[key] = lipschitz_bound(self.encoder, key, points=points, cache=False)
        return self._bounds[key]

    def certify(self, x, *, norm=2) -> Certificate:
        """Predictions and input-space ℓ2 radii for a batch ``x`` (N, *input_shape).

        Returns a Certificate whose ``radius`` is the input radius (float64, rounded down) and
        whose ``extra`` holds ``latent_radius`` and ``lipschitz`` (the L used).
        """
        if norm not in (2, 2.0, "2", "l2"):
            raise ValueError(f"input-space certificates are l2 (the Lipschitz bound is l2->l2); got norm={norm!r}")
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor of inputs (N, ...); got {type(x).__name__}")
        if x.dim() < 1:
            raise ValueError("x must have a leading batch dimension")
        preds, radii = [], []
        with eval_mode(self.encoder):
            for i in range(0, x.shape[0], self.batch_size):
                z = encode(self.encoder, x[i:i + self.batch_size], self.device)
                cert = self.head.certify(z, norm=2, backend=self.backend)
                preds.append(cert.prediction.cpu())
                radii.append(cert.radius.double().cpu())
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)
        latent = torch.cat(radii) if radii else torch.zeros(0, dtype=torch.float64)
        Lf = float(self.lipschitz_bound(tuple(x.shape[1:]), points=x[:8].to(self.device)))
        # (R − e)/L in float64; two roundings, so deflate to stay below the exact quotient
        radius = ((latent - self.encoder_error).clamp_min(0) / Lf) * slack_down(2)
        return Certificate(prediction=pred, radius=round_down_to(radius, torch.float64), norm=2,
                           extra=dict(latent_radius=latent, lipschitz=Lf))

    def certify_loader(self, loader, *, progress: bool = False):
        """Certify every batch of a loader yielding (inputs, labels).

        Returns ``(certificate, labels, seconds_per_input)``. With a ``torch.distributed``
        process group, give each rank a shard (``DistributedSampler``) and use
        :func:`gather_rows` to collect the results on rank 0.
        """
        from tqdm.auto import tqdm

        rank, _ = distributed_rank()
        certs, labels, n, t0 = [], [], 0, time.perf_counter()
        total = len(loader) if hasattr(loader, "__len__") else None
        for batch in tqdm(loader, total=total, disable=not progress or rank != 0, desc="certify", unit="batch"):
            x, y = split_batch(batch, "loader")
            certs.append(self.certify(x))
            labels.append(torch.as_tensor(y).reshape(-1).cpu())
            n += x.shape[0]
        seconds = (time.perf_counter() - t0) / max(n, 1)
        if not certs:
            return Certificate(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float64)), \
                torch.zeros(0, dtype=torch.int64), seconds
        latent = torch.cat([c.extra["latent_radius"] for c in certs])
        cert = Certificate(torch.cat([c.prediction for c in certs]), torch.cat([c.radius for c in certs]), 2,
                           dict(latent_radius=latent, lipschitz=certs[0].extra["lipschitz"]))
        return cert, torch.cat(labels), seconds


def gather_rows(*columns: torch.Tensor):
    """All-gather 1-D tensors of per-row results from every rank to every rank, in rank order.

    With no process group it returns its inputs. Rows of different ranks may differ in
    number (the last shard of a ``DistributedSampler`` without padding).
    """
    import torch.distributed as dist

    rank, world = distributed_rank()
    if world == 1:
        return columns
    n = torch.tensor([columns[0].shape[0]])
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    out = []
    for col in columns:
        padded = torch.zeros(top, dtype=col.dtype)
        padded[: col.shape[0]] = col.cpu()
        parts = [torch.zeros_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded)
        out.append(torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)]))
    return tuple(out)
