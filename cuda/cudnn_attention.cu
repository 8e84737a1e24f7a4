/* Attention through cuDNN's fused scaled-dot-product attention (the cuDNN graph API, written with NVIDIA's
 * header-only cudnn-frontend), bf16 only: the engine's default attention on the GPU in bf16, with attention.cu's own
 * kernels as the fallback for whatever this path does not take (fp32, masks with holes, T = 1, a shape cuDNN
 * refuses, a machine without a usable cuDNN).
 *
 *   O = softmax(Q K^T / sqrt(HS), keys past the row's length left out) V, dropout on the probabilities;
 *   Stats [B,NH,T,1] fp32 (the softmax's log-sum-exp per query row) for the backward.
 *
 * Layouts: Q, K, V, O, dO, dQ, dK, dV are the engine's [N, C] row-major buffers (N = B*T), read as [B,NH,T,HS] with
 * strides (T*C, HS, C, 1): no head split or merge. The padding mask is each row's key length (seq_len_kv: the
 * engine's row length, its last real token + 1, all T for an all-padding row, which is what the own kernel's -10000
 * mask gives up to fp32 rounding); every query row is computed (seq_len_q = T), as the own kernel does.
 *
 * Dropout: cuDNN draws its own Philox stream from (seed, offset) device scalars; it is not the engine's keyed mask
 * (common.cuh), so CPU/GPU parity with attention dropout holds on the own kernel only. The seed given here is the
 * engine's seed mixed with the step and the dropout site (model.cu), so each layer and step draws its own stream, and
 * the backward regenerates the forward's mask from the same seed.
 *
 * The backward is cuDNN's deterministic algorithm: the engine's gradients are bit-identical run to run.
 *
 * Graphs are built once per (B, T, NH, HS, dropout probability, training, direction) and cached (CUDNN_GRAPHS at
 * most, oldest out first); a shape cuDNN refuses is remembered with its reason and goes to the own kernel from then on.
 *
 * Compiled in full only where the build found cuDNN and the frontend headers (BERTQA_HAVE_CUDNN, setup.py);
 * otherwise every entry point says so and the engine keeps its own kernels. No C++ exception leaves this file.
 */
#include "kernels.cuh"

#include <cmath>
#include <cstdio>
#include <cstring>   /* before cudnn_frontend.h, whose shim uses std::strlen without including it */

#ifdef BERTQA_HAVE_CUDNN
#include <cudnn.h>
#include <cudnn_frontend.h>

#include <list>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <unordered_map>

namespace fe = cudnn_frontend;

namespace {

enum : int64_t { UID_Q = 1, UID_K, UID_V, UID_O, UID_STATS, UID_DO, UID_DQ, UID_DK, UID_DV, UID_SEQ_Q, UID_SEQ_KV,
                 UID_SEED, UID_OFFSET };
constexpr size_t CUDNN_GRAPHS = 64;

/* B, T, NH, HS, dropout probability in millionths, training (forward keeps Stats), backward */
using graph_key = std::tuple<int, int, int, int, long, int, int>;

struct cached {
    std::shared_ptr<fe::graph::Graph> graph;
    int64_t workspace = 0;
};

}  // namespace

struct bq_cudnn {
    cudnnHandle_t handle = nullptr;
    std::map<graph_key, cached> graphs;
    std::list<graph_key> order;                   /* insertion order, for eviction */
    std::map<graph_key, std::string> refused;     /* shapes cuDNN did not take, with its reason */
    void *workspace = nullptr;
    size_t workspace_bytes = 0;
    int64_t *rng = nullptr;                       /* device [2]: Philox seed, offset */
    int *seq_q = nullptr;                         /* device [seq_q_cap]: T in every entry */
    int seq_q_cap = 0, seq_q_T = -1;
    std::string why;                              /* the last refusal, for attention_used() */
};

namespace {

using tensor_t = std::shared_ptr<fe::graph::Tensor_attributes>;

tensor_t bthd(fe::graph::Graph &g, const char *name, int64_t uid, int B, int T, int NH, int HS) {
    const int64_t C = (int64_t)NH * HS;
    return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim({B, NH, T, HS})
                        .set_stride({(int64_t)T * C, HS, C, 1}));
}

void set_bthd(const tensor_t &t, int64_t uid, int B, int T, int NH, int HS) {
    const int64_t C = (int64_t)NH * HS;
    t->set_output(true).set_uid(uid).set_dim({B, NH, T, HS}).set_stride({(int64_t)T * C, HS, C, 1});
}

tensor_t per_row(fe::graph::Graph &g, const char *name, int64_t uid, int B, fe::DataType_t type) {
    return g.tensor(fe::graph::Tensor_attributes().set_name(name).set_uid(uid).set_dim({B, 1, 1, 1})
                        .set_stride({1, 1, 1, 1}).set_data_type(type));
}

/* "" for success, else the frontend's message (never empty) */
std::string fe_message(fe::error_object e) {
    if (e.is_good()) return std::string();
    std::string m = e.get_message();
    return m.empty() ? "cudnn-frontend error " + std::to_string((int)e.get_code()) : m;
}

/* The graph of one key into *out: "" on success, else cuDNN's reason. */
std::string build_graph(bq_cudnn *c, const graph_key &key, cached *out) {
    const int B = std::get<0>(key), T = std::get<1>(key), NH = std::get<2>(key), HS = std::get<3>(key);
    const float p = (float)std::get<4>(key) * 1e-6f;
    const bool training = std::get<5>(key), backward = std::get<6>(key);
    const float scale = 1.0f / std::sqrt((float)HS);
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(fe::DataType_t::BFLOAT16)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    auto Q = bthd(*g, "Q", UID_Q, B, T, NH, HS), K = bthd(*g, "K", UID_K, B, T, NH, HS),
         V = bthd(*g, "V", UID_V, B, T, NH, HS);
    auto seq_q = per_row(*g, "seq_q", UID_SEQ_Q, B, fe::DataType_t::INT32);
    auto seq_kv = per_row(*g, "seq_kv", UID_SEQ_KV, B, fe::DataType_t::INT32);
    tensor_t seed, offset;
    if (p > 0) {
        seed = per_row(*g, "seed", UID_SEED, 1, fe::DataType_t::INT64);
        offset = per_row(*g, "offset", UID_OFFSET, 1, fe::DataType_t::INT64);
    }
    if (!backward) {
        auto opt = fe::graph::SDPA_attributes().set_name("bertqa_sdpa").set_generate_stats(training)
                       .set_attn_scale(scale).set_padding_mask(true).set_seq_len_q(seq_q).set_seq_len_kv(seq_kv);
        if (p > 0) opt.set_dropout(p, seed, offset);
        auto [O, stats] = g->sdpa(Q, K, V, opt);
        set_bthd(O, UID_O, B, T, NH, HS);
        if (training) {
            if (!stats) return "cuDNN gave no Stats output for a training forward";
            stats->set_output(true).set_uid(UID_STATS).set_data_type(fe::DataType_t::FLOAT)
                .set_dim({B, NH, T, 1}).set_stride({(int64_t)NH * T, T, 1, 1});   /* as the backward reads it */
        }
    } else {
        auto O = bthd(*g, "O", UID_O, B, T, NH, HS), dO = bthd(*g, "dO", UID_DO, B, T, NH, HS);
        auto stats = g->tensor(fe::graph::Tensor_attributes().set_name("stats").set_uid(UID_STATS)
                                   .set_dim({B, NH, T, 1}).set_stride({(int64_t)NH * T, T, 1, 1})
                                   .set_data_type(fe::DataType_t::FLOAT));
        /* deterministic: the engine's results are bit-identical run to run (no atomics in dQ) */
        auto opt = fe::graph::SDPA_backward_attributes().set_name("bertqa_sdpa_backward").set_attn_scale(scale)
                       .set_padding_mask(true).set_seq_len_q(seq_q).set_seq_len_kv(seq_kv)
                       .set_deterministic_algorithm(true);
        if (p > 0) opt.set_dropout(p, seed, offset);
        auto [dQ, dK, dV] = g->sdpa_backward(Q, K, V, O, dO, stats, opt);
        set_bthd(dQ, UID_DQ, B, T, NH, HS);
        set_bthd(dK, UID_DK, B, T, NH, HS);
        set_bthd(dV, UID_DV, B, T, NH, HS);
    }
    std::string why = fe_message(g->validate());
    if (why.empty()) why = fe_message(g->build_operation_graph(c->handle));
    if (why.empty()) why = fe_message(g->create_execution_plans({fe::HeurMode_t::A}));
    if (why.empty()) why = fe_message(g->check_support(c->handle));
    if (why.empty()) why = fe_message(g->build_plans(c->handle));
    int64_t ws = 0;
    if (why.empty()) why = fe_message(g->get_workspace_size(ws));
    if (!why.empty()) return why;
    out->graph = g;
    out->workspace = ws;
    return std::string();
}

/* The cached graph of key, built on first use; nullptr with c->why set when cuDNN refuses it. */
const cached *graph_for(bq_cudnn *c, const graph_key &key) {
    auto hit = c->graphs.find(key);
    if (hit != c->graphs.end()) return &hit->second;
    auto no = c->refused.find(key);
    if (no != c->refused.end()) {
        c->why = no->second;
        return nullptr;
    }
    cached made;
    std::string why;
    try {
        why = build_graph(c, key, &made);
    } catch (const std::exception &ex) {
        why = std::string("cudnn-frontend threw: ") + ex.what();
    } catch (...) {
        why = "cudnn-frontend threw";
    }
    if (!why.empty()) {
        char shape[160];
        snprintf(shape, sizeof shape, "%s B=%d T=%d NH=%d HS=%d: ", std::get<6>(key) ? "backward" : "forward",
                 std::get<0>(key), std::get<1>(key), std::get<2>(key), std::get<3>(key));
        c->why = shape + why;
        c->refused[key] = c->why;
        return nullptr;
    }
    if (c->graphs.size() >= CUDNN_GRAPHS) {
        c->graphs.erase(c->order.front());
        c->order.pop_front();
    }
    c->order.push_back(key);
    return &(c->graphs[key] = made);
}

__global__ void fill_int_kernel(int *p, int v, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) p[i] = v;
}

int ensure_workspace(bq_cudnn *c, cudaStream_t s, int64_t bytes) {
    if ((size_t)bytes <= c->workspace_bytes) return BQ_OK;
    CUDA_TRY(cudaStreamSynchronize(s));
    if (c->workspace) CUDA_TRY(cudaFree(c->workspace));
    c->workspace = nullptr;
    c->workspace_bytes = 0;
    cudaError_t e = cudaMalloc(&c->workspace, (size_t)bytes);
    if (e != cudaSuccess) {
        cudaGetLastError();
        c->workspace = nullptr;
        return bq_cuda_fail(e == cudaErrorMemoryAllocation ? BQ_ERR_NOMEM : BQ_ERR_CUDA,
                            "cudaMalloc(cuDNN workspace, %lld bytes) failed: %s", (long long)bytes,
                            cudaGetErrorString(e));
    }
    c->workspace_bytes = (size_t)bytes;
    return BQ_OK;
}

/* seq_q (all T, B entries) and the Philox pair on the device, in stream order */
int stage_inputs(bq_cudnn *c, cudaStream_t s, int B, int T, float p, uint64_t seed) {
    if (B > c->seq_q_cap) {
        CUDA_TRY(cudaStreamSynchronize(s));
        if (c->seq_q) CUDA_TRY(cudaFree(c->seq_q));
        c->seq_q = nullptr;
        c->seq_q_cap = 0;
        CUDA_TRY(cudaMalloc(&c->seq_q, sizeof(int) * (size_t)B));
        c->seq_q_cap = B;
        c->seq_q_T = -1;
    }
    if (c->seq_q_T != T) {
        fill_int_kernel<<<ceil_div((size_t)c->seq_q_cap, 256), 256, 0, s>>>(c->seq_q, T, c->seq_q_cap);
        LAUNCH_CHECK("fill_int_kernel");
        c->seq_q_T = T;
    }
    if (p > 0) {
        /* a pageable copy: returns once the two values are staged, so the host array may go */
        const int64_t host[2] = {(int64_t)(seed & 0x7fffffffffffffffULL), 0};
        CUDA_TRY(cudaMemcpyAsync(c->rng, host, sizeof host, cudaMemcpyHostToDevice, s));
    }
    return BQ_OK;
}

graph_key key_of(int B, int T, int NH, int HS, float p, int training, int backward) {
    return graph_key(B, T, NH, HS, std::lround((double)p * 1e6), training, backward);
}

int run(bq_cudnn *c, cudaStream_t s, const cached *gr, std::unordered_map<int64_t, void *> &pack, float p) {
    if (p > 0) {
        pack[UID_SEED] = c->rng;
        pack[UID_OFFSET] = c->rng + 1;
    }
    TRY(ensure_workspace(c, s, gr->workspace));
    cudnnStatus_t cs = cudnnSetStream(c->handle, s);
    if (cs != CUDNN_STATUS_SUCCESS) return bq_cuda_fail(BQ_ERR_CUDA, "cudnnSetStream: %s", cudnnGetErrorString(cs));
    std::string why;
    try {
        why = fe_message(gr->graph->execute(c->handle, pack, c->workspace));
    } catch (const std::exception &ex) {
        why = std::string("cudnn-frontend threw: ") + ex.what();
    } catch (...) {
        why = "cudnn-frontend threw";
    }
    if (!why.empty()) return bq_cuda_fail(BQ_ERR_CUDA, "cuDNN attention failed: %s", why.c_str());
    return BQ_OK;
}

}  // namespace

int bq_cudnn_create(bq_cudnn **out, char *why, size_t n) {
    *out = nullptr;
    bq_cudnn *c = nullptr;
    try {
        c = new bq_cudnn();
    } catch (...) {
        snprintf(why, n, "out of host memory");
        return 0;
    }
    cudnnStatus_t cs = cudnnCreate(&c->handle);
    if (cs != CUDNN_STATUS_SUCCESS) {
        snprintf(why, n, "cudnnCreate failed: %s (cuDNN %zu in use, built against %d.%d.%d)",
                 cudnnGetErrorString(cs), cudnnGetVersion(), CUDNN_MAJOR, CUDNN_MINOR, CUDNN_PATCHLEVEL);
        c->handle = nullptr;
        bq_cudnn_destroy(c);
        return 0;
    }
    if (cudaMalloc(&c->rng, 2 * sizeof(int64_t)) != cudaSuccess) {
        cudaGetLastError();
        c->rng = nullptr;
        snprintf(why, n, "cudaMalloc of the cuDNN dropout seed failed");
        bq_cudnn_destroy(c);
        return 0;
    }
    *out = c;
    return 1;
}

void bq_cudnn_destroy(bq_cudnn *c) {
    if (!c) return;
    if (c->handle) cudnnDestroy(c->handle);
    if (c->workspace) cudaFree(c->workspace);
    if (c->rng) cudaFree(c->rng);
    if (c->seq_q) cudaFree(c->seq_q);
    delete c;
}

int bq_cudnn_prepare(bq_cudnn *c, int B, int T, int NH, int HS, float p, int training) {
    if (!graph_for(c, key_of(B, T, NH, HS, p, training, 0))) return 0;
    if (training && !graph_for(c, key_of(B, T, NH, HS, p, training, 1))) return 0;
    return 1;
}

const char *bq_cudnn_why(const bq_cudnn *c) { return c ? c->why.c_str() : "no cuDNN handle"; }

size_t bq_cudnn_version(void) { return cudnnGetVersion(); }

int bq_cudnn_forward(bq_cudnn *c, cudaStream_t s, bf16 *o, float *stats, const bf16 *q, const bf16 *k,
                     const bf16 *v, const int *seq_kv, int B, int T, int NH, int HS, float p, uint64_t seed,
                     int training) {
    const cached *gr = graph_for(c, key_of(B, T, NH, HS, p, training, 0));
    if (!gr) return bq_cuda_fail(BQ_ERR_ARG, "cuDNN attention refused %s", c->why.c_str());
    TRY(stage_inputs(c, s, B, T, p, seed));
    std::unordered_map<int64_t, void *> pack = {
        {UID_Q, (void *)q}, {UID_K, (void *)k}, {UID_V, (void *)v}, {UID_O, o},
        {UID_SEQ_Q, c->seq_q}, {UID_SEQ_KV, (void *)seq_kv}};
    if (training) pack[UID_STATS] = stats;
    return run(c, s, gr, pack, p);
}

int bq_cudnn_backward(bq_cudnn *c, cudaStream_t s, bf16 *dq, bf16 *dk, bf16 *dv, const bf16 *dout, const bf16 *o,
                      const float *stats, const bf16 *q, const bf16 *k, const bf16 *v, const int *seq_kv, int B,
                      int T, int NH, int HS, float p, uint64_t seed) {
    const cached *gr = graph_for(c, key_of(B, T, NH, HS, p, 1, 1));
    if (!gr) return bq_cuda_fail(BQ_ERR_ARG, "cuDNN attention refused %s", c->why.c_str());
    TRY(stage_inputs(c, s, B, T, p, seed));
    std::unordered_map<int64_t, void *> pack = {
        {UID_Q, (void *)q}, {UID_K, (void *)k}, {UID_V, (void *)v}, {UID_O, (void *)o}, {UID_DO, (void *)dout},
        {UID_STATS, (void *)stats}, {UID_DQ, dq}, {UID_DK, dk}, {UID_DV, dv},
        {UID_SEQ_Q, c->seq_q}, {UID_SEQ_KV, (void *)seq_kv}};
    return run(c, s, gr, pack, p);
}

#else  /* built without cuDNN */

struct bq_cudnn {};

int bq_cudnn_create(bq_cudnn **out, char *why, size_t n) {
    *out = nullptr;
    snprintf(why, n, "bertqa._cuda was built without cuDNN (no cudnn.h / libcudnn or no cudnn-frontend headers at "
                     "build time; see setup.py)");
    return 0;
}
void bq_cudnn_destroy(bq_cudnn *c) { (void)c; }
int bq_cudnn_prepare(bq_cudnn *, int, int, int, int, float, int) { return 0; }
const char *bq_cudnn_why(const bq_cudnn *) { return "bertqa._cuda was built without cuDNN"; }
size_t bq_cudnn_version(void) { return 0; }
int bq_cudnn_forward(bq_cudnn *, cudaStream_t, bf16 *, float *, const bf16 *, const bf16 *, const bf16 *, const int *,
                     int, int, int, int, float, uint64_t, int) {
    return bq_cuda_fail(BQ_ERR_ARG, "bertqa._cuda was built without cuDNN");
}
int bq_cudnn_backward(bq_cudnn *, cudaStream_t, bf16 *, bf16 *, bf16 *, const bf16 *, const bf16 *, const float *,
                      const bf16 *, const bf16 *, const bf16 *, const int *, int, int, int, int, float, uint64_t) {
    return bq_cuda_fail(BQ_ERR_ARG, "bertqa._cuda was built without cuDNN");
}

#endif
