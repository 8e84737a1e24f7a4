/* Span loss of BertForQuestionAnswering: mean of the start and end cross-entropies. */
#include <math.h>
#include "bertqa.h"

/* Cross-entropy of rows [B,T] against targets, mean over non-ignored rows (target == T is ignored,
 * targets clamped to [0, T] first, exactly as Hugging Face does). Writes d(mean CE)/d(logits) * scale. */
static double cross_entropy(float *dlogits, const float *logits, const int64_t *pos, int B, int T, float scale) {
    int n_valid = 0;
    for (int b = 0; b < B; b++) {
        int64_t p = pos[b] < 0 ? 0 : (pos[b] > T ? T : pos[b]);
        n_valid += p != T;
    }
    double total = 0.0;
    for (int b = 0; b < B; b++) {
        const float *x = logits + (long)b * T;
        int64_t p = pos[b] < 0 ? 0 : (pos[b] > T ? T : pos[b]);
        if (p == T) {
            if (dlogits) for (int t = 0; t < T; t++) dlogits[(long)b * T + t] = 0.0f;
            continue;
        }
        double mx = x[0];
        for (int t = 1; t < T; t++) mx = x[t] > mx ? x[t] : mx;
        double sum = 0.0;
        for (int t = 0; t < T; t++) sum += exp(x[t] - mx);
        double lse = mx + log(sum);
        total += lse - x[p];
        if (dlogits) {
            double g = (double)scale / n_valid;
            for (int t = 0; t < T; t++)
                dlogits[(long)b * T + t] = (float)(g * (exp(x[t] - lse) - (t == p)));
        }
    }
    return n_valid ? total / n_valid : 0.0;
}

float span_loss(float *dstart, float *dend, const float *start_logits, const float *end_logits,
                const int64_t *start_pos, const int64_t *end_pos, int B, int T, float grad_scale) {
    double ls = cross_entropy(dstart, start_logits, start_pos, B, T, 0.5f * grad_scale);
    double le = cross_entropy(dend, end_logits, end_pos, B, T, 0.5f * grad_scale);
    return (float)(0.5 * (ls + le));
}

/* Over rows of their own lengths (the engine's packed rows): the softmax of row b runs over its T_b = off[b+1] -
 * off[b] real tokens only. Targets are clamped to [0, T] (T the padded width) and T is ignored, as above; a target
 * at or after the row's end (a padded position, where no answer can be) is ignored too. */
static double cross_entropy_rows(float *dlogits, const float *logits, const int64_t *pos, int B, const int *off,
                                 int T, float scale) {
    int n_valid = 0;
    for (int b = 0; b < B; b++) {
        const int64_t p = pos[b] < 0 ? 0 : (pos[b] > T ? T : pos[b]);
        n_valid += p < off[b + 1] - off[b];
    }
    double total = 0.0;
    for (int b = 0; b < B; b++) {
        const int L = off[b + 1] - off[b];
        const float *x = logits + off[b];
        float *d = dlogits ? dlogits + off[b] : NULL;
        const int64_t p = pos[b] < 0 ? 0 : (pos[b] > T ? T : pos[b]);
        if (p >= L || L == 0) {
            if (d) for (int t = 0; t < L; t++) d[t] = 0.0f;
            continue;
        }
        double mx = x[0];
        for (int t = 1; t < L; t++) mx = x[t] > mx ? x[t] : mx;
        double sum = 0.0;
        for (int t = 0; t < L; t++) sum += exp(x[t] - mx);
        const double lse = mx + log(sum);
        total += lse - x[p];
        if (d) {
            const double g = (double)scale / n_valid;
            for (int t = 0; t < L; t++) d[t] = (float)(g * (exp(x[t] - lse) - (t == p)));
        }
    }
    return n_valid ? total / n_valid : 0.0;
}

float span_loss_rows(float *dstart, float *dend, const float *start_logits, const float *end_logits,
                     const int64_t *start_pos, const int64_t *end_pos, int B, const int *off, int T, float grad_scale) {
    double ls = cross_entropy_rows(dstart, start_logits, start_pos, B, off, T, 0.5f * grad_scale);
    double le = cross_entropy_rows(dend, end_logits, end_pos, B, off, T, 0.5f * grad_scale);
    return (float)(0.5 * (ls + le));
}
