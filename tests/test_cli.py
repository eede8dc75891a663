"""The command line as a user meets it: file formats, unlabelled data, one-line errors, exit
codes, pipes, --version, warnings, the TSV time format, smooth and analyze."""

import datetime
import math
import shutil
import subprocess

import numpy as np
import pytest
import torch
from helpers import blobs
from sklearn.datasets import load_digits, make_classification

from gmfast import GaussianMixtureHead as Head
from gmfast.cli import main as cli_main
from gmfast.cli import read_latents, write_latents
from gmfast.tsv import format_time, parse_time, read_certification_tsv, summarize, write_certification_tsv

GMFAST = shutil.which("gmfast")


def _run(*args, stdin=None, shell=False):
    cmd = args[0] if shell else [GMFAST, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, shell=shell, input=stdin)


def _one_line_error(proc, *needles, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    err = proc.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)


@pytest.fixture
def files(tmp_path):
    Z, y = blobs(400, 3, 4, seed=90)
    write_latents(tmp_path / "train.safetensors", torch.tensor(Z), torch.tensor(y))
    np.savez(tmp_path / "test.npz", latents=Z[:60], labels=y[:60])
    np.save(tmp_path / "test.npy", Z[:60])
    with open(tmp_path / "test.csv", "w") as f:
        f.write("a,b,label,c,d\n")
        for z, lab in zip(Z[:60], y[:60]):
            f.write(f"{float(z[0])!r},{float(z[1])!r},{lab},{float(z[2])!r},{float(z[3])!r}\n")
    with open(tmp_path / "test.tsv", "w") as f:  # no header: every column is a latent
        for z in Z[:60]:
            f.write("\t".join(repr(float(v)) for v in z) + "\n")
    head = Head("tied", shrinkage="ledoit-wolf").fit(Z, y)
    head.save(tmp_path / "h.safetensors")
    return tmp_path, Z, y, head


def test_every_latents_format_reads_the_same(files):
    tmp, Z, y, _ = files
    for name, labelled in (("test.npz", True), ("test.npy", False), ("test.csv", True), ("test.tsv", False)):
        Zr, yr = read_latents(tmp / name, need_labels=False)
        np.testing.assert_array_equal(Zr.double().numpy(), Z[:60])  # repr round-trips exactly
        if labelled:
            np.testing.assert_array_equal(yr.numpy(), y[:60])
        else:
            assert yr is None


def test_certify_unlabelled_latents_and_time_format(files):
    tmp, Z, y, head = files
    for name in ("test.npy", "test.tsv", "test.csv"):
        out = tmp / (name + ".out.tsv")
        assert cli_main(["certify", "--head", str(tmp / "h.safetensors"), "--latents", str(tmp / name),
                         "--out", str(out)]) == 0
        rows = read_certification_tsv(out)
        ref = head.certify(torch.tensor(Z[:60]))
        np.testing.assert_array_equal(rows["predict"], ref.prediction.numpy())
        np.testing.assert_array_equal(rows["radius"], ref.radius.numpy())
        if name == "test.csv":
            np.testing.assert_array_equal(rows["label"], y[:60])
            np.testing.assert_array_equal(rows["correct"], (ref.prediction.numpy() == y[:60]).astype(int))
        else:
            assert (rows["label"] == -1).all() and (rows["correct"] == -1).all()
        # time is per input, H:MM:SS.ffffff as Cohen's str(timedelta)
        t = out.read_text().splitlines()[1].split("\t")[5]
        h, m, s = t.split(":")
        assert len(m) == 2 and len(s) == 9 and s[2] == "." and float(s) < 1.0, t


def test_time_format_round_trip():
    for sec in (0.0, 1.5e-6, 0.25, 61.000001, 3725.5):
        text = format_time(sec)
        td = datetime.timedelta(seconds=sec)
        assert parse_time(text) == pytest.approx(td.total_seconds(), abs=1e-6)
        if td.microseconds:
            assert text == str(td)  # Cohen's own spelling
    with pytest.raises(ValueError, match="seconds"):
        format_time(-1.0)


def test_fit_default_shrinkage_works_on_rank_deficient_data(tmp_path):
    X, y = load_digits(return_X_y=True)
    np.savez(tmp_path / "digits.npz", latents=X[:900], labels=y[:900])
    Xr, yr = make_classification(400, 20, n_informative=5, n_redundant=5, random_state=0)
    np.savez(tmp_path / "red.npz", latents=Xr, labels=yr)
    for name, X_, y_ in (("digits", X[:900], y[:900]), ("red", Xr, yr)):
        assert cli_main(["fit", "--latents", str(tmp_path / f"{name}.npz"), "--out", str(tmp_path / f"{name}.h")
                         + ".safetensors"]) == 0
        head = Head.load(tmp_path / f"{name}.h.safetensors")
        assert 0 < head.shrinkage_ < 1
        # sound against an exact float64 computation of the stored classifier's radius
        mu, cov, pri = head.means_.numpy(), head.covariance_.numpy(), head.priors_.numpy()
        W = np.linalg.solve(cov, mu.T).T
        L = X_ @ W.T + np.log(pri) - 0.5 * (W * mu).sum(1)
        c = L.argmax(1)
        ref = np.full(len(X_), np.inf)
        for j in range(len(mu)):
            dv = W[c] - W[j]
            nrm = np.linalg.norm(dv, axis=1)
            r = np.where(c == j, np.inf, (L[np.arange(len(X_)), c] - L[:, j]) / np.where(nrm > 0, nrm, 1))
            ref = np.minimum(ref, r)
        cert = head.certify(torch.tensor(X_))
        assert (cert.radius.numpy() <= ref * (1 + 1e-9)).all()
        assert (cert.prediction.numpy() == y_).mean() > 0.8
    # the literal shrinkage spellings are accepted too
    for s in ("auto", "ledoit-wolf", "0.3"):
        assert cli_main(["fit", "--latents", str(tmp_path / "red.npz"), "--out", str(tmp_path / "s.safetensors"),
                         "--shrinkage", s]) == 0


def test_bad_input_is_one_line_that_says_what_to_do(files, capsys):
    tmp, Z, y, _ = files
    h = str(tmp / "h.safetensors")

    def err(*argv, needles):
        code = cli_main(list(argv))
        text = capsys.readouterr().err.strip()
        assert code == 2, (code, text)
        assert "\n" not in text and "Traceback" not in text, text
        for n in needles:
            assert n in text, (n, text)
        return text

    (tmp / "garbage.npz").write_bytes(b"this is not a zip file" * 20)
    text = err("certify", "--head", h, "--latents", str(tmp / "garbage.npz"), needles=("not a valid .npz", "np.savez"))
    assert "allow_pickle" not in text  # never suggests unpickling
    np.savez(tmp / "obj.npz", latents=np.array([object()], dtype=object))
    err("certify", "--head", h, "--latents", str(tmp / "obj.npz"), needles=("not a valid .npz",))
    (tmp / "bad.safetensors").write_bytes(b"not a file")
    err("certify", "--head", h, "--latents", str(tmp / "bad.safetensors"), needles=("not a valid safetensors file",))
    (tmp / "bad.npy").write_bytes(b"not a file")
    err("certify", "--head", h, "--latents", str(tmp / "bad.npy"), needles=("not a valid .npy", "np.save"))
    (tmp / "z.parquet").write_bytes(b"x")
    err("certify", "--head", h, "--latents", str(tmp / "z.parquet"), needles=(".npy", ".csv"))
    err("certify", "--head", h, "--latents", str(tmp / "test.npy"), "--out", str(tmp / "missing" / "r.tsv"),
        needles=("does not exist", "mkdir -p"))
    err("fit", "--latents", str(tmp / "test.npy"), "--out", str(tmp / "x.safetensors"), needles=("needs labels",))
    err("fit", "--latents", str(tmp / "train.safetensors"), "--out", str(tmp / "x.safetensors"), "--shrinkage", "lots",
        needles=("shrinkage must be 'auto'",))
    err("fit", "--latents", str(tmp / "train.safetensors"), "--out", str(tmp / "x.safetensors"), "--shrinkage", "2",
        needles=("shrinkage must be 'auto'",))
    err("fitt", needles=("invalid choice", "--help"))
    err("certify", "--head", h, needles=("--latents", "--help"))
    err("certify", "--head", str(tmp / "nohead.safetensors"), "--latents", str(tmp / "test.npy"),
        needles=("no such file",))
    err("analyze", str(tmp / "test.csv"), needles=("header",))
    err("analyze", str(tmp / "test.csv"), "--radii", "a,b", needles=("--radii",))
    err("analyze", str(tmp / "nothere.tsv"), needles=("no such TSV file",))
    with open(tmp / "badrows.csv", "w") as f:
        f.write("1,2,3\n4,x,6\n")
    err("certify", "--head", h, "--latents", str(tmp / "badrows.csv"), needles=("numbers separated by commas",))


def test_pipe_closed_early_is_quiet(files):
    tmp, *_ = files
    Z, _ = blobs(6000, 3, 4, seed=91)
    np.save(tmp / "big.npy", Z)
    proc = subprocess.Popen([GMFAST, "certify", "--head", str(tmp / "h.safetensors"), "--latents",
                             str(tmp / "big.npy")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = [proc.stdout.readline(), proc.stdout.readline()]  # `| head -n 2`
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    code = proc.wait(timeout=300)
    assert first[0].startswith("idx\tlabel")
    assert err == "" and code == 141, (code, err)


def test_version_and_help(capsys):
    import gmfast

    assert cli_main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"gmfast {gmfast.__version__} (torch ")
    for cmd in ("demo", "fit", "certify", "smooth", "analyze", "bench", "report"):
        assert cli_main([cmd, "--help"]) == 0
        assert f"usage: gmfast {cmd}" in capsys.readouterr().out


def test_warnings_are_one_line(files):
    tmp, Z, y, head = files
    Zb = Z[:5].copy()
    Zb[2, 1] = np.nan
    np.save(tmp / "nan.npy", Zb)
    p = _run("certify", "--head", str(tmp / "h.safetensors"), "--latents", str(tmp / "nan.npy"), "--out",
             str(tmp / "nan.tsv"))
    assert p.returncode == 0, p.stderr
    warn = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(warn) == 1 and warn[0].startswith("gmfast: warning:") and "NaN" in warn[0], p.stderr
    rows = read_certification_tsv(tmp / "nan.tsv")
    assert rows["predict"][2] == -1 and rows["radius"][2] == 0.0


def test_smooth_writes_cohen_tsv_and_analyze_summarises(files):
    tmp, Z, y, head = files
    out = tmp / "s.tsv"
    assert cli_main(["smooth", "--head", str(tmp / "h.safetensors"), "--latents", str(tmp / "test.npz"),
                     "--sigma", "0.5", "--n", "1000", "--alpha", "0.001", "--out", str(out)]) == 0
    rows = read_certification_tsv(out)
    assert len(rows["idx"]) == 60 and (rows["label"] == y[:60]).all()
    # every radius is within the largest a run with n samples at level alpha can certify
    top = 0.5 * float(__import__("scipy").stats.norm.ppf(0.001 ** (1 / 1000)))
    assert (rows["radius"] <= top).all() and (rows["radius"] > 0).mean() > 0.8
    s = summarize(rows, [0.0, 0.5])
    np.testing.assert_allclose(s["certified_accuracy"],
                               [np.mean((rows["correct"] == 1) & (rows["radius"] >= r)) for r in (0.0, 0.5)])
    assert s["abstention_rate"] == np.mean(rows["predict"] == -1)
    p = _run("analyze", str(out), "--radii", "0,0.5")
    assert p.returncode == 0 and "cert. acc." in p.stdout and "abstained" in p.stdout


def test_tsv_writer_takes_smoothing_certificates(tmp_path):
    from gmfast.smoothing import Smooth

    Z, y = blobs(300, 3, 4, seed=92)
    head = Head("tied").fit(Z, y)
    cert = Smooth(head, 3, 0.3, seed=0).certify_batch(torch.tensor(Z[:20]), 50, 500, 0.01, 1000)
    write_certification_tsv(tmp_path / "s.tsv", cert, y[:20], seconds=np.full(20, 0.002))
    rows = read_certification_tsv(tmp_path / "s.tsv")
    np.testing.assert_array_equal(rows["predict"], cert.prediction.numpy())
    np.testing.assert_array_equal(rows["radius"], cert.radius.numpy())  # float64, bit-exact
    np.testing.assert_allclose(rows["time"], 0.002)
    with pytest.raises(ValueError, match="one entry per row"):
        write_certification_tsv(tmp_path / "x.tsv", cert, y[:5])
    assert math.isnan(summarize(read_certification_tsv(_unlabelled(tmp_path, cert)), [0.0])["clean_accuracy"])


def _unlabelled(tmp_path, cert):
    write_certification_tsv(tmp_path / "u.tsv", cert)
    return tmp_path / "u.tsv"
