"""The kernels' first-use self-check, its fallback and its record (mlxtune.quant.kernel_check),
with the kernel runner swapped for an injected one or the C++ shim: the same machinery
that runs on Metal / CUDA. Also the GPU profile's dispatch served by the reference, and
`mlxtune doctor --kernels`."""

import json
import logging

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner

import kernel_shim
from mlxtune import backend, doctor
from mlxtune.cli import cli
from mlxtune.quant import formats, kernel_check, kernels, layouts

needs_metal_shim = pytest.mark.skipif(kernel_shim.metal_problem() is not None,
                                      reason=f"Metal shim: {kernel_shim.metal_problem()}")
LOGGER = "mlxtune.quant.kernel_check"


@pytest.fixture(autouse=True)
def fresh_records():
    kernel_check.reset_self_checks()
    yield
    kernel_check.reset_self_checks()


def problem(fmt="nf4", M=40, dtype=mx.float32, lora=True, transpose=False, seed=0):
    """(x, arrays, lora, expected float64) for W 48 x 256."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((48, 256)) * 0.05).astype(np.float32)
    if fmt == "nf4":
        a = layouts.nf4_from_dense(w)
        ref = formats.nf4_dequantize(layouts.nf4_to_reference(a))
    else:
        raw = formats.quantize(w, "Q6_K")
        a = layouts.gguf_q6_k(raw, w.shape)
        ref = formats.dequantize_raw(raw, "Q6_K", w.shape)
    ref = ref.astype(np.float64)
    K, N = (48, 256) if transpose else (256, 48)
    x = mx.array(rng.standard_normal((M, K)).astype(np.float32)).astype(dtype)
    x64 = np.array(x.astype(mx.float32), np.float64)
    want = x64 @ (ref if transpose else ref.T)
    args = None
    if lora:
        xa = mx.array(rng.standard_normal((M, 4)).astype(np.float32)).astype(dtype)
        lb = mx.array((rng.standard_normal((4, N)) * 0.1).astype(np.float32)).astype(dtype)
        args = (xa, lb, mx.array([2.0], mx.float32))
        want = want + 2.0 * (np.array(xa.astype(mx.float32), np.float64)
                             @ np.array(lb.astype(mx.float32), np.float64))
    return x, {k: mx.array(v) for k, v in a.items()}, args, want


def close(y, want, dtype="float32"):
    """Within the self-check's own tolerance (float32 sums of 260 terms, rounded to dtype)."""
    got = np.array(y.astype(mx.float32), np.float64)
    tol = kernel_check.tolerance(dtype, 260, np.abs(want).max(), 2 * np.abs(want).max() * 16)
    return np.abs(got - want).max() <= tol


class Runner:
    """An injected runner: `wrong` scales the reference (wrong arithmetic), `fail` raises
    (a compile error); counts its calls."""

    def __init__(self, mode="good"):
        self.mode, self.calls = mode, []

    def __call__(self, be, spec, launch, dtype):
        self.calls.append(spec.name)
        if self.mode == "fail":
            raise RuntimeError("[metal::Device] Unable to build metal library from source\n"
                               "program_source:12:3: error: use of undeclared identifier 'oops'")
        # a correct kernel: the reference, from the launch's own inputs
        x, fmt = launch.inputs[0], "q6_k" if "q6_k" in spec.name else "nf4"
        names = kernels.FORMAT_INPUTS[fmt]
        arrays = dict(zip(names, launch.inputs[1:1 + len(names)]))
        params = launch.inputs[1 + len(names)]
        if fmt == "nf4":   # undo the padding of the one-element arrays, take the offset back
            blocks = arrays["weight"].size * 8 // 64
            arrays["absmax_scale"] = arrays["absmax_scale"][:-(-blocks // 256)]
            arrays["absmax_offset"] = mx.view(params[5:6], mx.float32)
        lora = None
        if launch.lora:
            lora = (launch.inputs[-2], launch.inputs[-1], mx.view(params[4:5], mx.float32))
        y = kernels.reference(fmt, x, arrays, launch.transpose, lora)
        return y * 1.05 if self.mode == "wrong" else y


def test_tolerance_follows_dtype_and_length():
    assert kernel_check.tolerance("bfloat16", 256, 1.0, 0.0) == 2.0 ** -7
    assert kernel_check.tolerance("float16", 256, 1.0, 0.0) == 2.0 ** -10
    assert kernel_check.tolerance("float32", 512, 0.0, 1.0) > kernel_check.tolerance("float32", 256, 0.0, 1.0)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("transpose", [False, True])
def test_reference_matches_float64(dtype, transpose):
    x, arrays, args, want = problem("q6_k", dtype=getattr(mx, dtype), transpose=transpose)
    y = kernels.reference("q6_k", x, arrays, transpose, args)
    assert y.dtype == getattr(mx, dtype)
    assert close(y, want, dtype)


def test_gpu_profile_takes_the_dispatch_to_the_launch(monkeypatch):
    """On the CPU under the GPU profile: prepare and the launch checks run, the reference
    computes, no kernel is checked or launched; on the CPU profile matmul refuses."""
    seen = []
    prepare, check = kernels.prepare, kernels.check_launch
    monkeypatch.setattr(kernels, "prepare",
                        lambda *a, **k: seen.append("prepare") or prepare(*a, **k))
    monkeypatch.setattr(kernels, "check_launch", lambda s, p: seen.append(s.name) or check(s, p))
    x, arrays, args, want = problem(M=5)
    monkeypatch.setenv("MLXTUNE_PROFILE", "cpu")
    with pytest.raises(RuntimeError, match="no quantized kernels"):
        kernels.matmul("nf4", x, arrays, lora=args)
    monkeypatch.setenv("MLXTUNE_PROFILE", "gpu")
    assert kernels.active_runner() is None
    y = kernels.matmul("nf4", x, arrays, lora=args)
    assert seen[-2:] == ["prepare", "mlxtune_qmv_nf4_lora"]
    assert close(y, want)
    assert kernel_check.self_check_results() == []


def test_launch_checks_catch_a_bad_launch():
    x, arrays, args, _ = problem(M=40)
    p = kernels.prepare("nf4", x, arrays, lora=args)
    s = kernels.spec("metal", "nf4", p.op, p.lora)
    kernels.check_launch(s, p)
    p.grid = (p.grid[0] - kernels.QMM_THREADS, *p.grid[1:])
    with pytest.raises(ValueError, match="does not cover"):
        kernels.check_launch(s, p)
    p = kernels.prepare("nf4", x, arrays, lora=args)
    p.inputs[3] = p.inputs[3][:1]
    with pytest.raises(ValueError, match="constant"):
        kernels.check_launch(s, p)


@pytest.mark.parametrize("mode,status", [("wrong", "mismatch"), ("fail", "error")])
def test_failing_kernel_falls_back_once_with_one_warning(monkeypatch, caplog, mode, status):
    monkeypatch.setenv("MLXTUNE_PROFILE", "gpu")
    runner = Runner(mode)
    x, arrays, args, want = problem(M=40, dtype=mx.bfloat16)
    with caplog.at_level(logging.WARNING, logger=LOGGER), \
            kernels.use_runner(runner, "metal", "test"):
        y1 = kernels.matmul("nf4", x, arrays, lora=args)
        y2 = kernels.matmul("nf4", x, arrays, lora=args)
        other = kernels.matmul("nf4", x[:3], arrays)   # another kernel: its own check
    assert close(y1, want, "bfloat16") and close(y2, want, "bfloat16")   # the reference's
    assert runner.calls == ["mlxtune_qmm_nf4_lora", "mlxtune_qmv_nf4"]   # one check each
    warnings = [r for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 2
    line = warnings[0].getMessage()
    assert "\n" not in line and "mlxtune_qmm_nf4_lora[bfloat16]" in line and status in line
    (record,) = [r for r in kernel_check.self_check_results()
                 if r["kernel"] == "mlxtune_qmm_nf4_lora[bfloat16]"]
    assert record["status"] == status
    assert (record["backend"], record["runner"], record["format"], record["op"],
            record["dtype"], record["lora"], record["transpose"]) == (
        "metal", "test", "nf4", "qmm", "bfloat16", True, False)
    if status == "mismatch":
        assert record["max_error"] > record["tolerance"] > 0
    else:
        assert "undeclared identifier" in record["message"] and record["max_error"] is None
        assert "undeclared identifier" in line
    assert other.shape == (3, 48)


def test_good_kernel_is_launched_after_its_check(monkeypatch, caplog):
    runner = Runner("good")
    x, arrays, args, want = problem("q6_k", M=40, lora=False, transpose=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER), \
            kernels.use_runner(runner, "cuda", "test"):
        for _ in range(3):
            y = kernels.matmul("q6_k", x, arrays, transpose=True)
    assert runner.calls == ["mlxtune_qmm_q6_k_t"] * 4   # the check, then every call
    assert close(y, want)
    assert not [r for r in caplog.records if r.name == LOGGER]
    (record,) = kernel_check.self_check_results()
    assert record["status"] == "ok" and record["max_error"] <= record["tolerance"]


def test_the_gpu_backend_uses_mlx_runner_through_the_same_check(monkeypatch, caplog):
    """On 'metal' the runner is MLX's kernel call: faked here by a kernel object whose
    launch fails as a Metal compile error does; the fallback and the record follow."""
    monkeypatch.setattr(backend, "name", lambda: "metal")
    launched = []

    def fake_kernel(be, spec):
        def call(**kw):
            launched.append(spec.name)
            raise RuntimeError("[metal::Device] Unable to build metal library from source\n"
                               "error: cannot initialize a parameter of type 'device float *'")
        return call

    monkeypatch.setattr(kernels, "_mlx_kernel", fake_kernel)
    assert kernels.active_runner()[2] == "mlx"
    x, arrays, args, want = problem(M=6)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        y = kernels.matmul("nf4", x, arrays, lora=args)
        kernels.matmul("nf4", x, arrays, lora=args)
    assert launched == ["mlxtune_qmv_nf4_lora"]
    assert close(y, want)
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1
    assert kernel_check.self_check_summary()[0]["status"] == "error"


def test_summary_is_json_and_checks_a_models_formats_first(monkeypatch):
    runner = Runner("good")
    assert kernel_check.self_check_summary(formats=["nf4"], dtype=mx.bfloat16) == []   # no runner
    with kernels.use_runner(runner, "metal", "test"):
        summary = kernel_check.self_check_summary(formats=["nf4"], dtype=mx.bfloat16)
    assert len(summary) == len(kernel_check.VARIANTS)
    assert {r["dtype"] for r in summary} == {"bfloat16"}
    assert {r["status"] for r in summary} == {"ok"}
    assert json.loads(json.dumps(summary)) == summary
    assert set(summary[0]) == {"kernel", "backend", "runner", "format", "op", "dtype", "lora",
                               "transpose", "status", "max_error", "tolerance", "message"}


@needs_metal_shim
def test_broken_source_through_the_shim_falls_back(monkeypatch, caplog):
    """A syntax error in the kernel header, compiled by the shim: error, one warning line,
    the reference's result."""
    good = kernels.header("metal")
    monkeypatch.setattr(kernels, "header", lambda be: good.replace(
        "uint block = row * (K / 64) + col / 64;", "uint block = row * (K / 64) + col / 64"))
    x, arrays, args, want = problem(M=40)
    with caplog.at_level(logging.WARNING, logger=LOGGER), \
            kernels.use_runner(kernel_shim.run_launch, "metal", "shim"):
        y = kernels.matmul("nf4", x, arrays, lora=args)
    assert close(y, want)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert "mlxtune_qmm_nf4_lora[float32]" in warning and "\n" not in warning
    assert "error" in warning and "expected ';'" in warning
    (record,) = kernel_check.self_check_results()
    assert record["status"] == "error" and "CompileError" in record["message"]


@needs_metal_shim
def test_wrong_arithmetic_through_the_shim_is_a_mismatch(monkeypatch, caplog):
    """One accumulator of the tiled kernel fed the wrong weight column: it compiles and runs
    and is caught by the tolerance, in bfloat16."""
    good = kernels.header("metal")
    monkeypatch.setattr(kernels, "header", lambda be: good.replace("acc11 += a1 * b1;",
                                                                   "acc11 += a1 * b0;"))
    x, arrays, args, want = problem(M=40, dtype=mx.bfloat16, lora=False)
    with caplog.at_level(logging.WARNING, logger=LOGGER), \
            kernels.use_runner(kernel_shim.run_launch, "metal", "shim"):
        y = kernels.matmul("nf4", x, arrays)
    assert close(y, want, "bfloat16")
    (record,) = kernel_check.self_check_results()
    assert record["status"] == "mismatch" and record["max_error"] > record["tolerance"]
    assert len([r for r in caplog.records if r.name == LOGGER]) == 1


@needs_metal_shim
def test_the_real_sources_pass_their_self_check_through_the_shim():
    with kernels.use_runner(kernel_shim.run_launch, "metal", "shim"):
        records = kernel_check.self_check_all(dtypes=("bfloat16",))
    assert [r["status"] for r in records] == ["ok"] * len(records) == ["ok"] * 12


# -- mlxtune doctor --kernels --------------------------------------------------------------

class FakeShim:
    """kernel_shim's interface for doctor, with an injected runner and no compiler."""

    def __init__(self, runner, problems=None):
        self.run_launch, self.problems = runner, problems or {}

    def problem(self, source):
        return self.problems.get(source)

    def compiler(self, source):
        return "fake++"


def test_doctor_kernels_on_the_cpu(monkeypatch):
    monkeypatch.setattr(doctor, "shim_module", lambda: FakeShim(
        Runner("good"), {"cuda": "no C++ compiler with _Float16"}))
    out = CliRunner().invoke(cli, ["doctor", "--kernels"])
    assert out.exit_code == 0, out.output
    assert "no GPU" in out.output
    rows = [ln for ln in out.output.splitlines() if ln.startswith("mlxtune_q")]
    assert len(rows) == 2 * len(kernel_check.FORMATS) * len(kernel_check.DTYPES) * len(kernel_check.VARIANTS)
    assert sum(" ok " in r for r in rows) == 36 and sum("not run" in r for r in rows) == 36
    assert "kernel self-check  36 ok" in out.output


def test_doctor_kernels_fails_on_a_failing_kernel(monkeypatch):
    monkeypatch.setattr(doctor, "shim_module", lambda: FakeShim(
        Runner("wrong"), {"cuda": "no compiler"}))
    out = CliRunner().invoke(cli, ["doctor", "--kernels", "--json"])
    assert out.exit_code == 1
    info = json.loads(out.stdout)
    statuses = {r["status"] for r in info["kernels"]}
    assert statuses == {"mismatch", "not run"}
    assert any("no GPU" in n for n in info["kernel checks"])


def test_doctor_kernels_without_any_runner(monkeypatch):
    monkeypatch.setattr(doctor, "shim_module", lambda: None)
    out = CliRunner().invoke(cli, ["doctor", "--kernels"])
    assert out.exit_code == 0
    assert "ships with the source tree only" in out.output
    rows = [ln for ln in out.output.splitlines() if ln.startswith("mlxtune_q")]
    assert len(rows) == 72 and all("no GPU: not run" in ln for ln in rows)
