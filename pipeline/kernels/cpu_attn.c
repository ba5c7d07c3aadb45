/* One pass over a layer's attention on the CPU: for each window, head and query row, the scores
 * q.k * scaling over the row's valid keys, their softmax, and from it, while the row is in L1:
 *   - the layer's output row P V (what SDPA would return),
 *   - the row's statistics (kernels/reference.py: row_stats, the same nine columns),
 *   - the row's share of the head-mean map (mean over heads of P),
 *   - the row's probabilities themselves, when a recipe needs every head's map,
 *   - the row's k strongest keys, per head and on the head mean (after every head's share).
 * Each is optional (a NULL pointer, or k = 0); the mean's top keys need the mean.
 *
 * Conventions are those of kernels/reference.py: q (batch, head, query, dim), k and v (batch,
 * kv_head, key, dim), any strides; query head h reads kv head h / (head / kv_head). Window b
 * has lengths[b] real tokens, right padding after them: keys at or past it are masked, and so
 * are (causal) keys after the query's position. Query row i is position offset + i (a block
 * of a long window's queries). Padded query rows still get an output row (over the valid
 * keys, as SDPA computes it) and their probabilities; their statistics are 0.
 *
 * Built once per machine by kernels/cpu.py (cc -O3 -march=native -fopenmp) and
 * called through ctypes; the threads are the process's OpenMP pool, torch's. GCC vector
 * extensions: VF floats per vector, lowered to whatever the CPU has (AVX-512, AVX2, SSE).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define VF 16 /* floats per vector: keys per score tile, dims per output tile */
#define ROWS 4 /* query rows per block: each key tile and value row loaded once for all four */
#define NSTATS 9

typedef float vf __attribute__((vector_size(VF * sizeof(float)), aligned(4)));
typedef int32_t vi __attribute__((vector_size(VF * sizeof(int32_t)), aligned(4)));

#define LOAD(p) (*(const vf *)(p))
#define STORE(p, x) (*(vf *)(p) = (x))

static inline int64_t lo64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t up(int64_t n) { return (n + VF - 1) / VF * VF; }
static inline vf pick(vi m, vf a, vf b) { return (vf)(((vi)a & m) | ((vi)b & ~m)); }
static inline float total(vf x) { float s = 0.f; for (int i = 0; i < VF; i++) s += x[i]; return s; }
static inline float top(vf x) { float m = x[0]; for (int i = 1; i < VF; i++) m = x[i] > m ? x[i] : m; return m; }

/* exp(x) for x <= 0 (a score minus its row's maximum), to about 1 ulp: x = n ln2 + r with
 * |r| <= ln2 / 2, exp(r) by Cephes' degree-6 polynomial, 2^n from the exponent bits. Below -86
 * it returns exp(-86), 4.5e-38, a normal float: no lane ever makes a subnormal (slow on x86)
 * and equal tiny weights stay equal, so ties rank by position as torch's zeros do. Our own, not
 * libm's vector exp, because that needs -ffast-math, whose start-up code would switch the
 * whole process (torch too) to flush subnormals to zero. */
static inline vf vexp(vf x)
{
    const float shift = 12582912.f; /* 1.5 * 2^23: adding it rounds to an integer */
    x = pick(x < -86.f, (vf){0} - 86.f, x);
    vf n = (x * 1.44269504088896341f + shift) - shift;
    vf r = x - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = (vf){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return p * (vf)bits;
}

static inline int any_lane(vi m) { int32_t a = 0; for (int i = 0; i < VF; i++) a |= m[i]; return a != 0; }

/* The `count` largest of x[0..n), descending, ties to the smaller position (reference.row_topk):
 * a sorted insertion, whole vectors below the current last weight skipped (only vectors that lie
 * inside x[0..n) are read as such). Slots past n: weight -1 and position -1. */
static void top_keys(const float *x, int64_t n, int64_t count, float *w, int32_t *at)
{
    int64_t filled = 0;
    for (int64_t j0 = 0; j0 < n; j0 += VF) {
        if (filled == count && j0 + VF <= n && !any_lane(LOAD(x + j0) > w[count - 1])) continue;
        const int64_t end = j0 + VF < n ? j0 + VF : n;
        for (int64_t j = j0; j < end; j++) {
            const float v = x[j];
            if (filled == count && !(v > w[count - 1])) continue;
            int64_t slot = filled < count ? filled++ : count - 1;
            for (; slot > 0 && w[slot - 1] < v; slot--) {
                w[slot] = w[slot - 1];
                at[slot] = at[slot - 1];
            }
            w[slot] = v;
            at[slot] = (int32_t)j;
        }
    }
    for (int64_t slot = filled; slot < count; slot++) {
        w[slot] = -1.f;
        at[slot] = -1;
    }
}

/* Per thread: one kv head's keys transposed (dim x key) and values (key x dim), padded to whole
 * vectors with zeros; a block's scores; the key flags as floats; the block's queries. */
struct scratch { float *kt, *vb, *s, *flag, *qv; };

static int scratch_alloc(struct scratch *w, int64_t kp, int64_t dp)
{
    w->kt = aligned_alloc(64, sizeof(float) * dp * kp);
    w->vb = aligned_alloc(64, sizeof(float) * kp * dp);
    w->s = aligned_alloc(64, sizeof(float) * ROWS * kp);
    w->flag = aligned_alloc(64, sizeof(float) * 4 * kp);
    w->qv = aligned_alloc(64, sizeof(float) * ROWS * dp);
    return w->kt && w->vb && w->s && w->flag && w->qv;
}

static void scratch_free(struct scratch *w)
{
    free(w->kt); free(w->vb); free(w->s); free(w->flag); free(w->qv);
}

/* Returns 0, or 1 when scratch memory could not be allocated (nothing is then complete). */
int attnpipe_attention_rows(
    const float *q, const int64_t *qs, const float *k, const int64_t *ks, const float *v, const int64_t *vs,
    int64_t batch, int64_t heads, int64_t kv_heads, int64_t nq, int64_t nk, int64_t dim,
    const int64_t *lengths, int causal, int64_t offset, float scaling,
    const uint8_t *flags, int64_t flag_stride,
    float *out, const int64_t *os, float *stats, float *mean, float *probs,
    int64_t k_head, float *top_w, int32_t *top_at, int64_t k_mean, float *mean_w, int32_t *mean_at)
{
    const int64_t rep = heads / kv_heads, kp = up(nk), dp = up(dim);
    const int threads = omp_get_max_threads();
    /* Work items: a window's rows, split when there are too few windows to keep every thread busy. */
    int64_t chunk = nq;
    if (batch < 4 * threads) {
        chunk = (nq * batch + 4 * threads - 1) / (4 * threads);
        chunk = chunk < 16 ? 16 : chunk;
    }
    chunk = (chunk + ROWS - 1) / ROWS * ROWS;
    const int64_t per = (nq + chunk - 1) / chunk, items = batch * per;
    vi lane;
    for (int i = 0; i < VF; i++) lane[i] = i;
    int failed = 0;

    #pragma omp parallel reduction(| : failed)
    {
        struct scratch w;
        int ok = scratch_alloc(&w, kp, dp);
        failed |= !ok;
        float *fsep = w.flag, *fspecial = w.flag + kp, *fpunct = w.flag + 2 * kp, *fpos = w.flag + 3 * kp;

        #pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < items; item++) {
            if (!ok) continue;
            const int64_t b = item / per, r0 = (item % per) * chunk, r1 = lo64(r0 + chunk, nq);
            const int64_t length = lengths[b], keys = lo64(length, nk);
            /* the keys any row of this item sees */
            const int64_t seen = causal ? lo64(offset + r1, keys) : keys, seenp = up(seen);
            for (int64_t j = 0; j < seenp; j++) {
                uint8_t f = (flags && j < seen) ? flags[b * flag_stride + j] : 0;
                fspecial[j] = (f & 1) ? 1.f : 0.f;
                fsep[j] = (f & 2) ? 1.f : 0.f;
                fpunct[j] = (f & 4) ? 1.f : 0.f;
                fpos[j] = (float)j;
            }
            if (mean) memset(mean + (b * nq + r0) * nk, 0, sizeof(float) * (r1 - r0) * nk);
            for (int64_t g = 0; g < kv_heads; g++) {
                const float *kg = k + b * ks[0] + g * ks[1], *vg = v ? v + b * vs[0] + g * vs[1] : 0;
                for (int64_t d = 0; d < dim; d++) {
                    float *row = w.kt + d * kp;
                    for (int64_t j = 0; j < seen; j++) row[j] = kg[j * ks[2] + d * ks[3]];
                    for (int64_t j = seen; j < seenp; j++) row[j] = 0.f;
                }
                if (out) {
                    for (int64_t j = 0; j < seen; j++) {
                        float *row = w.vb + j * dp;
                        for (int64_t d = 0; d < dim; d++) row[d] = vg[j * vs[2] + d * vs[3]];
                        for (int64_t d = dim; d < dp; d++) row[d] = 0.f;
                    }
                }
                for (int64_t h = g * rep; h < (g + 1) * rep; h++) {
                    for (int64_t i0 = r0; i0 < r1; i0 += ROWS) {
                        const int rows = (int)lo64(ROWS, r1 - i0);
                        int64_t n[ROWS], widest = 0;
                        for (int r = 0; r < ROWS; r++) {
                            const int64_t pos = offset + i0 + r;
                            n[r] = r < rows ? (causal ? lo64(pos + 1, keys) : keys) : 0;
                            n[r] = n[r] < 0 ? 0 : n[r];
                            widest = n[r] > widest ? n[r] : widest;
                            const float *qi = q + b * qs[0] + h * qs[1] + (r < rows ? i0 + r : i0) * qs[2];
                            for (int64_t d = 0; d < dim; d++) w.qv[r * dp + d] = qi[d * qs[3]] * scaling;
                        }
                        const int64_t width = up(widest);
                        /* scores: a tile of VF keys for the block's four rows, summed over dim */
                        for (int64_t j0 = 0; j0 < width; j0 += VF) {
                            vf a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                            for (int64_t d = 0; d < dim; d++) {
                                vf kv = LOAD(w.kt + d * kp + j0);
                                a0 += w.qv[d] * kv;
                                a1 += w.qv[dp + d] * kv;
                                a2 += w.qv[2 * dp + d] * kv;
                                a3 += w.qv[3 * dp + d] * kv;
                            }
                            STORE(w.s + j0, a0);
                            STORE(w.s + kp + j0, a1);
                            STORE(w.s + 2 * kp + j0, a2);
                            STORE(w.s + 3 * kp + j0, a3);
                        }
                        /* softmax of each row over its n keys, zeros past them; entropy as
                         * log Z - sum p (s - max), both terms >= 0 */
                        float log_z[ROWS], spread[ROWS];
                        for (int r = 0; r < ROWS; r++) {
                            float *s = w.s + r * kp;
                            const int64_t nr = n[r];
                            if (nr == 0) {
                                for (int64_t j = 0; j < width; j += VF) STORE(s + j, (vf){0});
                                log_z[r] = spread[r] = 0.f;
                                continue;
                            }
                            vf mv = (vf){0} - 3.4e38f;
                            for (int64_t j = 0; j < width; j += VF) {
                                vf x = pick((lane + (int32_t)j) < (int32_t)nr, LOAD(s + j), mv);
                                mv = pick(x > mv, x, mv);
                            }
                            const float peak = top(mv);
                            vf z = {0}, sp = {0};
                            for (int64_t j = 0; j < width; j += VF) {
                                vi in = (lane + (int32_t)j) < (int32_t)nr;
                                vf x = pick(in, LOAD(s + j) - peak, (vf){0});
                                vf e = pick(in, vexp(x), (vf){0});
                                STORE(s + j, e);
                                z += e;
                                sp += e * x;
                            }
                            const float zs = total(z), inv = 1.f / zs;
                            for (int64_t j = 0; j < width; j += VF) STORE(s + j, LOAD(s + j) * inv);
                            log_z[r] = logf(zs);
                            spread[r] = total(sp) * inv;
                        }
                        for (int r = 0; r < rows; r++) {
                            const int64_t i = i0 + r, pos = offset + i, nr = n[r];
                            const float *p = w.s + r * kp;
                            const int real = pos < length && nr > 0;
                            if (stats) {
                                float *st = stats + ((b * heads + h) * nq + i) * NSTATS;
                                if (real) {
                                    vf sep = {0}, special = {0}, punct = {0}, dist = {0};
                                    const float at = (float)pos;
                                    for (int64_t j = 0; j < width; j += VF) {
                                        vf pj = LOAD(p + j), gap = at - LOAD(fpos + j);
                                        gap = pick(gap < 0, -gap, gap);
                                        sep += pj * LOAD(fsep + j);
                                        special += pj * LOAD(fspecial + j);
                                        punct += pj * LOAD(fpunct + j);
                                        dist += pj * gap;
                                    }
                                    const float entropy = log_z[r] - spread[r];
                                    st[0] = entropy > 0.f ? entropy : 0.f;
                                    st[1] = p[0];
                                    st[2] = total(sep);
                                    st[3] = total(special);
                                    st[4] = pos < nr ? p[pos] : 0.f;
                                    st[5] = pos >= 1 && pos - 1 < nr ? p[pos - 1] : 0.f;
                                    st[6] = pos + 1 < nr ? p[pos + 1] : 0.f;
                                    st[7] = total(punct);
                                    st[8] = total(dist);
                                } else {
                                    memset(st, 0, NSTATS * sizeof(float));
                                }
                            }
                            if (mean && nr > 0) {
                                float *mr = mean + (b * nq + i) * nk;
                                const float share = 1.f / (float)heads;
                                for (int64_t j = 0; j < nr; j++) mr[j] += p[j] * share;
                            }
                            if (probs) {
                                float *pr = probs + ((b * heads + h) * nq + i) * nk;
                                memcpy(pr, p, nr * sizeof(float));
                                if (nr < nk) memset(pr + nr, 0, (nk - nr) * sizeof(float));
                            }
                            if (k_head) {
                                const int64_t slot = ((b * heads + h) * nq + i) * k_head;
                                top_keys(p, real ? nr : 0, k_head, top_w + slot, top_at + slot);
                            }
                        }
                        if (out) {
                            /* P V: a tile of VF dims for the block's four rows, summed over keys */
                            for (int64_t d0 = 0; d0 < dp; d0 += VF) {
                                vf acc[ROWS] = {{0}};
                                for (int64_t j = 0; j < widest; j++) {
                                    vf vr = LOAD(w.vb + j * dp + d0);
                                    acc[0] += w.s[j] * vr;
                                    acc[1] += w.s[kp + j] * vr;
                                    acc[2] += w.s[2 * kp + j] * vr;
                                    acc[3] += w.s[3 * kp + j] * vr;
                                }
                                const int64_t count = lo64(VF, dim - d0);
                                for (int r = 0; r < rows; r++) {
                                    float *o = out + b * os[0] + (i0 + r) * os[1] + h * os[2] + d0;
                                    if (n[r] == 0) memset(o, 0, count * sizeof(float));
                                    else memcpy(o, &acc[r], count * sizeof(float));
                                }
                            }
                        }
                    }
                }
            }
            /* every head has added its share to these rows' mean: its top keys */
            for (int64_t i = r0; i < r1 && k_mean; i++) {
                const int64_t pos = offset + i, n = causal ? lo64(pos + 1, keys) : keys;
                const int64_t slot = (b * nq + i) * k_mean;
                top_keys(mean + (b * nq + i) * nk, pos < length && n > 0 ? n : 0, k_mean, mean_w + slot,
                         mean_at + slot);
            }
        }
        scratch_free(&w);
    }
    return failed ? 1 : 0;
}
