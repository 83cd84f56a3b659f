"""zoo.layers.ssm: each shared SSM piece against a naive oracle written from the Mamba / VMamba maths."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from zoo.layers import ssm
from zoo.layers.ssm import scan, scan_bidirectional
from zoo.ops import selective_scan_naive


def _pixel_order(order: str, h: int, w: int):
    """Row-major pixel indices in the order a traversal visits them, by explicit loops."""
    if order.startswith("row"):
        seq = [i * w + j for i in range(h) for j in range(w)]
    else:
        seq = [i * w + j for j in range(w) for i in range(h)]
    return seq[::-1] if order.endswith("_reversed") else seq


ORDERS = ("row", "col", "row_reversed", "col_reversed")


@pytest.mark.parametrize("hw", [(3, 5), (4, 4), (1, 6)])
def test_cross_scan_and_merge_follow_the_traversals(hw):
    h, w = hw
    x = torch.randn(2, 3, h, w)
    xs = ssm.cross_scan_2d(x, ORDERS)
    flat = x.flatten(2)
    assert xs.shape == (2, 4, 3, h * w)
    for k, order in enumerate(ORDERS):
        torch.testing.assert_close(xs[:, k], flat[..., _pixel_order(order, h, w)], rtol=0, atol=0)
    # merge: output step t of direction k belongs to pixel order[t]; sum the directions per pixel
    y = torch.randn(2, 4, 3, h * w)
    expected = torch.zeros(2, 3, h * w)
    for k, order in enumerate(ORDERS):
        for t, p in enumerate(_pixel_order(order, h, w)):
            expected[..., p] += y[:, k, :, t]
    torch.testing.assert_close(ssm.cross_merge_2d(y, h, w, ORDERS), expected)
    torch.testing.assert_close(ssm.cross_merge_2d(xs, h, w, ORDERS), 4 * flat)


def test_cross_scan_rejects_unknown_orders():
    with pytest.raises(ValueError, match="must be names from"):
        ssm.cross_scan_2d(torch.randn(1, 1, 2, 2), ("diagonal",))
    with pytest.raises(ValueError, match="3 directions but 2 orders"):
        ssm.cross_merge_2d(torch.randn(1, 3, 1, 4), 2, 2, ("row", "col"))


def test_init_helpers():
    A_log = ssm.s4d_real_A_log(3, 5)
    torch.testing.assert_close(-torch.exp(A_log), -torch.arange(1.0, 6.0).expand(3, 5))
    x = torch.tensor([1e-4, 1e-3, 0.1, 1.0, 20.0], dtype=torch.float64)
    torch.testing.assert_close(F.softplus(ssm.inverse_softplus(x)), x)

    torch.manual_seed(0)
    bias = ssm.init_dt_bias_(torch.empty(20000), dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4)
    dt = F.softplus(bias.double())
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    # log-uniform: log(dt) is uniform, so its mean is the midpoint and its quartiles are evenly spaced
    log_dt = dt.log()
    mid = (math.log(1e-3) + math.log(0.1)) / 2
    assert abs(log_dt.mean().item() - mid) < 0.05
    q = torch.quantile(log_dt.float(), torch.tensor([0.25, 0.75]))
    assert abs((q[1] - q[0]).item() - (math.log(0.1) - math.log(1e-3)) / 2) < 0.05
    # the floor lifts every dt below it
    floored = F.softplus(ssm.init_dt_bias_(torch.empty(1000), dt_min=1e-6, dt_max=1e-5, dt_init_floor=1e-4))
    torch.testing.assert_close(floored, torch.full((1000,), 1e-4), rtol=1e-4, atol=0)

    w = ssm.init_dt_proj_weight_(torch.empty(64, 16), dt_rank=16, dt_scale=2.0)
    assert w.abs().max() <= 0.5 and w.abs().max() > 0.45


def test_init_stacked_ssm():
    k, d, r, n = 2, 8, 3, 4
    tensors = [torch.empty(k, r + 2 * n, d), torch.empty(k, d, r), torch.empty(k, d), torch.empty(k * d, n),
               torch.empty(k * d)]
    ssm.init_stacked_ssm_(*tensors)
    x_proj, dt_w, dt_b, A_logs, Ds = tensors
    assert x_proj.abs().max() <= d ** -0.5 and dt_w.abs().max() <= r ** -0.5
    assert ((F.softplus(dt_b) >= 1e-3 * 0.999) & (F.softplus(dt_b) <= 0.1 * 1.001)).all()
    torch.testing.assert_close(A_logs.exp(), torch.arange(1.0, n + 1).expand(k * d, n))
    assert (Ds == 1).all()


def test_fp32_rule():
    A, D, bias = ssm.ssm_parameters(torch.zeros(2, 3, dtype=torch.bfloat16), torch.ones(2, dtype=torch.float16),
                                    None)
    assert A.dtype == D.dtype == torch.float32 and bias is None
    torch.testing.assert_close(A, -torch.ones(2, 3))
    assert ssm.fp32_or_wider(torch.zeros(1, dtype=torch.float64)).dtype == torch.float64


def test_dt_bc_projection_layouts_agree():
    torch.manual_seed(0)
    b, k, d, r, n, L = 2, 3, 6, 2, 4, 7
    x = torch.randn(b, k, d, L, dtype=torch.float64)
    xw = torch.randn(k, r + 2 * n, d, dtype=torch.float64)
    dw = torch.randn(k, d, r, dtype=torch.float64)
    delta, B, C = ssm.dt_bc_projection_stacked(x, xw, dw, n)
    assert delta.shape == (b, k, d, L) and B.shape == C.shape == (b, k, n, L)
    for slot in range(k):
        # written out per token: proj = W_x u, dt = proj[:r], delta = W_dt dt
        proj = torch.stack([xw[slot] @ x[:, slot, :, t].T for t in range(L)], dim=-1).permute(1, 0, 2)
        exp_delta = torch.einsum("dr,brl->bdl", dw[slot], proj[:, :r])
        torch.testing.assert_close(delta[:, slot], exp_delta)
        torch.testing.assert_close(B[:, slot], proj[:, r:r + n])
        torch.testing.assert_close(C[:, slot], proj[:, r + n:])
        one = ssm.dt_bc_projection(x[:, slot], xw[slot], dw[slot], n)
        last = ssm.dt_bc_projection(x[:, slot].transpose(1, 2), xw[slot], dw[slot], n, tokens_last=True)
        for got, want in ((one, (exp_delta, B[:, slot:slot + 1], C[:, slot:slot + 1])), (last, one)):
            for g, e in zip(got, want):
                torch.testing.assert_close(g, e)


@pytest.mark.parametrize("conv, reverse", [("causal", False), ("causal", True), ("same", False)])
def test_scan_direction_conv_modes(conv, reverse):
    torch.manual_seed(0)
    block = ssm.ScanDirection1d(6, 3, 2, d_conv=4, reverse=reverse, conv=conv).double()
    x = torch.randn(2, 6, 9, dtype=torch.float64)
    w, bias = block.conv1d.weight[:, 0], block.conv1d.bias  # (D, K)
    seq = x.flip(-1) if reverse else x
    pad = {"causal": (3, 0), "same": (1, 2)}[conv]  # 'same' with 4 taps pads 1 before, 2 after
    padded = F.pad(seq, pad)
    ref = torch.stack([(padded[..., t:t + 4] * w).sum(-1) for t in range(9)], -1) + bias[:, None]
    ref = F.silu(ref.flip(-1) if reverse else ref)
    inputs = block(x)
    torch.testing.assert_close(inputs.u, ref)
    assert inputs.A.dtype == torch.float64
    torch.testing.assert_close(inputs.A, -torch.arange(1.0, 4.0, dtype=torch.float64).expand(6, 3))
    assert inputs.B.shape == (2, 1, 3, 9)


def test_scan_direction_rejects_bad_modes():
    with pytest.raises(ValueError, match="accepted"):
        ssm.ScanDirection1d(4, 2, 1, conv="full")
    with pytest.raises(ValueError, match="reverse=True"):
        ssm.ScanDirection1d(4, 2, 1, conv="same", reverse=True)


def test_scan_entry_points_match_the_naive_scan():
    torch.manual_seed(0)
    fwd = ssm.ScanDirection1d(4, 2, 1).double()
    bwd = ssm.ScanDirection1d(4, 2, 1, reverse=True).double()
    x = torch.randn(1, 4, 6, dtype=torch.float64)
    z = torch.randn(1, 4, 6, dtype=torch.float64)
    f, r = fwd(x), bwd(x)

    def naive(i, reverse=False, gate=None):
        flip = (lambda t: t.flip(-1)) if reverse else (lambda t: t)
        y = selective_scan_naive(flip(i.u), flip(i.delta), i.A, flip(i.B), flip(i.C), i.D,
                                 None if gate is None else flip(gate), i.delta_bias, delta_softplus=True)
        return flip(y)

    torch.testing.assert_close(ssm.scan(f, z=z), naive(f, gate=z))
    torch.testing.assert_close(ssm.scan(r, reverse=True), naive(r, reverse=True))
    torch.testing.assert_close(ssm.scan_bidirectional(f, r, z=z, scale=0.5),
                               0.5 * (naive(f) + naive(r, reverse=True)) * F.silu(z))


class _TinyMixer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fwd = ssm.ScanDirection1d(4, 2, 1)
        self.bwd = ssm.ScanDirection1d(4, 2, 1, reverse=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # names imported into this module, as model files do: FX wraps leaves in the caller's globals
        return scan_bidirectional(self.fwd(x), self.bwd(x), x, 0.5) + scan(self.fwd(x))


def test_layers_script_and_trace_with_the_scan_as_a_leaf():
    torch.manual_seed(0)
    m = _TinyMixer().eval()
    x = torch.randn(2, 4, 5)
    expected = m(x)
    torch.testing.assert_close(torch.jit.script(m)(x), expected)
    from timm.layers import get_notrace_functions
    traced = torch.fx.GraphModule(
        m, torch.fx.Tracer(autowrap_functions=tuple(get_notrace_functions())).trace(m))
    targets = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert ssm.scan in targets and ssm.scan_bidirectional in targets
    torch.testing.assert_close(traced(x), expected)
