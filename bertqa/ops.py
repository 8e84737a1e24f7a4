"""bertqa's C kernels, one by one, on NumPy arrays.

Every function takes float32, C-contiguous arrays (token ids and positions: int64 or int32) and returns new
arrays; nothing is cast silently. A wrong dtype raises TypeError; a wrong rank, shape, an empty or
non-contiguous array raises ValueError naming the argument. The kernels run in C with the GIL released, on
``OMP_NUM_THREADS`` threads (default: all cores), with matrix products in OpenBLAS.

Shapes use the names B (batch), T (sequence length), C (hidden size), NH (heads), HS (head size = C / NH),
V (vocabulary size). ``...`` stands for any leading shape.

Gradients follow the usual convention: ``f_backward(dy, inputs)`` returns d(loss)/d(inputs) given
dy = d(loss)/d(output).
"""
import numpy as np

from ._core import _C

__all__ = [
    "layernorm", "layernorm_backward", "gelu", "gelu_backward", "linear", "linear_backward", "attention",
    "attention_backward", "embedding", "embedding_backward", "dropout", "dropout_backward", "span_loss", "adamw",
    "global_norm", "clip_grad_norm", "set_num_threads", "runtime_info", "set_isa", "attention_rows",
    "attention_rows_backward",
]


def layernorm(x, weight, bias, eps=1e-12):
    """LayerNorm over the last axis, as ``torch.nn.LayerNorm`` (biased variance).

    y = (x - mean) / sqrt(var + eps) * weight + bias

    Args:
        x: [..., C] float32.
        weight, bias: [C] float32.
        eps: added to the variance; BERT checkpoints use 1e-12 (config ``layer_norm_eps``).
    Returns:
        y: [..., C] float32.
    """
    return _C.layernorm(x, weight, bias, eps)


def layernorm_backward(dy, x, weight, eps=1e-12):
    """Gradients of :func:`layernorm` (mean and 1/std are recomputed from x).

    Args:
        dy: [..., C] float32, gradient of the loss with respect to the output.
        x: [..., C] float32, the forward input.
        weight: [C] float32.
    Returns:
        (dx [..., C], dweight [C], dbias [C]), float32.
    """
    return _C.layernorm_backward(dy, x, weight, eps)


def gelu(x):
    """GELU in the exact erf form BERT uses: ``0.5 * x * (1 + erf(x / sqrt(2)))``.

    Args:
        x: float32 array of any shape.
    Returns:
        y: same shape, float32.
    """
    return _C.gelu(x)


def gelu_backward(dy, x):
    """Gradient of :func:`gelu`: ``dx = dy * (Phi(x) + x * phi(x))``.

    Args:
        dy, x: float32 arrays of one shape.
    Returns:
        dx: same shape, float32.
    """
    return _C.gelu_backward(dy, x)


def linear(x, weight, bias=None):
    """Fully connected layer ``y = x @ weight.T + bias``, weight in the Hugging Face ``[out, in]`` layout.

    Args:
        x: [..., in] float32.
        weight: [out, in] float32.
        bias: [out] float32, or None.
    Returns:
        y: [..., out] float32 (one sgemm in OpenBLAS).
    """
    return _C.linear(x, weight, bias)


def linear_backward(dy, x, weight):
    """Gradients of :func:`linear`.

    Args:
        dy: [..., out] float32.
        x: [..., in] float32, the forward input.
        weight: [out, in] float32.
    Returns:
        (dx [..., in] = dy @ weight, dweight [out, in] = dy.T @ x, dbias [out] = dy summed over rows).
    """
    return _C.linear_backward(dy, x, weight)


def attention(q, k, v, mask=None, dropout_p=0.0, seed=0, step=0, tensor_id=0):
    """Multi-head scaled dot-product self-attention with a padding mask, as BERT computes it.

    For every batch row b and head h::

        scores = q[b, h] @ k[b, h].T / sqrt(HS) + (1 - mask[b]) * -10000     # [T, T]
        probs  = softmax(scores, axis=-1)
        out[b, h] = dropout(probs) @ v[b, h]                                   # [T, HS]

    Args:
        q, k, v: [B, NH, T, HS] float32 (split heads before calling: x.reshape(B, T, NH, HS).transpose(0, 2, 1, 3)).
        mask: [B, T] of 0/1 (1 = real token, 0 = padding; bool, int or float), or None for no padding.
            A padded key gets -10000 added to its score, so it takes (almost) no probability.
        dropout_p: dropout on the probabilities (0 = off, as in evaluation). The mask is a pure function of
            (seed, step, tensor_id, element), so :func:`attention_backward` regenerates it.
    Returns:
        out: [B, NH, T, HS] float32.
    """
    return _C.attention(q, k, v, mask, dropout_p, seed, step, tensor_id)


def attention_backward(dout, q, k, v, mask=None, dropout_p=0.0, seed=0, step=0, tensor_id=0):
    """Gradients of :func:`attention` (the probabilities are recomputed; pass the same mask and dropout key).

    Args:
        dout: [B, NH, T, HS] float32.
        q, k, v, mask, dropout_p, seed, step, tensor_id: as given to :func:`attention`.
    Returns:
        (dq, dk, dv), each [B, NH, T, HS] float32.
    """
    return _C.attention_backward(dout, q, k, v, mask, dropout_p, seed, step, tensor_id)


def attention_rows(q, k, v, offsets, mask=None, dropout_p=0.0, seed=0, step=0, window_ids=None, tensor_id=0,
                   positions=None, return_state=False):
    """Attention over packed rows of their own lengths (no padding stored), the fused kernel the engine trains with.

    Row b is tokens ``offsets[b] .. offsets[b+1]-1``; its T_b tokens attend to each other, head by head::

        scores = q[r, h] @ k[r, h].T / sqrt(HS) + (1 - mask[b, :T_b]) * -10000    # r = the row's tokens
        out[r, h] = dropout(softmax(scores)) @ v[r, h]

    Nothing [T, T] is stored: per block of queries, one pass over blocks of keys with a running max and sum; each
    query's max and sum are all that :func:`attention_rows_backward` needs.

    Args:
        q, k, v: [N, NH, HS] float32, N = offsets[-1] (the [N, C] activations of a linear layer, reshaped).
        offsets: [B + 1] integers (an array, list or tuple), 0 = offsets[0] <= offsets[1] <= ... <= offsets[B] = N (empty rows allowed).
        mask: [B, Tpad] of 0/1 with Tpad >= the longest row, or None. Column t of row b is token t of the row; a 0
            before the row's end (a hole) gets -10000 on its score, columns past T_b are not read.
        dropout_p: dropout on the probabilities (0 = off). Element (b, h, i, j) draws the Philox uniform of index
            ((w_b * NH + h) * P + i) * P + j (bq_rng in csrc/bertqa.h), w_b = window_ids[b] (None: b), keyed by
            (seed, step, tensor_id): the engine's numbering, a function of the window and not of the batch.
        positions: P >= the longest row (None: mask.shape[1], or the longest row without a mask).
        return_state: also return state [2, NH, N] float32, what :func:`attention_rows_backward` needs: for
            each head and query, the max of its scores in base-2 units (``max * log2(e)``) and 1 / the softmax
            denominator (the sum of ``exp(score - max)``). Its log-sum-exp is
            ``(state[0] - np.log2(state[1])) * np.log(2)``.
    Returns:
        out [N, NH, HS] float32, or (out, state).
    """
    return _C.attention_rows(q, k, v, _ints(offsets), mask, dropout_p, seed, step, _ints(window_ids), tensor_id,
                             0 if positions is None else positions, return_state)


def attention_rows_backward(dout, q, k, v, out, state, offsets, mask=None, dropout_p=0.0, seed=0, step=0,
                            window_ids=None, tensor_id=0, positions=None):
    """Gradients of :func:`attention_rows`, recomputing the probabilities block by block from ``state`` (and the
    dropout masks from their key) instead of reading stored ones.

    Args:
        dout: [N, NH, HS] float32, the gradient of the loss with respect to out.
        out, state: what ``attention_rows(..., return_state=True)`` returned for these inputs.
        q, k, v, offsets, mask, dropout_p, seed, step, window_ids, tensor_id, positions: as given to it.
    Returns:
        (dq, dk, dv), each [N, NH, HS] float32.
    """
    return _C.attention_rows_backward(dout, q, k, v, out, state, _ints(offsets), mask, dropout_p, seed, step,
                                      _ints(window_ids), tensor_id, 0 if positions is None else positions)


def _ints(a):
    """offsets / window ids given as a list or tuple: an array (its dtype is still checked in C)."""
    return np.asarray(a) if isinstance(a, (list, tuple)) else a


def embedding(input_ids, token_type_ids, word_embeddings, position_embeddings, token_type_embeddings):
    """BERT's input embedding (before its LayerNorm): word + position + token type.

    out[b, t] = word_embeddings[input_ids[b, t]] + position_embeddings[t] + token_type_embeddings[token_type_ids[b, t]]

    Args:
        input_ids: [B, T] int64/int32, each in [0, V).
        token_type_ids: [B, T] int64/int32 (0 = first segment, 1 = second), or None for all 0.
        word_embeddings: [V, C]; position_embeddings: [P, C] with T <= P; token_type_embeddings: [NT, C].
    Returns:
        out: [B, T, C] float32. An id outside its table raises ValueError naming it.
    """
    return _C.embedding(input_ids, token_type_ids, word_embeddings, position_embeddings, token_type_embeddings)


def embedding_backward(dout, input_ids, token_type_ids, vocab_size, max_position_embeddings, type_vocab_size,
                       padding_idx=None):
    """Gradients of :func:`embedding` with respect to its three tables (scatter-add over the tokens).

    Args:
        dout: [B, T, C] float32.
        input_ids, token_type_ids: as given to :func:`embedding`.
        vocab_size, max_position_embeddings, type_vocab_size: the tables' row counts.
        padding_idx: a token id whose word-embedding row gets no gradient (torch's ``padding_idx``; BERT uses
            its pad_token_id, 0), or None.
    Returns:
        (dword [V, C], dposition [P, C], dtype [NT, C]) float32. Repeated ids sum their gradients.
    """
    return _C.embedding_backward(dout, input_ids, token_type_ids, vocab_size, max_position_embeddings,
                                 type_vocab_size, padding_idx)


def dropout(x, p, seed, step=0, tensor_id=0):
    """Inverted dropout: ``y = x * keep / (1 - p)`` with ``keep = uniform >= p``.

    The uniforms come from Philox4x32-10 keyed by ``seed`` with counter (element // 4, tensor_id, step), so the
    same (seed, step, tensor_id) gives the same mask on CPU and GPU, and backward needs no stored mask.

    Args:
        x: float32, any shape. p: drop probability in [0, 1). seed: 64-bit key. step, tensor_id: 32-bit.
    Returns:
        y: same shape, float32.
    """
    return _C.dropout(x, p, seed, step, tensor_id)


def dropout_backward(dy, p, seed, step=0, tensor_id=0):
    """Gradient of :func:`dropout` with the same key: ``dx = dy * keep / (1 - p)``."""
    return _C.dropout_backward(dy, p, seed, step, tensor_id)


def span_loss(start_logits, end_logits, start_positions, end_positions):
    """Question-answering span loss, as Hugging Face ``BertForQuestionAnswering`` computes it.

    Positions are clamped to [0, T]; a position equal to T (outside the sequence) is ignored. The loss is
    ``(CE(start_logits, start_positions) + CE(end_logits, end_positions)) / 2``, each cross-entropy the mean
    over its non-ignored rows (0 when every row is ignored, where torch would give NaN).

    Args:
        start_logits, end_logits: [B, T] float32.
        start_positions, end_positions: [B] int64/int32.
    Returns:
        (loss: float, dstart [B, T], dend [B, T]) with the gradients of the loss with respect to the logits.
    """
    return _C.span_loss(start_logits, end_logits, start_positions, end_positions)


def adamw(param, grad, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, grad_scale=1.0):
    """One AdamW step in place, with ``torch.optim.AdamW`` semantics (decoupled weight decay)::

        g = grad * grad_scale
        param *= 1 - lr * weight_decay
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g**2
        param -= lr / (1 - beta1**step) * m / (sqrt(v) / sqrt(1 - beta2**step) + eps)

    Args:
        param, m, v: float32 arrays of one shape, updated in place (m and v start as zeros).
        grad: float32, the shape of param.
        step: the step number, counting from 1 (it sets the bias correction).
        lr, beta1, beta2, eps, weight_decay: the usual hyperparameters.
        grad_scale: multiplies grad first (global-norm clipping without rewriting the gradient).
    Returns:
        None.
    """
    _C.adamw(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay, grad_scale)


def global_norm(grads):
    """The L2 norm of all the given float32 arrays taken together (summed in double)."""
    return _C.global_norm(list(grads))


def clip_grad_norm(grads, max_norm):
    """Scale the arrays in place so their global L2 norm is at most max_norm, as
    ``torch.nn.utils.clip_grad_norm_`` (coefficient ``max_norm / (norm + 1e-6)``, applied when below 1).

    Returns:
        The global norm before clipping.
    """
    return _C.clip_grad_norm(list(grads), max_norm)


def set_num_threads(n):
    """Threads for the kernels (OpenMP) and the matrix products (OpenBLAS), for calls from any thread of the
    process (not only the calling one, as omp_set_num_threads would)."""
    _C.set_num_threads(n)


def runtime_info():
    """A dict: OpenMP threads, BLAS threads, the BLAS build and the CPU kernel set it chose; ``isa``, the
    instruction set bertqa's own kernels use ('avx2' or 'avx512'), and ``isas``, those this CPU can run."""
    return _C.runtime_info()


def set_isa(name):
    """Run bertqa's own kernels (GELU, LayerNorm, dropout, attention's softmax rows, AdamW) with the 'avx2' or
    'avx512' variants from now on, in every thread; 'auto' is the best this CPU runs (what bertqa picks at import,
    unless the environment sets ``BERTQA_CPU=avx2|avx512|auto``). Returns the name now in use. ValueError for
    another name, RuntimeError for an instruction set this CPU cannot run. The two give the same dropout masks
    and GELU / AdamW results bit for bit, and row sums (LayerNorm, softmax) within a few float32 ulps."""
    return _C.set_isa(name)
