/* BERT embeddings: word + position + token type. (LayerNorm and dropout follow as their own kernels.) */
#include "bertqa.h"

static int check_ids(const int64_t *ids, const int64_t *types, int B, int T, int V, int P, int NT) {
    if (T > P) return BQ_ERR_INDEX;
    for (long i = 0; i < (long)B * T; i++) {
        if (ids[i] < 0 || ids[i] >= V) return BQ_ERR_INDEX;
        if (types && (types[i] < 0 || types[i] >= NT)) return BQ_ERR_INDEX;
    }
    return BQ_OK;
}

int embedding_forward(float *out, const int64_t *ids, const int64_t *types, const float *wte,
                      const float *wpe, const float *wtt, int B, int T, int C, int V, int P, int NT) {
    int st = check_ids(ids, types, B, T, V, P, NT);
    if (st != BQ_OK) return st;
#pragma omp parallel for schedule(static) if ((long)B * T * C > 65536) num_threads(bq_num_threads())
    for (long bt = 0; bt < (long)B * T; bt++) {
        const int t = (int)(bt % T);
        const float *w = wte + ids[bt] * C;          /* [C] */
        const float *p = wpe + (long)t * C;          /* [C] */
        const float *y = wtt + (types ? types[bt] : 0) * C;
        float *o = out + bt * C;
        for (int c = 0; c < C; c++) o[c] = w[c] + p[c] + y[c];
    }
    return BQ_OK;
}

int embedding_backward(float *dwte, float *dwpe, float *dwtt, const float *dout, const int64_t *ids,
                       const int64_t *types, int B, int T, int C, int V, int P, int NT, int64_t pad_id) {
    int st = check_ids(ids, types, B, T, V, P, NT);
    if (st != BQ_OK) return st;
    /* Threads own disjoint channel ranges, so the scatter-add needs no atomics and sums in a fixed order. */
    const int CH = 64;
    const int nchunks = (C + CH - 1) / CH;
#pragma omp parallel for schedule(static) if ((long)B * T * C > 65536) num_threads(bq_num_threads())
    for (int chunk = 0; chunk < nchunks; chunk++) {
        const int c0 = chunk * CH, c1 = c0 + CH < C ? c0 + CH : C;
        for (long bt = 0; bt < (long)B * T; bt++) {
            const float *g = dout + bt * C;
            if (dwte && ids[bt] != pad_id) { float *d = dwte + ids[bt] * C; for (int c = c0; c < c1; c++) d[c] += g[c]; }
            if (dwpe) { float *d = dwpe + (bt % T) * C; for (int c = c0; c < c1; c++) d[c] += g[c]; }
            if (dwtt) { float *d = dwtt + (types ? types[bt] : 0) * C; for (int c = c0; c < c1; c++) d[c] += g[c]; }
        }
    }
    return BQ_OK;
}
