"""gmfast: fast, sound certified robustness for Gaussian-mixture heads on torch encoders.

Public names are imported lazily so that ``import gmfast`` stays cheap and a missing
optional part (the compiled module, triton) never breaks the rest.
"""

__version__ = "0.1.0"

_LAZY = {
    "GaussianMixtureHead": ("gmfast.head", "GaussianMixtureHead"),
    "Certificate": ("gmfast.certificate", "Certificate"),
    "NotFittedError": ("gmfast._validate", "NotFittedError"),
    "fit_head": ("gmfast.fit", "fit_head"),
    "Certifier": ("gmfast.certifier", "Certifier"),
    "certified_accuracy": ("gmfast.certificate", "certified_accuracy"),
    "lipschitz_bound": ("gmfast.lipschitz", "lipschitz_bound"),
    "available_backends": ("gmfast.ops", "available_backends"),
}
_SUBMODULES = {"smoothing", "binomial", "bounds", "distributional", "diagnostics", "mixture", "report", "io",
               "lipschitz", "ops", "cli", "plot", "multiproto", "demo", "bench", "sklearn", "tsv", "train"}


def __getattr__(name):
    import importlib

    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"gmfast.{name}")
    raise AttributeError(f"module 'gmfast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY) + list(_SUBMODULES))
