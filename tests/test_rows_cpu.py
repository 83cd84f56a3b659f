"""MSVMamba's and VMamba's channels-last CPU mixers (zoo_scan::depthwise_conv2d_silu / scan_orders /
scan_cross) against F.conv2d, the naive scan over gathered copies, and the reference mixer on the official
fixtures (VMamba's fixtures run through its fused mixer in test_vmamba.py)."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from _parity import fixture_id, load_fixture, parity_files
from zoo.models import msvmamba as msv_mod
from zoo.models import vmamba as vmamba_mod
from zoo.models.msvmamba import checkpoint_filter_fn, from_official_kwargs
from zoo.ops import scan_order_index, selective_scan_naive
from zoo.ops.compiled import kernels_available
from zoo.ops import mixer as mixer_mod
from zoo.ops.mixer import fused_mixer_enabled
from zoo.ops.multi_direction import SCAN_ORDERS

KERNELS, WHY = kernels_available("cpu")
pytestmark = pytest.mark.skipif(not KERNELS, reason=f"compiled CPU kernels unavailable: {WHY}")
FIXTURES = parity_files("msvmamba", "msvmamba_*.json")


@pytest.mark.parametrize("k, stride, size, channels, bias", [
    (3, 1, (7, 5), 37, True), (7, 2, (14, 9), 16, True), (7, 2, (1, 3), 5, False), (5, 1, (4, 4), 19, False),
    (3, 1, (5, 6), 85, True), (7, 2, (9, 8), 64, False),
])
def test_depthwise_conv2d_silu_matches_conv2d(k, stride, size, channels, bias):
    """Odd and even map sizes (stride-2 edges), 64-channel blocks, 16-channel ones and a tail past them, no bias,
    and an input that is a column slice of a wider channels-last tensor (how the mixer passes in_proj's output)."""
    torch.manual_seed(0)
    wide = torch.randn(2, *size, 2 * channels + 3)
    x = wide[..., 3:3 + channels]
    weight = torch.randn(channels, 1, k, k)
    b = torch.randn(channels) if bias else None
    out = torch.ops.zoo_scan.depthwise_conv2d_silu(x, weight, b, stride)
    want = F.silu(F.conv2d(x.permute(0, 3, 1, 2), weight, b, stride=stride, padding=(k - 1) // 2, groups=channels))
    torch.testing.assert_close(out, want.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k, size, channels, biases", [(3, (7, 5), 37, True), (5, (1, 4), 16, False),
                                                       (3, (4, 5), 85, True)])
def test_depthwise_conv2d_residual_gelu_matches_convffn_middle(k, size, channels, biases):
    """gelu(x' + conv(x') + bias), x' = x + x_bias (ConvFFN's fc1 bias moved in), against F.conv2d and exact GELU;
    the input a column slice of a wider map; inputs spanning GELU's tails (|x| up to ~12)."""
    torch.manual_seed(0)
    x = (torch.randn(2, *size, channels + 3) * 4)[..., 3:]
    weight = torch.randn(channels, 1, k, k)
    x_bias, bias = (torch.randn(channels), torch.randn(channels)) if biases else (None, None)
    out = torch.ops.zoo_scan.depthwise_conv2d_residual_gelu(x, x_bias, weight, bias)
    xb = (x + x_bias if biases else x).permute(0, 3, 1, 2)
    want = F.gelu(xb + F.conv2d(xb, weight, bias, padding=(k - 1) // 2, groups=channels))
    torch.testing.assert_close(out, want.permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_residual_gelu_matches_float64_gelu_through_the_negative_tail():
    """With zero weights the op is GELU itself: against float64 x * Phi(x) relatively, down to the negative
    tail's 1e-36 (past which the kernel returns 0), no output denormal. The tail's error grows with the rounding
    of z^2 (z = |x| / sqrt 2): 3e-6 for |x| < 5.66 (z < 4), 3e-5 out to -12.7. (That the kernel's intermediates
    stay normal too shows only in its speed: docs/kernels.md.)"""
    x = torch.cat([torch.linspace(-12.7, 12.7, 2541), torch.tensor([-13.0, -50.0, -1e4, 50.0, 1e4])])
    x = x[:2544].reshape(1, 1, -1, 16)
    out = torch.ops.zoo_scan.depthwise_conv2d_residual_gelu(x, None, torch.zeros(16, 1, 1, 1), None)
    x64 = x.double()
    want = x64 * 0.5 * torch.special.erfc(-x64 / 2 ** 0.5)
    assert torch.isfinite(out).all()
    big = want.abs() > 1e-36
    near = big & (x.abs() < 5.66)
    torch.testing.assert_close(out[near].double(), want[near], rtol=3e-6, atol=0)
    torch.testing.assert_close(out[big].double(), want[big], rtol=3e-5, atol=0)
    assert (out[~big].abs() <= 1e-36).all()
    assert not ((out != 0) & (out.abs() < torch.finfo(torch.float32).tiny)).any(), "denormal outputs"


def _scan_inputs(batch: int, L: int, dim: int, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(batch, L, dim, generator=gen)
    delta = torch.randn(batch, L, dim, generator=gen) * 0.5
    A = -torch.rand(dim, n, generator=gen) * 4 - 0.1
    x_dbl = torch.randn(batch, L, 2 * n + 3, generator=gen)  # B and C as column slices, as the mixer has them
    return u, delta, A, x_dbl[..., 3:3 + n], x_dbl[..., 3 + n:], torch.randn(dim, generator=gen), \
        torch.randn(dim, generator=gen) * 0.3


@pytest.mark.parametrize("height, width, dim, n", [(3, 5, 37, 1), (4, 4, 16, 3), (1, 6, 5, 1), (2, 7, 20, 16),
                                                  (2, 3, 300, 1)])
def test_scan_orders_is_one_sequence_over_the_gathered_orders(height, width, dim, n):
    """Every order of SCAN_ORDERS, the state running from one into the next: equals the naive scan of the
    concatenated reordered copies, each order's outputs put back to row-major positions."""
    L = height * width
    u, delta, A, B, C, D, bias = _scan_inputs(2, L, dim, n)
    orders = torch.stack([scan_order_index(o, height, width) for o in SCAN_ORDERS])
    out = torch.ops.zoo_scan.scan_orders(u, delta, A, B, C, D, bias, orders, True)

    flat = orders.reshape(-1)
    gathered = [t[:, flat].transpose(1, 2) for t in (u, delta)]  # (batch, dim, K * L)
    bc = [t[:, flat].transpose(1, 2) for t in (B, C)]
    y = selective_scan_naive(gathered[0], gathered[1], A, bc[0], bc[1], D, delta_bias=bias, delta_softplus=True)
    want = torch.empty_like(out)
    for k in range(len(SCAN_ORDERS)):
        want[:, k, orders[k]] = y[:, :, k * L:(k + 1) * L].transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("height, width, dim, n", [(3, 5, 37, 1), (4, 4, 16, 3), (2, 7, 70, 16), (2, 3, 300, 1)])
def test_scan_cross_sums_independent_scans_of_each_order(height, width, dim, n):
    """Four orders, each with its own delta, B, C, A, D and bias and a zero initial state: equals the sum of
    four naive scans over the gathered copies, put back to row-major positions (VMamba's scan + merge)."""
    L, K = height * width, len(SCAN_ORDERS)
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(2, L, dim, generator=gen)
    delta = torch.randn(K, 2, L, dim, generator=gen) * 0.5
    A = -torch.rand(K, dim, n, generator=gen) * 4 - 0.1
    x_dbl = torch.randn(2, L, K, 2 * n + 2, generator=gen)
    B, C = x_dbl[..., 2:2 + n], x_dbl[..., 2 + n:]
    D, bias = torch.randn(K, dim, generator=gen), torch.randn(K, dim, generator=gen) * 0.3
    orders = torch.stack([scan_order_index(o, height, width) for o in SCAN_ORDERS])
    out = torch.ops.zoo_scan.scan_cross(u, delta, A, B, C, D, bias, orders, True)

    want = torch.zeros_like(out)
    for k in range(K):
        idx = orders[k]
        y = selective_scan_naive(u[:, idx].transpose(1, 2), delta[k][:, idx].transpose(1, 2), A[k],
                                 B[:, idx, k].transpose(1, 2), C[:, idx, k].transpose(1, 2), D[k],
                                 delta_bias=bias[k], delta_softplus=True)
        want[:, idx] += y.transpose(1, 2)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    wrong_k = rf"scan_cross: orders must be an int64 CPU tensor \(K, L = {L}\), got Long \[3, {L}\]"
    with pytest.raises(RuntimeError, match=wrong_k):
        torch.ops.zoo_scan.scan_cross(u, delta, A, B, C, D, bias, orders[:3], True)
    with pytest.raises(RuntimeError, match=rf"scan_cross: delta must be \(K, batch, L, dim\) = \[{K}, 2, {L}, {dim}\]"):
        torch.ops.zoo_scan.scan_cross(u, delta[:, :, :-1], A, B, C, D, bias, orders, True)


def test_dt_proj_folded_into_the_scans_equals_the_full_delta():
    """dt_weight: delta given as dt_proj's rank-R input (a strided column slice, as the mixers pass it) gives
    the outputs of the full-width delta computed by a matmul, for scan_orders and for scan_cross."""
    gen = torch.Generator().manual_seed(2)
    height, width, dim, n, rank = 3, 5, 37, 1, 3
    L = height * width
    u, _, A, B, C, D, bias = _scan_inputs(2, L, dim, n)
    orders = torch.stack([scan_order_index(o, height, width) for o in SCAN_ORDERS])
    low = torch.randn(2, L, rank + 4, generator=gen)[..., 1:1 + rank]
    weight = torch.randn(dim, rank, generator=gen)
    full = low @ weight.t()
    torch.testing.assert_close(torch.ops.zoo_scan.scan_orders(u, low, A, B, C, D, bias, orders, True, weight),
                               torch.ops.zoo_scan.scan_orders(u, full, A, B, C, D, bias, orders, True),
                               rtol=1e-5, atol=1e-6)
    K = len(SCAN_ORDERS)
    lows = torch.randn(2, L, K, rank + 2, generator=gen)[..., :rank].permute(2, 0, 1, 3)  # (K, B, L, R), strided
    weights = torch.randn(K, dim, rank, generator=gen)
    fulls = torch.einsum("kblr,kdr->kbld", lows, weights)
    As, Ds, biases = A.expand(K, dim, n).contiguous(), D.expand(K, dim).contiguous(), bias.expand(K, dim).contiguous()
    Bs, Cs = B.unsqueeze(2).expand(2, L, K, n), C.unsqueeze(2).expand(2, L, K, n)
    torch.testing.assert_close(
        torch.ops.zoo_scan.scan_cross(u, lows, As, Bs, Cs, Ds, biases, orders, True, weights),
        torch.ops.zoo_scan.scan_cross(u, fulls, As, Bs, Cs, Ds, biases, orders, True), rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"scan_orders: dt_weight must be \(dim, rank\) = \[37, 3\]"):
        torch.ops.zoo_scan.scan_orders(u, low, A, B, C, D, bias, orders, True, weight[:5])
    with pytest.raises(RuntimeError, match=r"scan_orders: delta must be \(batch, L, rank\) with dt_weight"):
        torch.ops.zoo_scan.scan_orders(u, full, A, B, C, D, bias, orders, True, weight)


@pytest.mark.parametrize("size, low, K, with_z", [((7, 5), (4, 3), 4, True), ((6, 6), (3, 3), 2, False),
                                                  ((4, 9), None, 0, True), ((1, 3), (1, 2), 1, True)])
def test_norm_merge_gate_matches_layer_norm_upsample_and_gate(size, low, K, with_z):
    """Odd sizes (uneven bilinear taps), one-pixel rows, d = 37 (a tail past the vector lanes), strided y and z
    (column slices, as the mixer passes them), against LayerNorm + sum over orders + F.interpolate + silu gate."""
    torch.manual_seed(0)
    (H, W), d = size, 37
    norm = torch.nn.LayerNorm(d, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    y = torch.randn(2, H * W, d + 5)[..., 5:] * 3 + 1
    y_low = torch.randn(2, K, low[0] * low[1], d) if low else None
    z = torch.randn(2, H * W, 2 * d)[..., d:] if with_z else None
    with torch.no_grad():
        out, sums = torch.ops.zoo_scan.norm_merge_gate(y, y_low, H, W, *(low or (0, 0)), norm.weight, norm.bias,
                                                       norm.eps, z)
        want = norm(y)
        if low:
            s = norm(y_low).sum(1).view(2, *low, d).permute(0, 3, 1, 2)
            want = want + F.interpolate(s, size=(H, W), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)
    torch.testing.assert_close(sums, want.sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out, want * F.silu(z) if with_z else want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("d", [16, 96, 131])  # whole 16-value partial sums, and a tail past them
def test_norm_merge_gate_layer_norm_keeps_its_accuracy_on_offset_tokens(d):
    """Tokens with a mean far above their spread (300 +- 0.5): the variance is taken around the mean in a second
    pass, so float32 keeps it (E[x^2] - mean^2 would lose about 2% of it to cancellation). Against float64, the
    error may be at most about that of torch's own float32 LayerNorm (the mean's rounding at 300 bounds both)."""
    torch.manual_seed(1)
    y = torch.randn(3, 20, d) * 0.5 + 300
    w, b = torch.randn(d), torch.randn(d)
    out, _ = torch.ops.zoo_scan.norm_merge_gate(y, None, 4, 5, 0, 0, w, b, 1e-5, None)
    want = F.layer_norm(y.double(), (d,), w.double(), b.double(), 1e-5)
    torch_err = (F.layer_norm(y, (d,), w, b, 1e-5).double() - want).abs().max().item()
    err = (out.double() - want).abs().max().item()
    assert err <= 2 * torch_err + 1e-5, (err, torch_err)
    assert err < 1e-3  # 2% of the variance lost would be ~1e-2 here


def test_norm_merge_gate_refuses_mismatched_shapes():
    y, w = torch.randn(1, 6, 8), torch.ones(8)
    with pytest.raises(RuntimeError, match="y must be \\(batch, height \\* width, d\\)"):
        torch.ops.zoo_scan.norm_merge_gate(y, None, 2, 2, 0, 0, w, w, 1e-5, None)
    with pytest.raises(RuntimeError, match="y_low must be"):
        torch.ops.zoo_scan.norm_merge_gate(y, torch.randn(1, 2, 5, 8), 2, 3, 2, 2, w, w, 1e-5, None)
    with pytest.raises(RuntimeError, match="z must be"):
        torch.ops.zoo_scan.norm_merge_gate(y, None, 2, 3, 0, 0, w, w, 1e-5, torch.randn(1, 6, 7))


def test_step_maths_match_float64_over_the_whole_range():
    """The vectorised softplus and exp(dt * A) inside the row scans, one value per channel, against float64:
    a two-step scan with u = B = C = 1, D = 0 gives y_0 = softplus(delta_0 + bias) and, with u_1 = 0,
    y_1 = exp(dt_1 * A) * dt_0 (here dt_0 = dt_1 = 1 without softplus, so y_1 = exp(A))."""
    dim = 4096
    raw = torch.linspace(-80.0, 40.0, dim, dtype=torch.float64)
    ones, zeros = torch.ones(1, 2, dim), torch.zeros(dim)
    u = torch.ones(1, 2, dim)
    u[:, 1] = 0
    order = torch.arange(2)[None]
    bc = torch.ones(1, 2, 1)
    y = torch.ops.zoo_scan.scan_orders(u, raw.float().expand(1, 2, dim).contiguous(), -torch.ones(dim, 1), bc, bc,
                                       zeros, zeros, order, True)
    torch.testing.assert_close(y[0, 0, 0].double(), F.softplus(raw.float().double()), rtol=4e-7, atol=0)

    A = torch.linspace(-87.0, 80.0, dim)  # decays down to exp(-87), and growth
    y = torch.ops.zoo_scan.scan_orders(u, ones, A[:, None], bc, bc, zeros, zeros, order, False)
    want = A.double().exp()
    # exp(x) as 2^(x * log2 e): rounding the float product costs |x| * 2^-24 relative (as rounding dt * A in
    # float32 does in any float32 scan), twice over with log2 e's own rounding, beside the polynomial's ~1 ulp
    rel = (y[0, 0, 1].double() - want).abs() / want
    assert (rel <= 3e-7 + 1.5e-7 * A.double().abs()).all(), rel.max()

    # softplus and A <= 0: the decay-only exp (one clamp), exponents from 0 down past float32's underflow
    y = torch.ops.zoo_scan.scan_orders(u, raw.float().expand(1, 2, dim).contiguous(), -2 * torch.ones(dim, 1), bc, bc,
                                       zeros, zeros, order, True)
    dt = y[0, 0, 0].double()  # the kernel's own time scales, so only the exp is checked here
    x = -2 * dt
    want = x.exp() * dt
    assert x.min() < -70  # the clamp at 2^-126 (values below it are ~1e-38 absolute)
    err = (y[0, 0, 1].double() - want).abs()
    assert (err <= (3e-7 + 1.5e-7 * x.abs()) * want + 1e-37).all(), (err / want).max()


def test_scan_result_does_not_depend_on_the_thread_count():
    """Batch 1 on 8 threads splits the channels into narrower tasks (16 lanes) than on 1 thread (64): every
    lane's arithmetic is the same, so the outputs are bit-identical."""
    u, delta, A, B, C, D, bias = _scan_inputs(1, 12, 100, 2)
    orders = torch.stack([scan_order_index(o, 3, 4) for o in SCAN_ORDERS])
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.zoo_scan.scan_orders(u, delta, A, B, C, D, bias, orders, True)
        torch.set_num_threads(8)
        eight = torch.ops.zoo_scan.scan_orders(u, delta, A, B, C, D, bias, orders, True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, eight)


def test_scan_orders_refuses_orders_that_are_not_permutations():
    u, delta, A, B, C, D, bias = _scan_inputs(1, 4, 3, 1)
    with pytest.raises(RuntimeError, match=r"orders\[0\] visits token 1 twice"):
        torch.ops.zoo_scan.scan_orders(u, delta, A, B, C, D, bias, torch.tensor([[0, 1, 1, 3]]), True)
    with pytest.raises(RuntimeError, match=r"orders\[1\] holds token 4 outside \[0, 4\)"):
        torch.ops.zoo_scan.scan_orders(u, delta, A, B, C, D, bias, torch.tensor([[0, 1, 2, 3], [4, 0, 1, 2]]), True)
    with pytest.raises(RuntimeError, match=r"orders must be an int64 CPU tensor"):
        torch.ops.zoo_scan.scan_orders(u, delta, A, B, C, D, bias, torch.tensor([[0, 1, 2, 3]], dtype=torch.int32),
                                       True)
    with pytest.raises(RuntimeError, match=r"delta must be u's shape"):
        torch.ops.zoo_scan.scan_orders(u, delta[:, :3], A, B, C, D, bias, torch.tensor([[0, 1, 2, 3]]), True)


def test_fake_kernels_and_schemas():
    """Shapes without running (torch.compile / export), checked by torch's own op tests."""
    checks = ("test_schema", "test_faketensor")
    x = torch.randn(2, 7, 5, 24)[..., 4:20]
    for stride in (1, 2):
        torch.library.opcheck(torch.ops.zoo_scan.depthwise_conv2d_silu,
                              (x, torch.randn(16, 1, 3, 3), torch.randn(16), stride), test_utils=checks)
    u, delta, A, B, C, D, bias = _scan_inputs(2, 12, 16, 2)
    orders = torch.stack([scan_order_index(o, 3, 4) for o in SCAN_ORDERS])
    torch.library.opcheck(torch.ops.zoo_scan.scan_orders, (u, delta, A, B, C, D, bias, orders, True),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.zoo_scan.scan_orders, (u, delta[..., :3].contiguous(), A, B, C, D, bias, orders,
                                                           True, torch.randn(16, 3)), test_utils=checks)
    K = len(SCAN_ORDERS)
    per_order = [t.expand(K, *t.shape).contiguous() for t in (delta, A, D, bias)]
    per_token = [t.unsqueeze(2).expand(2, 12, K, 2).contiguous() for t in (B, C)]
    torch.library.opcheck(torch.ops.zoo_scan.scan_cross, (u, per_order[0], per_order[1], *per_token, per_order[2],
                                                          per_order[3], orders, True), test_utils=checks)
    torch.library.opcheck(torch.ops.zoo_scan.depthwise_conv2d_residual_gelu,
                          (x, torch.randn(16), torch.randn(16, 1, 3, 3), None), test_utils=checks)
    w = torch.randn(16)
    torch.library.opcheck(torch.ops.zoo_scan.norm_merge_gate, (u, torch.randn(2, 4, 6, 16), 3, 4, 2, 3, w, w, 1e-5,
                                                               delta), test_utils=checks)


def test_fused_path_serves_inference_only():
    x = torch.randn(1, 4, 4, 8)
    with torch.no_grad():
        assert fused_mixer_enabled(x, "scan_orders")
    assert not fused_mixer_enabled(x, "scan_orders")  # gradients on: the differentiable path
    with torch.no_grad():
        assert not fused_mixer_enabled(x.double(), "scan_orders")


@pytest.mark.skipif(not FIXTURES, reason="no MSVMamba parity fixtures (../shared/parity/msvmamba)")
@pytest.mark.parametrize("fixture", FIXTURES, ids=fixture_id)
def test_official_parity_through_the_fused_mixer(fixture, monkeypatch):
    """The official fixtures through the channels-last mixer (checked to run), within their tolerance."""
    monkeypatch.delenv("ZOO_SCAN_BACKEND", raising=False)
    calls = []
    real = msv_mod.MultiScaleSS2D._forward_rows

    def counted(self, x):
        calls.append(1)
        return real(self, x)

    monkeypatch.setattr(msv_mod.MultiScaleSS2D, "_forward_rows", counted)
    meta, tensors, official_sd = load_fixture(fixture)
    model = from_official_kwargs(**meta["official_kwargs"]).eval()
    model.load_state_dict(checkpoint_filter_fn(official_sd, model), strict=True)
    with torch.no_grad():
        logits = model(tensors["input"])
    assert len(calls) == sum(len(s.blocks) for s in model.stages)
    torch.testing.assert_close(logits, tensors["logits"], rtol=meta["rtol"], atol=meta["atol"])


def test_fused_and_reference_mixers_agree_on_a_released_shape(monkeypatch):
    """msvmamba_nano at 64 px (odd low-resolution maps in the later stages), seeded weights: the fused
    inference path and ZOO_SCAN_BACKEND=reference give the same logits."""
    torch.manual_seed(0)
    model = timm.create_model("msvmamba_nano").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = model(x)
        monkeypatch.setenv("ZOO_SCAN_BACKEND", "reference")
        reference = model(x)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)



@pytest.mark.parametrize("name, module", [("msvmamba_nano", msv_mod.MultiScaleSS2D), ("vmamba_tiny", vmamba_mod.SS2D)])
def test_mixers_run_in_image_groups_with_the_whole_batch_result(name, module, monkeypatch):
    """With a cache budget below one image, every mixer runs image by image (its row path sees batch 1)
    and the logits equal the whole-batch run's."""
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        whole = model(x)
        batches = []
        real = module._forward_rows

        def recorded(self, rows):
            batches.append(rows.shape[0])
            return real(self, rows)

        monkeypatch.setattr(module, "_forward_rows", recorded)
        monkeypatch.setattr(mixer_mod, "_CHUNK_ELEMENTS", 1)
        grouped = model(x)
    assert batches and set(batches) == {1}
    torch.testing.assert_close(grouped, whole, rtol=1e-5, atol=1e-6)
