"""Randomized smoothing (Cohen, Rosenfeld & Kolter, ICML 2019), the baseline gmfast is
compared against (DESIGN 1.6).

For a base classifier ``f`` and noise level ``σ`` the smoothed classifier is

    g(x) = argmax_k P(f(x + δ) = k),    δ ~ N(0, σ² I).

If ``p_A ≤ P(f(x + δ) = c_A)`` and ``p_A > ½`` then ``g(x + δ') = c_A`` for every
``‖δ'‖₂ < σ Φ⁻¹(p_A)`` (Cohen et al., Theorem 1 with ``p_B = 1 − p_A``). ``p_A`` is a
one-sided Clopper–Pearson lower confidence bound from Monte Carlo counts, so a returned
radius is wrong with probability at most ``α`` over the sampling noise; that is the only
way it can be wrong.

Entry points: :class:`Smooth` (``certify``, ``predict``, ``certify_batch``,
``certify_adaptive``), :class:`SmoothCertificate`, and the exact binomial bounds
:func:`clopper_pearson_lower` and :func:`clopper_pearson_interval` (from :mod:`gmfast.binomial`).

Radii are float64 and rounded *down* (see :func:`_radius`); they are never cast to a
narrower type, which could round them up past the bound.
"""

from __future__ import annotations

import bisect
import math
import operator
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats
from tqdm.auto import tqdm

from gmfast._smoothing_args import as_input as _as_input
from gmfast._smoothing_args import checkpoints as _checkpoints
from gmfast._smoothing_args import level as _level
from gmfast._smoothing_args import one_input as _one_input
from gmfast._smoothing_args import positive_int as _positive_int
from gmfast.binomial import clopper_pearson_interval, clopper_pearson_lower

__all__ = ["Smooth", "SmoothCertificate", "clopper_pearson_lower", "clopper_pearson_interval"]

#: abstention label, as in Cohen et al. and every gmfast certificate.
ABSTAIN = -1


def _radius(p_lower, sigma):
    """``σ Φ⁻¹(p_lower)`` in float64 where ``p_lower > ½``, else 0 (abstain).

    The result is multiplied by ``1 − 8ε`` so the rounding of ``Φ⁻¹`` and of the product
    (a few ulps) cannot push it above the exact value; NaN bounds give 0.
    """
    p = np.asarray(p_lower, dtype=np.float64)
    certified = p > 0.5  # False for NaN
    r = np.zeros(p.shape)
    r[certified] = sigma * stats.norm.ppf(p[certified]) * (1.0 - 8.0 * np.finfo(np.float64).eps)
    return r


# ---------------------------------------------------------------------------------------
# Result
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SmoothCertificate:
    """Randomized-smoothing predictions and certified ℓ2 radii for a batch (CPU tensors).

    Attributes
    ----------
    prediction : LongTensor (B,)
        Class ``c_A`` of the smoothed classifier, ``-1`` for abstain.
    radius : float64 tensor (B,)
        ``σ Φ⁻¹(p_A)``: with probability ``≥ 1 − α`` the smoothed prediction is constant
        on the open ℓ2 ball of this radius. ``0.0`` for abstain.
    counts_selection : LongTensor (B, K)
        Class histogram of the ``n0`` selection samples (chooses ``c_A``).
    counts : LongTensor (B, K)
        Class histogram of the fresh estimation samples (bounds ``p_A``).
    samples : LongTensor (B,)
        Base-classifier evaluations spent on each input (selection + estimation).
    invalid : LongTensor (B,)
        Evaluations whose output was not a class (NaN logits, a label outside ``0..K−1``);
        any such output makes the input abstain.
    p_lower : float64 tensor (B,)
        The lower confidence bound on ``p_A`` the radius comes from (0 when not computed).

    ``pred, r = cert`` unpacks ``prediction`` and ``radius``.
    """

    prediction: torch.Tensor
    radius: torch.Tensor
    counts_selection: torch.Tensor
    counts: torch.Tensor
    samples: torch.Tensor
    invalid: torch.Tensor
    p_lower: torch.Tensor

    def __iter__(self):
        yield self.prediction
        yield self.radius

    def __len__(self) -> int:
        return int(self.prediction.shape[0])


# ---------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------


def _count(labels, owner_index, num_inputs, num_classes):
    """Per-input class histogram of one forward batch, in a single ``bincount``.

    Parameters
    ----------
    labels : LongTensor (N,)
        Base-classifier outputs; anything outside ``0..K−1`` (``-1`` for NaN logits) is
        not a class and lands in an overflow bin that is dropped.
    owner_index : LongTensor (N,)
        Input (``0..num_inputs−1``) each noisy sample belongs to; same device as labels.
    num_inputs, num_classes : int

    Returns
    -------
    LongTensor (num_inputs, num_classes) on the labels' device.

    This is the contract a fused GPU kernel (argmax + histogram) can replace.
    """
    size = num_inputs * num_classes
    valid = (labels >= 0) & (labels < num_classes)
    flat = torch.where(valid, owner_index * num_classes + labels, size)
    return torch.bincount(flat, minlength=size + 1)[:size].view(num_inputs, num_classes)


# ---------------------------------------------------------------------------------------
# Smoothed classifier
# ---------------------------------------------------------------------------------------


class Smooth:
    """Smoothed classifier ``g(x) = argmax_k P(f(x + δ) = k)``, ``δ ~ N(0, σ² I)``.

    Parameters
    ----------
    base : callable, object with ``predict``, or ``(encoder, head)``
        The base classifier ``f`` on batches ``(N, *input_shape)``. A callable returns
        logits ``(N, K)`` and ``f`` is their argmax (rows with a NaN are not a class). An
        object with a ``predict(x) -> (N,)`` integer method (a gmfast
        ``GaussianMixtureHead``) is used through it, so no probabilities are materialised.
        ``(encoder, head)`` means ``head.predict(encoder(x))`` (or the argmax of
        ``head(encoder(x))`` when the head has no ``predict``). Any ``torch.nn.Module``
        involved must not have a mode-dependent submodule in training mode (BatchNorm,
        Dropout, RReLU, spectral normalisation, ...: see
        :func:`gmfast._validate.mode_dependent_modules`): those change ``f`` between calls,
        and the certificate would mean nothing. Stateless layers are accepted in either mode.
    num_classes : int
        ``K ≥ 2``.
    sigma : float
        Noise standard deviation ``σ > 0``, in input units.
    seed : int, optional
        Seeds the noise generator (one ``torch.Generator`` per device, all with this
        seed). By default a seed is drawn from torch's global RNG, so ``torch.manual_seed``
        makes runs reproducible.
    generator : torch.Generator, optional
        Use this generator instead; it must live on the inputs' device. Exclusive with
        ``seed``.
    progress : bool
        Show a tqdm bar over forward batches.

    Notes
    -----
    Noise is drawn in the input's dtype on the input's device, in forward batches of at
    most ``batch_size`` noisy copies (several inputs share a batch in the batched
    methods). The certified object is the smoothed classifier for that (rounded) Gaussian,
    as in every implementation. The base runs under ``torch.no_grad()``. Results are CPU
    tensors; radii are float64 and rounded down.
    """

    def __init__(self, base, num_classes, sigma, *, seed=None, generator=None, progress=False, fused="auto"):
        if isinstance(base, tuple):
            if len(base) != 2:
                raise ValueError(
                    f"base as a tuple must be (encoder, head); got {len(base)} elements"
                )
            self._encoder, self._head = base
            if not callable(self._encoder):
                raise TypeError(f"encoder must be callable; got {type(self._encoder).__name__}")
        else:
            self._encoder, self._head = None, base
        self._use_predict = callable(getattr(self._head, "predict", None))
        if not self._use_predict and not callable(self._head):
            raise TypeError(
                f"base must be callable (returning logits) or have a predict method; "
                f"got {type(self._head).__name__}"
            )
        self.base = base
        self.num_classes = operator.index(num_classes)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2; got {self.num_classes}")
        self.sigma = float(sigma)
        if not (math.isfinite(self.sigma) and self.sigma > 0):
            raise ValueError(f"sigma must be a finite positive float; got {sigma!r}")
        if seed is not None and generator is not None:
            raise ValueError("pass either seed or generator, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator; got {type(generator).__name__}")
        self._generator = generator
        self._seed = int(seed) if seed is not None else int(torch.randint(0, 2**62, ()).item())
        self._generators = {}
        self.progress = bool(progress)
        if fused not in ("auto", True, False):
            raise ValueError(f"fused must be 'auto', True or False; got {fused!r}")
        self.fused = fused
        self._check_eval()

    # -- public API ---------------------------------------------------------------------

    def certify(self, x, n0, n, alpha, batch_size):
        """CERTIFY of Cohen et al. (2019) for one input.

        ``c_A`` is the most frequent class (lowest index on ties) among ``n0`` noisy
        samples; ``n`` fresh samples give ``n_A`` hits of ``c_A``; ``p_A`` is the one-sided
        Clopper–Pearson lower bound at level ``α``. Abstain if ``p_A ≤ ½``.

        Parameters
        ----------
        x : Tensor (*input_shape)
            One input, no batch dimension.
        n0, n : int
            Selection and estimation sample counts.
        alpha : float
            Failure probability of the certificate.
        batch_size : int
            Most noisy copies per forward pass.

        Returns
        -------
        (int, float)
            ``(c_A, σ Φ⁻¹(p_A))`` or ``(-1, 0.0)``.
        """
        x = _as_input(x, "x")
        with _one_input(x, "certify"):
            pred, radius = self.certify_batch(x.unsqueeze(0), n0, n, alpha, batch_size)
        return int(pred[0]), float(radius[0])

    def predict(self, x, n, alpha, batch_size):
        """PREDICT of Cohen et al. (2019) for one input: ``c_A`` or ``-1``.

        With ``n_A, n_B`` the two largest counts among ``n`` noisy samples, return the top
        class when the two-sided binomial test of ``n_A`` out of ``n_A + n_B`` against ½ has
        p-value ``≤ α``; the returned class then differs from ``g(x)`` with probability at
        most ``α``.

        Parameters
        ----------
        x : Tensor (*input_shape)
        n : int
        alpha : float
        batch_size : int

        Returns
        -------
        int
        """
        x = _as_input(x, "x")
        with _one_input(x, "predict"):
            return int(self.predict_batch(x.unsqueeze(0), n, alpha, batch_size)[0])

    def predict_batch(self, X, n, alpha, batch_size):
        """:meth:`predict` for each row of ``X`` (B, *input_shape); LongTensor (B,)."""
        X = _as_input(X, "X", batched=True)
        n = _positive_int(n, "n")
        alpha = _level(alpha)
        batch_size = _positive_int(batch_size, "batch_size")
        self._check_eval()
        need = torch.full((X.shape[0],), n)
        counts, invalid = self._sample_counts(X, need, batch_size, "predict")
        top = torch.sort(counts, dim=1, descending=True, stable=True)
        out = torch.full((X.shape[0],), ABSTAIN, dtype=torch.int64)
        for i in range(X.shape[0]):
            n_a, n_b = int(top.values[i, 0]), int(top.values[i, 1])
            if invalid[i] == 0 and stats.binomtest(n_a, n_a + n_b, 0.5).pvalue <= alpha:
                out[i] = int(counts[i].argmax())
        return out

    def certify_batch(self, X, n0, n, alpha, batch_size):
        """CERTIFY (Cohen et al. 2019) for every row of ``X``, sampling several per pass.

        Parameters
        ----------
        X : Tensor (B, *input_shape)
        n0, n : int
            Selection and estimation samples per input.
        alpha : float
            Per-input failure probability.
        batch_size : int
            Most noisy copies per forward pass (shared by consecutive inputs).

        Returns
        -------
        SmoothCertificate
            ``samples`` is ``n0 + n`` (``n0`` when a selection output was invalid: the
            input abstains and gets no estimation samples).
        """
        X = _as_input(X, "X", batched=True)
        n0, n = _positive_int(n0, "n0"), _positive_int(n, "n")
        alpha = _level(alpha)
        batch_size = _positive_int(batch_size, "batch_size")
        self._check_eval()
        B = X.shape[0]
        sel, invalid_sel = self._sample_counts(X, torch.full((B,), n0), batch_size, "selection")
        c_a = sel.argmax(dim=1)  # first maximum: lowest index on ties
        need = torch.where(invalid_sel > 0, 0, n)
        counts, invalid_est = self._sample_counts(X, need, batch_size, "estimation")
        n_a = counts.gather(1, c_a[:, None])[:, 0]
        p_lower = clopper_pearson_lower(n_a.numpy(), need.numpy(), alpha)
        return self._finish(c_a, p_lower, sel, counts, n0 + need, invalid_sel + invalid_est)

    def certify_adaptive(
        self, X, alpha, *, radius=None, rtol=0.05, n_max=100_000, n0=100, batch_size=1000,
        schedule=None,
    ):
        """CERTIFY with a sequential sample size: stop each input as soon as it is decided.

        Selection is as in :meth:`certify_batch` (``n0`` samples pick ``c_A``). Estimation
        draws fresh samples up to checkpoints ``n_1 < … < n_m = n_max`` (cumulative
        counts; default ``100·4^j`` capped at ``n_max``). At checkpoint ``j`` it computes
        the Clopper–Pearson bounds ``p_lo,j`` and ``p_hi,j`` of ``n_A,j`` out of ``n_j`` at
        level ``α/m`` each, and stops the input when

        - ``radius = r`` is given: ``p_lo,j ≥ Φ(r/σ)`` (certified at ``r``) or
          ``p_hi,j < Φ(r/σ)`` (not certifiable at ``r`` at this level);
        - ``radius`` is None: ``p_hi,j ≤ ½`` (will abstain), or the radius has converged,
          ``σΦ⁻¹(p_lo,j) ≥ (1 − rtol) σΦ⁻¹(p_hi,j)``. A relative precision is expensive
          where the radius is near 0 (``p_A`` just above ½) or where ``n_A = n_j`` (the
          upper bound is 1 and the radius keeps growing with ``n``): such inputs tend to
          run to ``n_max``. Pass ``radius`` when a target is known;
        - or ``n_j = n_max``.

        It returns ``c_A`` and ``σ Φ⁻¹(p_lo,τ)`` at the stopping checkpoint ``τ`` (abstain
        if ``p_lo,τ ≤ ½``). Inputs that stop drop out of further sampling.

        Why the guarantee is still ``α``: the selection samples are independent of the
        estimation samples, so given ``c_A`` each ``n_A,j`` is exactly
        ``Binom(n_j, p_A)`` for the fixed ``n_j``, and the event
        ``E_j = {p_lo,j > p_A}`` has probability ``≤ α/m``. By the union bound,
        ``P(∪_j E_j) ≤ α``. Whatever the stopping rule, ``p_lo,τ`` is one of the
        ``p_lo,j``, so ``{p_lo,τ > p_A} ⊂ ∪_j E_j`` and ``P(p_lo,τ > p_A) ≤ α`` for every
        stopping time; on the complement, Cohen et al.'s Theorem 1 makes the returned
        radius valid. The upper bounds only decide when to stop, so their level affects
        efficiency, not soundness. The price is level ``α/m`` instead of ``α`` at each
        checkpoint, a small loss of radius for ``m ≈ 6``.

        Parameters
        ----------
        X : Tensor (B, *input_shape)
        alpha : float
        radius : float, optional
            Target radius ``r ≥ 0``.
        rtol : float
            Relative radius precision when ``radius`` is None, ``0 < rtol < 1``.
        n_max : int
            Largest estimation sample count.
        n0 : int
            Selection samples.
        batch_size : int
            Most noisy copies per forward pass.
        schedule : sequence of int, optional
            Strictly increasing cumulative checkpoints ending at ``n_max``.

        Returns
        -------
        SmoothCertificate
            ``samples`` is ``n0 +`` the estimation samples the input used.
        """
        X = _as_input(X, "X", batched=True)
        alpha = _level(alpha)
        n0 = _positive_int(n0, "n0")
        n_max = _positive_int(n_max, "n_max")
        batch_size = _positive_int(batch_size, "batch_size")
        checkpoints = _checkpoints(schedule, n_max)
        if radius is not None:
            radius = float(radius)
            if not (math.isfinite(radius) and radius >= 0):
                raise ValueError(f"radius must be a finite float >= 0; got {radius!r}")
            target = float(stats.norm.cdf(radius / self.sigma))
        else:
            rtol = float(rtol)
            if not 0 < rtol < 1:
                raise ValueError(f"rtol must lie in (0, 1); got {rtol!r}")
        self._check_eval()

        B, K = X.shape[0], self.num_classes
        level = alpha / len(checkpoints)
        sel, invalid = self._sample_counts(X, torch.full((B,), n0), batch_size, "selection")
        c_a = sel.argmax(dim=1)
        counts = torch.zeros(B, K, dtype=torch.int64)
        used = torch.zeros(B, dtype=torch.int64)
        p_lower = np.zeros(B)
        active = (invalid == 0).numpy()
        done = 0
        for j, n_j in enumerate(checkpoints):
            idx = np.flatnonzero(active)
            if idx.size == 0:
                break
            idx_t = torch.from_numpy(idx)
            X_act = X.index_select(0, idx_t.to(X.device))
            hist, inv = self._sample_counts(
                X_act, torch.full((idx.size,), n_j - done), batch_size, f"estimation ≤{n_j}"
            )
            counts[idx_t] += hist
            invalid[idx_t] += inv
            used[idx_t] = n_j
            done = n_j
            n_a = counts[idx_t, c_a[idx_t]].numpy()
            lo, hi = clopper_pearson_interval(n_a, n_j, 2 * level)  # α/m on each side
            p_lower[idx] = lo
            if radius is not None:
                stop = (lo >= target) | (hi < target)
            else:
                r_lo, r_hi = stats.norm.ppf(lo), stats.norm.ppf(hi)
                stop = (hi <= 0.5) | ((lo > 0.5) & (hi < 1.0) & (r_lo >= (1.0 - rtol) * r_hi))
            stop |= (inv > 0).numpy() | (j == len(checkpoints) - 1)
            active[idx[stop]] = False
        return self._finish(c_a, p_lower, sel, counts, n0 + used, invalid)

    # -- internals ----------------------------------------------------------------------

    def _finish(self, c_a, p_lower, sel, counts, samples, invalid):
        p_lower = np.where(invalid.numpy() > 0, 0.0, np.nan_to_num(p_lower, nan=0.0))
        radius = _radius(p_lower, self.sigma)
        prediction = torch.where(torch.from_numpy(p_lower > 0.5), c_a, ABSTAIN)
        return SmoothCertificate(
            prediction=prediction,
            radius=torch.from_numpy(radius),
            counts_selection=sel,
            counts=counts,
            samples=samples,
            invalid=invalid,
            p_lower=torch.from_numpy(p_lower),
        )

    def _check_eval(self):
        """Refuse a base whose function changes with the training flag while it is set.

        Only modules whose forward depends on the mode count
        (:func:`gmfast._validate.mode_dependent_modules`: BatchNorm, Dropout, RReLU,
        spectral normalisation, ...); a plain ``nn.Linear`` left in train mode computes the
        same function as in eval mode and is accepted.
        """
        from gmfast._validate import mode_dependent_modules

        for part in (self._encoder, self._head):
            if isinstance(part, torch.nn.Module):
                for name, module in mode_dependent_modules(part):
                    if module.training:
                        where = f" (submodule {name!r}, {type(module).__name__})" if name else ""
                        raise ValueError(
                            f"{type(part).__name__} is in training mode{where}; call "
                            f".eval() first: {type(module).__name__} in training mode makes the "
                            f"base classifier change between calls and the certificate meaningless"
                        )

    def _noise_generator(self, device):
        if self._generator is not None:
            g = self._generator.device
            if g.type != device.type or (
                g.index is not None and device.index is not None and g.index != device.index
            ):
                raise ValueError(
                    f"generator lives on {g} but the inputs are on {device}; pass a "
                    f"torch.Generator(device={str(device)!r}) or a seed"
                )
            return self._generator
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self._seed)
        return self._generators[device]

    def _fused_counter(self, device) -> str | None:
        """The backend whose kernel fuses the head's argmax with the counting, or None.

        Only for a tied :class:`gmfast.GaussianMixtureHead` base (``base=(encoder, head)`` or
        the head alone): its logits are linear, so the kernel keeps them in registers and
        adds one count per row (the contract :mod:`gmfast.ops.smoothing`). ``"auto"``
        uses it on CUDA when Triton is available; ``True`` insists (on the CPU only under
        ``TRITON_INTERPRET=1``, for tests).
        """
        if self.fused is False:
            return None
        from gmfast.head import GaussianMixtureHead
        from gmfast.ops.smoothing import fused_backend

        ok = isinstance(self._head, GaussianMixtureHead) and self._head.covariance_type == "tied"
        backend = fused_backend(device, allow_interpreter=self.fused is True) if ok else None
        if self.fused is True and backend is None:
            raise RuntimeError("fused=True needs a tied GaussianMixtureHead base and Triton on a CUDA device")
        return backend

    def _count_fused(self, noisy, owner, counts, backend) -> None:
        """counts (n_owned, K) += per-owner histogram of the tied head's argmax, fused."""
        from gmfast.ops.smoothing import smoothing_counts

        z = noisy if self._encoder is None else self._encoder(noisy)
        Zt, work, _ = self._head.prepared(z.reshape(z.shape[0], -1))
        smoothing_counts(Zt, owner, counts.shape[0], work.A, work.beta, counts, backend=backend)

    def _labels(self, batch):
        """Base-classifier classes of a noisy batch (N, *shape): LongTensor (N,), -1 = none."""
        z = batch if self._encoder is None else self._encoder(batch)
        N = batch.shape[0]
        if self._use_predict:
            labels = torch.as_tensor(self._head.predict(z), device=batch.device)
            if labels.is_floating_point() or labels.is_complex():
                raise TypeError(
                    f"base.predict must return integer classes; got dtype {labels.dtype}"
                )
            labels = labels.reshape(-1).long()
            if labels.shape[0] != N:
                raise ValueError(f"base.predict returned {labels.shape[0]} labels for {N} inputs")
            return labels
        logits = self._head(z)
        if logits.dim() != 2 or logits.shape != (N, self.num_classes):
            raise ValueError(
                f"base must return logits of shape (N, num_classes) = ({N}, {self.num_classes}); "
                f"got {tuple(logits.shape)}"
            )
        # argmax would silently pick a class for a NaN row; mark it as no class instead.
        return logits.argmax(dim=1).masked_fill(torch.isnan(logits).any(dim=1), -1)

    def _sample_counts(self, X, need, batch_size, desc):
        """Class histograms of ``need[i]`` noisy copies of each ``X[i]``.

        The ``Σ need`` (input, copy) pairs are laid out input after input and cut into
        forward batches of ``batch_size``, so one pass may cover the tail of one input and
        the head of the next, and no pass holds more than ``batch_size`` copies.

        Parameters
        ----------
        X : Tensor (B, *input_shape)
        need : LongTensor (B,) on CPU, entries ``≥ 0``
        batch_size : int
        desc : str
            Progress-bar label.

        Returns
        -------
        counts : LongTensor (B, K) on CPU
        invalid : LongTensor (B,) on CPU
            Copies whose output was not a class.
        """
        B, K, device = X.shape[0], self.num_classes, X.device
        counts = torch.zeros(B, K, dtype=torch.int64, device=device)
        ends = need.cumsum(0).tolist() if B else []
        total = ends[-1] if B else 0
        if total:
            gen = self._noise_generator(device)
            ends_dev = torch.tensor(ends, dtype=torch.int64, device=device)
            bar = tqdm(
                range(0, total, batch_size), desc=desc, unit="batch", leave=False,
                disable=not self.progress,
            )
            with torch.no_grad():
                for start in bar:
                    stop = min(start + batch_size, total)
                    # Inputs covered by this pass; found on the host to avoid a device sync.
                    first = bisect.bisect_right(ends, start)
                    last = bisect.bisect_right(ends, stop - 1)
                    pos = torch.arange(start, stop, device=device)
                    owner = torch.searchsorted(ends_dev[first : last + 1], pos, right=True)
                    noisy = X.index_select(0, owner + first)
                    noise = torch.randn(noisy.shape, generator=gen, dtype=X.dtype, device=device)
                    noisy.add_(noise, alpha=self.sigma)
                    fused = self._fused_counter(device)
                    if fused is not None:
                        self._count_fused(noisy, owner, counts[first : last + 1], fused)
                        continue
                    labels = self._labels(noisy)
                    counts[first : last + 1] += _count(labels, owner, last - first + 1, K)
        counts = counts.cpu()
        return counts, need - counts.sum(dim=1)
