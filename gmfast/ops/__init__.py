"""Backend dispatch: one entry point per kernel contract, one resolver for all of them.

``backend`` is ``"auto" | "reference" | "cpu" | "triton" | "cuda"``, each a module of this
package (:data:`MODULES`) implementing the same contracts (:mod:`gmfast.ops.certify`).
``auto`` picks the compiled kernel for the tensor's device (CPU: ``cpu``; CUDA: ``cuda`` →
``triton``) and falls back to the pure-PyTorch reference with a one-time warning. A backend
requested by name that cannot run is an error that says why.

Fallback is one rule (:func:`call`): a backend that fails at its first real call raises
:class:`BackendFailure`; it is marked broken for the process and the call is resolved again.
"""

from __future__ import annotations

import importlib
import threading
import warnings

import torch

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")

#: backend name -> the module implementing its contracts (imported on first use: triton and
#: the compiled modules are heavy or may be absent)
MODULES = {
    "reference": "gmfast.ops._reference",
    "cpu": "gmfast.ops._cpu",
    "triton": "gmfast.ops._triton",
    "cuda": "gmfast.ops._cuda",
}
#: the device type each backend's tensors live on (None: any)
_DEVICE = {"reference": None, "cpu": "cpu", "triton": "cuda", "cuda": "cuda"}
#: the order ``auto`` tries backends in, per device type; the reference ends every chain
_AUTO = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}


class BackendFallbackWarning(UserWarning):
    """``backend='auto'`` fell back to a slower backend."""


class BackendFailure(RuntimeError):
    """A backend that looked available failed at its first real call (e.g. CUDA built, no
    kernel image for this GPU): :func:`call` marks it broken and resolves again."""


_lock = threading.Lock()
_status: dict[str, tuple[bool, str]] = {}
_warned: set[str] = set()


def _probe(name: str) -> tuple[bool, str]:
    """(usable, reason) for a backend, computed once."""
    with _lock:
        if name not in _status:
            try:
                module = kernel_module(name)
                ok, why = module.available()
            except Exception as exc:  # an import failure is a reason, not a crash
                ok, why = False, f"{type(exc).__name__}: {exc}"
            _status[name] = (ok, why)
        return _status[name]


def available_backends() -> dict[str, str]:
    """Map each backend to ``"ok"`` or the reason it cannot run here."""
    out = {}
    for name in MODULES:
        ok, why = _probe(name)
        out[name] = "ok" if ok else why
    return out


def resolve(backend: str | None, device: torch.device) -> str:
    """Concrete backend name for tensors on ``device``."""
    backend = "auto" if backend is None else backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
    if backend != "auto":
        want = _DEVICE[backend]
        if want is not None and device.type != want:
            raise ValueError(f"backend={backend!r} runs on {want} tensors; got a tensor on {device}")
        ok, why = _probe(backend)
        if not ok:
            raise RuntimeError(f"backend={backend!r} is not available: {why}")
        return backend
    chain = _AUTO.get(device.type, ())
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


def call(op: str, backend: str | None, Z: torch.Tensor, *args):
    """Run contract ``op`` (a function name of the backend modules) on the backend resolved
    for ``Z``; a :class:`BackendFailure` marks that backend broken (warning once) and the
    call is resolved again (a backend named explicitly then raises, saying why)."""
    while True:
        name = resolve(backend, Z.device)
        try:
            return getattr(kernel_module(name), op)(Z, *args)
        except BackendFailure as exc:
            mark_broken(name, str(exc))
            warnings.warn(f"gmfast: backend {name!r} is broken for this process ({exc}); resolving again",
                          BackendFallbackWarning, stacklevel=3)


def mark_broken(name: str, reason: str) -> None:
    """Record that a backend failed at its first real call (e.g. CUDA built, no driver)."""
    with _lock:
        _status[name] = (False, reason)


def kernel_module(name: str):
    """The module implementing backend ``name``'s contracts (:data:`MODULES`)."""
    return importlib.import_module(MODULES[name])


def cpu_info() -> dict:
    """Which instruction-set path the compiled CPU kernels run, and why (detected or forced by
    ``GMFAST_CPU_ISA``); see :func:`gmfast.ops._cpu.cpu_info`."""
    return kernel_module("cpu").cpu_info()


def set_cpu_isa(name: str) -> None:
    """Force a CPU kernel path (``"auto"``, ``"avx512"``, ``"avx2"``, ``"portable"``, ...);
    see :func:`gmfast.ops._cpu.set_cpu_isa`."""
    kernel_module("cpu").set_cpu_isa(name)
