"""zoo.layers.conv: the strided conv equals F.conv2d (float64), and its bf16 weight gradient at
one-position outputs matches a float64 reference even when the heap holds garbage (the oneDNN bug)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo
from zoo.layers import StridedConv2d, strided_conv2d


def _dirty_heap() -> None:
    """Leave freed NaN buffers of every small size (up to 160 kB) for the next allocations to reuse, so
    that a result read from a buffer nobody wrote shows as NaN."""
    junk = [torch.full((n,), float("nan")) for n in range(16, 40000, 97)]
    del junk


# (kernel, height, width, stride, padding): one output position along at least one dimension
ONE_POSITION = [(3, 1, 1, 2, 1), (7, 1, 1, 2, 3), (3, 2, 2, 3, 1), (5, 1, 2, 2, 2), (3, 5, 1, 2, 1),
                (5, 5, 2, 3, 2), (7, 3, 1, 2, 3), (2, 2, 1, 2, 1)]


@pytest.mark.parametrize("groups", [1, 8])
def test_strided_conv2d_is_f_conv2d(groups):
    """Forward and both gradients equal F.conv2d's in float64, over one-position and ordinary outputs,
    asymmetric strides and paddings, and channels-last inputs."""
    torch.manual_seed(0)
    cases = [(k, h, w, (s, s), (p, p)) for k, h, w, s, p in ONE_POSITION]
    cases += [(3, 4, 6, (2, 2), (1, 1)), (3, 1, 6, (2, 1), (1, 1)), (3, 6, 1, (1, 3), (1, 1)),
              (5, 3, 8, (3, 2), (2, 0)), (2, 4, 4, (2, 2), (0, 0)), (3, 3, 3, (1, 1), (1, 1))]
    for (k, h, w, stride, padding), channels_last in itertools.product(cases, (False, True)):
        x = torch.randn(2, 8, h, w, dtype=torch.float64)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(8, 8 // groups, k, k, dtype=torch.float64)
        bias = torch.randn(8, dtype=torch.float64)
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        ref_leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        y = strided_conv2d(*leaves, list(stride), list(padding), groups)
        ref = F.conv2d(*ref_leaves, stride, padding, 1, groups)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        grad = torch.randn_like(ref)
        y.backward(grad)
        ref.backward(grad)
        for got, want in zip(leaves, ref_leaves):
            torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("groups", [1, 32])
def test_bf16_weight_gradient_at_one_position_outputs(groups):
    """bf16 on CPU (oneDNN's path where the CPU has it): the weight gradient of every one-position case
    stays within bf16 rounding of the float64 gradient, after the heap was filled with NaN."""
    torch.manual_seed(0)
    for (k, h, w, s, p), channels_last in itertools.product(ONE_POSITION, (False, True)):
        x = torch.randn(4, 32, h, w)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        weight = torch.randn(32, 32 // groups, k, k)
        w64 = weight.double().requires_grad_()
        ref = F.conv2d(x.double(), w64, None, s, p, 1, groups)
        grad = torch.randn_like(ref)
        ref.backward(grad)
        for _ in range(3):
            w16 = weight.bfloat16().requires_grad_()
            y = strided_conv2d(x.bfloat16(), w16, None, [s, s], [p, p], groups).float()
            _dirty_heap()
            y.backward(grad.float())
            error = (w16.grad.double() - w64.grad).abs().max() / w64.grad.abs().max()
            assert error < 0.05, ((k, h, w, s, p), channels_last, float(error))


def test_strided_conv2d_module_keeps_the_conv2d_state_dict_and_rejects_what_it_cannot_do():
    conv = StridedConv2d(4, 6, 3, stride=2, padding=1)
    assert isinstance(conv, nn.Conv2d) and list(conv.state_dict()) == ["weight", "bias"]
    x = torch.randn(1, 4, 1, 1)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias, 2, 1))
    for bad in (dict(padding="same", stride=1), dict(dilation=2), dict(padding_mode="reflect")):
        with pytest.raises(ValueError, match="StridedConv2d: takes zero padding"):
            StridedConv2d(4, 6, 3, **bad)


def test_msvmamba_trains_in_bf16_with_a_one_pixel_last_stage():
    """test_msvmamba at 32 px (its last stage is 1x1, the low-resolution conv's output too): under bf16
    autocast every parameter's gradient is finite and close to the fp32 gradient, after a dirty heap.
    With nn.Conv2d in place of StridedConv2d this is the case that ended training with NaN weights."""
    torch.manual_seed(0)
    model = zoo.create_model("test_msvmamba", num_classes=3).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    model(x).float().logsumexp(-1).sum().backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters()}
    for _ in range(3):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        _dirty_heap()
        out.float().logsumexp(-1).sum().backward()
        conv_low = [n for n in reference if "conv_low.weight" in n]
        assert conv_low
        for name, p in model.named_parameters():
            assert torch.isfinite(p.grad).all(), name
        for name in conv_low:
            got, want = dict(model.named_parameters())[name].grad, reference[name]
            assert (got - want).abs().max() <= 0.1 * want.abs().max() + 1e-6, name
