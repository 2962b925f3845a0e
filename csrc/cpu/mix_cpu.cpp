// CPU (OpenMP) kernels of the mix ops: mask generation, MixMask mixing with switch images
// and λ, Un-Mix mixup/CutMix, and both together. Arguments were checked (and, for
// mix_and_unmix, the Un-Mix input taken from the MixMask one) by the API layer
// (mixfast/mix_api.h: checked()) before these run.
//
// Masking never does arithmetic on pixels: every masked output element is a bit-exact copy
// of an input element, selected with an all-ones/all-zeros integer mask of the element's
// width ((a & m) | (b & ~m)). The mask of each image row is precomputed once per grid row
// ("expanded row masks", one integer per element of a row), so the inner loops are plain
// vectorizable integer selects with no division or index math per pixel. Images paired by
// an involutive permutation (flip) are processed together: x_i and x_j are each read once
// for all outputs of the pair.
#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#include "mixfast/block_mask.h"
#include "mixfast/dtype.h"
#include "mixfast/mix_api.h"
#include "mixfast/upsample.h"

namespace mixfast {
namespace cpu {
namespace {

// ---------------------------------------------------------------------------------------
// grid masks
// ---------------------------------------------------------------------------------------

struct GridMasks {
  int n = 0, g = 0;
  std::vector<uint64_t> rows;  // n * g, bit c of rows[k*g + r] = cell (r, c) of mask k
  const uint64_t* mask(int k) const { return rows.data() + static_cast<size_t>(k) * g; }
};

void rows_to_bytes(const uint64_t* rows, int g, uint8_t* out) {
  for (int r = 0; r < g; ++r)
    for (int c = 0; c < g; ++c) out[r * g + c] = static_cast<uint8_t>((rows[r] >> c) & 1u);
}

void generate_into(const MaskSpec& spec, int n, uint64_t* rows, uint8_t* out, int num_threads) {
  const int g = spec.grid;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1) if (n > 1)
  for (int k = 0; k < n; ++k) {
    uint64_t* mine = rows + static_cast<size_t>(k) * g;
    generate_mask(spec, static_cast<uint32_t>(k), mine);
    if (out != nullptr) rows_to_bytes(mine, g, out + static_cast<size_t>(k) * g * g);
  }
}

GridMasks grid_masks(const MaskSource& src, int num_threads) {
  GridMasks m;
  m.n = src.n;
  m.g = src.grid;
  m.rows.assign(static_cast<size_t>(m.n) * m.g, 0);
  if (src.given == nullptr) {
    generate_into(src.spec, m.n, m.rows.data(), src.out, num_threads);
    return m;
  }
  for (int k = 0; k < m.n; ++k)
    for (int r = 0; r < m.g; ++r) {
      uint64_t bits = 0;
      const uint8_t* cells = src.given + (static_cast<size_t>(k) * m.g + r) * m.g;
      for (int c = 0; c < m.g; ++c) bits |= static_cast<uint64_t>(cells[c] != 0) << c;
      m.rows[static_cast<size_t>(k) * m.g + r] = bits;
    }
  return m;
}

// ---------------------------------------------------------------------------------------
// upsampling tables and λ
// ---------------------------------------------------------------------------------------

struct Upsample {
  std::vector<int> iy, ix;              // source grid row / column of every pixel row / column
  std::vector<int64_t> rowcnt, colcnt;  // pixels mapped to each grid row / column
};

Upsample upsample_tables(int g, int64_t H, int64_t W) {
  Upsample u;
  u.iy.resize(H);
  u.ix.resize(W);
  u.rowcnt.assign(g, 0);
  u.colcnt.assign(g, 0);
  const float sy = nearest_scale(g, static_cast<int>(H)), sx = nearest_scale(g, static_cast<int>(W));
  for (int64_t y = 0; y < H; ++y) ++u.rowcnt[u.iy[y] = nearest_src(static_cast<int>(y), sy, g)];
  for (int64_t x = 0; x < W; ++x) ++u.colcnt[u.ix[x] = nearest_src(static_cast<int>(x), sx, g)];
  return u;
}

void write_lambdas(const GridMasks& m, const Upsample& u, int64_t H, int64_t W, float* lam) {
  for (int k = 0; k < m.n; ++k) {
    int64_t count = 0;
    for (int r = 0; r < m.g; ++r) {
      int64_t cols = 0;
      for (int c = 0; c < m.g; ++c) cols += ((m.mask(k)[r] >> c) & 1u) ? u.colcnt[c] : 0;
      count += cols * u.rowcnt[r];
    }
    lam[k] = lambda_from_count(count, H, W);
  }
}

// ---------------------------------------------------------------------------------------
// element access: masking works on the raw bits (uint32 for float32, uint16 otherwise)
// ---------------------------------------------------------------------------------------

template <int DT>
using Bits = std::conditional_t<DT == kFloat32, uint32_t, uint16_t>;

template <int DT>
inline float to_float(Bits<DT> v) {
  if constexpr (DT == kFloat32) return bits_float(v);
  else return Scalar<DT>::load(v);
}

template <int DT>
inline Bits<DT> from_float(float f) {
  if constexpr (DT == kFloat32) return float_bits(f);
  else return Scalar<DT>::store(f);
}

// A row is the unit of the inner loops: W elements of one channel plane (NCHW) or the W*C
// interleaved elements of one pixel row (NHWC). `cin` elements share one pixel column.
struct RowLayout {
  int64_t run;              // elements per row
  int64_t rows_per_image;   // C*H (NCHW) or H (NHWC)
  int64_t cin;              // 1 (NCHW) or C (NHWC)
  int64_t H;
  explicit RowLayout(const ImageGeometry& g)
      : run(g.channels_last ? g.W * g.C : g.W),
        rows_per_image(g.channels_last ? g.H : g.C * g.H),
        cin(g.channels_last ? g.C : 1),
        H(g.H) {}
  int64_t pixel_row(int64_t row) const { return row % H; }  // NHWC: row < H already
};

// For every mask k and grid row r: one all-ones/all-zeros integer per element of a row.
template <typename T>
std::vector<T> expand_row_masks(const GridMasks& m, const Upsample& u, const RowLayout& L, int num_threads) {
  std::vector<T> e(static_cast<size_t>(m.n) * m.g * L.run);
  const int total = m.n * m.g;
#pragma omp parallel for num_threads(num_threads) schedule(static) if (total > 64)
  for (int kr = 0; kr < total; ++kr) {
    const uint64_t bits = m.rows[kr];
    T* out = e.data() + static_cast<size_t>(kr) * L.run;
    for (int64_t j = 0; j < L.run; ++j) out[j] = ((bits >> u.ix[j / L.cin]) & 1u) ? static_cast<T>(~T{0}) : T{0};
  }
  return e;
}

// out = m ? a : b, elementwise on bit patterns.
template <typename T>
inline void select_row(const T* __restrict a, const T* __restrict b, const T* __restrict m, T* __restrict out,
                       int64_t n) {
  for (int64_t k = 0; k < n; ++k) out[k] = static_cast<T>((a[k] & m[k]) | (b[k] & static_cast<T>(~m[k])));
}

// All MixMask outputs of one row of the pair (i, j) in one pass over a = x_i, b = x_j:
//   mixed_i = mi ? a : b   switch_i = mi ? b : a   mixed_j = mj ? b : a   switch_j = mj ? a : b
// as xor-selects (b ^ ((a ^ b) & m) == m ? a : b). SAME: one mask for both (per batch).
template <typename T, bool SWITCH, bool BOTH, bool SAME>
inline void pair_row(const T* __restrict a, const T* __restrict b, const T* __restrict mi, const T* __restrict mj,
                     T* __restrict oi, T* __restrict si, T* __restrict oj, T* __restrict sj, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const T av = a[k], bv = b[k];
    const T d = static_cast<T>(av ^ bv);
    const T di = static_cast<T>(d & mi[k]);
    oi[k] = static_cast<T>(bv ^ di);
    if (SWITCH) si[k] = static_cast<T>(av ^ di);
    if (BOTH) {
      const T dj = SAME ? di : static_cast<T>(d & mj[k]);
      oj[k] = static_cast<T>(av ^ dj);
      if (SWITCH) sj[k] = static_cast<T>(bv ^ dj);
    }
  }
}

// The hot loop, compiled for AVX2 and for the baseline ISA; the loader picks the best the
// CPU has (GCC function multiversioning), so the build stays portable.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MIXFAST_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define MIXFAST_CPU_CLONES
#endif

template <typename T>
inline __attribute__((always_inline)) void pair_rows_any(const T* a, const T* b, const T* mi, const T* mj, T* oi,
                                                         T* si, T* oj, T* sj, int64_t n, bool sw, bool both,
                                                         bool same) {
  if (sw) {
    if (!both) pair_row<T, true, false, true>(a, b, mi, mj, oi, si, oj, sj, n);
    else if (same) pair_row<T, true, true, true>(a, b, mi, mj, oi, si, oj, sj, n);
    else pair_row<T, true, true, false>(a, b, mi, mj, oi, si, oj, sj, n);
  } else {
    if (!both) pair_row<T, false, false, true>(a, b, mi, mj, oi, si, oj, sj, n);
    else if (same) pair_row<T, false, true, true>(a, b, mi, mj, oi, si, oj, sj, n);
    else pair_row<T, false, true, false>(a, b, mi, mj, oi, si, oj, sj, n);
  }
}

MIXFAST_CPU_CLONES void pair_rows(const uint32_t* a, const uint32_t* b, const uint32_t* mi, const uint32_t* mj,
                                  uint32_t* oi, uint32_t* si, uint32_t* oj, uint32_t* sj, int64_t n, bool sw,
                                  bool both, bool same) {
  pair_rows_any(a, b, mi, mj, oi, si, oj, sj, n, sw, both, same);
}

MIXFAST_CPU_CLONES void pair_rows(const uint16_t* a, const uint16_t* b, const uint16_t* mi, const uint16_t* mj,
                                  uint16_t* oi, uint16_t* si, uint16_t* oj, uint16_t* sj, int64_t n, bool sw,
                                  bool both, bool same) {
  pair_rows_any(a, b, mi, mj, oi, si, oj, sj, n, sw, both, same);
}

// OpenMP only pays off past some work: waking the team costs microseconds (and much more
// on a loaded machine), so small batches run on the calling thread.
inline int threads_for(int64_t bytes, int requested) { return bytes >= (int64_t{1} << 20) ? requested : 1; }

// out_a = lam*a + mu*b and out_b = lam*b + mu*a, each product and the sum rounded to float32.
template <int DT>
inline void mixup_rows(const Bits<DT>* __restrict a, const Bits<DT>* __restrict b, float lam, float mu,
                       Bits<DT>* __restrict out_a, Bits<DT>* __restrict out_b, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    const float fa = to_float<DT>(a[k]), fb = to_float<DT>(b[k]);
    out_a[k] = from_float<DT>(f_add(f_mul(lam, fa), f_mul(mu, fb)));
    if (out_b != nullptr) out_b[k] = from_float<DT>(f_add(f_mul(lam, fb), f_mul(mu, fa)));
  }
}

// Units of work: image i with partner j. With an involution the pair (i, j), i <= j, is
// one unit producing the outputs of both; otherwise every i is its own unit.
struct Unit {
  int64_t i, j;
  bool both;  // also write the outputs of j (j != i, paired)
};

std::vector<Unit> pair_units(const int64_t* perm, int64_t N) {
  bool involution = true;
  for (int64_t i = 0; i < N && involution; ++i) involution = perm[perm[i]] == i;
  std::vector<Unit> units;
  for (int64_t i = 0; i < N; ++i) {
    if (!involution) units.push_back({i, perm[i], false});
    else if (i <= perm[i]) units.push_back({i, perm[i], perm[i] != i});
  }
  return units;
}

std::vector<Unit> flip_units(int64_t N) {
  std::vector<Unit> units;
  for (int64_t i = 0; i <= (N - 1) / 2; ++i) units.push_back({i, N - 1 - i, N - 1 - i != i});
  return units;
}

// ---------------------------------------------------------------------------------------
// MixMask
// ---------------------------------------------------------------------------------------

// One mask for the whole batch, image partners (no filler): the fast path. The pixel rows
// that map to grid row r form one contiguous band of each channel plane (NCHW) or image
// (NHWC), because the nearest-neighbour index is monotonic; the band's mask is grid row r's
// expanded mask repeated, so each (pair, plane, band) is one long select without per-row
// overhead.
template <int DT>
void mix_per_batch_mask(const MixArgs& a, const GridMasks& gm, const Upsample& up, const RowLayout& L,
                        const std::vector<Unit>& units) {
  using T = Bits<DT>;
  const ImageGeometry& geo = a.geo;
  const int g = gm.g;
  std::vector<int64_t> ystart(g + 1, 0);
  int64_t band_max = 0;
  for (int r = 0; r < g; ++r) {
    ystart[r + 1] = ystart[r] + up.rowcnt[r];
    band_max = std::max(band_max, up.rowcnt[r]);
  }
  const std::vector<T> E = expand_row_masks<T>(gm, up, L, 1);
  std::vector<T> bands(static_cast<size_t>(g) * band_max * L.run);
  for (int r = 0; r < g; ++r)
    for (int64_t k = 0; k < band_max; ++k)
      std::memcpy(bands.data() + (static_cast<size_t>(r) * band_max + k) * L.run, E.data() + static_cast<size_t>(r) * L.run,
                  L.run * sizeof(T));
  const T* x = static_cast<const T*>(a.x);
  T* mixed = static_cast<T*>(a.mixed);
  T* sw = static_cast<T*>(a.switch_out);
  const int64_t img = geo.image_elems();
  const int64_t planes = geo.channels_last ? 1 : geo.C;
  const int64_t total = static_cast<int64_t>(units.size()) * planes * g;
  const int nt = threads_for(geo.N * img * static_cast<int64_t>(sizeof(T)), a.num_threads);

#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t t = 0; t < total; ++t) {
    const int64_t u = t / (planes * g), c = (t / g) % planes;
    const int r = static_cast<int>(t % g);
    if (up.rowcnt[r] == 0) continue;  // grid finer than the image: row r is never sampled
    const int64_t off = (c * geo.H + ystart[r]) * L.run, n = up.rowcnt[r] * L.run;
    const Unit un = units[u];
    const T* m = bands.data() + static_cast<size_t>(r) * band_max * L.run;
    pair_rows(x + un.i * a.x_batch_stride + off, x + un.j * a.x_batch_stride + off, m, m, mixed + un.i * img + off,
              sw ? sw + un.i * img + off : nullptr, mixed + un.j * img + off, sw ? sw + un.j * img + off : nullptr,
              n, sw != nullptr, un.both, true);
  }
}

template <int DT>
void mix_impl(const MixArgs& a, const GridMasks& gm, const Upsample& up) {
  using T = Bits<DT>;
  const ImageGeometry& geo = a.geo;
  const RowLayout L(geo);
  const std::vector<Unit> units = a.filler ? std::vector<Unit>() : pair_units(a.perm, geo.N);
  if (a.filler == nullptr && gm.n == 1) {
    mix_per_batch_mask<DT>(a, gm, up, L, units);
    return;
  }
  // General path, one pixel row at a time: per-sample masks or a filler image.
  const std::vector<T> E = expand_row_masks<T>(gm, up, L, a.num_threads);
  const int64_t n_units = a.filler ? geo.N : static_cast<int64_t>(units.size());
  const T* x = static_cast<const T*>(a.x);
  const T* filler = static_cast<const T*>(a.filler);
  T* mixed = static_cast<T*>(a.mixed);
  T* sw = static_cast<T*>(a.switch_out);
  const int64_t img = geo.image_elems();
  const bool per_sample = gm.n > 1;
  const int64_t total = n_units * L.rows_per_image;
  const int nt = threads_for(geo.N * img * static_cast<int64_t>(sizeof(T)), a.num_threads);

#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t t = 0; t < total; ++t) {
    const int64_t u = t / L.rows_per_image, row = t % L.rows_per_image;
    const int64_t off = row * L.run;
    const int gy = up.iy[L.pixel_row(row)];
    if (filler != nullptr) {
      const int64_t i = u;
      const T* m = E.data() + (static_cast<size_t>(per_sample ? i : 0) * gm.g + gy) * L.run;
      select_row(x + i * a.x_batch_stride + off, filler + i * a.filler_batch_stride + off, m, mixed + i * img + off,
                 L.run);
      continue;
    }
    const Unit un = units[u];
    const T* mi = E.data() + (static_cast<size_t>(per_sample ? un.i : 0) * gm.g + gy) * L.run;
    const T* mj = E.data() + (static_cast<size_t>(per_sample ? un.j : 0) * gm.g + gy) * L.run;
    pair_rows(x + un.i * a.x_batch_stride + off, x + un.j * a.x_batch_stride + off, mi, mj, mixed + un.i * img + off,
              sw ? sw + un.i * img + off : nullptr, mixed + un.j * img + off, sw ? sw + un.j * img + off : nullptr,
              L.run, sw != nullptr, un.both, !per_sample);
  }
}

// ---------------------------------------------------------------------------------------
// Un-Mix (partner = flip)
// ---------------------------------------------------------------------------------------

// CutMix column mask of one row: ones for pixel columns in [x1, x2).
template <typename T>
std::vector<T> box_row_mask(const UnmixArgs& u, const RowLayout& L) {
  std::vector<T> m(L.run);
  for (int64_t j = 0; j < L.run; ++j) {
    const int64_t col = j / L.cin;
    m[j] = (col >= u.x1 && col < u.x2) ? static_cast<T>(~T{0}) : T{0};
  }
  return m;
}

// Un-Mix outputs of row `off` for the flip pair (i, j): from a = x_i, b = x_j.
template <int DT>
inline void unmix_pair_row(const UnmixArgs& u, const Bits<DT>* a, const Bits<DT>* b, const Bits<DT>* box,
                           bool row_in_box, Bits<DT>* out_i, Bits<DT>* out_j, int64_t run) {
  if (u.mixup) {
    mixup_rows<DT>(a, b, u.lam, u.mu, out_i, out_j, run);
  } else if (row_in_box) {
    select_row(b, a, box, out_i, run);
    if (out_j) select_row(a, b, box, out_j, run);
  } else {
    std::memcpy(out_i, a, run * sizeof(Bits<DT>));
    if (out_j) std::memcpy(out_j, b, run * sizeof(Bits<DT>));
  }
}

template <int DT>
void unmix_impl(const UnmixArgs& u) {
  using T = Bits<DT>;
  const RowLayout L(u.geo);
  const std::vector<T> box = box_row_mask<T>(u, L);
  const std::vector<Unit> units = flip_units(u.geo.N);
  const T* x = static_cast<const T*>(u.x);
  T* out = static_cast<T*>(u.out);
  const int64_t img = u.geo.image_elems();
  const int64_t total = static_cast<int64_t>(units.size()) * L.rows_per_image;
  const int nt = threads_for(u.geo.N * img * static_cast<int64_t>(sizeof(T)), u.num_threads);

#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t t = 0; t < total; ++t) {
    const int64_t k = t / L.rows_per_image, row = t % L.rows_per_image, off = row * L.run;
    const int64_t y = L.pixel_row(row);
    const Unit un = units[k];
    unmix_pair_row<DT>(u, x + un.i * u.x_batch_stride + off, x + un.j * u.x_batch_stride + off, box.data(),
                       y >= u.y1 && y < u.y2, out + un.i * img + off, un.both ? out + un.j * img + off : nullptr,
                       L.run);
  }
}

// ---------------------------------------------------------------------------------------
// MixMask + Un-Mix from one pass: flip pairs (i, j) read x_i, x_j once for both Un-Mix
// outputs and the MixMask outputs of i and j (whose fillers x_perm[i], x_perm[j] are
// read as well).
// ---------------------------------------------------------------------------------------

template <int DT>
void mix_unmix_impl(const MixUnmixArgs& args, const GridMasks& gm, const Upsample& up) {
  using T = Bits<DT>;
  const MixArgs& a = args.mix;
  const UnmixArgs& u = args.unmix;
  const RowLayout L(a.geo);
  const std::vector<T> E = expand_row_masks<T>(gm, up, L, a.num_threads);
  const std::vector<T> box = box_row_mask<T>(u, L);
  const std::vector<Unit> units = flip_units(a.geo.N);
  const T* x = static_cast<const T*>(a.x);
  T* mixed = static_cast<T*>(a.mixed);
  T* sw = static_cast<T*>(a.switch_out);
  T* um = static_cast<T*>(u.out);
  const int64_t img = a.geo.image_elems();
  const bool per_sample = gm.n > 1;
  const int64_t total = static_cast<int64_t>(units.size()) * L.rows_per_image;
  const int nt = threads_for(a.geo.N * img * static_cast<int64_t>(sizeof(T)), a.num_threads);

#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t t = 0; t < total; ++t) {
    const int64_t k = t / L.rows_per_image, row = t % L.rows_per_image, off = row * L.run;
    const int64_t y = L.pixel_row(row);
    const int gy = up.iy[y];
    const Unit un = units[k];
    const T* xi = x + un.i * a.x_batch_stride + off;
    const T* xj = x + un.j * a.x_batch_stride + off;
    unmix_pair_row<DT>(u, xi, xj, box.data(), y >= u.y1 && y < u.y2, um + un.i * img + off,
                       un.both ? um + un.j * img + off : nullptr, L.run);
    for (int side = 0; side < (un.both ? 2 : 1); ++side) {
      const int64_t i = side ? un.j : un.i;
      const T* own = side ? xj : xi;
      const T* fill = x + a.perm[i] * a.x_batch_stride + off;
      const T* m = E.data() + (static_cast<size_t>(per_sample ? i : 0) * gm.g + gy) * L.run;
      select_row(own, fill, m, mixed + i * img + off, L.run);
      if (sw) select_row(fill, own, m, sw + i * img + off, L.run);
    }
  }
}

template <template <int> class F, typename... Args>
void by_dtype(int dtype, Args&&... args) {
  switch (dtype) {
    case kFloat32: F<kFloat32>::run(args...); break;
    case kBFloat16: F<kBFloat16>::run(args...); break;
    default: F<kFloat16>::run(args...); break;
  }
}

template <int DT>
struct MixOp {
  static void run(const MixArgs& a, const GridMasks& m, const Upsample& u) { mix_impl<DT>(a, m, u); }
};
template <int DT>
struct UnmixOp {
  static void run(const UnmixArgs& a) { unmix_impl<DT>(a); }
};
template <int DT>
struct MixUnmixOp {
  static void run(const MixUnmixArgs& a, const GridMasks& m, const Upsample& u) { mix_unmix_impl<DT>(a, m, u); }
};

}  // namespace

// ---------------------------------------------------------------------------------------
// entry points (arguments already checked by the API layer: mixfast/mix_api.h, checked())
// ---------------------------------------------------------------------------------------

void make_masks(const MaskSpec& spec, int n, uint8_t* out, int num_threads) {
  std::vector<uint64_t> rows(static_cast<size_t>(n) * spec.grid);
  generate_into(spec, n, rows.data(), out, num_threads);
}

void mix(const MixArgs& a) {
  const GridMasks gm = grid_masks(a.masks, a.num_threads);
  const Upsample up = upsample_tables(gm.g, a.geo.H, a.geo.W);
  write_lambdas(gm, up, a.geo.H, a.geo.W, a.lam);
  by_dtype<MixOp>(a.geo.dtype, a, gm, up);
}

void unmix(const UnmixArgs& a) { by_dtype<UnmixOp>(a.geo.dtype, a); }

void mix_and_unmix(const MixUnmixArgs& a) {
  const GridMasks gm = grid_masks(a.mix.masks, a.mix.num_threads);
  const Upsample up = upsample_tables(gm.g, a.mix.geo.H, a.mix.geo.W);
  write_lambdas(gm, up, a.mix.geo.H, a.mix.geo.W, a.mix.lam);
  by_dtype<MixUnmixOp>(a.mix.geo.dtype, a, gm, up);
}

}  // namespace cpu
}  // namespace mixfast
