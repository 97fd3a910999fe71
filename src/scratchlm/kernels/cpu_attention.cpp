// Attention forward and backward for the CPU in fp32, one (batch, head) at a time, for short
// sequences: the scores of a block of queries stay in the core's cache, the matmuls run in
// register tiles, and the backward recomputes the probabilities from the saved log-sum-exp.
// Built at first use by scratchlm.kernels.cpu_attention (C++17, -O3 -march=native, OpenMP);
// the vectors are GCC/Clang vector extensions of 16 floats, one AVX-512 register where the CPU
// has them and two or four narrower ones where it does not.
//
// Shapes: queries (B, H, Q, D), keys and values (B, G, T, D) with H a multiple of G (grouped
// queries: head h reads key head h / (H / G)), each with its own strides and unit stride along
// D. Causal attention aligns the triangle at the top left (query i sees keys 0..i), as PyTorch's
// scaled_dot_product_attention does.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

typedef float vec __attribute__((vector_size(64), aligned(4)));
typedef int32_t ivec __attribute__((vector_size(64), aligned(4)));
constexpr int W = 16;    // floats in a vector
constexpr int BQ = 32;   // queries in a block: the block's scores, (BQ, keys), stay in cache
constexpr float NEG_BIG = -1e30f;

inline vec splat(float x) { return vec{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
inline vec load(const float* p) { return *reinterpret_cast<const vec*>(p); }
inline void store(float* p, vec v) { *reinterpret_cast<vec*>(p) = v; }

// e^x for x <= 0 (scores minus their row's maximum): range reduction by ln 2 in two parts, then
// Cephes's degree-6 polynomial for expf; below -87 it returns 0.
inline vec exp_nonpositive(vec x) {
    const vec magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    vec t = x * splat(1.44269504088896341f) + magic;
    vec n = t - magic;
    vec r = x - n * splat(0.693145751953125f);
    r = r - n * splat(1.42860682030941723212e-6f);
    vec p = splat(1.9875691500e-4f);
    p = p * r + splat(1.3981999507e-3f);
    p = p * r + splat(8.3334519073e-3f);
    p = p * r + splat(4.1665795894e-2f);
    p = p * r + splat(1.6666665459e-1f);
    p = p * r + splat(5.0000001201e-1f);
    p = p * r * r + r + splat(1.0f);
    ivec bits = (__builtin_convertvector(n, ivec) + 127) << 23;
    return x < splat(-87.0f) ? splat(0.0f) : p * (vec)bits;  // a vector cast keeps the bits
}

inline float reduce_max(vec v) {
    float m = v[0];
    for (int i = 1; i < W; ++i) m = std::max(m, v[i]);
    return m;
}

inline float reduce_sum(vec v) {
    float s = 0.0f;
    for (int i = 0; i < W; ++i) s += v[i];
    return s;
}

inline int round_up(int n, int m) { return (n + m - 1) / m * m; }

// C[r][j] = sum_d A[r][d] * Bt[d][j] for rows r < rows (A contiguous rows of D, zero rows past
// the end) and columns j < cols (a multiple of 32; Bt rows of ldb floats).
template <int D>
void rows_by_columns(const float* A, int rows, const float* Bt, int ldb, int cols, float* C, int ldc) {
    for (int r0 = 0; r0 < rows; r0 += 8) {
        for (int j0 = 0; j0 < cols; j0 += 2 * W) {
            vec acc[8][2] = {};
            for (int d = 0; d < D; ++d) {
                vec b0 = load(Bt + d * ldb + j0), b1 = load(Bt + d * ldb + j0 + W);
                for (int r = 0; r < 8; ++r) {
                    vec a = splat(A[(r0 + r) * D + d]);
                    acc[r][0] += a * b0;
                    acc[r][1] += a * b1;
                }
            }
            for (int r = 0; r < 8; ++r) {
                store(C + (r0 + r) * ldc + j0, acc[r][0]);
                store(C + (r0 + r) * ldc + j0 + W, acc[r][1]);
            }
        }
    }
}

// Rows of the tile a register block holds: R rows of D floats in at most 16 vectors.
template <int D>
constexpr int tile_rows() { return std::max(1, 16 / (D / W)); }

// Out[r][:] = row_scale[r] * sum_{j < cols} C[r][j] * M[j][:] for r < rows (Out rows at ldo; M
// rows at ldm); no row_scale: 1.
template <int D>
void rows_by_rows(const float* C, int ldc, int rows, int cols, const float* M, long ldm, float* Out, long ldo,
                  const float* row_scale = nullptr) {
    constexpr int R = tile_rows<D>(), V = D / W;
    int r0 = 0;
    for (; r0 + R <= rows; r0 += R) {
        vec acc[R][V];
        for (int r = 0; r < R; ++r)
            for (int c = 0; c < V; ++c) acc[r][c] = splat(0.0f);
        for (int j = 0; j < cols; ++j) {
            const float* m = M + j * ldm;
            vec mv[V];
            for (int c = 0; c < V; ++c) mv[c] = load(m + c * W);
            for (int r = 0; r < R; ++r) {
                vec a = splat(C[(r0 + r) * ldc + j]);
                for (int c = 0; c < V; ++c) acc[r][c] += a * mv[c];
            }
        }
        for (int r = 0; r < R; ++r) {
            const vec factor = splat(row_scale ? row_scale[r0 + r] : 1.0f);
            for (int c = 0; c < V; ++c) store(Out + (r0 + r) * ldo + c * W, acc[r][c] * factor);
        }
    }
    for (; r0 < rows; ++r0) {
        vec acc[V] = {};
        for (int j = 0; j < cols; ++j)
            for (int c = 0; c < V; ++c) acc[c] += splat(C[r0 * ldc + j]) * load(M + j * ldm + c * W);
        const vec factor = splat(row_scale ? row_scale[r0] : 1.0f);
        for (int c = 0; c < V; ++c) store(Out + r0 * ldo + c * W, acc[c] * factor);
    }
}

// Acc[j][:] += sum_{r < rows} C[r][j] * A[r][:] for j < cols (Acc contiguous rows of D; A rows
// of D floats at lda).
template <int D>
void columns_by_rows(const float* C, int ldc, int rows, int cols, const float* A, long lda, float* Acc) {
    constexpr int R = tile_rows<D>(), V = D / W;
    int j0 = 0;
    for (; j0 + R <= cols; j0 += R) {
        vec acc[R][V];
        for (int t = 0; t < R; ++t)
            for (int c = 0; c < V; ++c) acc[t][c] = load(Acc + (j0 + t) * D + c * W);
        for (int r = 0; r < rows; ++r) {
            vec av[V];
            for (int c = 0; c < V; ++c) av[c] = load(A + r * lda + c * W);
            for (int t = 0; t < R; ++t) {
                vec s = splat(C[r * ldc + j0 + t]);
                for (int c = 0; c < V; ++c) acc[t][c] += s * av[c];
            }
        }
        for (int t = 0; t < R; ++t)
            for (int c = 0; c < V; ++c) store(Acc + (j0 + t) * D + c * W, acc[t][c]);
    }
    for (; j0 < cols; ++j0) {
        vec acc[V];
        for (int c = 0; c < V; ++c) acc[c] = load(Acc + j0 * D + c * W);
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < V; ++c) acc[c] += splat(C[r * ldc + j0]) * load(A + r * lda + c * W);
        for (int c = 0; c < V; ++c) store(Acc + j0 * D + c * W, acc[c]);
    }
}

// Rows [0, n) of X (rows of D at stride ldx), times factor, into a contiguous (n, D) buffer,
// then zero rows up to a multiple of 8.
template <int D>
void copy_rows(const float* X, long ldx, int n, float factor, float* out) {
    for (int i = 0; i < n; ++i)
        for (int c = 0; c < D; c += W) store(out + i * D + c, load(X + i * ldx + c) * splat(factor));
    for (int i = n; i < round_up(n, 8); ++i)
        for (int c = 0; c < D; c += W) store(out + i * D + c, splat(0.0f));
}

// X (n rows of D at stride ldx) transposed into (D, ld) with ld a multiple of 32, zero columns
// from n.
template <int D>
void transpose(const float* X, long ldx, int n, float* out, int ld) {
    for (int j0 = 0; j0 < ld; j0 += W) {
        float block[W][D];
        for (int j = 0; j < W; ++j)
            for (int c = 0; c < D; c += W)
                store(&block[j][c], j0 + j < n ? load(X + (j0 + j) * ldx + c) : splat(0.0f));
        for (int d = 0; d < D; ++d) {
            vec column;
            for (int j = 0; j < W; ++j) column[j] = block[j][d];
            store(out + d * ld + j0, column);
        }
    }
}

// Keys query i of a block sees: i + 1 when causal, all T otherwise.
inline int keys_seen(int i, int T, bool causal) { return causal ? std::min(i + 1, T) : T; }

struct Strides {
    long b, h, t;
};

// A 64-byte aligned scratch buffer of n floats, one per thread.
struct Scratch {
    std::vector<float> storage;
    float* data;
    explicit Scratch(long n) : storage(n + W) {
        data = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
    }
};

// Each row of a block of scores into its exponentials e^(s - max) in place, over the vectors
// holding keys the row sees (the rest of the row zero), with the row's log-sum-exp into lse and
// the reciprocal of its sum into inverse (the output rows are scaled by it, not the exponentials).
void softmax_rows(float* s, int ld, int i0, int rows, int cols, int T, bool causal, float* lse, float* inverse) {
    for (int r = 0; r < rows; ++r) {
        float* row = s + r * ld;
        const int n = keys_seen(i0 + r, T, causal), seen = round_up(n, W);
        for (int j = n; j < seen; ++j) row[j] = NEG_BIG;
        vec m = splat(NEG_BIG);
        for (int j = 0; j < seen; j += W) {
            vec x = load(row + j);
            m = x > m ? x : m;
        }
        const float mx = reduce_max(m);
        vec sum = splat(0.0f);
        for (int j = 0; j < seen; j += W) {
            vec e = exp_nonpositive(load(row + j) - splat(mx));
            store(row + j, e);
            sum += e;
        }
        for (int j = seen; j < cols; j += W) store(row + j, splat(0.0f));
        const float total = reduce_sum(sum);
        inverse[r] = 1.0f / total;
        lse[r] = mx + std::log(total);
    }
}

template <int D>
void forward(const float* q, Strides sq, const float* k, Strides sk, const float* v, Strides sv, float* o,
             Strides so, float* lse, int B, int H, int G, int Q, int T, bool causal, float scale, int threads) {
    const int Tp = round_up(T, 2 * W);
#pragma omp parallel num_threads(threads)
    {
        Scratch qs(BQ * D), kt(long(Tp) * D), s(long(Tp) * BQ), inverse(BQ);
#pragma omp for schedule(static)
        for (long bh = 0; bh < long(B) * H; ++bh) {
            const int b = bh / H, h = bh % H, g = h / (H / G);
            const float* qh = q + b * sq.b + h * sq.h;
            const float* vh = v + b * sv.b + g * sv.h;
            float* oh = o + b * so.b + h * so.h;
            transpose<D>(k + b * sk.b + g * sk.h, sk.t, keys_seen(Q - 1, T, causal), kt.data, Tp);
            for (int i0 = 0; i0 < Q; i0 += BQ) {
                const int rows = std::min(BQ, Q - i0);
                const int cols = round_up(keys_seen(i0 + rows - 1, T, causal), 2 * W);
                copy_rows<D>(qh + i0 * sq.t, sq.t, rows, scale, qs.data);
                rows_by_columns<D>(qs.data, rows, kt.data, Tp, cols, s.data, Tp);
                softmax_rows(s.data, Tp, i0, rows, cols, T, causal, lse + bh * Q + i0, inverse.data);
                rows_by_rows<D>(s.data, Tp, rows, std::min(cols, T), vh, sv.t, oh + i0 * so.t, so.t, inverse.data);
            }
        }
    }
}

// With P the probabilities (recomputed from the scores and the saved log-sum-exp) and O = P V:
// dV = Pᵀ dO, dP = dO Vᵀ, dS = P ∘ (dP − rowsum(dO ∘ O)), dQ = scale · dS K, dK = scale · dSᵀ Q.
// One task per (batch, key head): the query heads that share it add into its dK and dV.
template <int D>
void backward(const float* q, Strides sq, const float* k, Strides sk, const float* v, Strides sv, const float* o,
              Strides so, const float* dout, Strides sd, const float* lse, float* dq, Strides sdq, float* dk,
              Strides sdk, float* dv, Strides sdv, int B, int H, int G, int Q, int T, bool causal, float scale,
              int threads) {
    const int Tp = round_up(T, 2 * W), R = H / G;
    const int keys = keys_seen(Q - 1, T, causal);
#pragma omp parallel num_threads(threads)
    {
        Scratch qs(BQ * D), dout_rows(BQ * D), kt(long(Tp) * D), vt(long(Tp) * D);
        Scratch p(long(Tp) * BQ), dp(long(Tp) * BQ);
        Scratch dk_acc(long(Tp) * D), dv_acc(long(Tp) * D), delta(BQ);
#pragma omp for schedule(static)
        for (long bg = 0; bg < long(B) * G; ++bg) {
            const int b = bg / G, g = bg % G;
            const float* kg = k + b * sk.b + g * sk.h;
            const float* vg = v + b * sv.b + g * sv.h;
            transpose<D>(kg, sk.t, keys, kt.data, Tp);
            transpose<D>(vg, sv.t, keys, vt.data, Tp);
            std::fill(dk_acc.data, dk_acc.data + long(keys) * D, 0.0f);
            std::fill(dv_acc.data, dv_acc.data + long(keys) * D, 0.0f);
            for (int h = g * R; h < (g + 1) * R; ++h) {
                const float* qh = q + b * sq.b + h * sq.h;
                const float* oh = o + b * so.b + h * so.h;
                const float* dh = dout + b * sd.b + h * sd.h;
                const float* lh = lse + (long(b) * H + h) * Q;
                float* dqh = dq + b * sdq.b + h * sdq.h;
                for (int i0 = 0; i0 < Q; i0 += BQ) {
                    const int rows = std::min(BQ, Q - i0);
                    const int cols = round_up(keys_seen(i0 + rows - 1, T, causal), 2 * W);
                    const int valid = std::min(cols, T);
                    copy_rows<D>(qh + i0 * sq.t, sq.t, rows, scale, qs.data);
                    copy_rows<D>(dh + i0 * sd.t, sd.t, rows, 1.0f, dout_rows.data);
                    rows_by_columns<D>(qs.data, rows, kt.data, Tp, cols, p.data, Tp);
                    rows_by_columns<D>(dout_rows.data, rows, vt.data, Tp, cols, dp.data, Tp);
                    for (int r = 0; r < rows; ++r) {
                        const float* orow = oh + (i0 + r) * so.t;
                        vec acc = splat(0.0f);
                        for (int c = 0; c < D; c += W) acc += load(orow + c) * load(dout_rows.data + r * D + c);
                        const vec row_delta = splat(reduce_sum(acc)), row_lse = splat(lh[i0 + r]);
                        const int n = keys_seen(i0 + r, T, causal);
                        float* prow = p.data + r * Tp;
                        float* dprow = dp.data + r * Tp;
                        const int seen = round_up(n, W);
                        for (int j = 0; j < seen; j += W) {
                            vec pr = exp_nonpositive(load(prow + j) - row_lse);
                            if (j + W > n)
                                for (int t = n - j; t < W; ++t) pr[t] = 0.0f;
                            store(prow + j, pr);
                            store(dprow + j, pr * (load(dprow + j) - row_delta) * splat(scale));
                        }
                        for (int j = seen; j < cols; j += W) {
                            store(prow + j, splat(0.0f));
                            store(dprow + j, splat(0.0f));
                        }
                    }
                    columns_by_rows<D>(p.data, Tp, rows, valid, dout_rows.data, D, dv_acc.data);
                    rows_by_rows<D>(dp.data, Tp, rows, valid, kg, sk.t, dqh + i0 * sdq.t, sdq.t);
                    columns_by_rows<D>(dp.data, Tp, rows, valid, qh + i0 * sq.t, sq.t, dk_acc.data);
                }
            }
            float* dkg = dk + b * sdk.b + g * sdk.h;
            float* dvg = dv + b * sdv.b + g * sdv.h;
            for (int j = 0; j < T; ++j)
                for (int c = 0; c < D; c += W) {
                    store(dkg + j * sdk.t + c, j < keys ? load(dk_acc.data + j * D + c) : splat(0.0f));
                    store(dvg + j * sdv.t + c, j < keys ? load(dv_acc.data + j * D + c) : splat(0.0f));
                }
        }
    }
}

}  // namespace

extern "C" {

// Both run on `threads` OpenMP threads (PyTorch's count) and return 0, or 1 for a head width
// without an instance (the caller checks WIDTHS).
int scratchlm_attention_forward(const float* q, long qb, long qh, long qt, const float* k, long kb, long kh,
                                long kt, const float* v, long vb, long vh, long vt, float* o, long ob, long oh,
                                long ot, float* lse, int B, int H, int G, int Q, int T, int D, int causal,
                                float scale, int threads) {
    const Strides sq{qb, qh, qt}, sk{kb, kh, kt}, sv{vb, vh, vt}, so{ob, oh, ot};
    switch (D) {
#define CASE(WIDTH) \
    case WIDTH: forward<WIDTH>(q, sq, k, sk, v, sv, o, so, lse, B, H, G, Q, T, causal, scale, threads); return 0;
        CASE(32) CASE(64) CASE(128)
#undef CASE
        default: return 1;
    }
}

int scratchlm_attention_backward(const float* q, long qb, long qh, long qt, const float* k, long kb, long kh,
                                 long kt, const float* v, long vb, long vh, long vt, const float* o, long ob,
                                 long oh, long ot, const float* dout, long db, long dh, long dt, const float* lse,
                                 float* dq, long dqb, long dqh, long dqt, float* dk, long dkb, long dkh, long dkt,
                                 float* dv, long dvb, long dvh, long dvt, int B, int H, int G, int Q, int T, int D,
                                 int causal, float scale, int threads) {
    const Strides sq{qb, qh, qt}, sk{kb, kh, kt}, sv{vb, vh, vt}, so{ob, oh, ot}, sd{db, dh, dt};
    const Strides sdq{dqb, dqh, dqt}, sdk{dkb, dkh, dkt}, sdv{dvb, dvh, dvt};
    switch (D) {
#define CASE(WIDTH)                                                                                          \
    case WIDTH:                                                                                              \
        backward<WIDTH>(q, sq, k, sk, v, sv, o, so, dout, sd, lse, dq, sdq, dk, sdk, dv, sdv, B, H, G, Q, T, \
                        causal, scale, threads);                                                             \
        return 0;
        CASE(32) CASE(64) CASE(128)
#undef CASE
        default: return 1;
    }
}

}
