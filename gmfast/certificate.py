"""The certificate returned by every certifier, and certified accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class Certificate:
    """Predictions and certified radii for a batch.

    Attributes
    ----------
    prediction : LongTensor (B,)
        Predicted class; ``-1`` means abstain (non-finite input, overflow).
    radius : float tensor (B,)
        Certified radius in the threat model ``norm``: every perturbation ``δ`` with
        ``‖δ‖ < radius`` leaves the prediction unchanged. ``0`` means not certified.
    norm : 2 | 1 | inf | "mahalanobis"
    extra : dict
        Other per-row tensors a certifier reports (e.g. the latent radius).

    ``pred, r = cert`` unpacks the first two fields.
    """

    prediction: torch.Tensor
    radius: torch.Tensor
    norm: object = 2
    extra: dict = field(default_factory=dict)

    def __iter__(self):
        yield self.prediction
        yield self.radius

    def __len__(self) -> int:
        return int(self.prediction.shape[0])


def certified_accuracy(cert, labels, radii) -> np.ndarray:
    """Fraction of inputs that are correct *and* certified at each radius.

    ``CA(ε) = mean[ prediction == label  and  radius ≥ ε ]``; abstentions (``-1``)
    count as wrong.

    Parameters
    ----------
    cert : Certificate or (prediction, radius)
    labels : (B,) integer labels
    radii : float or sequence of floats

    Returns
    -------
    ndarray of shape (len(radii),), float64
    """
    pred, rad = cert
    pred = torch.as_tensor(pred).reshape(-1).cpu()
    rad = torch.as_tensor(rad).reshape(-1).double().cpu()
    labels = torch.as_tensor(labels).reshape(-1).cpu()
    if not (pred.shape == rad.shape == labels.shape):
        raise ValueError(
            f"prediction, radius and labels must have the same length; got "
            f"{pred.shape[0]}, {rad.shape[0]} and {labels.shape[0]}"
        )
    eps = torch.as_tensor(np.atleast_1d(np.asarray(radii, dtype=np.float64)))
    if pred.shape[0] == 0:
        return np.full(eps.shape[0], np.nan)
    correct = (pred == labels) & (pred >= 0)
    ok = correct[None, :] & (rad[None, :] >= eps[:, None])
    return ok.double().mean(dim=1).numpy()
