/* phi4's CPU kernels: the decoder's products, norms, rotary embedding and paged attention in float32.

   Why our own: a BLAS picks its kernel, and with it the order of every sum, from the problem's shape and
   the CPU it runs on, so a token's numbers would change with the batch it shares (and did, differently,
   on Intel and AMD). Here every output element is computed by one fixed sequence of float32 operations
   that depends on that element's own inputs alone:

   - a product y = x W^T sums k = 0, 1, ..., K-1 in order with fused multiply-adds, whatever the tile,
     row count, thread or instruction set computes it;
   - a dot product or sum across a row (attention scores, norms, softmax) accumulates 16 lanes over
     chunks of 16 and then adds the lanes in one fixed tree.

   So a row's bits do not depend on the batch, on how a prompt was chunked, or on the vector width: the
   AVX-512, AVX2 and portable builds of this file give the same bits (tests/test_cpu_kernels.py).

   Weights are read in their stored precision (bfloat16, float16, float8 e4m3 or float32) and widened
   in registers, which is exact: the products are the reference's float32 products of the same values,
   from half (or a quarter) of the bytes. They are packed at load into column blocks of 64, [N/64][K][64],
   so that a decode step reads each weight once, front to back.

   Compiled on first use for the CPU at hand (cpu_kernels.py); -ffp-contract=off keeps the compiler from
   fusing anything we did not fuse on purpose. */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define BLOCK_COLS 64 /* output columns per packed weight block: four 16-lane vectors */
#define K_CHUNK 512   /* reduction steps widened into a float32 buffer at a time, for many rows */
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 32 /* how far ahead (in rows of a weight block) a decode product asks for memory */
#endif

enum { FORMAT_F32 = 0, FORMAT_BF16 = 1, FORMAT_F16 = 2, FORMAT_E4M3 = 3 };

/* ---- 16 float32 lanes, on whatever the CPU has ------------------------------------------------- */

#if defined(__AVX512F__)
#include <immintrin.h>
#define PHI4_ISA "avx512"
#define ROW_TILE 6  /* rows per register tile of several rows ... */
#define TILE_VECS 4 /* ... by 16-lane vectors of a block's 64 columns: 6 x 4 accumulators of the 32 registers */
typedef __m512 v16;
static inline v16 v_zero(void) { return _mm512_setzero_ps(); }
static inline v16 v_set1(float a) { return _mm512_set1_ps(a); }
static inline v16 v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void v_store(float *p, v16 a) { _mm512_storeu_ps(p, a); }
static inline v16 v_load_n(const float *p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
static inline void v_store_n(float *p, v16 a, int n) { _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1), a); }
static inline v16 v_fma(v16 a, v16 b, v16 c) { return _mm512_fmadd_ps(a, b, c); }
static inline v16 v_add(v16 a, v16 b) { return _mm512_add_ps(a, b); }
static inline v16 v_sub(v16 a, v16 b) { return _mm512_sub_ps(a, b); }
static inline v16 v_mul(v16 a, v16 b) { return _mm512_mul_ps(a, b); }
static inline v16 v_div(v16 a, v16 b) { return _mm512_div_ps(a, b); }
static inline v16 v_max(v16 a, v16 b) { return _mm512_max_ps(a, b); }
static inline v16 v_min(v16 a, v16 b) { return _mm512_min_ps(a, b); }
/* 2^n for integer-valued n in [-126, 128] (128 gives infinity) */
static inline v16 v_pow2(v16 n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23));
}
/* 16 columns of a pair of vectors' worth of bf16 weights (the packed layout, PackedWeight.pack: 32-bit word i of
   the pair holds column i in its low half and column 16 + i in its high half): the low halves shifted up, or the
   high halves masked, are float32 already. One operation per 16 weights, not two (a zero-extension and a shift):
   decode products of 8-32 rows 1.12-1.36x faster (this and the AVX2 build, on a Xeon), where the widening competed
   with the multiply-adds for the same ports. */
static inline v16 v_load_bf16_pair(const uint16_t *pair, int high) {
  const __m512i words = _mm512_loadu_si512(pair);
  return _mm512_castsi512_ps(high ? _mm512_and_si512(words, _mm512_set1_epi32((int)0xFFFF0000u))
                                  : _mm512_slli_epi32(words, 16));
}
static inline v16 v_load_f16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }
/* e4m3 -> float16 bits by placing exponent and mantissa (subnormals included), then x 2^8 for the bias */
static inline v16 v_load_e4m3(const uint8_t *p) {
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
  __m512i h = _mm512_or_si512(_mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 8),
                              _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x7F)), 7));
  return _mm512_mul_ps(_mm512_cvtph_ps(_mm512_cvtepi32_epi16(h)), _mm512_set1_ps(256.0f));
}
/* lanes i + i+8, then + i+4, + i+2, + i+1 */
static inline float v_sum(v16 a) {
  __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}
static inline float v_hmax(v16 a) { return _mm512_reduce_max_ps(a); } /* max is exact in any order */

#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define PHI4_ISA "avx2"
#define ROW_TILE 6  /* 6 rows by 16 columns: 12 accumulators of the 16 registers (a v16 is two), so that */
#define TILE_VECS 1 /* each weight widened into registers serves 6 rows (1 row by 64, which widened every */
                    /* weight once per row, made products of 3-512 rows 1.3-1.9x slower on a Xeon) */
typedef struct { __m256 lo, hi; } v16;
static inline v16 v_make(__m256 lo, __m256 hi) { v16 r = {lo, hi}; return r; }
static inline v16 v_zero(void) { return v_make(_mm256_setzero_ps(), _mm256_setzero_ps()); }
static inline v16 v_set1(float a) { return v_make(_mm256_set1_ps(a), _mm256_set1_ps(a)); }
static inline v16 v_load(const float *p) { return v_make(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)); }
static inline void v_store(float *p, v16 a) { _mm256_storeu_ps(p, a.lo); _mm256_storeu_ps(p + 8, a.hi); }
static inline v16 v_load_n(const float *p, int n) { float t[16] = {0}; memcpy(t, p, (size_t)n * 4); return v_load(t); }
static inline void v_store_n(float *p, v16 a, int n) { float t[16]; v_store(t, a); memcpy(p, t, (size_t)n * 4); }
#define V_BINARY(name, op) \
  static inline v16 name(v16 a, v16 b) { return v_make(op(a.lo, b.lo), op(a.hi, b.hi)); }
V_BINARY(v_add, _mm256_add_ps)
V_BINARY(v_sub, _mm256_sub_ps)
V_BINARY(v_mul, _mm256_mul_ps)
V_BINARY(v_div, _mm256_div_ps)
V_BINARY(v_max, _mm256_max_ps)
V_BINARY(v_min, _mm256_min_ps)
static inline v16 v_fma(v16 a, v16 b, v16 c) {
  return v_make(_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi));
}
static inline __m256 pow2_8(__m256 n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}
static inline v16 v_pow2(v16 n) { return v_make(pow2_8(n.lo), pow2_8(n.hi)); }
static inline __m256 bf16_8(__m256i words, int high) {
  return _mm256_castsi256_ps(high ? _mm256_and_si256(words, _mm256_set1_epi32((int)0xFFFF0000u))
                                  : _mm256_slli_epi32(words, 16));
}
static inline v16 v_load_bf16_pair(const uint16_t *pair, int high) { /* as in the AVX-512 build */
  return v_make(bf16_8(_mm256_loadu_si256((const __m256i *)pair), high),
                bf16_8(_mm256_loadu_si256((const __m256i *)(pair + 16)), high));
}
static inline v16 v_load_f16(const uint16_t *p) {
  return v_make(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)),
                _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8))));
}
static inline __m256 e4m3_8(const uint8_t *p) {
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
  __m256i h = _mm256_or_si256(_mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 8),
                              _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7F)), 7));
  __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  return _mm256_mul_ps(_mm256_cvtph_ps(packed), _mm256_set1_ps(256.0f));
}
static inline v16 v_load_e4m3(const uint8_t *p) { return v_make(e4m3_8(p), e4m3_8(p + 8)); }
static inline float v_sum(v16 a) {
  __m256 s8 = _mm256_add_ps(a.lo, a.hi);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}
static inline float v_hmax(v16 a) {
  float t[16], m;
  v_store(t, v_max(a, a));
  m = t[0];
  for (int i = 1; i < 16; i++) m = t[i] > m ? t[i] : m;
  return m;
}

#else /* portable C: the same operations lane by lane */
#define PHI4_ISA "portable"
#define ROW_TILE 1
#define TILE_VECS 4
typedef struct { float f[16]; } v16;
static inline v16 v_zero(void) { v16 r; for (int i = 0; i < 16; i++) r.f[i] = 0.0f; return r; }
static inline v16 v_set1(float a) { v16 r; for (int i = 0; i < 16; i++) r.f[i] = a; return r; }
static inline v16 v_load(const float *p) { v16 r; memcpy(r.f, p, 64); return r; }
static inline void v_store(float *p, v16 a) { memcpy(p, a.f, 64); }
static inline v16 v_load_n(const float *p, int n) { v16 r = v_zero(); memcpy(r.f, p, (size_t)n * 4); return r; }
static inline void v_store_n(float *p, v16 a, int n) { memcpy(p, a.f, (size_t)n * 4); }
#define V_BINARY(name, expr) \
  static inline v16 name(v16 a, v16 b) { v16 r; for (int i = 0; i < 16; i++) { float x = a.f[i], y = b.f[i]; r.f[i] = (expr); } return r; }
V_BINARY(v_add, x + y)
V_BINARY(v_sub, x - y)
V_BINARY(v_mul, x * y)
V_BINARY(v_div, x / y)
/* as the x86 instructions: the second operand when either is NaN */
V_BINARY(v_max, x > y ? x : y)
V_BINARY(v_min, x < y ? x : y)
static inline v16 v_fma(v16 a, v16 b, v16 c) { v16 r; for (int i = 0; i < 16; i++) r.f[i] = fmaf(a.f[i], b.f[i], c.f[i]); return r; }
static inline v16 v_pow2(v16 n) {
  v16 r;
  for (int i = 0; i < 16; i++) {
    uint32_t bits = (uint32_t)((int32_t)lrintf(n.f[i]) + 127) << 23;
    memcpy(&r.f[i], &bits, 4);
  }
  return r;
}
static inline float widen_bf16(uint16_t h) { uint32_t bits = (uint32_t)h << 16; float f; memcpy(&f, &bits, 4); return f; }
static inline v16 v_load_bf16_pair(const uint16_t *pair, int high) { /* word i: column i low, 16 + i high */
  v16 r;
  for (int i = 0; i < 16; i++) r.f[i] = widen_bf16(pair[2 * i + high]);
  return r;
}
static inline float widen_f16(uint16_t h) { /* exact: every float16 is a float32 */
  int exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF;
  float magnitude = exponent == 0    ? ldexpf((float)mantissa, -24)
                    : exponent == 31 ? (mantissa ? NAN : INFINITY)
                                     : ldexpf((float)(mantissa | 0x400), exponent - 25);
  return (h & 0x8000) ? -magnitude : magnitude;
}
static inline v16 v_load_f16(const uint16_t *p) { v16 r; for (int i = 0; i < 16; i++) r.f[i] = widen_f16(p[i]); return r; }
static inline float widen_e4m3(uint8_t b) {
  return widen_f16((uint16_t)(((b & 0x80) << 8) | ((b & 0x7F) << 7))) * 256.0f;
}
static inline v16 v_load_e4m3(const uint8_t *p) { v16 r; for (int i = 0; i < 16; i++) r.f[i] = widen_e4m3(p[i]); return r; }
static inline float v_sum(v16 a) {
  float s8[8], s4[4], s2[2];
  for (int i = 0; i < 8; i++) s8[i] = a.f[i] + a.f[i + 8];
  for (int i = 0; i < 4; i++) s4[i] = s8[i] + s8[i + 4];
  for (int i = 0; i < 2; i++) s2[i] = s4[i] + s4[i + 2];
  return s2[0] + s2[1];
}
static inline float v_hmax(v16 a) { float m = a.f[0]; for (int i = 1; i < 16; i++) m = a.f[i] > m ? a.f[i] : m; return m; }
#endif

const char *phi4_isa(void) { return PHI4_ISA; }

static inline int team_size(int requested, int64_t work_items) {
  int threads = requested < 1 ? 1 : requested;
  return work_items < threads ? (int)(work_items < 1 ? 1 : work_items) : threads;
}

/* ---- elementwise functions, in the same operations on every instruction set -------------------- */

/* e^x: x = n ln2 + r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (error below 1 ulp), times
   2^n. Arguments are clamped to [-87.3, 88.8] so that 2^n stays a normal number or infinity. */
static inline v16 v_exp(v16 x) {
  x = v_min(v_max(x, v_set1(-87.3f)), v_set1(88.8f));
  const v16 shift = v_set1(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
  v16 n = v_sub(v_add(v_mul(x, v_set1(1.44269504f)), shift), shift);
  v16 r = v_fma(n, v_set1(-0.693145752f), x);
  r = v_fma(n, v_set1(-1.42860677e-06f), r);
  v16 p = v_set1(1.0f / 5040.0f);
  p = v_fma(p, r, v_set1(1.0f / 720.0f));
  p = v_fma(p, r, v_set1(1.0f / 120.0f));
  p = v_fma(p, r, v_set1(1.0f / 24.0f));
  p = v_fma(p, r, v_set1(1.0f / 6.0f));
  p = v_fma(p, r, v_set1(0.5f));
  p = v_fma(p, r, v_set1(1.0f));
  p = v_fma(p, r, v_set1(1.0f));
  return v_mul(p, v_pow2(n));
}

/* dot product of two rows of n floats: 16 lanes over chunks of 16, then the fixed tree */
static inline float dot(const float *a, const float *b, int64_t n) {
  v16 acc = v_zero();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = v_fma(v_load(a + i), v_load(b + i), acc);
  if (i < n) acc = v_fma(v_load_n(a + i, (int)(n - i)), v_load_n(b + i, (int)(n - i)), acc);
  return v_sum(acc);
}

/* ---- y = x W^T ---------------------------------------------------------------------------------- */

typedef struct {
  const float *x;       /* [M, K] rows ldx apart */
  int64_t ldx;
  const void *weight;   /* packed [ceil(N/64)][K][64] */
  int format;
  int64_t k, n;
  const float *x_scale; /* per row, or NULL: y = acc * x_scale[m] * w_scale[n] */
  const float *w_scale; /* per column, or NULL */
  float *y;             /* [M, N] rows ldy apart */
  int64_t ldy;
} Product;

/* Vector `vector` (0-3, 16 columns each) of the 64-column row of packed weights that starts at `row`; `high` is
   vector % 2, passed apart so that a caller whose vector is known only at run time can still make it a constant
   (a bf16 vector is the low or the high halves of a pair: chosen at run time, both would be computed). */
static inline v16 load_weights(const void *base, int format, int64_t row, int vector, const int high) {
  switch (format) {
  case FORMAT_BF16: return v_load_bf16_pair((const uint16_t *)base + row + 32 * (vector / 2), high);
  case FORMAT_F16: return v_load_f16((const uint16_t *)base + row + 16 * vector);
  case FORMAT_E4M3: return v_load_e4m3((const uint8_t *)base + row + 16 * vector);
  default: return v_load((const float *)base + row + 16 * vector);
  }
}

/* Store vectors [j0, j0 + vecs) of one row of a 64-column block: scaled if the product is quantized, cut at
   the last column. */
static inline void store_row(const Product *p, const v16 *acc, int64_t row, int64_t block, int j0, int vecs) {
  const int64_t col = block * BLOCK_COLS + 16 * j0;
  float *out = p->y + row * p->ldy + col;
  int64_t left = p->n - col;
  for (int j = 0; j < vecs; j++, left -= 16) {
    v16 value = acc[j];
    if (p->x_scale != NULL) value = v_mul(v_mul(value, v_set1(p->x_scale[row])), v_load(p->w_scale + col + 16 * j));
    if (left >= 16) v_store(out + 16 * j, value);
    else if (left > 0) v_store_n(out + 16 * j, value, (int)left);
  }
}

/* Rows [row, row + rows) by vectors [j0, j0 + vecs) of one column block over k in [k0, k1), weights widened
   as they are read. `partial` (the block's 64 columns per row) holds the running sums of k < k0
   (unscaled), or NULL to start from zero. Inlined into one copy per tile shape (packed_tile), so that the
   compiler unrolls it and keeps the sums in registers. Every shape sums k in order: the same bits. */
static inline __attribute__((always_inline)) void tile_from_packed(const Product *p, const int format, int64_t block,
                                                                   int64_t row, const int rows, int j0,
                                                                   const int vecs, const int odd, int64_t k0,
                                                                   int64_t k1, float *partial, int64_t ld_partial) {
  j0 = vecs == 4 ? 0 : j0; /* a constant where the tile is the whole block: its copy adds no offsets */
  v16 acc[ROW_TILE][4];
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < vecs; j++)
      acc[i][j] = partial && k0 > 0 ? v_load(partial + i * ld_partial + 16 * (j0 + j)) : v_zero();
  const int64_t base = block * p->k * BLOCK_COLS;
  const int64_t row_bytes = BLOCK_COLS * (format == FORMAT_F32 ? 4 : format == FORMAT_E4M3 ? 1 : 2);
  const char *stream = (const char *)p->weight + base / BLOCK_COLS * row_bytes;
  for (int64_t k = k0; k < k1; k++) {
    /* A software prefetch PREFETCH_ROWS ahead keeps DRAM busy: ~20% faster than the hardware alone. The
       tiles of a block's later vectors find its weights in the cache already. */
    if (j0 == 0)
      for (int64_t line = 0; line < row_bytes; line += 64) __builtin_prefetch(stream + (k + PREFETCH_ROWS) * row_bytes + line);
    v16 w[4];
    for (int j = 0; j < vecs; j++) w[j] = load_weights(p->weight, format, base + k * BLOCK_COLS, j0 + j, (odd + j) % 2);
    for (int i = 0; i < rows; i++) {
      v16 b = v_set1(p->x[(row + i) * p->ldx + k]);
      for (int j = 0; j < vecs; j++) acc[i][j] = v_fma(b, w[j], acc[i][j]);
    }
  }
  for (int i = 0; i < rows; i++) {
    if (partial && k1 < p->k) {
      for (int j = 0; j < vecs; j++) v_store(partial + i * ld_partial + 16 * (j0 + j), acc[i][j]);
    } else {
      store_row(p, acc[i], row + i, block, j0, vecs);
    }
  }
}

/* The same sums over weights already widened into `widened` [k1 - k0][64]: for many rows. */
static inline __attribute__((always_inline)) void tile_from_widened(const Product *p, const float *widened, int64_t block,
                                                                    int64_t row, const int rows, int j0,
                                                                    int64_t k0, int64_t k1, float *partial,
                                                                    int64_t ld_partial) {
  j0 = TILE_VECS == 4 ? 0 : j0; /* as in tile_from_packed */
  v16 acc[ROW_TILE][TILE_VECS];
  for (int i = 0; i < rows; i++)
    for (int j = 0; j < TILE_VECS; j++)
      acc[i][j] = k0 > 0 ? v_load(partial + i * ld_partial + 16 * (j0 + j)) : v_zero();
  for (int64_t k = k0; k < k1; k++) {
    const float *wk = widened + (k - k0) * BLOCK_COLS + 16 * j0;
    v16 w[TILE_VECS];
    for (int j = 0; j < TILE_VECS; j++) w[j] = v_load(wk + 16 * j);
    for (int i = 0; i < rows; i++) {
      v16 b = v_set1(p->x[(row + i) * p->ldx + k]);
      for (int j = 0; j < TILE_VECS; j++) acc[i][j] = v_fma(b, w[j], acc[i][j]);
    }
  }
  for (int i = 0; i < rows; i++) {
    if (k1 < p->k) {
      for (int j = 0; j < TILE_VECS; j++) v_store(partial + i * ld_partial + 16 * (j0 + j), acc[i][j]);
    } else {
      store_row(p, acc[i], row + i, block, j0, TILE_VECS);
    }
  }
}

/* One compiled copy of the tile per weight format and shape: a lone row takes the whole block (its weights
   are read once, front to back); several rows take TILE_VECS vectors at a time. */
static void packed_tile(const Product *p, int64_t block, int64_t row, int rows, int j0, int vecs, int64_t k0,
                        int64_t k1, float *partial, int64_t ld_partial) {
/* `odd`, j0 % 2, a constant in each copy: narrow tiles (whose j0 is known only at run time) get two */
#define TILE(format, n, v) \
  if ((v) < 4 && j0 % 2) tile_from_packed(p, format, block, row, n, j0, v, 1, k0, k1, partial, ld_partial); \
  else tile_from_packed(p, format, block, row, n, j0, v, 0, k0, k1, partial, ld_partial)
#define ROWS_CASE(format, n) case n: TILE(format, n, TILE_VECS); break;
#if ROW_TILE > 1
#define ROW_CASES(format) \
  if (vecs == 4 && rows == 1) { TILE(format, 1, 4); break; } \
  switch (rows) { ROWS_CASE(format, 1) ROWS_CASE(format, 2) ROWS_CASE(format, 3) ROWS_CASE(format, 4) \
                  ROWS_CASE(format, 5) ROWS_CASE(format, 6) }
#else
#define ROW_CASES(format) TILE(format, 1, 4);
#endif
  switch (p->format) {
  case FORMAT_BF16: ROW_CASES(FORMAT_BF16) break;
  case FORMAT_F16: ROW_CASES(FORMAT_F16) break;
  case FORMAT_E4M3: ROW_CASES(FORMAT_E4M3) break;
  default: ROW_CASES(FORMAT_F32) break;
  }
#undef ROW_CASES
#undef ROWS_CASE
#undef TILE
}

static void widened_tile(const Product *p, const float *widened, int64_t block, int64_t row, int rows, int j0,
                         int64_t k0, int64_t k1, float *partial, int64_t ld_partial) {
  if (rows == ROW_TILE) tile_from_widened(p, widened, block, row, ROW_TILE, j0, k0, k1, partial, ld_partial);
  else tile_from_widened(p, widened, block, row, rows, j0, k0, k1, partial, ld_partial);
}

/* Up to FEW_ROWS rows (decode) the weights are widened as they are read: each block once per run of
   L1_ROWS reduction steps, whose weights stay in the L1 cache while every register tile of rows uses them.
   Beyond (prefill), each chunk of a block is widened once into a float32 buffer that every tile reuses. */
#define FEW_ROWS 32
#define L1_ROWS 128

void phi4_linear(const float *x, int64_t m, int64_t k, int64_t ldx, const void *weight, int format, int64_t n,
                 const float *x_scale, const float *w_scale, float *y, int64_t ldy, int threads) {
  Product p = {x, ldx, weight, format, k, n, x_scale, w_scale, y, ldy};
  const int64_t blocks = (n + BLOCK_COLS - 1) / BLOCK_COLS;
  if (m == 0 || n == 0) return;
  if (m <= FEW_ROWS) {
    /* One register tile keeps its sums in registers across all of K (buffered only between chunks of a
       long K, so that the weights stream through the cache once); several tiles share L1-sized runs. */
    /* Narrow tiles (AVX2) only from three rows: two rows by 16 columns widen too few weights per pass to pay
       for a block's four passes (0.92x each row alone, AVX2 build on a Xeon). A constant where tiles are whole
       blocks. */
    const int vecs = TILE_VECS == 4 || m <= 2 ? 4 : TILE_VECS, row_tile = vecs > TILE_VECS ? 1 : ROW_TILE;
    const int64_t chunk = m > row_tile || vecs < 4 ? L1_ROWS : k <= 4 * K_CHUNK ? k : K_CHUNK;
#pragma omp parallel num_threads(team_size(threads, blocks))
    {
      float partial[FEW_ROWS * BLOCK_COLS];
#pragma omp for schedule(static)
      for (int64_t block = 0; block < blocks; block++)
        for (int64_t k0 = 0; k0 < k; k0 += chunk)
          for (int j0 = 0; j0 < 4; j0 += vecs)
            for (int64_t row = 0; row < m; row += row_tile)
              packed_tile(&p, block, row, (int)(m - row < row_tile ? m - row : row_tile), j0, vecs, k0,
                          k0 + chunk < k ? k0 + chunk : k, chunk < k ? partial + row * BLOCK_COLS : NULL,
                          BLOCK_COLS);
    }
    return;
  }
  /* Many rows: tasks are (column block, run of rows); a task widens its block chunk by chunk. */
  int64_t row_run = m;
  const int64_t wanted_tasks = 4 * (int64_t)(threads < 1 ? 1 : threads);
  if (blocks < wanted_tasks) {
    int64_t runs = (wanted_tasks + blocks - 1) / blocks;
    row_run = (m + runs - 1) / runs;
    row_run = (row_run + ROW_TILE - 1) / ROW_TILE * ROW_TILE;
  }
  const int64_t runs = (m + row_run - 1) / row_run;
  const int64_t chunk = k < K_CHUNK ? k : K_CHUNK;
#pragma omp parallel num_threads(team_size(threads, blocks * runs))
  {
    float *widened = (float *)aligned_alloc(64, (size_t)chunk * BLOCK_COLS * sizeof(float));
    float *partial = chunk < k ? (float *)aligned_alloc(64, (size_t)row_run * BLOCK_COLS * sizeof(float)) : NULL;
#pragma omp for schedule(static)
    for (int64_t task = 0; task < blocks * runs; task++) {
      const int64_t block = task / runs, first_row = (task % runs) * row_run;
      const int64_t last_row = first_row + row_run < m ? first_row + row_run : m;
      const int64_t base = block * k * BLOCK_COLS;
      for (int64_t k0 = 0; k0 < k; k0 += chunk) {
        const int64_t k1 = k0 + chunk < k ? k0 + chunk : k;
        for (int64_t kk = k0; kk < k1; kk++)
          for (int v = 0; v < 4; v++)
            v_store(widened + (kk - k0) * BLOCK_COLS + 16 * v,
                    load_weights(weight, format, base + kk * BLOCK_COLS, v, v % 2));
        for (int j0 = 0; j0 < 4; j0 += TILE_VECS) /* a vector's slice of the chunk stays in L1 over the rows */
          for (int64_t row = first_row; row < last_row; row += ROW_TILE) {
            int rows = (int)(last_row - row < ROW_TILE ? last_row - row : ROW_TILE);
            widened_tile(&p, widened, block, row, rows, j0, k0, k1,
                         partial ? partial + (row - first_row) * BLOCK_COLS : NULL, BLOCK_COLS);
          }
      }
    }
    free(widened);
    free(partial);
  }
}

/* ---- residual add + RMSNorm ----------------------------------------------------------------------- */

/* sum = x + residual (or x alone when residual is NULL), written to residual_out;
   out = weight * (sum / sqrt(mean(sum^2) + eps)), in the reference's order of operations. */
void phi4_add_rms_norm(const float *x, const float *residual, const float *weight, float eps, int64_t rows,
                       int64_t width, float *out, float *residual_out, int threads) {
#pragma omp parallel for num_threads(team_size(threads, rows / 8)) schedule(static)
  for (int64_t r = 0; r < rows; r++) {
    const float *xr = x + r * width;
    float *sum = residual_out + r * width;
    if (residual != NULL) {
      const float *rr = residual + r * width;
      for (int64_t i = 0; i < width; i++) sum[i] = rr[i] + xr[i];
    } else if (sum != xr) {
      memcpy(sum, xr, (size_t)width * sizeof(float));
    }
    const float mean = dot(sum, sum, width) / (float)width;
    const float inverse = 1.0f / sqrtf(mean + eps);
    float *o = out + r * width;
    for (int64_t i = 0; i < width; i++) o[i] = weight[i] * (sum[i] * inverse);
  }
}

/* ---- SiLU(gate) * up ------------------------------------------------------------------------------ */

void phi4_silu_and_mul(const float *gate_up, int64_t rows, int64_t width, float *out, int threads) {
#pragma omp parallel for num_threads(team_size(threads, rows * width / 4096)) schedule(static)
  for (int64_t r = 0; r < rows; r++) {
    const float *gate = gate_up + r * 2 * width, *up = gate + width;
    float *o = out + r * width;
    int64_t i = 0;
    for (; i + 16 <= width; i += 16) {
      v16 g = v_load(gate + i);
      v16 silu = v_div(g, v_add(v_set1(1.0f), v_exp(v_sub(v_zero(), g))));
      v_store(o + i, v_mul(v_load(up + i), silu));
    }
    if (i < width) {
      int n = (int)(width - i);
      v16 g = v_load_n(gate + i, n);
      v16 silu = v_div(g, v_add(v_set1(1.0f), v_exp(v_sub(v_zero(), g))));
      v_store_n(o + i, v_mul(v_load_n(up + i, n), silu), n);
    }
  }
}

/* ---- rotary embedding, and this step's keys and values into the paged cache ------------------------ */

static inline void rotate(float *x, const float *cos, const float *sin, int64_t half) {
  for (int64_t i = 0; i < half; i++) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i + half] + a * sin[i + half];
  }
}

/* qkv [T, (heads + 2 kv_heads) * head_dim] rows ld apart: q and k rotated in place on their first
   rotary_dim features (cos/sin rows picked per token), then k and v copied to their cache slots. */
void phi4_rotary_and_cache(float *qkv, int64_t tokens, int64_t ld, int64_t heads, int64_t kv_heads,
                           int64_t head_dim, int64_t rotary_dim, const float *cos, const float *sin,
                           const int64_t *rope_rows, const int64_t *slots, float *k_cache, float *v_cache,
                           int threads) {
  const int64_t half = rotary_dim / 2, kv_width = kv_heads * head_dim;
#pragma omp parallel for num_threads(team_size(threads, tokens / 16)) schedule(static)
  for (int64_t t = 0; t < tokens; t++) {
    float *row = qkv + t * ld;
    const float *c = cos + rope_rows[t] * rotary_dim, *s = sin + rope_rows[t] * rotary_dim;
    for (int64_t h = 0; h < heads + kv_heads; h++) rotate(row + h * head_dim, c, s, half);
    memcpy(k_cache + slots[t] * kv_width, row + heads * head_dim, (size_t)kv_width * sizeof(float));
    memcpy(v_cache + slots[t] * kv_width, row + (heads + kv_heads) * head_dim, (size_t)kv_width * sizeof(float));
  }
}

/* ---- paged attention -------------------------------------------------------------------------------- */

#define QUERY_BLOCK 16 /* query tokens of one sequence that share each tile of keys */
#ifdef __AVX512F__
#define SCORE_ROWS 8 /* query rows that share each key vector read for their scores (8 of 32 registers) */
#else
#define SCORE_ROWS 4 /* a v16 is two AVX2 registers */
#endif
#define VALUE_ROWS 4   /* query rows by 16-lane vectors of head_dim whose weighted sums stay in registers: */
#ifdef __AVX512F__
#define VALUE_VECS 2
#else
#define VALUE_VECS 1 /* a v16 is two AVX2 registers: 4 x 2 sums and their values would not fit in 16 */
#endif

/* Scores of `n` query rows against one tile of 16 keys ([head_dim][16]): each a sum over d in order. */
static inline __attribute__((always_inline)) void score_rows(const float *const *queries, const float *keys,
                                                             int64_t head_dim, const int n, float scale,
                                                             float *scores, int64_t padded) {
  v16 dots[SCORE_ROWS];
  for (int i = 0; i < n; i++) dots[i] = v_zero();
  for (int64_t d = 0; d < head_dim; d++) {
    const v16 key = v_load(keys + d * 16);
    for (int i = 0; i < n; i++) dots[i] = v_fma(v_set1(queries[i][d]), key, dots[i]);
  }
  for (int i = 0; i < n; i++) v_store(scores + i * padded, v_mul(dots[i], v_set1(scale)));
}

static inline v16 value_vector(const float *value, int64_t d, int64_t head_dim) {
  const int64_t left = head_dim - 16 * d;
  return left >= 16 ? v_load(value + 16 * d) : v_load_n(value + 16 * d, (int)left);
}

/* Vectors [d0, d0 + nv) of the weighted sums of `nr` query rows: over their visible keys j in order (row i sees
   j < visible[i], which grows with i), score times value (at v_cache + at[j]), in registers until the end. */
static inline __attribute__((always_inline)) void weigh_values(const float *v_cache, const int64_t *at,
                                                               const float *scores,
                                                               int64_t padded, const int64_t *visible, const int nr,
                                                               int64_t d0, const int nv, int64_t head_dim,
                                                               v16 *acc, int64_t vectors) {
  v16 sums[VALUE_ROWS][VALUE_VECS], v[VALUE_VECS];
  for (int i = 0; i < nr; i++)
    for (int e = 0; e < nv; e++) sums[i][e] = v_zero();
  int64_t j = 0;
  for (; j < visible[0]; j++) { /* keys every row sees */
    for (int e = 0; e < nv; e++) v[e] = value_vector(v_cache + at[j], d0 + e, head_dim);
    for (int i = 0; i < nr; i++) {
      const v16 score = v_set1(scores[i * padded + j]);
      for (int e = 0; e < nv; e++) sums[i][e] = v_fma(score, v[e], sums[i][e]);
    }
  }
  for (; j < visible[nr - 1]; j++) { /* keys only the later rows see */
    for (int e = 0; e < nv; e++) v[e] = value_vector(v_cache + at[j], d0 + e, head_dim);
    for (int i = 0; i < nr; i++) {
      if (j >= visible[i]) continue;
      const v16 score = v_set1(scores[i * padded + j]);
      for (int e = 0; e < nv; e++) sums[i][e] = v_fma(score, v[e], sums[i][e]);
    }
  }
  for (int i = 0; i < nr; i++)
    for (int e = 0; e < nv; e++) acc[i * vectors + d0 + e] = sums[i][e];
}

/* Every query token of sequence s (rows query_start[s] .. query_start[s+1]) sits at position
   context_lens[s] - query_len + i and attends to its sequence's keys 0..position, read through the block
   table. One task is a block of up to QUERY_BLOCK tokens of one sequence and one kv head with its group of
   query heads: keys are gathered 16 at a time into a [head_dim][16] tile, and each score is
   sum over d = 0..head_dim-1, in order, of q[d] * k[d] (fused multiply-adds), times the scale. Softmax is
   exact per query: the max, the exponentials, their sum (16 lanes over runs of 16 keys, one tree), then the
   values weighted key by key in order. A query's numbers depend on its own keys and nothing else. Rows are
   computed a few at a time (score_rows, weigh_values) so that each key or value read serves several, with
   each row's sums in the same order as alone: prefill 1.2-1.4x faster than row by row (demo, AVX-512 Xeon). */
void phi4_attention(const float *q, int64_t ldq, const float *k_cache, const float *v_cache, float *out,
                    int64_t ld_out, int64_t num_seqs, const int32_t *query_start, const int32_t *context_lens,
                    const int32_t *block_tables, int64_t max_blocks, int64_t block_size, int64_t heads,
                    int64_t kv_heads, int64_t head_dim, float scale, int threads) {
  const int64_t group = heads / kv_heads, kv_width = kv_heads * head_dim;
  const int64_t vectors = (head_dim + 15) / 16;
  int64_t blocks = 0, longest = 0;
  for (int64_t s = 0; s < num_seqs; s++) {
    blocks += (query_start[s + 1] - query_start[s] + QUERY_BLOCK - 1) / QUERY_BLOCK;
    longest = context_lens[s] > longest ? context_lens[s] : longest;
  }
  int64_t *block_seq = (int64_t *)malloc((size_t)(2 * blocks + 1) * sizeof(int64_t)), *block_first = block_seq + blocks;
  for (int64_t s = 0, b = 0; s < num_seqs; s++)
    for (int64_t t = query_start[s]; t < query_start[s + 1]; t += QUERY_BLOCK, b++) block_seq[b] = s, block_first[b] = t;
  const int64_t padded = (longest + 15) / 16 * 16, max_rows = QUERY_BLOCK * group;
#pragma omp parallel num_threads(team_size(threads, blocks * kv_heads))
  {
    float *scores = (float *)aligned_alloc(64, (size_t)(max_rows * padded) * sizeof(float));
    float *keys = (float *)aligned_alloc(64, (size_t)(head_dim * 16) * sizeof(float));
    v16 *acc = (v16 *)aligned_alloc(64, (size_t)(max_rows * vectors) * sizeof(v16));
    float *inverse_sum = (float *)malloc((size_t)max_rows * sizeof(float));
    int64_t *visible = (int64_t *)malloc((size_t)max_rows * sizeof(int64_t));
    const float **queries = (const float **)malloc((size_t)max_rows * sizeof(float *));
    int64_t *at = (int64_t *)malloc((size_t)padded * sizeof(int64_t)); /* key j's place in either cache */
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < blocks * kv_heads; item++) {
      const int64_t b = item / kv_heads, kv_head = item % kv_heads, s = block_seq[b], t0 = block_first[b];
      const int64_t count = query_start[s + 1] - t0 < QUERY_BLOCK ? query_start[s + 1] - t0 : QUERY_BLOCK;
      const int64_t first_position = context_lens[s] - (query_start[s + 1] - query_start[s]) + (t0 - query_start[s]);
      const int64_t rows = count * group, keys_seen = first_position + count;
      const int32_t *table = block_tables + s * max_blocks;
      for (int64_t r = 0; r < rows; r++) {
        visible[r] = first_position + r / group + 1;
        queries[r] = q + (t0 + r / group) * ldq + (kv_head * group + r % group) * head_dim;
      }
      for (int64_t j = 0; j < keys_seen; j++)
        at[j] = ((int64_t)table[j / block_size] * block_size + j % block_size) * kv_width + kv_head * head_dim;
      for (int64_t j0 = 0; j0 < keys_seen; j0 += 16) {
        for (int64_t jj = 0; jj < 16; jj++) {
          const int64_t j = j0 + jj;
          if (j < keys_seen) {
            const float *key = k_cache + at[j];
            for (int64_t d = 0; d < head_dim; d++) keys[d * 16 + jj] = key[d];
          } else {
            for (int64_t d = 0; d < head_dim; d++) keys[d * 16 + jj] = 0.0f;
          }
        }
        for (int64_t r = 0; r < rows; r += SCORE_ROWS) {
          float *tile = scores + r * padded + j0;
#define SCORE(n) score_rows(queries + r, keys, head_dim, n, scale, tile, padded); break;
          switch (rows - r < SCORE_ROWS ? rows - r : SCORE_ROWS) {
          case 1: SCORE(1) case 2: SCORE(2) case 3: SCORE(3)
#if SCORE_ROWS > 4
          case 4: SCORE(4) case 5: SCORE(5) case 6: SCORE(6) case 7: SCORE(7)
#endif
          default: SCORE(SCORE_ROWS)
          }
#undef SCORE
        }
      }
      for (int64_t r = 0; r < rows; r++) {
        float *sr = scores + r * padded;
        const int64_t length = visible[r];
        v16 running = v_set1(-INFINITY);
        int64_t j = 0;
        for (; j + 16 <= length; j += 16) running = v_max(v_load(sr + j), running);
        float top = v_hmax(running);
        for (; j < length; j++) top = sr[j] > top ? sr[j] : top;
        v16 total = v_zero();
        for (j = 0; j + 16 <= length; j += 16) {
          v16 e = v_exp(v_sub(v_load(sr + j), v_set1(top)));
          v_store(sr + j, e);
          total = v_add(total, e);
        }
        if (j < length) {
          const int n = (int)(length - j);
          v16 e = v_exp(v_sub(v_load_n(sr + j, n), v_set1(top)));
          v_store_n(sr + j, e, n);
          total = v_add(total, v_load_n(sr + j, n));
        }
        inverse_sum[r] = 1.0f / v_sum(total);
      }
      for (int64_t r = 0; r < rows; r += VALUE_ROWS)
        for (int64_t d = 0; d < vectors; d += VALUE_VECS) {
          const int nr = (int)(rows - r < VALUE_ROWS ? rows - r : VALUE_ROWS);
          const int nv = (int)(vectors - d < VALUE_VECS ? vectors - d : VALUE_VECS);
#define WEIGH(n, m) weigh_values(v_cache, at, scores + r * padded, padded, visible + r, n, d, m, head_dim, acc + r * vectors, vectors)
          if (nv == VALUE_VECS) {
            switch (nr) { case 1: WEIGH(1, VALUE_VECS); break; case 2: WEIGH(2, VALUE_VECS); break;
                          case 3: WEIGH(3, VALUE_VECS); break; default: WEIGH(VALUE_ROWS, VALUE_VECS); break; }
          } else {
            switch (nr) { case 1: WEIGH(1, 1); break; case 2: WEIGH(2, 1); break;
                          case 3: WEIGH(3, 1); break; default: WEIGH(VALUE_ROWS, 1); break; }
          }
#undef WEIGH
        }
      for (int64_t r = 0; r < rows; r++) {
        float *o = out + (t0 + r / group) * ld_out + (kv_head * group + r % group) * head_dim;
        for (int64_t d = 0; d < vectors; d++) {
          const int64_t left = head_dim - 16 * d;
          const v16 result = v_mul(acc[r * vectors + d], v_set1(inverse_sum[r]));
          if (left >= 16) v_store(o + 16 * d, result);
          else v_store_n(o + 16 * d, result, (int)left);
        }
      }
    }
    free(scores);
    free(keys);
    free(acc);
    free(inverse_sum);
    free(visible);
    free(queries);
    free(at);
  }
  free(block_seq);
}

/* ---- greedy choice ---------------------------------------------------------------------------------- */

/* The index of each row's largest value, the lowest index on ties (NaN never wins): the maximum of each
   run of 256 values, vectorised, then a scalar look for the first place that holds the overall maximum. */
void phi4_argmax(const float *x, int64_t rows, int64_t width, int64_t ld, int64_t *out, int threads) {
  const int64_t run = 256, runs = (width + run - 1) / run;
#pragma omp parallel num_threads(team_size(threads, rows))
  {
    float *run_max = (float *)malloc((size_t)runs * sizeof(float));
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
      const float *row = x + r * ld;
      float top = -INFINITY;
      for (int64_t first = 0, index = 0; first < width; first += run, index++) {
        const int64_t last = first + run < width ? first + run : width;
        v16 running = v_set1(-INFINITY);
        int64_t i = first;
        for (; i + 16 <= last; i += 16) running = v_max(v_load(row + i), running); /* a NaN lane loses */
        float m = v_hmax(running);
        for (; i < last; i++) m = row[i] > m ? row[i] : m;
        run_max[index] = m;
        top = m > top ? m : top;
      }
      int64_t index = 0, found = width;
      while (index < runs && !(run_max[index] == top)) index++;
      for (found = index * run; found < width && !(row[found] == top); found++) {
      }
      out[r] = found < width ? found : 0; /* all NaN: token 0 */
    }
    free(run_max);
  }
}

/* ---- the whole decoder stack in one call ------------------------------------------------------------ */

/* One layer's weights as the kernels read them, and where its keys and values are cached. */
typedef struct {
  const float *input_norm, *post_attention_norm; /* [hidden] */
  const void *qkv, *o, *gate_up, *down;          /* packed (see phi4_linear) */
  int32_t qkv_format, o_format, gate_up_format, down_format;
  float *k_cache, *v_cache;                      /* [num_slots, kv_heads, head_dim] */
} DecoderLayer;

typedef struct {
  int64_t layers, hidden, intermediate, heads, kv_heads, head_dim, rotary_dim, block_size;
  float eps, attention_scale;
} DecoderShape;

/* Every layer over T tokens: the same kernels, in the same order and on the same operands as the model's
   Python loop calls them one by one (phi3.py), so the bits are the same; one call instead of nine per
   layer matters when the layers are small (the Python and ctypes cost of a call is several microseconds).
   `hidden` [T, hidden] holds the embeddings and receives the final normalised states. Returns 0, or -1 when
   the activations' memory cannot be had (nothing is computed then). */
int phi4_decoder(float *hidden, int64_t tokens, const DecoderShape *shape, const DecoderLayer *layers,
                  const float *final_norm, const float *cos, const float *sin, const int64_t *rope_rows,
                  const int64_t *slots, int64_t num_seqs, const int32_t *query_start, const int32_t *context_lens,
                  const int32_t *block_tables, int64_t max_blocks, int threads) {
  const int64_t h = shape->hidden, q_size = shape->heads * shape->head_dim;
  const int64_t qkv_width = q_size + 2 * shape->kv_heads * shape->head_dim, inter = shape->intermediate;
  const size_t floats = (size_t)tokens * (size_t)(3 * h + qkv_width + q_size + 3 * inter);
  float *residual = (float *)aligned_alloc(64, (floats * sizeof(float) + 63) / 64 * 64);
  if (residual == NULL) return -1;
  float *normed = residual + tokens * h, *x = normed + tokens * h, *qkv = x + tokens * h;
  float *attended = qkv + tokens * qkv_width, *gate_up = attended + tokens * q_size;
  float *act = gate_up + tokens * 2 * inter;
  phi4_add_rms_norm(hidden, NULL, layers[0].input_norm, shape->eps, tokens, h, normed, residual, threads);
  for (int64_t l = 0; l < shape->layers; l++) {
    const DecoderLayer *layer = layers + l;
    if (l > 0) phi4_add_rms_norm(x, residual, layer->input_norm, shape->eps, tokens, h, normed, residual, threads);
    phi4_linear(normed, tokens, h, h, layer->qkv, layer->qkv_format, qkv_width, NULL, NULL, qkv, qkv_width, threads);
    phi4_rotary_and_cache(qkv, tokens, qkv_width, shape->heads, shape->kv_heads, shape->head_dim, shape->rotary_dim,
                          cos, sin, rope_rows, slots, layer->k_cache, layer->v_cache, threads);
    phi4_attention(qkv, qkv_width, layer->k_cache, layer->v_cache, attended, q_size, num_seqs, query_start,
                   context_lens, block_tables, max_blocks, shape->block_size, shape->heads, shape->kv_heads,
                   shape->head_dim, shape->attention_scale, threads);
    phi4_linear(attended, tokens, q_size, q_size, layer->o, layer->o_format, h, NULL, NULL, x, h, threads);
    phi4_add_rms_norm(x, residual, layer->post_attention_norm, shape->eps, tokens, h, normed, residual, threads);
    phi4_linear(normed, tokens, h, h, layer->gate_up, layer->gate_up_format, 2 * inter, NULL, NULL, gate_up,
                2 * inter, threads);
    phi4_silu_and_mul(gate_up, tokens, inter, act, threads);
    phi4_linear(act, tokens, inter, inter, layer->down, layer->down_format, h, NULL, NULL, x, h, threads);
  }
  phi4_add_rms_norm(x, residual, final_norm, shape->eps, tokens, h, hidden, residual, threads);
  free(residual);
  return 0;
}
