"""Every instruction-set path of the CPU kernels this machine can run, forced in turn.

The kernels are compiled once per ISA (``csrc/cpu/microkernel.h``, ``csrc/cpu/dispatch.cpp``)
and the fastest path the CPU supports runs by default; ``set_cpu_isa`` / ``GMFAST_CPU_ISA``
force another. Each path has its own register blocking (and FMA or not), so each is checked
on its own against the reference: awkward shapes through every GEMM policy (the lanes kernel,
the microkernel, the portable tiles, MKL), rows with non-finite inputs or logits, tied and per-class including the full-covariance Cholesky kernel,
and the fp-soundness tests that put points within rounding distance of a decision boundary
(from ``test_certify_tied.py`` and ``test_cholesky_form.py``, run here once per path).

``test_no_wide_instructions_outside_the_isa_builds`` checks the built module itself: an
AVX/AVX-512 instruction anywhere but in the functions of the ISA builds would make the module
die with an illegal instruction on an older CPU.
"""

import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from helpers import random_head
from test_backends import assert_same, reference_as_cpu, sample
from test_certify_tied import test_fp_sound_near_the_boundary as tied_near_boundary
from test_cholesky_form import test_sound_within_rounding_of_the_boundary as chol_near_boundary

import gmfast
from gmfast.ops import _cpu
from gmfast.params import tied_denominators, tied_error_model

C = _cpu._load()
PATHS = [name for name, ok in C.cpu_isas() if ok]
UNSUPPORTED = [name for name, ok in C.cpu_isas() if not ok]
if UNSUPPORTED:
    print(f"test_isa: compiled paths this CPU cannot run (not tested here): {UNSUPPORTED}")


@pytest.fixture(params=PATHS)
def isa(request):
    """Runs the test with the CPU kernels forced onto one path, then restores ``auto``."""
    _cpu.set_cpu_isa(request.param)
    assert gmfast.ops.cpu_info()["isa"] == request.param
    try:
        yield request.param
    finally:
        _cpu.set_cpu_isa("auto")
        _cpu.set_gemm_policy("auto")


POLICIES = ("auto", "lanes", "micro", "portable", "blas")
# (B, d, K): B = 0 and 1, odd sizes that leave partial strips and panels, K = 2, d = 1, a
# feature count past one k-chunk of the microkernel (256), many classes
TIED_SHAPES = [(0, 5, 3), (1, 1, 2), (7, 3, 2), (13, 1, 67), (97, 64, 3), (97, 65, 2), (250, 513, 5),
               (301, 33, 1001), (301, 300, 67)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tied_every_policy_equals_reference(isa, dtype):
    for B, d, K in TIED_SHAPES:
        head = random_head("tied", d, K, seed=B + d + K)
        Z = sample(head, B, dtype, seed=1, noncontig=(B % 2 == 1))
        ref_cert = {norm: head.certify(Z, norm=norm, backend="reference") for norm in (2, 1)}
        for policy in POLICIES:
            _cpu.set_gemm_policy(policy)
            for norm, b in ref_cert.items():
                a = head.certify(Z, norm=norm, backend="cpu")
                assert_same(a, b, Z, head, dtype, f"{isa} policy={policy} {(B, d, K)} norm={norm}")
        _cpu.set_gemm_policy("auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tied_nonfinite_rows_every_policy(isa, dtype):
    """The kernel itself (no float64 re-run) gives -1 and radius 0 to rows with a NaN/Inf
    input or an overflowing logit, and the reference's answer to every other row of the same
    block, under each GEMM (the lanes kernel's epilogue works on whole blocks of rows)."""
    big = torch.finfo(dtype).max
    for B, d, K in [(70, 9, 5), (70, 33, 130)]:
        head = random_head("tied", d, K, seed=d + K)
        Z = sample(head, B, dtype, seed=3)
        bad = [0, 17, 33, 34, B - 1]
        Z[0, 3] = float("nan")
        Z[17, 0] = float("inf")
        Z[33, :] = big  # finite input whose logits overflow
        Z[34, 1] = -float("inf")
        Z[B - 1, d - 1] = float("nan")
        Z, work, _ = head.prepared(Z)
        inv = tied_denominators(work, 2)[1]
        fp = tied_error_model(work, d, dtype)
        keep = torch.tensor([i for i in range(B) if i not in bad])
        want = head.certify(Z[keep], backend="reference")
        for policy in POLICIES:
            _cpu.set_gemm_policy(policy)
            pred, radius = _cpu.tied_certify(Z, work.A, work.beta, inv, fp)
            what = f"{isa} policy={policy} {(B, d, K)}"
            assert (pred[bad] == -1).all() and (radius[bad] == 0).all(), what
            got = SimpleNamespace(prediction=pred[keep], radius=radius[keep])
            assert_same(got, want, Z[keep], head, dtype, what)
            pred_only, none = _cpu.tied_certify(Z, work.A, work.beta, None, None)
            assert none is None and torch.equal(pred_only, pred), what
        _cpu.set_gemm_policy("auto")


def test_tied_layout_bit_identical_every_policy(isa):
    """Rows with a stride give bit-identical radii to a contiguous copy under every GEMM,
    MKL included (its summation order depends on the leading dimension: the kernel copies
    strided blocks to a contiguous aligned buffer before calling it)."""
    for B, d, K in [(300, 6, 4), (700, 40, 150)]:
        head = random_head("tied", d, K, seed=d)
        X = sample(head, B, torch.float32, seed=4)
        strided = torch.cat([X, X], 1)[:, :d]
        for policy in POLICIES:
            _cpu.set_gemm_policy(policy)
            a, b = head.certify(X, backend="cpu"), head.certify(strided, backend="cpu")
            assert torch.equal(a.prediction, b.prediction) and torch.equal(a.radius, b.radius), \
                f"{isa} policy={policy} {(B, d, K)}: {(a.radius != b.radius).sum().item()} radii differ"
    _cpu.set_gemm_policy("auto")


@pytest.mark.parametrize("kind", ["full", "diag", "spherical"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_perclass_equals_reference(isa, kind, dtype):
    # d = 1, odd d across a 128-byte panel boundary (33 floats / 17 doubles), d past 2 panels
    for B, d, K in [(0, 4, 2), (1, 1, 2), (7, 3, 3), (97, 33, 2), (61, 17, 5), (130, 70, 4), (40, 9, 67)]:
        head = random_head(kind, d, K, seed=B + d + K)
        Z = sample(head, B, dtype, seed=2, noncontig=(B % 2 == 1))
        assert_same(head.certify(Z, backend="cpu"), reference_as_cpu(head, Z), Z, head, dtype, f"{isa} {kind}")


def test_paths_agree_with_each_other():
    """The same inputs on every path: equal predictions and radii up to the rounding of
    different summation orders (each is sound on its own, tested above)."""
    head = random_head("full", 45, 9, seed=7)
    tied = random_head("tied", 130, 70, seed=8)
    out = {}
    for path in PATHS:
        _cpu.set_cpu_isa(path)
        try:
            for name, h in (("full", head), ("tied", tied)):
                Z = sample(h, 301, torch.float32, seed=9)
                out[path, name] = (Z, h.certify(Z, backend="cpu"))
        finally:
            _cpu.set_cpu_isa("auto")
    for (path, name), (Z, cert) in out.items():
        h = head if name == "full" else tied
        assert_same(cert, out[PATHS[0], name][1], Z, h, torch.float32, f"{path} vs {PATHS[0]} ({name})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", [2, float("inf"), 1])
def test_tied_sound_near_the_boundary(isa, dtype, norm):
    tied_near_boundary("cpu", dtype, norm)


def _many_near_ties(K=200, d=8, seed=5):
    """A tied head whose classes all meet at the origin (unit covariance, means on a sphere,
    uniform priors: every logit offset is equal), and points z = t·u at scales t from far below
    to far above the float32 rounding of the logits: near the origin the top class has many
    competitors at almost the same radius, in every chunk of the screened epilogue
    (``csrc/cpu/tied.cpp``: ``screened_min``), which is what can make a wrong skip visible."""
    from gmfast import GaussianMixtureHead

    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(K, d, generator=g, dtype=torch.float64)
    mu = 3.0 * mu / mu.norm(dim=1, keepdim=True)
    head = GaussianMixtureHead.from_params(mu, torch.eye(d, dtype=torch.float64),
                                           torch.full((K,), 1.0 / K, dtype=torch.float64), "tied")
    u = torch.randn(64, d, generator=g, dtype=torch.float64)
    u /= u.norm(dim=1, keepdim=True)
    t = torch.tensor([1e-8, 1e-6, 1e-4, 1e-2, 1.0, 3.0], dtype=torch.float64)
    Z = (t[:, None, None] * u[None]).reshape(-1, d)
    # and points on the perpendicular bisector of two random classes, pushed off it slightly
    i, j = torch.randint(0, K, (2, 64), generator=g)
    mid = 0.5 * (mu[i] + mu[j]) + 1e-5 * torch.randn(64, d, generator=g, dtype=torch.float64)
    return head, torch.cat([Z, mid]).float()


@pytest.mark.parametrize("K", [70, 200])
@pytest.mark.parametrize("norm", [2, 1, float("inf")])
def test_screened_epilogue_is_bit_identical(isa, norm, K):
    """The float32 screen of the many-class epilogue skips only classes that provably cannot
    hold the minimum, so with it the radii are the same bits as the full float64 loop, under
    every GEMM that runs the per-row epilogue, with and without the rounding-error terms, on
    points where many classes are near the minimum. (The screen runs from 64 classes, from 192
    on the portable SSE2 path, ``csrc/cpu/tied.cpp: kScreenMinClasses``: K = 200 tests it on
    every path.)"""
    head, Z = _many_near_ties(K=K)
    for policy in ("auto", "micro", "portable", "blas"):
        _cpu.set_gemm_policy(policy)
        for fp_sound in (True, False):
            try:
                _cpu._set_margin_screen(False)
                want = head.certify(Z, norm=norm, backend="cpu", fp_sound=fp_sound)
            finally:
                _cpu._set_margin_screen(True)
            got = head.certify(Z, norm=norm, backend="cpu", fp_sound=fp_sound)
            what = f"{isa} K={K} policy={policy} norm={norm} fp_sound={fp_sound}"
            assert torch.equal(got.prediction, want.prediction), what
            assert torch.equal(got.radius, want.radius), \
                f"{what}: {(got.radius != want.radius).sum().item()} radii differ"
            if fp_sound:
                assert (got.radius > 0).sum() > Z.shape[0] // 4, f"{what}: too few certified rows to test anything"
    _cpu.set_gemm_policy("auto")


def test_screened_epilogue_sound_against_mpmath(isa):
    """The screened epilogue's radii against the exact radius of the float64 classifier at the
    exact input point (50-digit mpmath), on the near-tie points of ``_many_near_ties``."""
    import mpmath
    from helpers import mp_linear_radius

    head, Z = _many_near_ties(K=200, d=6, seed=9)  # K >= 192: screened on every path
    A, b = head.classifier_params.A.numpy(), head.classifier_params.beta.numpy()
    rows = torch.arange(0, Z.shape[0], 5)
    for policy in ("auto", "blas"):
        _cpu.set_gemm_policy(policy)
        cert = head.certify(Z, backend="cpu")
        for i in rows.tolist():
            c_ex, r_ex = mp_linear_radius(Z[i].double().numpy(), A, b, 2)
            r = mpmath.mpf(cert.radius[i].item())
            assert r <= r_ex, f"{isa} policy={policy} point {i}: returned {r} > exact {r_ex}"
            if cert.prediction[i].item() != c_ex:
                assert cert.radius[i].item() == 0.0
    _cpu.set_gemm_policy("auto")


def test_cholesky_sound_near_the_boundary(isa):
    chol_near_boundary()


def _epilogue_replica(Z, A, beta, inv, alpha, eps):
    """The CPU kernel's tied epilogue (``csrc/cpu/tied.cpp``: ``PairMin``, ``lanes_epilogue``),
    operation for operation in numpy float64, on integer data whose float32 logits and
    ``fl(‖z‖²)`` are exact in any summation order: the radii every correct evaluation without
    FMA contraction returns, bit for bit. Constants written out here (``csrc/common.h``):
    ``‖z‖ ≤ √((ss + 2d·2⁻¹⁵⁰)(1 + γ_{d+2}(2⁻²⁴)))(1 + 4u₆₄)``, ``up = 1 + 8u₆₄``,
    ``down = 1 − 8u₆₄``."""
    import numpy as np

    u64, d = 2.0**-53, Z.shape[1]
    z, a = Z.double().numpy(), A.double().numpy()
    logits = z @ a.T + beta.double().numpy()  # exact: small integers
    c = logits.argmax(1)  # first occurrence, as the kernels
    rows = np.arange(len(c))
    lc = logits[rows, c][:, None]
    m = lc - logits
    iv = inv.numpy()[c]
    if alpha is not None:
        nu = (d + 2) * 2.0**-24
        ss = (z * z).sum(1)  # exact
        zn = (np.sqrt((ss + (2.0 * d) * 2.0**-150) * (1.0 + nu / (1.0 - nu))) * (1.0 + 4.0 * u64))[:, None]
        al, ep = alpha.numpy()[None, :], eps.numpy()[None, :]
        ec = al[0, c][:, None] * zn + ep[0, c][:, None]
        num = m - (((ec + al * zn) + ep) * (1.0 + 8.0 * u64) + (2.0 * u64) * np.abs(m))
    else:
        num = m
    with np.errstate(invalid="ignore"):  # 0 * inf: NaN, which the kernels' max(0, .) turns into 0
        prod = num * iv
    v = np.where(prod > 0, prod, 0.0)
    v[rows, c] = np.inf
    r = v.min(1)
    if alpha is not None:
        r = r * (1.0 - 8.0 * u64)
    # how many (row, class) values came from a 0 * inf (NaN) and from a positive numerator
    # times inf: the cases the max(0, .) semantics must get right
    # and rows whose top logit is attained more than once (the first occurrence must win)
    cases = (int(np.isnan(prod).sum()), int(np.isposinf(prod).sum()), int(((logits == lc).sum(1) > 1).sum()))
    return torch.from_numpy(c), torch.from_numpy(r), cases


@pytest.mark.parametrize("K", [10, 23, 70])
def test_tied_epilogue_bit_exact_on_exact_logits(isa, K):
    """Every form of the float64 epilogue (across rows after the lanes kernel or MKL, per row
    with and without the chunk screen; on SSE2 the hand-vectorised maxpd/minpd loops) against
    an independent numpy replica of its operations, on integer points and parameters (exact
    float32 logits, many exact ties, some infinite reciprocal denominators: 0·inf must give 0,
    a positive numerator times inf gives inf). Paths without FMA (``portable`` on x86-64) must
    match bit for bit, and every path without the error terms (one rounding per value); with
    them the FMA paths fuse some products into additions, which moves a numerator near
    cancellation by a few ulps of its terms, so they are held to 1e-12 absolute (the terms are
    ≤ 300, the reciprocals ≤ 0.51; each path is sound by the rounding bound, tested above)."""
    g = torch.Generator().manual_seed(K)
    B, d = 301, 33  # odd: a single last row after the pairs of rows
    Z = torch.randint(-3, 4, (B, d), generator=g).float()
    A = torch.randint(-3, 4, (K, d), generator=g).float()
    beta = torch.randint(-20, 21, (K,), generator=g).float()
    inv = torch.rand(K, K, generator=g, dtype=torch.float64) * 0.5 + 0.01
    inv[torch.rand(K, K, generator=g) < 0.05] = float("inf")
    alpha = torch.rand(K, generator=g, dtype=torch.float64) * 0.05
    eps = torch.rand(K, generator=g, dtype=torch.float64) * 2.0
    exact = isa == "portable" and re.match(r"x86_64|AMD64", os.uname().machine)
    for fp in (SimpleNamespace(alpha=alpha, eps=eps), None):
        want_c, want_r, (n_nan, n_inf, n_tied) = _epilogue_replica(Z, A, beta, inv,
                                                                   *((fp.alpha, fp.eps) if fp else (None, None)))
        assert (want_r > 0).sum() > B // 4 and (want_r == 0).sum() > 0, "the data test too little"
        assert n_inf > 0 and (n_nan > 0 or fp is not None) and n_tied > 0, (n_nan, n_inf, n_tied)
        for policy in ("lanes", "blas", "micro", "portable"):
            _cpu.set_gemm_policy(policy)
            for screen in (True, False):
                _cpu._set_margin_screen(screen)
                try:
                    pred, rad = _cpu.tied_certify(Z, A, beta, inv, fp)
                finally:
                    _cpu._set_margin_screen(True)
                what = f"{isa} K={K} policy={policy} screen={screen} fp={fp is not None}"
                assert torch.equal(pred, want_c), what
                if exact or fp is None:
                    assert torch.equal(rad, want_r), f"{what}: {(rad != want_r).sum().item()} radii differ"
                else:
                    fin = torch.isfinite(want_r)
                    assert torch.equal(torch.isfinite(rad), fin), what
                    torch.testing.assert_close(rad[fin], want_r[fin], rtol=0.0, atol=1e-12, msg=what)
        _cpu.set_gemm_policy("auto")


def test_forcing_and_info():
    info = gmfast.ops.cpu_info()
    if not os.environ.get("GMFAST_CPU_ISA"):
        assert info["isa"] == PATHS[0] and not info["forced"] and info["reason"].startswith("detected")
    assert set(info["paths"]) == {n for n, _ in C.cpu_isas()}
    with pytest.raises(ValueError, match=r"expected 'auto' or one of .*got 'sse9'"):
        gmfast.ops.set_cpu_isa("sse9")
    # the environment variable forces the path when the kernels load, and is checked too
    code = "import gmfast.ops as o; i = o.cpu_info(); print(i['isa'], i['forced'])"
    env = dict(os.environ, GMFAST_CPU_ISA=PATHS[-1])
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [PATHS[-1], "True"]
    env["GMFAST_GEMM"] = "micro"
    code2 = "import gmfast.ops as o; print(o.cpu_info()['gemm_policy'])"
    res = subprocess.run([sys.executable, "-c", code2], env=env, capture_output=True, text=True, cwd="/")
    assert res.returncode == 0 and res.stdout.split() == ["micro"], res.stderr
    del env["GMFAST_GEMM"]
    env["GMFAST_CPU_ISA"] = "bogus"
    code = "from gmfast.ops import _cpu; _cpu._load()"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")
    assert res.returncode != 0 and "GMFAST_CPU_ISA: expected 'auto' or one of" in res.stderr


def test_unsupported_path_is_refused():
    if not UNSUPPORTED:
        pytest.skip("every compiled path runs on this CPU: there is no path to refuse here")
    with pytest.raises(ValueError, match="cannot run on this CPU"):
        gmfast.ops.set_cpu_isa(UNSUPPORTED[0])


def test_no_wide_instructions_outside_the_isa_builds():
    """Only the functions of the avx2/avx512 builds (their namespace is gmfast_avx2 /
    gmfast_avx512, CMakeLists.txt) may contain VEX/EVEX instructions: anything else runs
    before (or regardless of) the CPU check."""
    if not re.match(r"x86_64|AMD64", os.uname().machine):
        pytest.skip(f"checks x86-64 builds only; this is {os.uname().machine}")
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed: cannot disassemble the module")
    so = C.__file__
    text = subprocess.run([objdump, "-d", "--no-show-raw-insn", so], capture_output=True, text=True,
                          check=True).stdout
    func, bad, wide_in_isa = None, {}, 0
    for line in text.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if m:
            func = m.group(1)
            continue
        parts = line.split("\t")
        if len(parts) < 2 or func is None:
            continue
        insn = parts[1].strip()
        if re.match(r"v[a-z]", insn) or re.search(r"%[yz]mm|%k[0-7]\b|%xmm(1[6-9]|2\d|3[01])\b", insn):
            if "gmfast_avx2" in func or "gmfast_avx512" in func:
                wide_in_isa += 1
            else:
                bad.setdefault(func, insn)
    assert wide_in_isa > 1000, "the ISA builds contain no wide instructions: were they compiled for their ISA?"
    assert not bad, f"{len(bad)} functions outside the ISA builds use AVX/AVX-512, e.g. {list(bad.items())[:5]}"


def test_compiled_radius_cast_rounds_down():
    """``gmfast._fp.round_down_to`` takes the compiled loop (``round_down_f32``) for CPU
    vectors once the kernels are loaded: it must return the largest float32 not above each
    float64 radius (checked against the next float32 up, independently of either
    implementation), and the same bits as the numpy path it replaces, on zeros, subnormals,
    exact float32 values, values just above and below them, the top of the range and inf."""
    import numpy as np

    from gmfast._fp import round_down_to

    g = torch.Generator().manual_seed(3)
    f32 = torch.tensor([0.0, 1.4e-45, 3e-39, 1.0, 0.1, 3.4028234663852886e38], dtype=torch.float32).double()
    edge = torch.cat([f32, f32 * (1 + 2.0**-40), f32 * (1 - 2.0**-40), torch.tensor([1e-46, 1e300, float("inf")],
                                                                                    dtype=torch.float64)])
    x = torch.cat([edge, torch.rand(5000, generator=g, dtype=torch.float64)
                   * torch.logspace(-45, 38, 5000, dtype=torch.float64)])
    got = torch.from_numpy(C.round_down_f32(x.numpy()))
    assert torch.equal(round_down_to(x, torch.float32).view(torch.int32), got.view(torch.int32))
    assert bool((got.double() <= x).all())
    with np.errstate(over="ignore"):  # FLT_MAX steps up to inf
        up = torch.from_numpy(np.nextafter(got.numpy(), np.float32(np.inf))).double()
    assert bool(((up > x) | torch.isinf(x)).all()), "not the largest float32 below"
    # the numpy path (the module hidden from round_down_to) gives the same bits
    saved = sys.modules.pop("gmfast._C")
    try:
        assert torch.equal(round_down_to(x, torch.float32).view(torch.int32), got.view(torch.int32))
    finally:
        sys.modules["gmfast._C"] = saved
