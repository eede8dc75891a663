"""One home per soundness constant: the Python derivation (gmfast._fp) and the C++ layout
(csrc/constants.h) agree, and every backend reads the constants rather than deriving them.

The CUDA module's copy of the same check is in tests/test_cuda.py (it needs the emulated
build).
"""

from __future__ import annotations

import math

import pytest
import torch

from gmfast import _fp
from gmfast._fp import PERCLASS_FIELDS, TIED_FIELDS, CovKind
from gmfast.ops import _cpu


def _interface():
    ok, why = _cpu.available()
    if not ok:
        pytest.skip(f"the compiled CPU module is unavailable: {why}")
    return _cpu._load().kernel_interface()


def test_field_order_and_kinds_match_the_compiled_module():
    got = _interface()
    assert tuple(got["tied_fields"]) == TIED_FIELDS
    assert tuple(got["perclass_fields"]) == PERCLASS_FIELDS
    assert got["kinds"] == {k.name.lower(): int(k) for k in CovKind}


def test_base_units_match_the_compiled_module():
    got = _interface()
    for dt, tag in ((torch.float32, "f32"), (torch.float64, "f64")):
        assert got[f"unit_roundoff_{tag}"] == _fp.unit_roundoff(dt)
        assert got[f"underflow_unit_{tag}"] == _fp.underflow_unit(dt)


@pytest.mark.parametrize("d", [1, 7, 512, 100_000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_tied_kernel_constants_equal_python(d, dtype):
    """The CPU tied kernel bounds ``‖z‖`` with common.h's formula: bit-equal to _fp's."""
    C = _cpu._load()
    assert C.tied_kernel_constants(d, dtype == torch.float64) == _fp.tied_constants(d, dtype)


@pytest.mark.parametrize("d", [1, 9, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_perclass_constants_follow_their_definitions(d, dtype):
    """Each named constant is the formula its docstring states (an independent restatement)."""
    c = _fp.perclass_constant_map(d, dtype)
    u = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}[dtype]
    eta = {torch.float32: 2.0**-150, torch.float64: 2.0**-1074}[dtype]
    g = (d + 4) * u / (1 - (d + 4) * u)
    assert c["u"] == u and c["g"] == g and c["S"] == 1 + 4 * g
    assert c["gd"] == d * u / (1 - d * u)
    assert c["nu"] == math.sqrt(2 * (d + 4) * eta) and c["tiny_d"] == 2 * (d + 4) * eta
    assert c["tiny_u"] == 2 * (d + 4) ** 1.5 * eta
    assert c["half_S"] == 0.5 * c["S"] and c["three_u"] == 3 * u and c["one_u"] == 1 + u
    assert c["down8"] < 1 < c["up4"] and c["four_u64"] == 4 * 2.0**-53
    assert list(c) == list(PERCLASS_FIELDS)


def test_kind_codes():
    assert [CovKind.of(n) for n in ("full", "diag", "spherical")] == [0, 1, 2]
    with pytest.raises(ValueError, match="per-class kind must be"):
        CovKind.of("tied")


def test_no_backend_derives_its_own_constants():
    """The derivations live in gmfast._fp only: the kernels' sources do not restate them."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = [*root.glob("gmfast/triton/*.py"), *root.glob("gmfast/ops/*.py"), *root.glob("csrc/cuda/*"),
               root / "csrc/cpu/perclass.cpp", root / "csrc/cpu/fullchol.cpp"]
    for path in sources:
        text = path.read_text()
        for banned in ("gamma(d + 4", "gamma_n(d + 4", "underflow_unit<T>()", "underflow_unit(dtype)",
                       '{"full": 0', "enum class PerClassKind"):
            assert banned not in text, f"{path.relative_to(root)} derives {banned!r} itself"
