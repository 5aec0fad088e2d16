"""Training-step formulations of the study's conv block for the compiled CUDA path.

Each computes what the plain modules compute (``Conv2d -> PReLU -> BatchNorm2d`` twice,
then ``MaxPool2d(2)``), written so that ``torch.compile`` makes fewer passes over the
block's activations, which at 224x224 are what a training step mostly waits on (each
map of the first block is 822 MB at batch 256 in bf16):

- :func:`prelu_batch_norm`: PReLU and training-mode BatchNorm as one autograd
  function whose backward gets every per-channel sum it needs (BatchNorm's two, the
  PReLU slope's and the conv bias's) in one reduction over the map, then writes the
  input gradient in one pointwise pass. Autograd on the modules needs a second
  reduction after the input gradient exists (the slope's), and the conv's bias is
  added in a pass of its own; here the bias is added where the map is read.
- :func:`max_pool_2x2`: a 2x2 max-pool from four strided views, keeping one int8 per
  output for the backward, which is then a pointwise function of the output gradient
  that the compiler fuses into BatchNorm's backward instead of scattering into a
  zeroed map first. Ties go to the first element in row-major order, as
  ``max_pool2d`` does.
- :func:`conv3x3_im2col`: the first conv (3 input channels) as one matrix product
  over the 27 (padded to 32) neighbours of each pixel; cuDNN's kernels for 3 or 8
  input channels run far below the card's rate, for the forward and the weight
  gradient.

The unit tests check each against the modules, values and gradients; the GPU checks
(``bench/gpu_checks.py``) check them compiled on CUDA.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_C = (1, -1, 1, 1)  # a per-channel vector against an NCHW map
_DIMS = (0, 2, 3)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> float32; float32 and float64 as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class _PreluBatchNorm(torch.autograd.Function):
    """``batch_norm(prelu(y0 + bias, slope), training=True)``; returns (z, mean, var).

    ``var`` is the unbiased variance (what BatchNorm's running estimate takes),
    ``z`` has ``y0``'s dtype, everything in between is at least float32.
    """

    @staticmethod
    def forward(
        ctx: Any,
        y0: torch.Tensor,
        bias: torch.Tensor,
        slope: torch.Tensor,
        gamma: torch.Tensor,
        beta: torch.Tensor,
        eps: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        y = _wide(y0) + bias.view(_C)
        p = torch.where(y > 0, y, slope.view(_C) * y)
        var, mean = torch.var_mean(p, dim=_DIMS, correction=0)
        rstd = torch.rsqrt(var + eps)
        z = (p - mean.view(_C)) * (rstd * gamma).view(_C) + beta.view(_C)
        ctx.save_for_backward(y0, bias, slope, gamma, mean, rstd)
        count = p.numel() // p.shape[1]
        return z.to(y0.dtype), mean, var * (count / max(count - 1, 1))

    @staticmethod
    def backward(
        ctx: Any, grad_z: torch.Tensor, _grad_mean: Any, _grad_var: Any
    ) -> tuple[Any, ...]:
        y0, bias, slope, gamma, mean, rstd = ctx.saved_tensors
        y = _wide(y0) + bias.view(_C)
        neg = y <= 0  # PReLU's slope side, as its backward has it
        p = torch.where(neg, slope.view(_C) * y, y)
        xhat = (p - mean.view(_C)) * rstd.view(_C)
        g = _wide(grad_z)
        n = p.numel() // p.shape[1]
        # every per-channel sum, in one pass over the map
        sum_g = g.sum(_DIMS)
        sum_gx = (g * xhat).sum(_DIMS)
        sum_x = xhat.sum(_DIMS)
        neg_g = torch.where(neg, g, 0.0).sum(_DIMS)
        neg_gy = torch.where(neg, g * y, 0.0).sum(_DIMS)
        neg_y = torch.where(neg, y, 0.0).sum(_DIMS)
        neg_xy = torch.where(neg, xhat * y, 0.0).sum(_DIMS)
        neg_x = torch.where(neg, xhat, 0.0).sum(_DIMS)
        neg_n = neg.sum(_DIMS, dtype=y.dtype)
        k = gamma * rstd
        c1, c2 = sum_g / n, sum_gx / n
        # d loss / d p = k (g - c1 - xhat c2); d p / d y = 1 or slope
        grad_p = k.view(_C) * (g - c1.view(_C) - xhat * c2.view(_C))
        grad_y = grad_p * torch.where(neg, slope.view(_C), 1.0)
        # the same sums give d/d slope = sum over neg of y grad_p, and d/d bias = sum of grad_y
        grad_slope = k * (neg_gy - c1 * neg_y - c2 * neg_xy)
        sum_grad_p = k * (sum_g - c1 * n - c2 * sum_x)
        neg_grad_p = k * (neg_g - c1 * neg_n - c2 * neg_x)
        grad_bias = sum_grad_p + (slope - 1) * neg_grad_p
        if slope.numel() == 1:  # one shared slope
            grad_slope = grad_slope.sum().reshape(slope.shape)
        return grad_y.to(y0.dtype), grad_bias, grad_slope, sum_gx, sum_g, None


def prelu_batch_norm(
    y0: torch.Tensor, bias: torch.Tensor | None, act: nn.PReLU, norm: nn.BatchNorm2d
) -> torch.Tensor:
    """``norm(act(y0 + bias))`` in training mode, with ``norm``'s running estimates updated."""
    if bias is None:
        bias = torch.zeros(y0.shape[1], device=y0.device)
    z, mean, var = _PreluBatchNorm.apply(y0, bias, act.weight, norm.weight, norm.bias, norm.eps)
    if norm.track_running_stats and norm.running_mean is not None:
        with torch.no_grad():
            norm.num_batches_tracked.add_(1)
            momentum = norm.momentum
            if momentum is None:  # a cumulative average, as BatchNorm keeps one
                momentum = 1.0 / norm.num_batches_tracked.float()
            norm.running_mean.lerp_(mean.detach(), momentum)
            norm.running_var.lerp_(var.detach(), momentum)
    return z


def max_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.max_pool2d(x, 2)`` for even H and W (first maximum in row-major order wins).

    A window holding a NaN gives one of its elements rather than NaN; BatchNorm's
    statistics have already turned the whole channel into NaN by then.
    """
    a, b = x[:, :, 0::2, 0::2], x[:, :, 0::2, 1::2]
    c, d = x[:, :, 1::2, 0::2], x[:, :, 1::2, 1::2]
    with torch.no_grad():
        top = torch.maximum(torch.maximum(a, b), torch.maximum(c, d))
        first = torch.where(a == top, 0, torch.where(b == top, 1, torch.where(c == top, 2, 3)))
        first = first.to(torch.int8)  # what the backward keeps: one byte per output
    return torch.where(first == 0, a, torch.where(first == 1, b, torch.where(first == 2, c, d)))


def conv3x3_im2col(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.conv2d(x, weight, None, 1, 1)`` for a 3x3 kernel, as one matrix product.

    Each pixel's 3x3 neighbourhood (channels innermost, zero-padded to a multiple of
    8) is one row; the result has channels-last strides. Under autocast the rows are
    built in the autocast dtype, so they take no more memory than the output.
    """
    n, c, h, w = x.shape
    out_channels = weight.shape[0]
    kind = x.device.type
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    k = 9 * c
    width = -(-k // 8) * 8
    padded = F.pad(x.to(dtype).permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1))  # N, H+2, W+2, C
    # a view (N, H, W, C, dy, dx), then one row per pixel: the compiler writes the rows
    # in one pass, reading the (small) input; no concatenation of nine shifted copies
    windows = padded.unfold(1, 3, 1).unfold(2, 3, 1).permute(0, 1, 2, 4, 5, 3)
    rows = F.pad(windows.reshape(n * h * w, k), (0, width - k))
    kernel = F.pad(weight.permute(0, 2, 3, 1).reshape(out_channels, k), (0, width - k))
    out = torch.mm(rows, kernel.to(dtype).t())  # (N H W, out)
    return out.view(n, h, w, out_channels).permute(0, 3, 1, 2)
