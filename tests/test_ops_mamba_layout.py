"""mamba-ssm's 3-D variable B/C, (batch, d_state, L) meaning one group, through every zoo.ops entry
point and both backends, against the independent oracle: forward, last state and gradients, with
the gradient of a 3-D B/C returned in the 3-D shape."""
from __future__ import annotations

import pytest
import torch

from _scan_oracle import oracle_scan
from zoo.ops import compiled, selective_scan, selective_scan_bidirectional
from zoo.ops.multi_direction import scan_order_index, selective_scan_multi_direction

CPU_KERNELS, WHY = compiled.kernels_available("cpu")
BACKENDS = ["reference", pytest.param("compiled", marks=pytest.mark.skipif(not CPU_KERNELS, reason=WHY))]


def inputs(batch=2, dim=4, L=70, n=5, layout_b="3d", layout_c="3d", seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    shapes = {"3d": (batch, n, L), "4d": (batch, 1, n, L), "fixed": (dim, n)}
    return dict(u=r(batch, dim, L), delta=0.5 * r(batch, dim, L), A=-(0.5 + torch.rand(dim, n, generator=g,
                dtype=torch.float64)), B=r(*shapes[layout_b]), C=r(*shapes[layout_c]), D=r(dim), z=r(batch, dim, L),
                delta_bias=0.3 * r(dim))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout_b,layout_c,reverse", [("3d", "3d", False), ("3d", "3d", True), ("3d", "fixed", False),
                                                       ("fixed", "3d", True), ("3d", "4d", False)])
def test_three_dim_B_C_match_oracle_with_grads(backend, layout_b, layout_c, reverse):
    x = inputs(layout_b=layout_b, layout_c=layout_c)
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    out, last = selective_scan(**leaves, delta_softplus=True, return_last_state=True, reverse=reverse,
                               backend=backend)
    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    ref, ref_last = oracle_scan(**ref_leaves, delta_softplus=True, reverse=reverse, return_last_state=True)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(last, ref_last, rtol=1e-9, atol=1e-9)
    w, wl = torch.randn_like(ref), torch.randn_like(ref_last)
    ((out * w).sum() + (last * wl).sum()).backward()
    ((ref * w).sum() + (ref_last * wl).sum()).backward()
    for k in x:
        assert leaves[k].grad.shape == x[k].shape, k
        torch.testing.assert_close(leaves[k].grad, ref_leaves[k].grad, rtol=1e-8, atol=1e-8, msg=lambda m: f"d{k}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_dim_B_C_in_the_bidirectional_scan(backend):
    f, r = inputs(L=9, seed=1), inputs(L=9, seed=2)
    z = f["z"]
    got = selective_scan_bidirectional(f["u"], f["delta"], f["A"], f["B"], f["C"], f["D"], f["delta_bias"],
                                       r["u"], r["delta"], r["A"], r["B"], r["C"], r["D"], r["delta_bias"], z=z,
                                       backend=backend)
    drop_z = lambda d: {k: v for k, v in d.items() if k != "z"}  # noqa: E731
    want = 0.5 * (oracle_scan(**drop_z(f), delta_softplus=True)
                  + oracle_scan(**drop_z(r), delta_softplus=True, reverse=True)) * torch.nn.functional.silu(z)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_dim_B_C_in_the_multi_direction_scan(backend):
    h, w = 3, 4
    x = inputs(L=h * w, seed=3)
    orders = ("row_reversed", "col", "col_reversed")
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items() if k != "z"}
    got = selective_scan_multi_direction(**leaves, height=h, width=w, orders=orders, backend=backend)
    # oracle: the orders' token sequences concatenated and scanned once, outputs put back on their pixels
    perms = [scan_order_index(o, h, w) for o in orders]
    idx = torch.cat(perms)
    ref_leaves = {k: x[k].clone().requires_grad_(True) for k in leaves}
    seq = {k: (v.index_select(-1, idx) if v.dim() == 3 else v) for k, v in ref_leaves.items()}
    y = oracle_scan(**seq, delta_softplus=True)
    want = torch.stack([y[..., k * h * w:(k + 1) * h * w][..., torch.argsort(p)] for k, p in enumerate(perms)], 1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    g = torch.randn_like(want)
    (got * g).sum().backward()
    (want * g).sum().backward()
    for k in ("B", "C", "u"):
        assert leaves[k].grad.shape == x[k].shape
        torch.testing.assert_close(leaves[k].grad, ref_leaves[k].grad, rtol=1e-8, atol=1e-8)


def test_three_dim_B_with_wrong_shape_names_the_layout():
    x = inputs(L=6)
    x["B"] = torch.randn(2, 5, 7, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"B has shape \(2, 5, 7\), expected \(batch, d_state, L\) = \(2, 5, 6\)"):
        selective_scan(**x)
