"""The zoo_scan ops check their own arguments when called directly (torch.ops.zoo_scan.*, no Python
validation in front): every bad shape or dtype is a RuntimeError naming the argument, the shape got
and the shape expected, never an out-of-bounds read (a short D used to yield heap garbage)."""
from __future__ import annotations

import pytest
import torch

from zoo.ops import compiled

ok, why = compiled.kernels_available("cpu")
pytestmark = pytest.mark.skipif(not ok, reason=f"compiled CPU kernels unavailable: {why}")

BATCH, DIM, L, N, GROUPS = 2, 4, 5, 3, 2


def scan_args():
    """Valid scan_fwd arguments: u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return [r(BATCH, DIM, L), r(BATCH, DIM, L), -torch.rand(DIM, N, generator=g) - 0.5, r(BATCH, GROUPS, N, L),
            r(BATCH, GROUPS, N, L), r(DIM), r(BATCH, DIM, L), r(DIM), True, False]


NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]

# (argument, bad value, expected message): the shape got and the shape expected are both named
FWD_CASES = [
    ("D", torch.randn(DIM - 1), r"D has shape \(3,\), expected \(dim,\) = \(4,\)"),
    ("D", torch.randn(DIM + 2), r"D has shape \(6,\), expected \(dim,\) = \(4,\)"),
    ("delta_bias", torch.randn(1), r"delta_bias has shape \(1,\), expected \(dim,\) = \(4,\)"),
    ("delta", torch.randn(BATCH, DIM, L - 1), r"delta has shape \(2, 4, 4\), expected \(batch, dim, L\) = \(2, 4, 5\)"),
    ("z", torch.randn(BATCH, DIM, 1), r"z has shape \(2, 4, 1\), expected \(batch, dim, L\) = \(2, 4, 5\)"),
    ("A", torch.randn(DIM - 1, N), r"A has shape \(3, 3\), expected \(dim, d_state\)"),
    ("B", torch.randn(BATCH, GROUPS, N + 1, L), r"B has shape \(2, 2, 4, 5\), expected \(batch, groups, d_state, L\) = \(2, 2, 3, 5\)"),
    ("C", torch.randn(BATCH, GROUPS, N, L + 1), r"C has shape \(2, 2, 3, 6\), expected \(batch, groups, d_state, L\) = \(2, 2, 3, 5\)"),
    ("B", torch.randn(BATCH, 3, N, L), r"B has 3 groups, which must divide dim = 4"),
    ("C", torch.randn(BATCH, 1, N, L), r"B and C must have the same number of groups, got 2 and 1"),
    ("B", torch.randn(DIM, N + 1), r"B has shape \(4, 4\), expected \(dim, d_state\) = \(4, 3\)"),
    ("C", torch.randn(BATCH, N, L + 2), r"C has shape \(2, 3, 7\), expected \(batch, d_state, L\) = \(2, 3, 5\)"),
    ("B", torch.randn(N, L), r"B has shape \(3, 5\), expected \(dim, d_state\) = \(4, 3\)"),
    ("B", torch.randn(1, BATCH, GROUPS, N, L), r"B has shape \(1, 2, 2, 3, 5\), expected \(dim, d_state\), \(batch, d_state, L\)"),
    ("u", torch.randn(BATCH, DIM), r"u has shape \(2, 4\), expected \(batch, dim, L\)"),
    ("delta", torch.ones(BATCH, DIM, L, dtype=torch.int64), r"delta has dtype Long; accepted: float32"),
    ("u", torch.ones(BATCH, DIM, L, dtype=torch.int32), r"u has dtype Int; accepted: float32"),
    ("D", torch.ones(DIM, dtype=torch.complex64), r"D has dtype ComplexFloat; accepted: float32"),
    ("B", torch.ones(BATCH, GROUPS, N, L, dtype=torch.bool), r"B has dtype Bool; accepted: float32"),
]


@pytest.mark.parametrize("name,bad,match", FWD_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(FWD_CASES)])
def test_scan_fwd_checks_every_argument(name, bad, match):
    args = scan_args()
    args[NAMES.index(name)] = bad
    with pytest.raises(RuntimeError, match="zoo_scan.scan_fwd: " + match):
        torch.ops.zoo_scan.scan_fwd(*args)


@pytest.mark.parametrize("name,bad,match", FWD_CASES[:6], ids=[c[0] for c in FWD_CASES[:6]])
def test_scan_bwd_checks_the_forward_arguments(name, bad, match):
    args = scan_args()
    args[NAMES.index(name)] = bad
    with pytest.raises(RuntimeError, match="zoo_scan.scan_bwd: " + match):
        torch.ops.zoo_scan.scan_bwd(torch.randn(BATCH, DIM, L), None, *args)


@pytest.mark.parametrize("dout,dlast,match", [
    (torch.randn(BATCH, DIM, L - 1), None, r"dout has shape \(2, 4, 4\), expected \(batch, dim, L\) = \(2, 4, 5\)"),
    (torch.randn(BATCH, DIM, L), torch.randn(BATCH, DIM, N - 1),
     r"dlast has shape \(2, 4, 2\), expected \(batch, dim, d_state\) = \(2, 4, 3\)"),
    (torch.randn(BATCH, DIM, L), torch.randn(DIM, N), r"dlast has shape \(4, 3\), expected"),
    (torch.ones(BATCH, DIM, L, dtype=torch.int64), None, r"dout has dtype Long"),
])
def test_scan_bwd_checks_incoming_gradients(dout, dlast, match):
    with pytest.raises(RuntimeError, match="zoo_scan.scan_bwd: " + match):
        torch.ops.zoo_scan.scan_bwd(dout, dlast, *scan_args())


def indexed_args(index):
    u, delta, A, B, C, D, _, bias, softplus, _ = scan_args()
    return [u, delta, A, B, C, D, bias, index, softplus]


@pytest.mark.parametrize("index,match", [
    (torch.tensor([0, 1, L]), r"index values must lie in \[0, 5\), got \[0, 5\]"),
    (torch.tensor([-1, 0]), r"index values must lie in \[0, 5\), got \[-1, 0\]"),
    (torch.tensor([0.0, 1.0]), r"index has dtype Float; accepted: an integer dtype"),
    (torch.zeros(2, 2, dtype=torch.long), r"index has shape \(2, 2\), expected a non-empty 1-D tensor"),
    (torch.zeros(0, dtype=torch.long), r"index has shape \(0,\), expected a non-empty 1-D tensor"),
])
def test_indexed_ops_check_the_index(index, match):
    with pytest.raises(RuntimeError, match="zoo_scan.scan_fwd_indexed: " + match):
        torch.ops.zoo_scan.scan_fwd_indexed(*indexed_args(index))
    with pytest.raises(RuntimeError, match="zoo_scan.scan_bwd_indexed: " + match):
        torch.ops.zoo_scan.scan_bwd_indexed(torch.randn(BATCH, DIM, 2), *indexed_args(index))


def test_indexed_ops_check_arguments_and_dout():
    args = indexed_args(torch.tensor([0, 2, 4, 1]))
    short_d = list(args)
    short_d[5] = torch.randn(DIM - 1)
    with pytest.raises(RuntimeError, match=r"zoo_scan.scan_fwd_indexed: D has shape \(3,\), expected \(dim,\)"):
        torch.ops.zoo_scan.scan_fwd_indexed(*short_d)
    # dout spans the visiting order (4 steps), not L
    with pytest.raises(RuntimeError, match=r"scan_bwd_indexed: dout has shape \(2, 4, 5\), expected "
                                           r"\(batch, dim, L\) = \(2, 4, 4\)"):
        torch.ops.zoo_scan.scan_bwd_indexed(torch.randn(BATCH, DIM, L), *args)


def test_valid_direct_calls_still_run():
    # the checks must not reject what the ops serve: fixed, 3-D and 4-D B/C, optional inputs absent
    u, delta, A, B, C, D, z, bias, sp, rev = scan_args()
    for Bx, Cx in ((B, C), (torch.randn(DIM, N), C), (torch.randn(BATCH, N, L), torch.randn(BATCH, N, L))):
        out, last = torch.ops.zoo_scan.scan_fwd(u, delta, A, Bx, Cx, None, None, None, sp, rev)
        assert out.shape == u.shape and last.shape == (BATCH, DIM, N) and torch.isfinite(out).all()
        grads = torch.ops.zoo_scan.scan_bwd(torch.ones_like(u), torch.ones_like(last), u, delta, A, Bx, Cx, D, z,
                                            bias, sp, rev)
        assert grads[3].shape == Bx.shape and grads[4].shape == Cx.shape
