"""The compiled CPU training kernels (lmforge/kernels.py) against PyTorch's own ops, and their fallback."""

import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from lmforge import kernels
from lmforge.config import load_config
from lmforge.models.gpt import GPT
from lmforge.objectives.clm import lm_loss

# inductor compiles the kernels with the system's C++ compiler; without one the eager fallback runs
# (tested below with a simulated failure) and the tests that need the real kernels cannot run
HAVE_CXX = any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c)
needs_cxx = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler for torch.compile's CPU kernels")


@pytest.fixture
def kernel_state(monkeypatch):
    """Each test sees the kernels on and working, and leaves the process-wide switch as it found it."""
    monkeypatch.setitem(kernels._state, "enabled", True)
    monkeypatch.setitem(kernels._state, "broken", False)


@needs_cxx
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 1.6e-2)])
def test_gelu_tanh_value_and_gradient_equal_torch(kernel_state, dtype, tol):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, 67, generator=g) * 3  # negative tail, the bend, large positives
    base[0, 0, :4] = torch.tensor([0.0, -12.0, 12.0, 1e-4])
    upstream = torch.randn(base.shape, generator=g).to(dtype)
    x, ref_x = base.to(dtype).requires_grad_(), base.to(dtype).requires_grad_()
    y = kernels.gelu_tanh(x)
    ref = F.gelu(ref_x, approximate="tanh")
    assert y.grad_fn is not None and type(y.grad_fn).__name__ == "_GeluTanhBackward"  # the kernel ran
    assert y.dtype == dtype and y.shape == base.shape
    torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol)
    y.backward(upstream)
    ref.backward(upstream)
    # bf16: the kernel rounds the derivative to bf16 before the product, ATen rounds once after it
    torch.testing.assert_close(x.grad.float(), ref_x.grad.float(), rtol=tol, atol=2 * tol)
    assert kernels.enabled()


def test_gelu_tanh_without_grad_is_atens_op(kernel_state):
    x = torch.randn(4, 33)
    with torch.no_grad():
        assert torch.equal(kernels.gelu_tanh(x.requires_grad_()), F.gelu(x, approximate="tanh"))
    kernels.set_enabled(False)
    y = kernels.gelu_tanh(torch.randn(4, 33, requires_grad=True))
    assert type(y.grad_fn).__name__ == "GeluBackward0"


@needs_cxx
def test_a_training_step_with_kernels_matches_the_eager_ops(kernel_state):
    """One GPT step (bf16 autocast) with and without the fused GELU + CE: same loss, same grads."""
    cfg = load_config("gpt-tiny").model
    torch.manual_seed(0)
    model = GPT(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 17))
    labels = torch.randint(0, cfg.vocab_size, (2, 17))
    grads = {}
    for fused in (True, False):
        kernels.set_enabled(fused)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, n = lm_loss(model(ids), labels)
        loss.backward()
        grads[fused] = (loss.item(), {k: p.grad.clone() for k, p in model.named_parameters()})
    assert not kernels._state["broken"]  # the first pass really ran the compiled kernels
    assert grads[True][0] == pytest.approx(grads[False][0], rel=1e-3)
    for k, g in grads[True][1].items():
        ref = grads[False][1][k]
        assert (g - ref).norm() <= 0.03 * ref.norm() + 1e-6, k  # bf16 roundings in different places


def test_a_compiler_failure_falls_back_with_one_warning(kernel_state, monkeypatch, capsys):
    """No working C++ compiler: the first call warns once, turns the kernels off, and still answers."""
    def broken_compile(fn, **kw):
        def run(*args):
            raise RuntimeError("InductorError: no C++ compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    gelu = kernels._compiled(kernels._gelu_tanh_and_grad)
    monkeypatch.setattr(kernels, "_gelu_kernel", gelu)
    x = torch.randn(6, 20, requires_grad=True)
    y = kernels.gelu_tanh(x)
    torch.testing.assert_close(y, F.gelu(x, approximate="tanh"), rtol=2e-6, atol=2e-6)
    y2 = kernels.gelu_tanh(x)  # second call: eager, no second warning
    assert type(y2.grad_fn).__name__ == "GeluBackward0"
    err = capsys.readouterr().err
    assert err.count("warning: fused training kernels unavailable") == 1
    assert "no C++ compiler found" in err and "more detail" not in err
    assert not kernels.enabled()
    assert kernels.ce_and_grad(torch.randn(3, 5), torch.tensor([0, 1, 2]), -100) is None


@pytest.mark.parametrize("fused", [pytest.param(True, marks=needs_cxx), False])  # compiled kernel, eager loop
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_equals_torch(kernel_state, dtype, fused):
    """lm_loss's fused CE == F.cross_entropy(logits.float()) in value and gradient, ignored rows included."""
    kernels.set_enabled(fused)
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 37, 50, generator=g) * 4  # 111 rows: several chunks and a ragged last one
    labels = torch.randint(0, 50, (3, 37), generator=g)
    labels[0, :5] = -100
    labels[2, -9:] = -100
    ours_x = base.to(dtype).requires_grad_()
    ref_x = base.to(dtype).requires_grad_()
    loss_sum, n = lm_loss(ours_x, labels)
    ref = F.cross_entropy(ref_x.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    (loss_sum / 7).backward()
    (ref / 7).backward()
    assert int(n) == 111 - 14
    torch.testing.assert_close(loss_sum, ref, rtol=1e-6, atol=1e-4)
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16 grads: one rounding of the same fp32 values
    torch.testing.assert_close(ours_x.grad.float(), ref_x.grad.float(), rtol=0, atol=tol)
    assert ours_x.grad[0, :5].abs().sum() == 0  # ignored targets get no gradient
    assert kernels.enabled() == fused  # the compiled kernel ran (it turns itself off if it cannot)


def test_eager_cross_entropy_is_the_same_for_any_chunk_size():
    """The fallback's chunking (32 rows on a CPU, 2^26 elements on a GPU) does not change the answer."""
    from lmforge.objectives.clm import ChunkedCrossEntropy

    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(70, 40, generator=g) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 40, (70,), generator=g)
    labels[::9] = -100
    ref = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum")
    _, grad32 = ChunkedCrossEntropy.eager(logits, labels, 32)
    for rows in (1, 32, 64, 70, 1000):
        total, grad = ChunkedCrossEntropy.eager(logits, labels, rows)
        torch.testing.assert_close(total, ref, rtol=1e-6, atol=1e-4)
        assert torch.equal(grad, grad32), rows  # row-wise math: chunking cannot change a gradient row


@pytest.mark.parametrize("frozen", ["nothing", "weight"])
def test_linear_with_the_bias_in_onednn_equals_autocast_linear(kernel_state, frozen):
    """Training under bf16 autocast: the same output as F.linear bit for bit, the same gradients."""
    from lmforge.models.layers import Linear

    torch.manual_seed(0)
    layer = Linear(24, 40)
    ref = torch.nn.Linear(24, 40)
    ref.load_state_dict(layer.state_dict())
    for m in (layer, ref):
        m.weight.requires_grad_(frozen != "weight")
    x = torch.randn(3, 7, 24)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(3, 7, 40).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = layer(x1), ref(x2)
    assert type(y.grad_fn).__name__ == "ViewBackward0" and y.grad_fn.next_functions[0][0].name() == \
        "_LinearBiasBackward"  # the oneDNN kernel ran (this CPU supports bf16 in oneDNN)
    assert y.dtype == y_ref.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    y.backward(upstream)
    y_ref.backward(upstream)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, rtol=1e-2, atol=1e-2)
    if frozen == "weight":
        assert layer.weight.grad is None
    else:  # bf16 GEMMs summing over the 21 rows in another order
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad, rtol=1e-2, atol=1e-2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # inference: ATen's linear
        assert layer(x).grad_fn is None and torch.equal(layer(x), ref(x))
    kernels.set_enabled(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert type(layer(x1).grad_fn).__name__ == "ViewBackward0"
        assert layer(x1).grad_fn.next_functions[0][0].name() != "_LinearBiasBackward"


def test_the_linear_probe_leaves_the_global_rng_alone():
    """It runs at the first training forward, after a resume restored the RNG: drawing from it would
    change every later dropout mask."""
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    assert kernels._probe_linear()
    assert torch.equal(torch.rand(4), expected)
