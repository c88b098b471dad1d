"""Chunked (fused) KD + LM equals the unchunked loss: pure function in float64, and the real engine path."""

import contextlib
import io
import math
from pathlib import Path

import pytest
import torch

from dsdistill.config import validate
from dsdistill.losses import kd_loss, lm_loss
from dsdistill.losses.fused import KDOptions, auto_chunk, fused_kd_lm
from dsdistill.losses.kd import DIVERGENCES
from dsdistill.schema import METRICS_FILE, EvalRecord, TrainRecord, parse_line
from dsdistill.train import open_session, train
from tests.test_distributed import launch

IGN = -100


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("top_k, rest", [(None, False), (4, False), (4, True)])
@pytest.mark.parametrize("chunk", [1, 4, 100])  # 4 leaves an uneven last chunk of the 16 valid rows
def test_fused_equals_unchunked_values_and_gradients(kind, top_k, rest, chunk):
    g = torch.Generator().manual_seed(0)
    b, s, ds_, dt, v = 3, 7, 5, 6, 11
    sh = torch.randn(b, s, ds_, generator=g, dtype=torch.float64, requires_grad=True)
    sw = torch.randn(v + 2, ds_, generator=g, dtype=torch.float64, requires_grad=True)  # padded embedding rows
    th = torch.randn(b, s, dt, generator=g, dtype=torch.float64)
    tw = torch.randn(v + 2, dt, generator=g, dtype=torch.float64)
    lab = torch.randint(0, v, (b, s), generator=g)
    lab[0, 3] = IGN
    lab[2, 1] = IGN
    opts = KDOptions(temperature=2.0, divergence=kind, beta=0.3, alpha=0.2, top_k=top_k, top_k_rest=rest, chunk=chunk)
    combined, m = fused_kd_lm(sh, sw[:v], th, tw[:v], lab, coef_kd=0.7, coef_lm=0.3, options=opts, ignore_index=IGN)
    combined.backward()
    fused_grads = sh.grad.clone(), sw.grad.clone()
    sh.grad = sw.grad = None
    s_logits, t_logits = sh @ sw[:v].T, th @ tw[:v].T
    kd, km = kd_loss(
        s_logits,
        t_logits,
        lab,
        temperature=2.0,
        ignore_index=IGN,
        divergence_kind=kind,
        beta=0.3,
        alpha=0.2,
        top_k=top_k,
        top_k_rest=rest,
    )
    lm, lmm = lm_loss(s_logits, lab, ignore_index=IGN)
    (0.7 * kd + 0.3 * lm).backward()
    assert m["count"] == km["count"] == lmm["count"] == 16
    assert float(m["kd"]) == pytest.approx(float(kd), rel=1e-12, abs=1e-12)
    assert float(m["kl"]) == pytest.approx(float(km["kl"]), rel=1e-12, abs=1e-12)
    assert float(m["lm"]) == pytest.approx(float(lm), rel=1e-12)
    assert float(combined) == pytest.approx(float(0.7 * kd + 0.3 * lm), rel=1e-12)
    assert torch.allclose(fused_grads[0], sh.grad, rtol=1e-10, atol=1e-12)
    assert torch.allclose(fused_grads[1], sw.grad, rtol=1e-10, atol=1e-12)
    assert torch.count_nonzero(fused_grads[1][v:]) == 0  # padded rows get no gradient


def test_no_gradient_work_without_coefficients():
    sh = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    sw = torch.randn(9, 4, dtype=torch.float64, requires_grad=True)
    lab = torch.randint(0, 9, (2, 5))
    combined, m = fused_kd_lm(
        sh, sw, None, None, lab, coef_kd=0.0, coef_lm=0.0, options=KDOptions(temperature=1.0, want_kd=False, chunk=3)
    )
    assert float(combined) == 0.0 and float(m["lm"]) == pytest.approx(float(lm_loss(sh @ sw.T, lab)[0]), rel=1e-12)


def test_chunk_rows_come_from_a_memory_model_of_every_live_buffer():
    from dsdistill.losses.fused import BYTES_PER_LOGIT, CHUNK_CAP_BYTES, EFFICIENT_ROWS, MAX_ROWS, fixed_bytes

    # the GPU preset (vocab 151,936, teacher 1,536, student 896, 8,192 tokens) on an 80 GB card with half of
    # ~70 GiB free: the free memory would allow ~7,000 rows (33 GiB of chunk buffers); the cap keeps a
    # chunk's buffers within 4 GiB, still hundreds of rows (GEMMs compute-bound), not the 55 of a 256 MiB budget
    fixed = fixed_bytes(tokens=8192, vocab=151_936, s_width=896, t_width=1536, t_dtype_bytes=2, grads=True)
    assert fixed == 151_936 * 1536 * 2 + 4 * (8192 * 896 + 2 * 151_936 * 896)
    rows = auto_chunk(151_936, 896, budget_bytes=35 << 30, fixed=fixed)
    assert EFFICIENT_ROWS <= rows <= 2048 and rows * 151_936 * BYTES_PER_LOGIT <= CHUNK_CAP_BYTES
    assert 2048 <= auto_chunk(32_000, 896, budget_bytes=35 << 30) <= MAX_ROWS  # a smaller vocabulary, more rows
    small = auto_chunk(151_936, 896, budget_bytes=256 << 20)
    assert small * 151_936 * BYTES_PER_LOGIT <= 256 << 20
    assert auto_chunk(151_936, 896, budget_bytes=256 << 20, fixed=300 << 20) == 16  # never below the floor
    assert auto_chunk(100, 16, budget_bytes=1 << 30) == MAX_ROWS


def _run(cfg):
    with contextlib.redirect_stdout(io.StringIO()), open_session(validate(cfg)) as session:
        summary = session.fit()
    recs = [parse_line(line) for line in (Path(summary.run_dir) / METRICS_FILE).read_text().splitlines()]
    return session, [r for r in recs if isinstance(r, TrainRecord)], [r for r in recs if isinstance(r, EvalRecord)]


@pytest.mark.parametrize("stage", [2, 3])
def test_engine_path_fused_equals_full_logits(make_config, tmp_path, stage):
    """Same models, data and steps through the real DeepSpeed engine: identical per-step numbers."""
    runs = {}
    for fused in (True, False):
        cfg = make_config(
            train={"max_steps": 4, "grad_accum": 2},
            eval={"every": 2, "max_batches": 2},
            curriculum={"weights": {"kd": 0.7, "lm": 0.3}},
            loss={"fused_logits": fused, "fused_chunk": 37, "kd": {"divergence": "jsd", "top_k": 9, "top_k_rest": True}},
            deepspeed={
                "student": {
                    "train_micro_batch_size_per_gpu": "auto",
                    "gradient_accumulation_steps": "auto",
                    "zero_optimization": {"stage": stage},
                }
            },
        )
        cfg["output"]["run_dir"] = str(tmp_path / f"fused-{fused}")
        runs[fused] = _run(cfg)
    (s_f, t_f, e_f), (s_u, t_u, e_u) = runs[True], runs[False]
    assert s_f.plan.fused and not s_u.plan.fused
    for a, b in zip(t_f, t_u):
        for name in ("kd", "lm"):
            assert a.losses[name] == pytest.approx(b.losses[name], rel=1e-5), (a.step, name)
        assert a.metrics["kd_kl"] == pytest.approx(b.metrics["kd_kl"], rel=1e-5)
    for a, b in zip(e_f, e_u):
        assert a.objective == pytest.approx(b.objective, rel=1e-5) and a.ppl == pytest.approx(b.ppl, rel=1e-5)
        assert a.teacher_ppl == pytest.approx(b.teacher_ppl, rel=1e-6)


@pytest.mark.slow
def test_two_rank_zero3_fused_equals_full_logits(make_config, tmp_path):
    """Two ranks through the launcher, fused; the full-logit reference on one rank accumulating two
    micro-batches, which are the same rows per step (KD and LM do not depend on how the rows are split)."""
    out = {}
    for fused in (True, False):
        cfg = make_config(
            train={"max_steps": 3, "micro_batch_size": 2, "grad_accum": 1 if fused else 2},
            eval={"every": 0, "max_batches": 1},
            curriculum={"weights": {"kd": 0.7, "lm": 0.3}},
            loss={"fused_logits": fused, "fused_chunk": 29},
            deepspeed={
                "student": {
                    "train_micro_batch_size_per_gpu": "auto",
                    "gradient_accumulation_steps": "auto",
                    "zero_optimization": {"stage": 3},
                }
            },
        )
        cfg["output"]["run_dir"] = str(tmp_path / f"fused-{fused}")
        if fused:
            (tmp_path / "launch").mkdir()
            proc = launch(cfg, tmp_path / "launch")
            assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        else:
            with contextlib.redirect_stdout(io.StringIO()):
                train(validate(cfg))
        recs = [parse_line(line) for line in (Path(cfg["output"]["run_dir"]) / METRICS_FILE).read_text().splitlines()]
        out[fused] = [r for r in recs if isinstance(r, TrainRecord)]
    assert len(out[True]) == len(out[False]) == 3
    for a, b in zip(out[True], out[False]):
        assert all(math.isfinite(v) for v in a.losses.values())
        for name in ("kd", "lm"):
            assert a.losses[name] == pytest.approx(b.losses[name], rel=1e-5), (a.step, name)


@pytest.mark.slow
def test_benchmark_script_smoke(tmp_path):
    """The benchmark runs end to end on the tiny CPU preset (numbers are reported, not asserted)."""
    import json
    import os
    import subprocess
    import sys

    from dsdistill.dist import without_world_env

    env = without_world_env(dict(os.environ))
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "dsdistill.bench", "--preset", "cpu-tiny", "--steps", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    methods = {r["method"]: r for r in report["results"]}
    assert set(methods) >= {"naive", "dsdistill"} and all("error" not in r for r in methods.values())
    assert methods["naive"]["speed_vs_naive"] == 1.0 and methods["dsdistill"]["tokens_per_s"] > 0


# ------------------------------------------------------------------ GPU-grade precision, checked on CPU


def _problem(dtype, *, b=2, s=33, ds_=48, dt=64, v=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(b, s, ds_, generator=g, dtype=torch.float64) * 0.5
    sw = torch.randn(v, ds_, generator=g, dtype=torch.float64) * 0.3
    th = torch.randn(b, s, dt, generator=g, dtype=torch.float64) * 0.5
    tw = torch.randn(v, dt, generator=g, dtype=torch.float64) * 0.3
    lab = torch.randint(0, v, (b, s), generator=g)
    return [x.to(dtype) for x in (sh, sw, th, tw)] + [lab]


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_bf16_inputs_stay_within_bf16_rounding_of_the_float64_reference(kind):
    sh, sw, th, tw, lab = _problem(torch.bfloat16)
    opts = KDOptions(temperature=2.0, divergence=kind, beta=0.3, alpha=0.2, chunk=16)
    sh.requires_grad_(True)
    sw.requires_grad_(True)
    combined, m = fused_kd_lm(sh, sw, th, tw, lab, coef_kd=0.7, coef_lm=0.3, options=opts, ignore_index=IGN)
    combined.backward()
    assert sh.grad.dtype == torch.bfloat16 and sw.grad.dtype == torch.bfloat16
    # reference: the same bf16 numbers, computed in float64 end to end
    ref = [x.detach().double().requires_grad_(i < 2) for i, x in enumerate((sh, sw, th, tw))]
    s_logits, t_logits = ref[0] @ ref[1].T, ref[2] @ ref[3].T
    kd, _ = kd_loss(s_logits, t_logits, lab, temperature=2.0, ignore_index=IGN, divergence_kind=kind, beta=0.3, alpha=0.2)
    lm, _ = lm_loss(s_logits, lab, ignore_index=IGN)
    (0.7 * kd + 0.3 * lm).backward()
    eps = 2.0**-8  # bf16's unit roundoff: logits and GEMM outputs are rounded once to it
    assert float(m["kd"]) == pytest.approx(float(kd), rel=4 * eps, abs=1e-3)
    assert float(m["lm"]) == pytest.approx(float(lm), rel=4 * eps)
    for got, want in ((sh.grad, ref[0].grad), (sw.grad, ref[1].grad)):
        err = (got.double() - want).norm() / want.norm()
        assert err < 4 * eps, float(err)


def test_bf16_call_runs_its_large_gemms_in_bf16_and_copies_no_full_weight():
    """The profiler shows every vocab-sized GEMM with bf16 operands; an op-level trace shows that no dtype
    conversion ever reads either lm_head weight, and that the only copy is the CPU's one re-layout of the
    student's weight for d hidden (`fused._dh_layout`), once per call however many chunks (on a GPU, none)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils._python_dispatch import TorchDispatchMode

    v, ds_, dt = 4096, 96, 128
    sh, sw, th, tw, lab = _problem(torch.bfloat16, b=2, s=65, ds_=ds_, dt=dt, v=v)
    sh.requires_grad_(True)
    sw.requires_grad_(True)
    weights = {sw.data_ptr(): "student lm_head", tw.data_ptr(): "teacher lm_head"}
    converted = []

    class WeightCopies(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if any(k in name for k in ("_to_copy", "copy_", "clone", "to.dtype", "contiguous")):
                for a in args:
                    if torch.is_tensor(a) and a.data_ptr() in weights and a.numel() >= v:
                        converted.append((name, weights[a.data_ptr()]))
            return func(*args, **(kwargs or {}))

    opts = KDOptions(temperature=2.0, chunk=32)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof, WeightCopies():
        combined, _ = fused_kd_lm(sh, sw, th, tw, lab, coef_kd=0.5, coef_lm=0.5, options=opts)
        combined.backward()
    large = [
        (ev.input_shapes, ev.input_dtypes)
        for ev in prof.events()
        if ev.name == "aten::mm" and any(v in shape for shape in ev.input_shapes)
    ]
    assert len(large) >= 3 * (2 * 64 // 32)  # student logits, teacher logits, d hidden, d weight per chunk
    assert all(dtypes[:2] == ["c10::BFloat16", "c10::BFloat16"] for _, dtypes in large), large[:3]
    assert converted == [("aten.clone.default", "student lm_head")]


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("peaked", [False, True], ids=["spread", "near-one-hot"])
def test_rest_bucket_at_k_equal_vocab_minus_one_is_full_kd_in_float32(kind, peaked):
    g = torch.Generator().manual_seed(3)
    n, v = 24, 257
    s = torch.randn(n, v, generator=g) * 2
    t = torch.randn(n, v, generator=g) * 2
    if peaked:  # tail mass far below fp32's epsilon, where log(1 - kept) cancels to nothing
        t[torch.arange(n), torch.randint(0, v, (n,), generator=g)] += 40.0
    lab = torch.randint(0, v, (1, n + 1), generator=g)

    def value_and_grad(top_k, rest):
        x = s.clone().requires_grad_(True)
        logits = torch.cat([x, x[:1]])[None]  # [1, n + 1, v]: the last position carries no loss
        loss, _ = kd_loss(
            logits,
            torch.cat([t, t[:1]])[None],
            lab,
            temperature=1.5,
            divergence_kind=kind,
            beta=0.3,
            alpha=0.2,
            top_k=top_k,
            top_k_rest=rest,
        )
        loss.backward()
        return float(loss), x.grad

    full, g_full = value_and_grad(None, False)
    rest, g_rest = value_and_grad(v - 1, True)
    assert rest == pytest.approx(full, rel=1e-5, abs=1e-7)
    assert (g_rest - g_full).norm() <= 1e-5 * g_full.norm() + 1e-7


# ------------------------------------------------------------------ the closed form against autograd


def _autograd_reference(s_logits, t_logits, targets, T, kind, top_k, rest, support, coef_kd, coef_lm):
    """coef_kd x T^2 (tv: 1) x divergence + coef_lm x CE over rows, by autograd through the reference
    formulas of `kd.py` (log-softmax, `_topk_log_probs`, `divergence`): independent of `closed_form.py`."""
    from dsdistill.losses.kd import _topk_log_probs, divergence, t2_factor

    s, t = s_logits / T, t_logits / T
    if top_k is None:
        s_lp, t_lp = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    else:
        s_lp, t_lp = _topk_log_probs(s, t, top_k, rest, kind, support)
    kd = divergence(t_lp, s_lp, kind, beta=0.3, alpha=0.2).sum() * t2_factor(kind, T)
    lm = torch.nn.functional.cross_entropy(s_logits, targets, reduction="sum")
    return coef_kd * kd + coef_lm * lm


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize(
    "top_k, rest, support", [(None, False, "auto"), (5, False, "auto"), (5, True, "auto"), (5, True, "teacher")]
)
@pytest.mark.parametrize("T", [1.0, 2.0, 1.5])
def test_the_closed_form_value_and_gradient_equal_autograd_through_the_reference_formulas(kind, top_k, rest, support, T):
    g = torch.Generator().manual_seed(7)
    n, d, v = 13, 6, 19
    sh = torch.randn(n + 1, d, generator=g, dtype=torch.float64, requires_grad=True)
    sw = torch.randn(v, d, generator=g, dtype=torch.float64, requires_grad=True)
    th = torch.randn(n + 1, d, generator=g, dtype=torch.float64)
    tw = torch.randn(v, d, generator=g, dtype=torch.float64)
    lab = torch.randint(0, v, (1, n + 1), generator=g)
    opts = KDOptions(
        temperature=T, divergence=kind, beta=0.3, alpha=0.2, top_k=top_k, top_k_rest=rest, top_k_support=support, chunk=4
    )
    for coef_kd, coef_lm in ((0.7, 0.3), (0.7, 0.0), (0.0, 0.3)):
        sh.grad = sw.grad = None
        combined, _ = fused_kd_lm(sh[None], sw, th[None], tw, lab, coef_kd=coef_kd, coef_lm=coef_lm, options=opts)
        combined.backward()
        got = sh.grad.clone(), sw.grad.clone()
        sh.grad = sw.grad = None
        ref = _autograd_reference(sh[:n] @ sw.T, th[:n] @ tw.T, lab[0, 1:], T, kind, top_k, rest, support, coef_kd, coef_lm)
        ref.backward()
        assert float(combined.detach()) == pytest.approx(float(ref.detach()), rel=1e-12, abs=1e-12)
        for a, b in zip(got, (sh.grad, sw.grad)):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12), (coef_kd, coef_lm, float((a - b).abs().max()))


def _one_row_problem(seed: int, n: int, d: int, v: int):
    """(generator, student hidden [1, n + 1, d] and head [v, d] needing gradients, teacher hidden and head,
    labels [1, n + 1]) in fp32."""
    g = torch.Generator().manual_seed(seed)
    sh = torch.randn(1, n + 1, d, generator=g, requires_grad=True)
    sw = torch.randn(v, d, generator=g, requires_grad=True)
    th, tw = torch.randn(1, n + 1, d, generator=g), torch.randn(v, d, generator=g)
    return g, sh, sw, th, tw, torch.randint(0, v, (1, n + 1), generator=g)


def test_no_logit_sized_tensor_is_kept_for_backward_and_no_graph_is_built_inside_a_chunk():
    """Everything saved for the backward pass is the two gradient buffers ([N, D] and [V, D]); the
    objective's graph has one node (the chunked head) between it and the inputs."""
    n, d, v = 40, 8, 300
    _, sh, sw, th, tw, lab = _one_row_problem(1, n, d, v)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        combined, _ = fused_kd_lm(sh, sw, th, tw, lab, coef_kd=0.5, coef_lm=0.5, options=KDOptions(temperature=2.0, chunk=8))
    # the two gradient buffers, and otherwise only the gather's small index (nothing with a vocabulary axis)
    assert (n, d) in saved and (v, d) in saved and all(v not in shape for shape in saved if shape != (v, d)), saved
    node = combined.grad_fn
    assert type(node).__name__ == "_ChunkedHeadBackward"
    leaves = {type(f).__name__ for f, _ in node.next_functions if f is not None}
    assert leaves <= {"AccumulateGrad", "IndexSelectBackward0", "IndexBackward0", "ViewBackward0", "SliceBackward0"}, leaves


def test_bytes_per_logit_outside_the_gemms_are_below_six_tenths_of_naive():
    """bench/traffic.py's count (every aten op but the GEMMs, forward + backward) at a small size: the fused
    path's eager ops move at most 0.6x the naive full-logit loss's bytes, fp32 and bf16, T = 2 and 1."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("traffic", Path(__file__).resolve().parent.parent / "bench" / "traffic.py")
    traffic = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(traffic)
    for dtype in (torch.float32, torch.bfloat16):
        for T in (2.0, 1.0):
            naive, _ = traffic.measure("naive", 2048, 4096, dtype, T, 1024)
            fused, _ = traffic.measure("fused", 2048, 4096, dtype, T, 1024)
            assert fused <= 0.6 * naive, (dtype, T, fused, naive)


@pytest.mark.slow
def test_the_compiled_head_equals_the_eager_closed_form_and_is_one_kernel_without_logit_sized_intermediates():
    """`loss.fused_compile` on CPU (Inductor's C++ backend): the same values and gradients as the eager
    closed form at two sets of coefficients and an uneven last chunk; and the generated code for a chunk is
    one kernel whose only [rows, V] buffer is the gradient it writes (the logits are read, nothing of
    their size is written in between)."""
    import re

    from torch._inductor.utils import run_and_get_code

    from dsdistill.losses import fused as fused_mod
    from dsdistill.losses.closed_form import forward_kl_lm

    g, sh, sw, th, tw, lab = _one_row_problem(5, 37, 8, 500)
    for coef_kd, coef_lm, T in ((0.7, 0.3, 2.0), (0.2, 0.9, 1.0)):
        grads = []
        for compiled in (False, True):
            sh.grad = sw.grad = None
            opts = KDOptions(temperature=T, chunk=16, compile=compiled)
            combined, m = fused_kd_lm(sh, sw, th, tw, lab, coef_kd=coef_kd, coef_lm=coef_lm, options=opts)
            combined.backward()
            grads.append((float(m["kd"]), float(m["lm"]), sh.grad.clone(), sw.grad.clone()))
        (kd_e, lm_e, gh_e, gw_e), (kd_c, lm_c, gh_c, gw_c) = grads
        assert kd_c == pytest.approx(kd_e, rel=1e-5) and lm_c == pytest.approx(lm_e, rel=1e-5)
        assert torch.allclose(gh_c, gh_e, rtol=1e-4, atol=1e-7) and torch.allclose(gw_c, gw_e, rtol=1e-4, atol=1e-7)
    assert fused_mod._compiler() is not None
    rows, vocab = 64, 4096
    s, t = torch.randn(rows, vocab, generator=g), torch.randn(rows, vocab, generator=g)
    fn = torch.compile(forward_kl_lm, dynamic=False)
    _, codes = run_and_get_code(fn, s, t, torch.randint(0, vocab, (rows,), generator=g), 2.0, 0.7, 0.3, True, True, True, False)
    code = "\n".join(codes)
    assert len(re.findall(r"cpp_fused_\w+ = async_compile", code)) == 1
    allocations = re.findall(r"empty_strided_cpu\(\(([^)]*)\)", code)
    assert [a for a in allocations if str(vocab) in a] == [f"{rows}, {vocab}"], allocations
