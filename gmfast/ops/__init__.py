"""Backend dispatch: one entry point per kernel contract, one resolver for all of them.

``backend`` is ``"auto" | "reference" | "cpu" | "triton" | "cuda"``. ``auto`` picks the
compiled kernel for the tensor's device (CPU: ``cpu``; CUDA: ``cuda`` → ``triton``) and
falls back to the pure-PyTorch reference with a one-time warning. A backend requested by
name that cannot run is an error that says why.
"""

from __future__ import annotations

import importlib
import threading
import warnings

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")


class BackendFallbackWarning(UserWarning):
    """``backend='auto'`` fell back to a slower backend."""


_lock = threading.Lock()
_status: dict[str, tuple[bool, str]] = {}
_warned: set[str] = set()


def _probe(name: str) -> tuple[bool, str]:
    """(usable, reason) for a backend, computed once."""
    with _lock:
        if name not in _status:
            try:
                module = importlib.import_module(f"gmfast.ops._{name}")
                ok, why = module.available()
            except Exception as exc:  # an import failure is a reason, not a crash
                ok, why = False, f"{type(exc).__name__}: {exc}"
            _status[name] = (ok, why)
        return _status[name]


def available_backends() -> dict[str, str]:
    """Map each backend to ``"ok"`` or the reason it cannot run here."""
    out = {"reference": "ok"}
    for name in ("cpu", "triton", "cuda"):
        ok, why = _probe(name)
        out[name] = "ok" if ok else why
    return out


def resolve(backend: str | None, device: torch.device) -> str:
    """Concrete backend name for tensors on ``device``."""
    backend = "auto" if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend == "reference":
        return backend
    if backend != "auto":
        want = "cuda" if backend in ("cuda", "triton") else "cpu"
        if device.type != want:
            raise ValueError(f"backend={backend!r} runs on {want} tensors; got a tensor on {device}")
        ok, why = _probe(backend)
        if not ok:
            raise RuntimeError(f"backend={backend!r} is not available: {why}")
        return backend
    chain = ("cpu",) if device.type == "cpu" else ("cuda", "triton") if device.type == "cuda" else ()
    for name in chain:
        if _probe(name)[0]:
            return name
    key = device.type
    if key not in _warned:
        _warned.add(key)
        reasons = "; ".join(f"{n}: {_probe(n)[1]}" for n in chain) or "no compiled kernel for this device"
        warnings.warn(
            f"gmfast: no compiled kernel for {device.type} tensors ({reasons}); "
            "using the pure-PyTorch reference",
            BackendFallbackWarning,
            stacklevel=3,
        )
    return "reference"


def mark_broken(name: str, reason: str) -> None:
    """Record that a backend failed at its first real call (e.g. CUDA built, no driver)."""
    with _lock:
        _status[name] = (False, reason)


def kernel_module(name: str):
    return importlib.import_module(f"gmfast.ops._{name}")
