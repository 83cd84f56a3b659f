// grouped_linear: y[g] = x[g] @ weight[g]^T (+ bias[g]) on the CPU. First for the projections of the row-layout
// mixers whose shapes sit outside what the BLAS is tuned for: x_proj's few outputs (dt_rank + 2 * d_state =
// 5..80), where MKL ran at 5-25 GMAC/s on the 2-core AVX2 machine of docs/kernels.md against 32-38 on the large
// GEMMs. On AMD CPUs it also beats MKL's Zen kernels on the models' own linear layers (zoo.ops.mixer.linear).
//
// A register tile of accumulators (12 AVX2 registers, or up to 24 AVX-512 ones) stays put over the whole inner
// dimension; the weight is repacked per call into panels of the tile's columns (K x cols, zero-padded past N),
// so each step reads one broadcast x value per row and one to three weight vectors.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "cpu_vec.h"
#include "mixer_common.h"

#if ZOO_INTRINSICS
#include <immintrin.h>
#endif

namespace zoo_scan {
namespace {

// vectors of W floats (zoo_vec's vector-extension types: split into narrower registers where the clone has none
// this wide)
template <int64_t W>
using LaneVec = std::conditional_t<W == 16, zoo_vec::Vec16, zoo_vec::Vec8>;

// A register tile: Rows x (Width * Vecs) outputs, Rows * Vecs accumulators of Width floats. Portable (AVX2
// registers): 6 x 16 in general, 12 x 8 where N <= 8 (x_proj of a d_state-1 model: dt_rank + 2 outputs),
// which would leave most of a 16-wide panel empty. AVX-512 (32 registers): 12 x 16, 12 x 32 or 8 x 48,
// whichever pads N least (pick_tile).
template <int64_t Rows, int64_t Vecs, int64_t Width = 8>
struct Tile {
  static constexpr int64_t kRows = Rows, kVecs = Vecs, kWidth = Width, kCols = Width * Vecs;
};
using WideTile = Tile<6, 2>;
using NarrowTile = Tile<12, 1>;
using Avx512Tile16 = Tile<12, 1, 16>;
using Avx512Tile32 = Tile<12, 2, 16>;
using Avx512Tile48 = Tile<8, 3, 16>;

struct LinearArgs {
  int64_t groups, M, K, N, panels;
  int64_t chunk_panels, chunks;  // row-block order: the panels one task sweeps (a column chunk), chunks a group
  const float* x;  // (groups, M, K), unit inner stride
  int64_t x_sg, x_sm;
  const float* wp;  // (groups, panels, K, cols): the packed weight, cols = the tile's columns
  const float* bp;  // (groups, panels, cols): the bias, zero-padded past N; nullptr without one
  float* y;         // (groups, M, N) contiguous
  const float* w;   // (groups, N, K) contiguous: the weight as given, which panel-order tasks pack themselves
  bool panel_order;  // tasks are (group, panel), each packing its panel, instead of (group, row block)
};

// The panel order, for x small enough to stay in L2 (as at batch 1 in a model's late stages): each task packs one
// panel and runs every row block of its group over it, so the weight is read once and never packed whole. The
// row-block order re-reads the packed weight once per 6-12 rows, from L3 where it exceeds L2: at M = 49 (K 768,
// N 3072) it ran at 27 GMAC/s against 50 at M = 1576.
constexpr int64_t kPanelOrderBytes = 256 * 1024;

// The row-block order sweeps the packed weight in column chunks of at most this many bytes, every row block over
// one chunk before the next, so the chunk stays in L2 (1 MB on Zen 4, 2 MB on the Xeon measured) and only x is
// re-read per chunk. Sweeping the whole weight per row block read it from L3 once per 6-12 rows where it exceeded
// L2: Vim-S's in_proj (K 384, N 1536, 2.4 MB packed) ran at 0.7x MKL's rate on a 2 MB-L2 Xeon. Smaller chunks
// cost where the weight fits L2 anyway (A/B, AVX2 build: 256 KiB or 512 KiB chunks 1.014-1.027 on Vim-Ti).
constexpr int64_t kWeightChunkBytes = 1024 * 1024;

void pack_one_panel(const float* src, int64_t rows, int64_t K, int64_t cols, float* out);

// out[i * ldo + j] = bias[j] + sum_k x[i * lda + k] * panel[k * cols + j], summed in k order after the bias
// (bias may be nullptr: 0). The accumulators are
// locals that never escape (only their final values are copied out) and the weight vectors are named
// scalars, not an array (GCC copied an array through the stack every step), so all stay in registers.
template <typename T>
ZOO_INLINE void tile(const float* __restrict x, int64_t lda, const float* __restrict panel,
                     const float* __restrict bias, int64_t K, float* __restrict out, int64_t ldo) {
  constexpr int64_t R = T::kRows, V = T::kVecs, W = T::kWidth;
  static_assert(V >= 1 && V <= 3, "tile() loads one to three weight vectors a step");
  static_assert(W == 8 || W == 16, "tiles of 8- or 16-lane vectors");
  using vec = LaneVec<W>;
  vec start[V] = {};
  if (bias) {
#pragma GCC unroll 3
    for (int64_t v = 0; v < V; ++v) std::memcpy(&start[v], bias + v * W, sizeof(vec));
  }
  vec acc[R][V];
#pragma GCC unroll 12
  for (int64_t i = 0; i < R; ++i)
#pragma GCC unroll 3
    for (int64_t v = 0; v < V; ++v) acc[i][v] = start[v];
  for (int64_t k = 0; k < K; ++k) {
    vec w0, w1{}, w2{};
    std::memcpy(&w0, panel + k * T::kCols, sizeof(vec));
    if constexpr (V >= 2) std::memcpy(&w1, panel + k * T::kCols + W, sizeof(vec));
    if constexpr (V >= 3) std::memcpy(&w2, panel + k * T::kCols + 2 * W, sizeof(vec));
#pragma GCC unroll 12
    for (int64_t i = 0; i < R; ++i) {
      const float xi = x[i * lda + k];
      acc[i][0] += xi * w0;
      if constexpr (V >= 2) acc[i][1] += xi * w1;
      if constexpr (V >= 3) acc[i][2] += xi * w2;
    }
  }
#pragma GCC unroll 12
  for (int64_t i = 0; i < R; ++i)
#pragma GCC unroll 3
    for (int64_t v = 0; v < V; ++v) std::memcpy(out + i * ldo + v * W, &acc[i][v], sizeof(vec));
}

// x rows [r0, r0 + rows) of group g for a tile of R rows: in place, or copied zero-padded into tail when the block
// is short (its rows past M do not exist); lda is set to the rows' stride
template <int64_t R>
ZOO_INLINE const float* block_rows(const LinearArgs& a, int64_t g, int64_t r0, int64_t rows, std::vector<float>& tail,
                                   int64_t& lda) {
  const float* x = a.x + g * a.x_sg + r0 * a.x_sm;
  lda = a.x_sm;
  if (rows == R) return x;
  tail.assign(R * a.K, 0.0f);
  for (int64_t i = 0; i < rows; ++i) std::memcpy(tail.data() + i * a.K, x + i * a.x_sm, a.K * sizeof(float));
  lda = a.K;
  return tail.data();
}

// y's tile of rows [r0, r0 + rows) and panel p of group g
template <typename T>
ZOO_INLINE void tile_at(const LinearArgs& a, int64_t g, int64_t r0, int64_t rows, const float* x, int64_t lda,
                        int64_t p, const float* panel) {
  constexpr int64_t R = T::kRows, C = T::kCols;
  const float* bias = a.bp ? a.bp + (g * a.panels + p) * C : nullptr;
  const int64_t cols = std::min(C, a.N - p * C);
  float* y = a.y + (g * a.M + r0) * a.N + p * C;
  if (rows == R && cols == C) {  // a whole tile of y: the accumulators go straight there
    tile<T>(x, lda, panel, bias, a.K, y, a.N);
    return;
  }
  float out[R * C];  // an edge tile: staged, then its rows and columns that exist copied
  tile<T>(x, lda, panel, bias, a.K, out, C);
  for (int64_t i = 0; i < rows; ++i) std::memcpy(y + i * a.N, out + i * C, cols * sizeof(float));
}

// tasks [begin, end) of the flattened (groups, column chunks, row blocks of T::kRows), or of (groups, panels) in
// the panel order
template <typename T>
ZOO_INLINE void linear_tiles(const LinearArgs& a, int64_t begin, int64_t end) {
  constexpr int64_t R = T::kRows, C = T::kCols;
  const int64_t blocks = (a.M + R - 1) / R;
  std::vector<float> tail, panel;
  int64_t lda = 0;
  for (int64_t task = begin; task < end; ++task) {
    if (a.panel_order) {
      const int64_t g = task / a.panels, p = task % a.panels;
      panel.resize(a.K * C);
      pack_one_panel(a.w + (g * a.N + p * C) * a.K, std::min(C, a.N - p * C), a.K, C, panel.data());
      for (int64_t r0 = 0; r0 < a.M; r0 += R) {
        const int64_t rows = std::min(R, a.M - r0);
        const float* x = block_rows<R>(a, g, r0, rows, tail, lda);  // sets lda: its own statement
        tile_at<T>(a, g, r0, rows, x, lda, p, panel.data());
      }
      continue;
    }
    const int64_t g = task / (a.chunks * blocks), in_group = task % (a.chunks * blocks);
    const int64_t p0 = in_group / blocks * a.chunk_panels;
    const int64_t r0 = (in_group % blocks) * R, rows = std::min(R, a.M - r0);
    const float* x = block_rows<R>(a, g, r0, rows, tail, lda);
    for (int64_t p = p0; p < std::min(a.panels, p0 + a.chunk_panels); ++p)
      tile_at<T>(a, g, r0, rows, x, lda, p, a.wp + (g * a.panels + p) * a.K * C);
  }
}

using TileKernel = void (*)(const LinearArgs&, int64_t, int64_t);

ZOO_CPU_DISPATCH void wide_tiles(const LinearArgs& a, int64_t begin, int64_t end) {
  linear_tiles<WideTile>(a, begin, end);
}
ZOO_CPU_DISPATCH void narrow_tiles(const LinearArgs& a, int64_t begin, int64_t end) {
  linear_tiles<NarrowTile>(a, begin, end);
}
template <typename T>
ZOO_TARGET_AVX512 void avx512_tiles(const LinearArgs& a, int64_t begin, int64_t end) {
  linear_tiles<T>(a, begin, end);
}

struct TileChoice {
  int64_t rows, cols;
  TileKernel kernel;
};

template <typename T>
TileChoice choice(TileKernel kernel) {
  return {T::kRows, T::kCols, kernel};
}

// The tile for N outputs. On AVX-512 the panel width that pads N least (the wider on a tie: fewer panels to
// sweep x for); N <= 8 keeps the narrow AVX2 tile, which measured no slower than a half-empty 16-wide one.
TileChoice pick_tile(int64_t N) {
  if (N <= NarrowTile::kCols) return choice<NarrowTile>(&narrow_tiles);
#if ZOO_INTRINSICS
  if (zoo_vec::avx512_kernels()) {
    const TileChoice options[] = {choice<Avx512Tile48>(&avx512_tiles<Avx512Tile48>),
                                  choice<Avx512Tile32>(&avx512_tiles<Avx512Tile32>),
                                  choice<Avx512Tile16>(&avx512_tiles<Avx512Tile16>)};
    auto padded = [N](const TileChoice& t) { return (N + t.cols - 1) / t.cols * t.cols; };
    return *std::min_element(std::begin(options), std::end(options),
                             [&](const TileChoice& p, const TileChoice& q) { return padded(p) < padded(q); });
  }
#endif
  return choice<WideTile>(&wide_tiles);
}

// One panel: out[k * cols + j] = src[j * K + k] for the panel's rows j < rows, zero for rows up to cols. From row
// j0 on (pack_panel_avx2 has written the rows before it).
ZOO_INLINE void pack_panel_scalar(const float* src, int64_t rows, int64_t K, int64_t cols, float* out,
                                  int64_t j0 = 0) {
  for (int64_t k = 0; k < K; ++k) {
    float* row = out + k * cols;
    for (int64_t j = j0; j < rows; ++j) row[j] = src[j * K + k];
    for (int64_t j = rows; j < cols; ++j) row[j] = 0.0f;
  }
}

#if ZOO_INTRINSICS
// out[k * ldo + j] = src[j * lds + k] for an 8 x 8 block, transposed in registers: pairs, then quads, then halves
ZOO_TARGET_AVX2 inline void transpose_8x8(const float* src, int64_t lds, float* out, int64_t ldo) {
  __m256 r[8], p[8], q[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  for (int i = 0; i < 8; i += 2) {
    p[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    p[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    for (int h = 0; h < 2; ++h) {
      q[i + h] = _mm256_shuffle_ps(p[i + h], p[i + h + 2], _MM_SHUFFLE(1, 0, 1, 0));
      q[i + h + 2] = _mm256_shuffle_ps(p[i + h], p[i + h + 2], _MM_SHUFFLE(3, 2, 3, 2));
    }
  }
  // q[0..3] hold rows 0-3 of columns {0, 4}, {2, 6}, {1, 5}, {3, 7} (lanes 0-3 / 4-7); q[4..7] the same of rows 4-7
  const int order[4] = {0, 2, 1, 3};
  for (int c = 0; c < 4; ++c) {
    const __m256 lo = q[order[c]], hi = q[4 + order[c]];
    _mm256_storeu_ps(out + c * ldo, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(out + (c + 4) * ldo, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
}

// pack_panel_scalar in 8 x 8 blocks: the scalar copy took 1.4 ns a float, 3-4% of a Vim linear layer at batch 8
// (A/B grouped_linear 0.983 on Vim-S, 0.989 on Vim-Ti at 512 px)
ZOO_TARGET_AVX2 void pack_panel_avx2(const float* src, int64_t rows, int64_t K, int64_t cols, float* out) {
  const int64_t rows8 = rows / 8 * 8, K8 = K / 8 * 8;
  for (int64_t j = 0; j < rows8; j += 8)
    for (int64_t k = 0; k < K8; k += 8) transpose_8x8(src + j * K + k, K, out + k * cols + j, cols);
  for (int64_t k = K8; k < K; ++k)
    for (int64_t j = 0; j < rows8; ++j) out[k * cols + j] = src[j * K + k];
  pack_panel_scalar(src, rows, K, cols, out, rows8);
}
#endif

// one panel: rows weight rows of K (from src) -> (K, cols), zero past rows
void pack_one_panel(const float* src, int64_t rows, int64_t K, int64_t cols, float* out) {
#if ZOO_INTRINSICS
  if (zoo_vec::avx2_kernels()) return pack_panel_avx2(src, rows, K, cols, out);
#endif
  pack_panel_scalar(src, rows, K, cols, out);
}

// weight (groups, N, K) -> (groups, panels, K, cols): each panel of cols outputs transposed, zero rows past N.
// One pass over each panel's cols weight rows: a padded copy then a transposed one cost 2.2% of Vim-S's forward,
// this per call in every linear layer.
at::Tensor pack_panels(const at::Tensor& weight, int64_t cols) {
  const at::Tensor w = weight.contiguous();
  const int64_t groups = w.size(0), N = w.size(1), K = w.size(2), panels = (N + cols - 1) / cols;
  auto packed = at::empty({groups, panels, K, cols}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = packed.data_ptr<float>();
  at::parallel_for(0, groups * panels, zoo_vec::grain_for(K * cols), [&](int64_t begin, int64_t end) {
    for (int64_t gp = begin; gp < end; ++gp) {
      const int64_t g = gp / panels, n0 = (gp % panels) * cols;
      pack_one_panel(src + (g * N + n0) * K, std::min(cols, N - n0), K, cols, dst + gp * K * cols);
    }
  });
  return packed;
}

at::Tensor grouped_linear_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  const char* op = "grouped_linear";
  check_float_on(op, x, "x", at::kCPU);
  check_float_on(op, weight, "weight", at::kCPU);
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 3, "zoo_scan::grouped_linear: x must be (groups, M, K) and weight ",
              "(groups, N, K), got ", x.sizes(), " and ", weight.sizes());
  const int64_t groups = x.size(0), M = x.size(1), K = x.size(2), N = weight.size(1);
  check_shape(op, weight, "weight", {groups, N, K}, "(groups, N, K)");
  if (bias) {
    check_float_on(op, *bias, "bias", at::kCPU);
    check_shape(op, *bias, "bias", {groups, N}, "(groups, N)");
  }
  const at::Tensor xs = unit_last(x);
  auto y = at::empty({groups, M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return bias ? y.copy_(bias->unsqueeze(1).expand({groups, M, N})) : y.zero_();
  const TileChoice t = pick_tile(N);
  const int64_t panels = (N + t.cols - 1) / t.cols;
  const bool panel_order = M * K * int64_t(sizeof(float)) <= kPanelOrderBytes;
  const at::Tensor w = weight.contiguous();
  const at::Tensor wp = panel_order ? at::Tensor() : pack_panels(w, t.cols);
  // (groups, N) -> (groups, panels, cols), zero past N
  const at::Tensor bp = bias ? at::constant_pad_nd(*bias, {0, panels * t.cols - N}).contiguous() : at::Tensor();
  const int64_t panel_bytes = K * t.cols * int64_t(sizeof(float));
  const int64_t chunk_panels = std::clamp<int64_t>(kWeightChunkBytes / panel_bytes, 1, panels);
  const int64_t chunks = (panels + chunk_panels - 1) / chunk_panels;
  LinearArgs a{groups, M, K, N, panels, chunk_panels, chunks, xs.data_ptr<float>(), xs.stride(0), xs.stride(1),
               panel_order ? nullptr : wp.data_ptr<float>(), bias ? bp.data_ptr<float>() : nullptr,
               y.data_ptr<float>(), w.data_ptr<float>(), panel_order};
  const int64_t tasks = groups * (panel_order ? panels : chunks * ((M + t.rows - 1) / t.rows));
  const int64_t work_per_task = panel_order ? M * K * t.cols / 8 : t.rows * K * chunk_panels * t.cols / 8;
  at::parallel_for(0, tasks, zoo_vec::grain_for(work_per_task),
                   [&](int64_t begin, int64_t end) { t.kernel(a, begin, end); });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(zoo_scan, CPU, m) { m.impl("grouped_linear", &grouped_linear_cpu); }

}  // namespace zoo_scan
