"""Input-space certificates for an encoder + Gaussian-mixture head: the global Lipschitz,
margin-aware and local (linear bound propagation) routes (DESIGN 1.6)."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from gmfast._fp import round_down_to, slack_down
from gmfast.certificate import Certificate
from gmfast.fit import device_of, distributed_rank, encode, eval_mode, split_batch
from gmfast.head import GaussianMixtureHead
from gmfast.lipschitz.errors import UnsupportedOpError


_METHODS = ("auto", "lipschitz", "margin", "local")
#: method="auto" runs the local route only on encoders with at most this many activation
#: units (its cost grows with them; the demo's CNN has 1,536): "affordable" by default
AUTO_LOCAL_NEURONS = 8192


def _input_norm(norm):
    if norm in (2, 2.0, "2", "l2"):
        return 2
    if norm in (math.inf, "inf", "linf"):
        return math.inf
    raise ValueError(f"input-space certificates are l2 or l-inf: norm must be 2 or float('inf'); got {norm!r}")


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

    Routes (``method``), each sound on its own, so their per-input maximum is too:

    * ``"lipschitz"``: ``R/L`` as above;
    * ``"margin"`` (tied heads): each margin ``m_cj = (a_c − a_j)ᵀh + β_c − β_j`` divided by its
      own Lipschitz constant, the head folded into the encoder's last linear layer
      (:mod:`gmfast.lipschitz.margin`); never below ``"lipschitz"`` by more than rounding;
    * ``"local"``: linear bound propagation (CROWN) over the ball around each input
      (:mod:`gmfast.lipschitz.local`): a lower bound on every margin over the whole ball
      (tied heads), or a box around the reachable latents that must stay inside the head's
      latent certified ball (per-class heads); the largest ball proved by a few passes.
      Supports Linear, ConvNd (AOL layers included), BatchNorm (eval), average pooling,
      reshapes, residual adds, ReLU/LeakyReLU and MaxMin; anything else is refused
      (:class:`gmfast.lipschitz.UnsupportedOpError`);
    * ``"auto"`` (the default, unless ``lipschitz`` is given as a float: then
      ``"lipschitz"``): the per-input maximum of every route the encoder supports
      (``"local"`` is skipped when it refuses an op or the encoder has more than
      ``AUTO_LOCAL_NEURONS`` activation units; the reason is in ``extra["skipped"]``). For
      tied heads its search starts no lower than just above the other routes' radii and stops
      where it cannot beat them, so ``extra["routes"]["local"]`` may there be below what
      ``method="local"`` gives (never the returned radius: the maximum).

    Parameters
    ----------
    encoder : nn.Module mapping (N, *input_shape) to latents (N, d) (flattened if needed)
    head : fitted GaussianMixtureHead
    lipschitz : "auto" or float
    method : {"auto", "lipschitz", "margin", "local"} or None
    domain : (lo, hi) or None
        The inputs' domain (e.g. ``(0, 1)`` for pixels). The ℓ∞ local route then certifies
        the perturbed inputs that stay in the domain (the ball intersected with the box),
        which is tighter; other routes and ℓ2 ignore it (their certificates hold for every
        perturbation).
    local_steps : int
        Relaxation passes of the local route per batch (each certifies a radius; more passes
        get closer to the best the relaxation can prove).
    batch_size : int
        Inputs per forward pass (the local route works in chunks of at most 64 inputs).
    device : where the encoder runs (default: where its parameters are)
    """

    def __init__(self, encoder: nn.Module, head: GaussianMixtureHead, lipschitz="auto", *, batch_size: int = 256,
                 device=None, encoder_error: float = 0.0, backend: str | None = None, method: str | None = None,
                 domain=None, local_steps: int = 4):
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
        if method is None:  # an explicit L is the caller's choice of route
            method = "auto" if lipschitz == "auto" else "lipschitz"
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}; got {method!r}")
        if method == "margin" and head.covariance_type != "tied":
            raise ValueError(f"method='margin' needs a tied head; got covariance_type={head.covariance_type!r} "
                             "(use 'local' or 'lipschitz')")
        if domain is not None:
            if not (isinstance(domain, (tuple, list)) and len(domain) == 2
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                            for v in domain) and domain[0] < domain[1]):
                raise ValueError(f"domain must be a pair (lo, hi) of finite numbers with lo < hi; got {domain!r}")
            domain = (float(domain[0]), float(domain[1]))
        if not (isinstance(local_steps, int) and not isinstance(local_steps, bool) and local_steps > 0):
            raise ValueError(f"local_steps must be a positive int; got {local_steps!r}")
        self.method = method
        self.domain = domain
        self.local_steps = local_steps
        self._margin = {}
        self._local = {}
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
        """Predictions and input-space radii for a batch ``x`` (N, *input_shape).

        ``norm``: 2 or ``float("inf")`` (the threat model ``‖δ‖_p < radius`` in input space;
        the global and margin routes give ℓ∞ radii as ℓ2 radii ``/√n``, ``‖δ‖₂ ≤ √n‖δ‖∞``).
        Returns a Certificate whose ``radius`` is the input radius (float64, rounded down) and
        whose ``extra`` holds ``latent_radius``, ``lipschitz`` (the L used, or None when the
        global route did not run), ``routes`` (route name → its radii) and ``skipped``.
        """
        p = _input_norm(norm)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor of inputs (N, ...); got {type(x).__name__}")
        if x.dim() < 1:
            raise ValueError("x must have a leading batch dimension")
        preds, radii, latents = [], [], []
        with eval_mode(self.encoder):
            for i in range(0, x.shape[0], self.batch_size):
                z = encode(self.encoder, x[i:i + self.batch_size], self.device)
                cert = self.head.certify(z, norm=2, backend=self.backend)
                preds.append(cert.prediction.cpu())
                radii.append(cert.radius.double().cpu())
                latents.append(z.detach().cpu())
        pred = torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64)
        latent = torch.cat(radii) if radii else torch.zeros(0, dtype=torch.float64)
        Z = torch.cat(latents) if latents else torch.zeros((0, self.head.n_features_in_))
        shape = tuple(x.shape[1:])
        n_in = math.prod(shape)
        # ℓ2 → ℓ∞: divide by √n (rounded up), then one more rounding
        to_p = (lambda r: r) if p == 2 else (lambda r: r / (math.sqrt(n_in) * (1 + 4e-16)) * slack_down(1))
        routes, skipped, Lf = {}, {}, None
        with eval_mode(self.encoder):
            if self.method in ("lipschitz", "auto"):
                Lf = float(self.lipschitz_bound(shape, points=x[:8].to(self.device)))
                # (R − e)/L in float64; two roundings, so deflate to stay below the exact quotient
                routes["lipschitz"] = to_p(((latent - self.encoder_error).clamp_min(0) / Lf) * slack_down(2))
            if self.method in ("margin", "auto") and self.head.covariance_type == "tied":
                try:
                    routes["margin"] = to_p(self._margin_route(shape, Z, pred))
                except UnsupportedOpError as e:
                    if self.method == "margin":
                        raise
                    skipped["margin"] = str(e)
            if self.method in ("local", "auto"):
                try:
                    # auto: the local search starts just above the other routes' radii
                    floor = torch.stack(list(routes.values())).amax(0) if routes and self.method == "auto" else None
                    routes["local"] = self._local_route(x, Z, pred, latent, p, floor)
                except UnsupportedOpError as e:
                    if self.method == "local":
                        raise
                    skipped["local"] = str(e)
        radius = torch.stack(list(routes.values())).amax(0) if routes else torch.zeros_like(latent)
        radius = torch.where(pred >= 0, radius, torch.zeros_like(radius))
        return Certificate(prediction=pred, radius=round_down_to(radius, torch.float64), norm=p,
                           extra=dict(latent_radius=latent, lipschitz=Lf, routes=routes, skipped=skipped))

    def _margin_route(self, shape, Z, pred):
        from gmfast.lipschitz.margin import margin_lipschitz_table, margin_lower_bounds, margin_radius

        params = self.head.classifier_params
        if shape not in self._margin:
            self._margin[shape] = margin_lipschitz_table(self.encoder, shape, params.A)[0]
        low = margin_lower_bounds(Z, params.A, params.beta, pred, self.encoder_error)
        return margin_radius(low, self._margin[shape], pred)

    def _local_bounds(self, shape):
        from gmfast.lipschitz.local import LocalBounds

        if shape not in self._local:
            self._local[shape] = LocalBounds(self.encoder, shape)  # traced with the graph's trust checks
        return self._local[shape]

    def _local_route(self, x, Z, pred, latent, p, floor=None):
        """Local radii (B,) float64; chunks of at most 64 inputs bound the working memory.
        ``floor`` (B,): radii of the other routes (tied heads: where the local route cannot
        beat them it stops after one pass and may return less; the caller takes the max)."""
        lb = self._local_bounds(tuple(x.shape[1:]))
        if self.method == "auto" and lb.n_neurons > AUTO_LOCAL_NEURONS:
            raise UnsupportedOpError(f"{lb.n_neurons} activations exceed the local route's budget in method='auto' "
                                     f"({AUTO_LOCAL_NEURONS}); pass method='local' to run it anyway")
        out = torch.zeros(x.shape[0], dtype=torch.float64)
        step = min(self.batch_size, 64)
        for i in range(0, x.shape[0], step):
            sl = slice(i, i + step)
            ok = pred[sl] >= 0
            if not bool(ok.any()):
                continue
            idx = ok.nonzero().reshape(-1)
            xb = x[sl][idx].detach().cpu()
            if self.head.covariance_type == "tied":
                r = self._local_tied(lb, xb, pred[sl][idx], p, None if floor is None else floor[sl][idx])
            else:
                r = self._local_perclass(lb, xb, Z[sl][idx], latent[sl][idx], p)
            out[i + idx] = r
        return out

    def _local_tied(self, lb, xb, c, p, floor=None):
        params = self.head.classifier_params
        from gmfast.lipschitz.local_search import tied_margin_rows

        lam, c0, lam_err, c0_err = tied_margin_rows(params.A.cpu().double(), params.beta.cpu().double(), c)
        return lb.margin_radius(xb, lam, c0, p, self.domain, steps=self.local_steps, lam_err=lam_err,
                                c0_err=c0_err, floor=floor)

    def _local_perclass(self, lb, xb, z, R, p):
        from gmfast._fp import norm_upper

        zd = z.double()

        def accept(lo, hi):
            far = torch.maximum((lo - zd).abs(), (hi - zd).abs())
            far = torch.nextafter(far, torch.full_like(far, math.inf))  # one rounded subtraction
            return norm_upper(far, dim=1) < R

        return lb.box_radius(xb, accept, p, self.domain, steps=max(self.local_steps, 8))

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
