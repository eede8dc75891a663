"""Certified training for Gaussian-mixture heads (issue 17).

A 1-Lipschitz encoder (AOL linear/conv layers, MaxMin activations, isometric
PixelUnshuffle downsampling: :mod:`gmfast.train.layers`) and a tied Gaussian-mixture head
are trained jointly with a loss on the head's normalised margin, the exact latent radius of a
tied head (:mod:`gmfast.train.loss`); the head is then refitted on the trained latents with
:func:`gmfast.fit_head` (or, with ``refit="prototypes"``, the trained prototypes are kept),
and :class:`gmfast.Certifier` certifies in input space through the sound Lipschitz bound of
the *trained* weights.

* :func:`run` / ``gmfast train --data digits|mnist --out DIR``: the recipe, end to end;
* :func:`load` ``(DIR) -> (encoder, head)``;
* :func:`digits_recipe`: the digits recipe trained in memory (for the demo);
* :func:`train`, :class:`Recipe`, :func:`recipe`: the pieces.
"""

from gmfast.train.layers import AOLConv2d, AOLLinear, CayleyConv2d, CayleyLinear, GroupSort, MaxMin, build_encoder
from gmfast.train.loss import TiedPrototypeHead, margin_loss, normalised_margins
from gmfast.train.recipe import (Recipe, certify, final_head, fit_tied_head, load, prototype_head, recipe, run,
                                 save, train)


def digits_recipe(time_budget: float | None = 60.0, *, seed: int = 0, progress: bool = False, log=None):
    """Train the digits recipe on the demo's split (:func:`gmfast.demo.load_digits_split`).

    The recipe is 300 epochs of a 64-128-128-32 Cayley/MaxMin MLP (~0.08–0.2 s per epoch on
    one CPU core, depending on load); ``time_budget`` (seconds) cuts the epochs to what fits.

    Returns ``(encoder, head, (Xte, yte))``: the trained 1-Lipschitz encoder and the recipe's
    tied head (its trained prototypes, :func:`final_head`), ready for
    :class:`gmfast.Certifier`, with the held-out split.
    """
    from gmfast.train.data import load_split

    r = recipe("digits", seed=seed)
    Xtr, ytr, Xte, yte = load_split("digits")
    encoder, prototypes, _ = train(r, Xtr, ytr, time_budget=time_budget, progress=progress, log=log)
    return encoder, final_head(r, encoder, prototypes, Xtr, ytr), (Xte, yte)


__all__ = ["AOLConv2d", "AOLLinear", "CayleyConv2d", "CayleyLinear", "GroupSort", "MaxMin", "Recipe",
           "TiedPrototypeHead", "build_encoder", "certify", "digits_recipe", "final_head", "fit_tied_head", "load",
           "margin_loss", "normalised_margins", "prototype_head", "recipe", "run", "save", "train"]
