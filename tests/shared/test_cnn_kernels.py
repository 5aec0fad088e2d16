"""The compiled CUDA path's formulations of the conv block against the plain modules.

Each must give the modules' values and gradients (float64 here, so any difference is
a formula's, not rounding's); the GPU checks (bench/gpu_checks.py) repeat this
compiled, on CUDA, in bf16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from shared.cnn import (
    COMPILED_FAST_PATHS,
    FAST_PATHS,
    KNOB_DEFAULTS,
    ConvBlock,
    RgbConv2d,
    build_model,
    use_fast_paths,
)
from shared.cnn_kernels import conv3x3_im2col, max_pool_2x2, prelu_batch_norm

D = torch.float64


def _grads(tensors):
    return [t.grad.clone() for t in tensors]


def _prelu_norm(fused, x, bias, act, norm):
    if fused:
        return prelu_batch_norm(x, bias, act, norm)
    return norm(act(x + bias.view(1, -1, 1, 1)))


@pytest.mark.parametrize("shared_slope", [False, True])
def test_prelu_batch_norm_matches_the_modules_values_gradients_and_running_estimates(
    shared_slope,
):
    torch.manual_seed(0)
    c = 6
    y0 = torch.randn(5, c, 7, 9, dtype=D)
    bias = torch.randn(c, dtype=D)
    weight = torch.randn(5, c, 7, 9, dtype=D)  # a loss that weighs every output differently
    pairs = []
    for _ in range(2):
        act = nn.PReLU(1 if shared_slope else c, init=0.3).to(D)
        norm = nn.BatchNorm2d(c).to(D)
        with torch.no_grad():
            act.weight.uniform_(-0.5, 0.8)
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-1, 1)
            norm.running_mean.uniform_(-1, 1)
        pairs.append((act, norm))
    pairs[1][0].load_state_dict(pairs[0][0].state_dict())
    pairs[1][1].load_state_dict(pairs[0][1].state_dict())
    outs, leaves = [], []
    for fused, (act, norm) in zip((False, True), pairs, strict=True):
        x = y0.clone().requires_grad_()
        b = bias.clone().requires_grad_()
        out = _prelu_norm(fused, x, b, act, norm)
        (out * weight).sum().backward()
        outs.append(out.detach())
        leaves.append(_grads([x, b, act.weight, norm.weight, norm.bias]))
    torch.testing.assert_close(outs[1], outs[0])
    for name, fused, plain in zip(
        ("input", "conv bias", "slope", "gamma", "beta"), leaves[1], leaves[0], strict=True
    ):
        torch.testing.assert_close(fused, plain, msg=f"{name} gradient differs")
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(
            pairs[1][1].state_dict()[key], pairs[0][1].state_dict()[key], msg=key
        )


def test_prelu_batch_norm_keeps_the_maps_dtype_and_a_cumulative_average():
    y0 = torch.randn(4, 3, 5, 5).to(torch.bfloat16)
    norm = nn.BatchNorm2d(3, momentum=None)
    out = prelu_batch_norm(y0, torch.zeros(3), nn.PReLU(3), norm)
    assert out.dtype == torch.bfloat16 and out.shape == y0.shape
    assert norm.num_batches_tracked.item() == 1  # momentum None: the first batch's stats
    p = F.prelu(y0.float(), torch.full((3,), 0.25))
    torch.testing.assert_close(norm.running_mean, p.mean((0, 2, 3)))


def test_max_pool_2x2_matches_max_pool2d_including_ties():
    torch.manual_seed(1)
    # small integers: most windows hold ties, which must go to the first in row-major order
    x = torch.randint(0, 3, (3, 4, 8, 6)).to(D).requires_grad_()
    ref = x.detach().clone().requires_grad_()
    g = torch.randn(3, 4, 4, 3, dtype=D)
    out = max_pool_2x2(x)
    expected = F.max_pool2d(ref, 2)
    torch.testing.assert_close(out, expected)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    assert torch.equal(x.grad, ref.grad)
    cl = x.detach().contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(max_pool_2x2(cl), expected.detach())


@pytest.mark.parametrize("channels_last", [False, True])
def test_conv3x3_im2col_matches_conv2d(channels_last):
    torch.manual_seed(2)
    x = torch.randn(3, 3, 10, 12, dtype=D)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w1 = torch.randn(5, 3, 3, 3, dtype=D, requires_grad=True)
    w2 = w1.detach().clone().requires_grad_()
    out = conv3x3_im2col(x, w1)
    expected = F.conv2d(x, w2, None, 1, 1)
    torch.testing.assert_close(out, expected)
    assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(expected)
    (out * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad)


def _study_model(fast_paths, **knobs):
    torch.manual_seed(3)
    params = dict(KNOB_DEFAULTS, image_size=32, width=0.25, dropout=0.0, **knobs)
    model = build_model(params, 3).to(D)
    use_fast_paths(model, fast_paths)
    return model


@pytest.mark.parametrize(
    "fast_paths", [FAST_PATHS, COMPILED_FAST_PATHS, ("peel_bias",), ("fuse_norm",), ("pool_2x2",)]
)
def test_a_training_step_through_the_fast_paths_equals_the_modules(fast_paths):
    """Loss, every parameter's gradient and every running estimate, one step."""
    x = torch.randn(6, 3, 32, 32, dtype=D, generator=torch.Generator().manual_seed(4))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    results = []
    for paths in ((), fast_paths):
        model = _study_model(paths).train()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((loss.detach(), grads, model.state_dict()))
    (loss0, grads0, state0), (loss1, grads1, state1) = results
    torch.testing.assert_close(loss1, loss0)
    for name, grad in grads0.items():
        torch.testing.assert_close(grads1[name], grad, msg=f"{name} gradient differs")
    for name, value in state0.items():
        torch.testing.assert_close(state1[name], value, msg=name)


def test_fast_paths_apply_to_the_study_design_only_and_never_in_evaluation():
    model = _study_model(FAST_PATHS)
    blocks = [m for m in model.modules() if isinstance(m, ConvBlock)]
    assert blocks and all(b.peel_bias and b.fuse_norm and b.pool_2x2 for b in blocks)
    assert next(m for m in model.modules() if isinstance(m, RgbConv2d)).im2col
    for knobs in ({"norm_order": "bn_act"}, {"activation": "relu"}, {"pool": "conv"}):
        other = _study_model(FAST_PATHS, **knobs)
        assert not any(
            b.peel_bias or b.fuse_norm or b.pool_2x2
            for b in other.modules()
            if isinstance(b, ConvBlock)
        ), knobs
    x = torch.randn(4, 3, 32, 32, dtype=D)
    plain = _study_model(())
    plain.load_state_dict(model.state_dict())
    model.eval(), plain.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.testing.assert_close(model(x), plain(x))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="unknown fast paths"):
        use_fast_paths(model, ("fuse_everything",))


def test_the_fast_paths_trace_as_one_graph_and_keep_the_state_dict():
    """What prepare_model compiles on CUDA: no graph breaks (fullgraph) under bf16
    autocast, checked with the aot_eager backend, which traces without codegen."""
    model = _study_model(FAST_PATHS).float().train()
    plain = _study_model(()).float().train()
    assert list(model.state_dict()) == list(plain.state_dict())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
    out.float().sum().backward()
    assert out.shape == (4, 3)
    assert all(p.grad is not None for p in model.parameters())


def test_the_fast_paths_compile_with_inductor_and_train_like_the_modules():
    """Inductor's own code for the formulations (C++ here, Triton on CUDA), one step
    against the eager modules: the lowering, not just the trace."""
    torch.manual_seed(5)
    params = dict(KNOB_DEFAULTS, image_size=32, width=0.125, dropout=0.0)
    plain, fast = build_model(params, 3), build_model(params, 3)
    fast.load_state_dict(plain.state_dict())
    use_fast_paths(fast, COMPILED_FAST_PATHS)
    compiled = torch.compile(fast.to(memory_format=torch.channels_last))
    x = torch.randn(6, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    losses = []
    for step in (plain, compiled):
        loss = F.cross_entropy(step(x), labels)
        loss.backward()
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
    for (name, p0), p1 in zip(plain.named_parameters(), fast.parameters(), strict=True):
        scale = p0.grad.abs().max().clamp_min(1e-8)
        assert ((p1.grad - p0.grad).abs().max() / scale).item() < 1e-3, name
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(fast.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
