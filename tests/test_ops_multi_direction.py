"""The multi-direction scan's traversal orders written out by hand (not imported from the code under
test) and its output against the float64 oracle over the literally concatenated traversals."""
from __future__ import annotations

import pytest
import torch

from _scan_oracle import oracle_scan
from zoo.ops import compiled
from zoo.ops.multi_direction import MSVMAMBA_LOW_RES_ORDERS, scan_order_index, selective_scan_multi_direction

# a 2 x 3 map, pixels numbered row-major:  0 1 2
#                                          3 4 5
ORDER_2x3 = {
    "row": [0, 1, 2, 3, 4, 5],
    "row_reversed": [5, 4, 3, 2, 1, 0],
    "col": [0, 3, 1, 4, 2, 5],
    "col_reversed": [5, 2, 4, 1, 3, 0],
}
CPU_KERNELS, WHY = compiled.kernels_available("cpu")
BACKENDS = ["reference", pytest.param("compiled", marks=pytest.mark.skipif(not CPU_KERNELS, reason=WHY))]


@pytest.mark.parametrize("order", list(ORDER_2x3))
def test_scan_order_index_by_hand(order):
    assert scan_order_index(order, 2, 3).tolist() == ORDER_2x3[order]


def test_msvmamba_low_resolution_orders():
    # the official low-resolution branch scans the flipped row-major sequence, then the column-major
    # one, then the flipped column-major one (checked end to end by the ../shared/parity fixtures)
    assert tuple(MSVMAMBA_LOW_RES_ORDERS) == ("row_reversed", "col", "col_reversed")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("orders,groups", [(("row_reversed", "col", "col_reversed"), 1),
                                           (("col", "row", "col_reversed", "row"), 2)])
def test_multi_direction_matches_oracle_over_hand_written_orders(backend, orders, groups):
    g = torch.Generator().manual_seed(5)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    batch, dim, n, L = 2, 4, 3, 6
    x = dict(u=r(batch, dim, L), delta=r(batch, dim, L), A=-(torch.arange(1, n + 1, dtype=torch.float64)).repeat(dim, 1),
             B=r(batch, groups, n, L), C=r(batch, n, L) if groups == 1 else r(batch, groups, n, L), D=r(dim),
             delta_bias=r(dim))
    leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    got = selective_scan_multi_direction(**leaves, height=2, width=3, orders=orders, backend=backend)
    ref_leaves = {k: v.clone().requires_grad_(True) for k, v in x.items()}
    steps = [p for o in orders for p in ORDER_2x3[o]]  # one sequence: all traversals back to back
    seq = {k: v[..., steps] if v.dim() >= 3 else v for k, v in ref_leaves.items()}
    y = oracle_scan(**seq, delta_softplus=True)
    want = torch.zeros(batch, len(orders), dim, L, dtype=torch.float64)
    for k, o in enumerate(orders):
        for step, pixel in enumerate(ORDER_2x3[o]):
            want[:, k, :, pixel] = y[:, :, k * L + step]
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    w = torch.randn_like(want)
    (got * w).sum().backward()
    (want * w).sum().backward()
    for k in x:
        torch.testing.assert_close(leaves[k].grad, ref_leaves[k].grad, rtol=1e-8, atol=1e-8, msg=lambda m: f"d{k}: {m}")
