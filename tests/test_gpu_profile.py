"""The GPU suite's trace summary (benchmarks/gpu/profile.py) on a hand-made trace with the layout of
a JAX GPU Perfetto trace (a device process with stream and "XLA Ops" lines, the host annotation
around the steps), and on a real CPU trace, where it must say that there are no device kernels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the GPU suite is not installed: the checkout's
from benchmarks.gpu.profile import ANNOTATION, category, format_summary, summarise  # noqa: E402


def _meta(pid, tid, kind, name):
    return {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}


def _x(pid, tid, name, ts, dur):
    return {"ph": "X", "pid": pid, "tid": tid, "name": name, "ts": ts, "dur": dur}


def test_summary_of_a_gpu_like_trace():
    events = [
        _meta(1, 0, "process_name", "/host:CPU"), _meta(1, 1, "thread_name", "python"),
        _meta(2, 0, "process_name", "/device:GPU:0"),
        _meta(2, 7, "thread_name", "Stream #7(Compute)"), _meta(2, 8, "thread_name", "Stream #8(MemcpyD2D)"),
        _meta(2, 9, "thread_name", "XLA Ops"),
        _x(1, 1, ANNOTATION, 1000, 1000),  # 1 ms of wall for 2 steps
        # stream 7: a convolution 1000-1300, a fusion 1250-1400 (overlaps), a short fusion 1500-1505
        _x(2, 7, "sm90_xmma_fprop_implicit_gemm_bf16", 1000, 300),
        _x(2, 7, "loop_multiply_fusion", 1250, 150),
        _x(2, 7, "input_reduce_fusion_3", 1500, 5),
        _x(2, 8, "Memcpy DtoD", 1600, 100),
        _x(2, 7, "outside the window", 3000, 50),  # after the steps: ignored
        _x(2, 9, "fusion.12", 1250, 150), _x(2, 9, "fusion.3", 1500, 5), _x(2, 9, "custom-call.1", 1000, 300),
    ]
    s = summarise({"traceEvents": events}, steps=2)
    assert s["wall_ms_per_step"] == pytest.approx(0.5)
    # union of [1000,1300) [1250,1400) [1500,1505) [1600,1700) = 400 + 5 + 100 us
    assert s["busy_ms_per_step"] == pytest.approx(0.505 / 2)
    assert s["busy_share"] == pytest.approx(0.505)
    assert s["kernels_per_step"] == 2 and s["kernel_ms_per_step"] == pytest.approx(0.555 / 2)
    assert s["short_kernels_share"] == pytest.approx(0.25)
    cats = s["categories"]
    assert cats["convolutions (cuDNN)"][0] == pytest.approx(0.15) and cats["memcpy/memset"][0] == pytest.approx(0.05)
    assert cats["reduction fusions (BN statistics, pooling, loss)"][0] == pytest.approx(0.0025)
    assert sum(share for _, share in cats.values()) == pytest.approx(1.0)
    assert s["top_kernels"][0][0] == "sm90_xmma_fprop_implicit_gemm_bf16"
    assert dict((k, ms) for k, ms, _ in s["top_ops"])["fusion"] == pytest.approx(0.155 / 2)  # instances pooled
    text = format_summary(s, "test")
    assert f"{s['busy_share']:.0%} of wall" in text and "| convolutions (cuDNN) | 0.15 | 54% |" in text


def test_categories():
    assert category("void cudnn::cnn::wgrad_alg0_engine<float>") == "convolutions (cuDNN)"
    assert category("nchwToNhwcKernel") == "layout transposes"
    assert category("triton_gemm_dot_3") == "GEMMs"
    assert category("loop_convert_fusion_2") == "elementwise fusions"
    assert category("something_else") == "other"


def test_missing_annotation_is_named():
    with pytest.raises(ValueError, match=ANNOTATION):
        summarise({"traceEvents": [_meta(1, 0, "process_name", "/host:CPU")]}, steps=1)


def test_cpu_trace_has_no_device_kernels(tmp_path):
    import jax
    import jax.numpy as jnp

    from benchmarks.gpu.profile import profile

    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    s = profile(lambda n: [f(x).block_until_ready() for _ in range(n)], 2, tmp_path)
    assert s["steps"] == 2 and s["wall_ms_per_step"] > 0
    assert "no GPU kernel events" in s["note"]
