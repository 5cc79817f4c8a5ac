/* The drift U-Net's batch-1 forward in plain C (drift_policy/models/cpu_kernel.py builds and calls it).
 *
 * Why: at batch 1 every convolution is a matrix product with 4-16 rows against a weight matrix read once per
 * call (16 MB for the default net), so the call is bound by streaming the weights. BLAS kernels pack the weights
 * for every product and reach a fraction of the memory bandwidth at these shapes; here each weight row is read
 * once, 4 rows at a time, for all time steps, with no packing. The rest (im2col, GroupNorm + Mish + FiLM fused,
 * residual adds) runs in the same call, on a small arena of activations that stays in cache.
 *
 * Activations are time-major: x[t * C + c]. A program is a flat int64 array of ops; pointer operands are
 * indices into the ptrs array (weights, inputs, output and arena buffers), filled by the caller at every call,
 * so the live parameter tensors are read each time.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32), aligned(4)));

enum { OP_CONV = 1, OP_GNMISH = 2, OP_ADD = 3, OP_CONVT = 4, OP_CAT = 5, OP_LINEAR = 6, OP_MISH = 7 };

static inline v8 load8(const float* p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline float hsum8(v8 v) {
    return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}

/* Y[M][N] = X[M][K] . W[N][K]^T (+ b[N]). */
static void gemm_nt(const float* X, int64_t M, int64_t K, const float* W, const float* b, int64_t N, float* Y) {
    const int64_t K8 = K & ~(int64_t)7;
    int64_t o = 0;
    for (; o + 4 <= N; o += 4) {
        const float *w0 = W + o * K, *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
        int64_t t = 0;
        for (; t + 4 <= M; t += 4) {
            const float *x0 = X + t * K, *x1 = x0 + K, *x2 = x1 + K, *x3 = x2 + K;
            v8 a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0};
            v8 a20 = {0}, a21 = {0}, a22 = {0}, a23 = {0}, a30 = {0}, a31 = {0}, a32 = {0}, a33 = {0};
            for (int64_t k = 0; k < K8; k += 8) {
                v8 W0 = load8(w0 + k), W1 = load8(w1 + k), W2 = load8(w2 + k), W3 = load8(w3 + k);
                v8 x = load8(x0 + k);
                a00 += x * W0; a01 += x * W1; a02 += x * W2; a03 += x * W3;
                x = load8(x1 + k);
                a10 += x * W0; a11 += x * W1; a12 += x * W2; a13 += x * W3;
                x = load8(x2 + k);
                a20 += x * W0; a21 += x * W1; a22 += x * W2; a23 += x * W3;
                x = load8(x3 + k);
                a30 += x * W0; a31 += x * W1; a32 += x * W2; a33 += x * W3;
            }
            float s[4][4] = {{hsum8(a00), hsum8(a01), hsum8(a02), hsum8(a03)},
                             {hsum8(a10), hsum8(a11), hsum8(a12), hsum8(a13)},
                             {hsum8(a20), hsum8(a21), hsum8(a22), hsum8(a23)},
                             {hsum8(a30), hsum8(a31), hsum8(a32), hsum8(a33)}};
            const float* xs[4] = {x0, x1, x2, x3};
            const float* ws[4] = {w0, w1, w2, w3};
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) {
                    float r = s[i][j];
                    for (int64_t k = K8; k < K; k++) r += xs[i][k] * ws[j][k];
                    Y[(t + i) * N + o + j] = r + (b ? b[o + j] : 0.0f);
                }
        }
        for (; t < M; t++) {                         /* leftover rows: one at a time */
            const float* x = X + t * K;
            v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
            for (int64_t k = 0; k < K8; k += 8) {
                v8 xv = load8(x + k);
                a0 += xv * load8(w0 + k); a1 += xv * load8(w1 + k); a2 += xv * load8(w2 + k); a3 += xv * load8(w3 + k);
            }
            float s[4] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};
            const float* ws[4] = {w0, w1, w2, w3};
            for (int j = 0; j < 4; j++) {
                float r = s[j];
                for (int64_t k = K8; k < K; k++) r += x[k] * ws[j][k];
                Y[t * N + o + j] = r + (b ? b[o + j] : 0.0f);
            }
        }
    }
    for (; o < N; o++) {                             /* leftover output channels */
        const float* w = W + o * K;
        for (int64_t t = 0; t < M; t++) {
            const float* x = X + t * K;
            v8 a = {0};
            for (int64_t k = 0; k < K8; k += 8) a += load8(x + k) * load8(w + k);
            float r = hsum8(a);
            for (int64_t k = K8; k < K; k++) r += x[k] * w[k];
            Y[t * N + o] = r + (b ? b[o] : 0.0f);
        }
    }
}

/* Conv1d(C_in -> C_out, kernel k, stride s, padding p) of x [T_in][C_in] -> y [T_out][C_out], W [C_out][C_in][k]:
 * im2col in W's (c, j) order, then one gemm_nt. */
static void conv(const float* x, float* y, const float* W, const float* b, int64_t Cin, int64_t Cout, int64_t k,
                 int64_t s, int64_t p, int64_t Tin, int64_t Tout, float* cols) {
    if (k == 1 && s == 1 && p == 0) {
        gemm_nt(x, Tin, Cin, W, b, Cout, y);
        return;
    }
    const int64_t K = Cin * k;
    for (int64_t t = 0; t < Tout; t++) {
        float* row = cols + t * K;
        for (int64_t j = 0; j < k; j++) {
            int64_t ti = t * s + j - p;
            if (ti < 0 || ti >= Tin) {
                for (int64_t c = 0; c < Cin; c++) row[c * k + j] = 0.0f;
            } else {
                const float* xr = x + ti * Cin;
                for (int64_t c = 0; c < Cin; c++) row[c * k + j] = xr[c];
            }
        }
    }
    gemm_nt(cols, Tout, K, W, b, Cout, y);
}

static inline float mish(float v) {
    if (v > 20.0f) return v;                         /* tanh(softplus(v)) is 1 in float */
    float n = expf(v), q = n * (n + 2.0f);           /* tanh(log1p(n)) = q / (q + 2) */
    return v * q / (q + 2.0f);
}

/* In place on x [T][C]: GroupNorm(G groups, eps) with gamma, beta; Mish; then, with film ([2C]: scale, bias),
 * x = scale * x + bias. */
static void gn_mish(float* x, int64_t C, int64_t T, int64_t G, const float* gamma, const float* beta,
                    const float* film, double eps) {
    const int64_t cg = C / G;
    for (int64_t g = 0; g < G; g++) {
        double sum = 0.0, sq = 0.0;
        for (int64_t t = 0; t < T; t++)
            for (int64_t c = g * cg; c < (g + 1) * cg; c++) sum += x[t * C + c];
        const double n = (double)(T * cg), mean = sum / n;
        for (int64_t t = 0; t < T; t++)
            for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
                double d = x[t * C + c] - mean;
                sq += d * d;
            }
        const float rstd = (float)(1.0 / sqrt(sq / n + eps)), m = (float)mean;
        for (int64_t t = 0; t < T; t++)
            for (int64_t c = g * cg; c < (g + 1) * cg; c++) {
                float v = mish((x[t * C + c] - m) * rstd * gamma[c] + beta[c]);
                x[t * C + c] = film ? film[c] * v + film[C + c] : v;
            }
    }
}

/* ConvTranspose1d(C_in -> C_out, kernel 4, stride 2, padding 1) of x [T][C_in] -> y [2T][C_out],
 * W [C_in][C_out][4]: z[t][(o, j)] = sum_c x[t][c] W[c][o][j], each weight row read once; then
 * y[2m] = z[m][o,1] + z[m-1][o,3], y[2m+1] = z[m][o,2] + z[m+1][o,0]. */
static void convt(const float* x, float* y, const float* W, const float* b, int64_t Cin, int64_t Cout, int64_t T,
                  float* z) {
    const int64_t N = Cout * 4, N8 = N & ~(int64_t)7;
    memset(z, 0, sizeof(float) * T * N);
    for (int64_t c = 0; c < Cin; c++) {
        const float* w = W + c * N;
        for (int64_t t = 0; t < T; t++) {
            const float a = x[t * Cin + c];
            float* zr = z + t * N;
            v8 av = {a, a, a, a, a, a, a, a};
            for (int64_t n = 0; n < N8; n += 8) {
                v8 zv = load8(zr + n) + av * load8(w + n);
                memcpy(zr + n, &zv, sizeof zv);
            }
            for (int64_t n = N8; n < N; n++) zr[n] += a * w[n];
        }
    }
    for (int64_t m = 0; m < T; m++)
        for (int64_t o = 0; o < Cout; o++) {
            const float bo = b ? b[o] : 0.0f;
            float e = z[m * N + o * 4 + 1] + (m > 0 ? z[(m - 1) * N + o * 4 + 3] : 0.0f);
            float d = z[m * N + o * 4 + 2] + (m + 1 < T ? z[(m + 1) * N + o * 4 + 0] : 0.0f);
            y[(2 * m) * Cout + o] = e + bo;
            y[(2 * m + 1) * Cout + o] = d + bo;
        }
}

#define P(i) (prog[i] < 0 ? (float*)0 : ptrs[prog[i]])

/* Runs the program; returns 0, or the index of an unknown op. */
int64_t drift_unet_run(const int64_t* prog, int64_t n, float** ptrs, double eps) {
    int64_t i = 0;
    while (i < n) {
        switch (prog[i]) {
        case OP_CONV:   /* in out w b Cin Cout k s p Tin Tout cols */
            conv(P(i + 1), P(i + 2), P(i + 3), P(i + 4), prog[i + 5], prog[i + 6], prog[i + 7], prog[i + 8],
                 prog[i + 9], prog[i + 10], prog[i + 11], P(i + 12));
            i += 13;
            break;
        case OP_GNMISH: /* x C T G gamma beta film */
            gn_mish(P(i + 1), prog[i + 2], prog[i + 3], prog[i + 4], P(i + 5), P(i + 6), P(i + 7), eps);
            i += 8;
            break;
        case OP_ADD: {  /* out a b n */
            float *o = P(i + 1), *a = P(i + 2), *b = P(i + 3);
            for (int64_t k = 0; k < prog[i + 4]; k++) o[k] = a[k] + b[k];
            i += 5;
            break;
        }
        case OP_CONVT:  /* in out w b Cin Cout T z */
            convt(P(i + 1), P(i + 2), P(i + 3), P(i + 4), prog[i + 5], prog[i + 6], prog[i + 7], P(i + 8));
            i += 9;
            break;
        case OP_CAT: {  /* out a Ca b Cb T: out[t] = (a[t], b[t]) */
            float *o = P(i + 1), *a = P(i + 2), *b = P(i + 4);
            const int64_t ca = prog[i + 3], cb = prog[i + 5], T = prog[i + 6];
            for (int64_t t = 0; t < T; t++) {
                memcpy(o + t * (ca + cb), a + t * ca, sizeof(float) * ca);
                memcpy(o + t * (ca + cb) + ca, b + t * cb, sizeof(float) * cb);
            }
            i += 7;
            break;
        }
        case OP_LINEAR: /* in out w b M K N */
            gemm_nt(P(i + 1), prog[i + 5], prog[i + 6], P(i + 3), P(i + 4), prog[i + 7], P(i + 2));
            i += 8;
            break;
        case OP_MISH: { /* in out n */
            float *in = P(i + 1), *o = P(i + 2);
            for (int64_t k = 0; k < prog[i + 3]; k++) o[k] = mish(in[k]);
            i += 4;
            break;
        }
        default:
            return i + 1;
        }
    }
    return 0;
}
