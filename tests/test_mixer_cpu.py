"""The fused CPU Vim mixer (zoo_scan::bimamba_conv / bimamba_scan) against the unfused reference path."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _parity import load_fixture, parity_files
import zoo
from zoo.models import vim as vim_mod
from zoo.models.vim import BiMambaMixer, checkpoint_filter_fn, from_official_kwargs
from zoo.ops import selective_scan_naive
from zoo.ops.compiled import kernels_available
from zoo.ops.mixer import bimamba_rows, cpu_isa, cpu_parallel_threads, fused_mixer_enabled

KERNELS, WHY = kernels_available("cpu")
pytestmark = pytest.mark.skipif(not KERNELS, reason=f"compiled CPU kernels unavailable: {WHY}")
FIXTURES = parity_files("vim", "vim_*.json")


def _mixer(dim: int, d_state: int, dt_bias: tuple, seed: int = 0) -> BiMambaMixer:
    """A mixer with model-range parameters: A = -(1..16) per channel, dt bias in the given
    softplus^-1 range, non-trivial conv bias and D."""
    torch.manual_seed(seed)
    m = BiMambaMixer(dim, d_state=d_state).eval()
    with torch.no_grad():
        for d in (m.fwd, m.bwd):
            d.A_log.copy_(torch.randint(1, 17, d.A_log.shape).float().log())
            d.dt_proj.bias.uniform_(*dt_bias)
            d.D.normal_()
            d.conv1d.bias.normal_(0, 0.5)
    return m


def _silence(direction) -> None:
    """Makes a direction contribute nothing (C = 0 and D = 0), to check the other one alone."""
    with torch.no_grad():
        direction.x_proj.weight[direction.dt_rank + direction.d_state:] = 0
        direction.D.zero_()


def _reference(m: BiMambaMixer, x: torch.Tensor, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as mp, torch.no_grad():
        mp.setenv("ZOO_SCAN_BACKEND", "reference")
        assert not fused_mixer_enabled(x)
        return m(x)


def _fused(m: BiMambaMixer, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return m.out_proj(bimamba_rows(m.in_proj(x), m.fwd, m.bwd, m.out_scale))


@pytest.mark.parametrize("which", ["both", "forward", "reverse"])
@pytest.mark.parametrize(
    "dim,L,d_state,dt_bias",
    [
        (32, 17, 16, (-7.0, -3.0)),  # small delta: slow decay, long memory
        (32, 17, 16, (2.0, 5.0)),  # large delta: fast decay
        (20, 1, 8, (-4.0, 1.0)),  # one token; 40 channels = 2 full lane blocks + 8 left over
        (24, 131, 4, (-4.0, 1.0)),  # odd L, 48 channels
        (16, 300, 16, (-5.0, 0.5)),  # longer than any block / buffer size
    ],
)
def test_fused_mixer_matches_reference(dim, L, d_state, dt_bias, which, monkeypatch):
    m = _mixer(dim, d_state, dt_bias)
    if which == "forward":
        _silence(m.bwd)
    elif which == "reverse":
        _silence(m.fwd)
    x = torch.randn(3, L, dim, generator=torch.Generator().manual_seed(1))
    ref = _reference(m, x, monkeypatch)
    fused = _fused(m, x)
    assert ref.abs().max() > 1e-2  # the checked direction(s) do reach the output
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=2e-5)
    with torch.no_grad():  # the module dispatches to the fused path under no_grad on CPU
        assert fused_mixer_enabled(m.in_proj(x))
        torch.testing.assert_close(m(x), fused, atol=0, rtol=0)


def test_scan_op_matches_naive_scans_with_strided_inputs():
    """bimamba_scan against two naive scans (delta used as given, no softplus), B/C as strided views."""
    g = torch.Generator().manual_seed(2)
    batch, L, dim, N = 2, 37, 19, 5
    u, delta = torch.randn(2, batch, L, dim, generator=g), torch.rand(2, batch, L, dim, generator=g) * 0.5
    A = -torch.rand(2, dim, N, generator=g) * 4
    BC = torch.randn(2, batch, L, 3 * N, generator=g)  # B, C are column slices of one buffer
    B, C = BC[..., :N], BC[..., 2 * N:]
    D, bias = torch.randn(2, dim, generator=g), torch.randn(2, dim, generator=g) * 0.1
    zz = torch.randn(batch, L, 2 * dim, generator=g)
    z = zz[..., dim:]
    out = torch.ops.zoo_scan.bimamba_scan(u, delta, A, B, C, D, bias, z, False, 0.7)

    def scan(k: int, flip: bool) -> torch.Tensor:
        def cl(t):  # (batch, L, c) -> (batch, c, L) in that direction's reading order
            t = t.transpose(1, 2)
            return t.flip(-1) if flip else t

        y = selective_scan_naive(cl(u[k]), cl(delta[k]), A[k], cl(B[k]).unsqueeze(1), cl(C[k]).unsqueeze(1),
                                 D[k], None, bias[k], False)
        return (y.flip(-1) if flip else y).transpose(1, 2)

    expected = 0.7 * (scan(0, False) + scan(1, True)) * F.silu(z)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_scan_op_decays_past_the_float_range():
    """Time-scale spikes at a few steps push dt * A far below 2^-126: those 16-step runs take the clamped 2^x,
    the others the unclamped one (exponents_bounded); both must match the naive scan."""
    g = torch.Generator().manual_seed(8)
    batch, L, dim, N = 2, 53, 40, 16  # 40 channels: two lane blocks and 8 single lanes
    u, z = torch.randn(2, batch, L, dim, generator=g), torch.randn(batch, L, dim, generator=g)
    delta = torch.randn(2, batch, L, dim, generator=g) * 0.5 - 2
    delta[:, :, [5, 40]] += 90.0  # softplus ~ 90: exponents down to -90 * 16 * log2(e)
    A = -torch.randint(1, 17, (2, dim, N), generator=g).float()
    B, C = torch.randn(2, batch, L, N, generator=g), torch.randn(2, batch, L, N, generator=g)
    D, bias = torch.randn(2, dim, generator=g), torch.zeros(2, dim)
    out = torch.ops.zoo_scan.bimamba_scan(u, delta, A, B, C, D, bias, z, True, 0.5)

    def scan(k: int, flip: bool) -> torch.Tensor:
        def cl(t):
            t = t.transpose(1, 2).double()
            return t.flip(-1) if flip else t

        y = selective_scan_naive(cl(u[k]), cl(delta[k]), A[k].double(), cl(B[k]).unsqueeze(1),
                                 cl(C[k]).unsqueeze(1), D[k].double(), None, bias[k].double(), True)
        return (y.flip(-1) if flip else y).transpose(1, 2)

    expected = 0.5 * (scan(0, False) + scan(1, True)) * F.silu(z.double())
    torch.testing.assert_close(out.double(), expected, atol=5e-5, rtol=5e-5)


def test_scan_op_folds_dt_proj_per_step():
    """With dt_weight, delta is dt_proj's rank-R input (here a column slice of x_proj's output, as the mixer
    passes it): the same result as the full-width delta = delta_low @ dt_weight^T."""
    g = torch.Generator().manual_seed(5)
    batch, L, dim, N, R = 2, 41, 37, 6, 5  # 37 channels: two lane blocks and 5 single lanes
    u, z = torch.randn(2, batch, L, dim, generator=g), torch.randn(batch, L, dim, generator=g)
    x_dbl = torch.randn(2, batch, L, R + 2 * N, generator=g)
    low, B, C = x_dbl[..., :R], x_dbl[..., R:R + N], x_dbl[..., R + N:]
    dt_w = torch.randn(2, dim, R, generator=g) * 0.5
    A, D = -torch.rand(2, dim, N, generator=g) * 4, torch.randn(2, dim, generator=g)
    bias = torch.randn(2, dim, generator=g) - 2
    folded = torch.ops.zoo_scan.bimamba_scan(u, low, A, B, C, D, bias, z, True, 0.5, dt_w)
    full = torch.ops.zoo_scan.bimamba_scan(u, low @ dt_w.transpose(1, 2).unsqueeze(1), A, B, C, D, bias, z, True,
                                           0.5)
    torch.testing.assert_close(folded, full, atol=2e-5, rtol=2e-5)


def test_scan_op_with_growing_states_matches_naive_scans():
    """Some A > 0: the exponents dt * A are no longer all <= 0, so the kernel must take its two-sided exp."""
    g = torch.Generator().manual_seed(6)
    batch, L, dim, N = 1, 12, 18, 4
    u, delta = torch.randn(2, batch, L, dim, generator=g), torch.randn(2, batch, L, dim, generator=g)
    A = torch.rand(2, dim, N, generator=g) * 2 - 1.5  # about a third of the states grow
    B, C = torch.randn(2, batch, L, N, generator=g), torch.randn(2, batch, L, N, generator=g)
    D, bias, z = torch.randn(2, dim, generator=g), torch.zeros(2, dim), torch.randn(batch, L, dim, generator=g)
    out = torch.ops.zoo_scan.bimamba_scan(u, delta, A, B, C, D, bias, z, True, 1.0)
    d64 = [t.double() for t in (u, delta, A, B, C, D)]

    def scan(k: int, flip: bool) -> torch.Tensor:
        def cl(t):
            t = t.transpose(1, 2)
            return t.flip(-1) if flip else t

        uu, dd, AA, BB, CC, DD = d64
        y = selective_scan_naive(cl(uu[k]), cl(dd[k]), AA[k], cl(BB[k]).unsqueeze(1), cl(CC[k]).unsqueeze(1),
                                 DD[k], None, None, True)
        return (y.flip(-1) if flip else y).transpose(1, 2)

    expected = (scan(0, False) + scan(1, True)) * F.silu(z.double())
    assert (A > 0).any() and expected.abs().max() > 10  # the growing states do reach the output
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)


def test_conv_op_matches_conv1d():
    g = torch.Generator().manual_seed(3)
    batch, L, dim, K = 2, 9, 21, 4
    x = torch.randn(batch, L, 2 * dim, generator=g)[..., :dim]  # a column slice, like the mixer's
    w, b = torch.randn(2, dim, K, generator=g), torch.randn(2, dim, generator=g)
    u = torch.ops.zoo_scan.bimamba_conv(x, w, b)
    xc = x.transpose(1, 2)
    fwd = F.silu(F.conv1d(F.pad(xc, (K - 1, 0)), w[0].unsqueeze(1), b[0], groups=dim))
    # reverse: a causal conv over the flipped sequence, flipped back
    rev = F.silu(F.conv1d(F.pad(xc.flip(-1), (K - 1, 0)), w[1].unsqueeze(1), b[1], groups=dim)).flip(-1)
    torch.testing.assert_close(u, torch.stack([fwd, rev]).transpose(2, 3), atol=1e-6, rtol=1e-6)


def test_conv_op_silu_over_its_whole_range():
    """The conv's SiLU (division-free on AVX-512) against float64 for pre-activations from -120 to 120: large
    positive ones give themselves, the middle agrees to float rounding, and large negative ones give almost zero
    (below -20 the float32 input's own rounding moves x e^x by |x| 6e-8 relative: atol covers that tail)."""
    dim = 37
    pre = torch.linspace(-120, 120, 2 * 5 * dim).view(2, 1, 5, dim)
    x = torch.zeros(1, 5, dim)
    u = torch.ops.zoo_scan.bimamba_conv(x, torch.zeros(2, dim, 4), torch.zeros(2, dim))
    assert torch.equal(u, torch.zeros_like(u))
    # bias only (zero taps): one output per bias value, every row alike
    for row in range(5):
        bias = pre[:, 0, row]
        u = torch.ops.zoo_scan.bimamba_conv(x, torch.zeros(2, dim, 4), bias)
        want = F.silu(bias.double())[:, None, None, :].expand(2, 1, 5, dim)
        torch.testing.assert_close(u.double(), want, rtol=1e-6, atol=1e-10)


def test_results_do_not_depend_on_thread_count():
    m = _mixer(64, 16, (-4.0, 1.0))
    x = torch.randn(4, 50, 64)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _fused(m, x)
        torch.set_num_threads(2)
        two = _fused(m, x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


def test_bad_arguments_get_clear_errors():
    u = torch.randn(2, 1, 5, 8)
    args = [u, u, -torch.ones(2, 8, 4), torch.randn(2, 1, 5, 4), torch.randn(2, 1, 5, 4), torch.ones(2, 8),
            torch.zeros(2, 8), torch.randn(1, 5, 8), True, 0.5]
    torch.ops.zoo_scan.bimamba_scan(*args)  # the valid call runs
    bad = list(args)
    bad[5] = torch.ones(2, 7)
    with pytest.raises(RuntimeError, match=r"D must be \(2, dim\)"):
        torch.ops.zoo_scan.bimamba_scan(*bad)
    bad = list(args)
    bad[7] = bad[7].double()
    with pytest.raises(RuntimeError, match="z must be a float32 tensor on cpu"):
        torch.ops.zoo_scan.bimamba_scan(*bad)
    with pytest.raises(RuntimeError, match=r"dt_weight must be \(2, dim, rank\)"):
        torch.ops.zoo_scan.bimamba_scan(*args, torch.randn(2, 7, 3))
    with pytest.raises(RuntimeError, match=r"delta must be \(2, batch, L, rank\) with dt_weight"):
        torch.ops.zoo_scan.bimamba_scan(*args, torch.randn(2, 8, 3))  # delta is still full width
    with pytest.raises(RuntimeError, match=r"weight must be \(2, dim, kernel\)"):
        torch.ops.zoo_scan.bimamba_conv(torch.randn(1, 5, 8), torch.randn(2, 9, 4), torch.randn(2, 8))


def test_fake_kernels_and_schema():
    """Shapes without running (torch.compile / export), checked by torch's own op tests."""
    x = torch.randn(2, 6, 8)
    torch.library.opcheck(torch.ops.zoo_scan.bimamba_conv, (x, torch.randn(2, 8, 4), torch.randn(2, 8)),
                          test_utils=("test_schema", "test_faketensor"))
    u = torch.randn(2, 2, 6, 8)
    args = (u, u.clone(), -torch.ones(2, 8, 4), torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4), torch.ones(2, 8),
            torch.zeros(2, 8), torch.randn(2, 6, 8), True, 0.5)
    torch.library.opcheck(torch.ops.zoo_scan.bimamba_scan, args, test_utils=("test_schema", "test_faketensor"))
    folded = (u, torch.randn(2, 2, 6, 3), *args[2:], torch.randn(2, 8, 3))  # dt_proj folded in (rank 3)
    torch.library.opcheck(torch.ops.zoo_scan.bimamba_scan, folded, test_utils=("test_schema", "test_faketensor"))


def test_training_keeps_the_differentiable_path():
    m = _mixer(16, 8, (-4.0, 1.0))
    x = torch.randn(2, 9, 16, requires_grad=True)
    assert torch.is_grad_enabled() and not fused_mixer_enabled(m.in_proj(x))
    m(x).square().sum().backward()
    assert x.grad is not None and m.fwd.A_log.grad.abs().sum() > 0


def test_build_is_portable_and_dispatches_on_this_cpu():
    """No host-specific -m flags (issue 15 item 4: a cached library built with -march=native died with
    SIGILL on another CPU); the clone in use matches what this CPU supports."""
    import platform

    from zoo.ops import _build

    assert not any(f.startswith(("-march", "-mtune", "-mavx", "-mfma")) for f in _build.cpu_build_flags()[0])
    cpuinfo = Path("/proc/cpuinfo")
    if platform.machine() != "x86_64" or not cpuinfo.exists():
        assert cpu_isa() == "baseline"
        return
    flags = set(next(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
    v4 = v3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
    expected = "avx512" if v4 <= flags else "avx2" if v3 <= flags else "baseline"
    assert cpu_isa() == expected


def test_no_openmp_flag_with_clang(monkeypatch):
    """-fopenmp unless the compiler is clang (whose -fopenmp would load LLVM's libomp next to the libgomp torch
    has loaded); a compiler that cannot be run keeps the GCC flags, so a cached library's key still matches."""
    from zoo.ops import _build

    for banner, clang in [("g++ (Debian 12.2.0-14) 12.2.0\nCopyright (C) 2022 Free Software Foundation", False),
                          ("Debian clang version 14.0.6\nTarget: x86_64-pc-linux-gnu", True)]:
        monkeypatch.setattr(_build.subprocess, "run",
                            lambda *a, banner=banner, **k: subprocess.CompletedProcess(a, 0, stdout=banner))
        assert _build._cxx_is_clang() is clang
    monkeypatch.setattr(_build.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(FileNotFoundError("c++")))
    assert _build._cxx_is_clang() is False


def test_kernels_run_on_the_threads_torch_is_given():
    """at::parallel_for is an OpenMP loop compiled into the kernels' library: built without -fopenmp, every
    kernel ran on one thread whatever torch.set_num_threads said (scan and conv times were equal at 1 and 2)."""
    import os

    from zoo.ops import _build

    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert cpu_parallel_threads() == 1
        if sys.platform.startswith("linux") and (os.cpu_count() or 1) >= 2:
            cflags, ldflags = _build.cpu_build_flags()
            assert "-fopenmp" in cflags and "-fopenmp" in ldflags
            torch.set_num_threads(2)
            assert cpu_parallel_threads() == 2
    finally:
        torch.set_num_threads(old)
    maps = Path("/proc/self/maps")
    if maps.exists():  # the library reuses torch's OpenMP runtime instead of loading a second one
        assert len({line.split()[-1] for line in maps.read_text().splitlines() if "libgomp" in line}) <= 1


@pytest.mark.skipif(not FIXTURES, reason="no Vim parity fixtures (../shared/parity/vim)")
@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
def test_official_parity_through_fused_mixer(fixture: Path, monkeypatch):
    monkeypatch.delenv("ZOO_SCAN_BACKEND", raising=False)
    calls = []

    def counted(*args):
        calls.append(1)
        return bimamba_rows(*args)

    monkeypatch.setattr(vim_mod, "bimamba_rows", counted)
    meta, tensors, state_dict = load_fixture(fixture)
    m = from_official_kwargs(**meta["official_kwargs"])
    m.load_state_dict(checkpoint_filter_fn(state_dict, m), strict=True)
    m.eval()
    with torch.no_grad():
        logits = m(tensors["input"])
    assert len(calls) == len(m.blocks)
    torch.testing.assert_close(logits, tensors["logits"], atol=meta["atol"], rtol=meta["rtol"])


def test_torch_compile_traces_the_fused_path():
    """fullgraph: the dispatch condition and both ops trace (fake kernels) without a graph break."""
    torch.manual_seed(0)
    m = vim_mod.Vim(img_size=32, patch_size=8, embed_dim=32, depth=2, d_state=8, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        compiled = torch.compile(m, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), m(x), atol=1e-6, rtol=1e-6)



@pytest.mark.parametrize("dim", [1, 5, 17, 192])
def test_rms_norm_op_matches_float64(dim):
    """zoo_scan::rms_norm against x * rsqrt(mean(x^2) + eps) * weight in float64: odd widths (the vector loops'
    tails), a non-contiguous input, large and tiny rows."""
    torch.manual_seed(dim)
    x = torch.randn(3, 2 * dim + 1, 7).transpose(1, 2)[..., :dim] * torch.logspace(-3, 3, 7)[:, None]
    weight = torch.randn(dim)
    got = torch.ops.zoo_scan.rms_norm(x, weight, 1e-5)
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=1e-30)


def test_rms_norm_op_errors_and_fake():
    with pytest.raises(RuntimeError, match=r"zoo_scan::rms_norm: weight must be \(x.size\(-1\),\)"):
        torch.ops.zoo_scan.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="zoo_scan::rms_norm: x must be a float32 tensor on cpu"):
        torch.ops.zoo_scan.rms_norm(torch.randn(2, 8).double(), torch.randn(8), 1e-5)
    torch.library.opcheck(torch.ops.zoo_scan.rms_norm, (torch.randn(2, 3, 8), torch.randn(8), 1e-6),
                          test_utils=("test_schema", "test_faketensor"))


def test_vim_blocks_take_the_fused_norm(monkeypatch):
    """In CPU inference the Vim blocks' and the final RMSNorm run zoo_scan::rms_norm; the model's features equal
    the reference path's (ZOO_SCAN_BACKEND=reference), and under gradients the reference norm still runs (the
    op has no backward)."""
    torch.manual_seed(0)
    model = zoo.create_model("test_vim", img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    calls = []
    real = torch.ops.zoo_scan.rms_norm

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(torch.ops.zoo_scan, "rms_norm", counted)
    with torch.no_grad():
        fused = model.forward_features(x)
    assert len(calls) == len(model.blocks) + 1  # every block's norm and the final one
    monkeypatch.setenv("ZOO_SCAN_BACKEND", "reference")
    with torch.no_grad():
        reference = model.forward_features(x)
    torch.testing.assert_close(fused, reference, rtol=1e-4, atol=1e-5)
    monkeypatch.delenv("ZOO_SCAN_BACKEND")
    calls.clear()
    model(x).sum().backward()
    assert not calls and model.blocks[0].norm.weight.grad is not None
