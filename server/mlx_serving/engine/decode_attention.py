"""One CUDA kernel for a batched decode step's attention, instead of about fifteen graph nodes.

A batch of sequences of different lengths is left-padded in mlx-lm's BatchKVCache, so every
decode step attends under a mask, and MLX's CUDA backend has no fused kernel for a masked
attention: it falls back to scale, two batched matmuls, a select and a softmax, plus the views
around them, in every layer. On a GPU the step is bound by the host dispatching that graph. This
kernel reads the cache's left padding instead of a mask (what the mask says, and all it says,
for a single new query), and writes its output already laid out for the output projection.
It runs where MLX runs on CUDA; everywhere else attention is left to MLX.
"""

import struct

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

HEAD_DIMS = (64, 128, 256)
DTYPES = (mx.float16, mx.bfloat16, mx.float32)

# One block per (query head, sequence): 32 warps take every 32nd key each, keeping an online
# softmax, then combine through shared memory (the layout of MLX's own vector kernel).
SOURCE = """
    constexpr int WARPS = 32;
    constexpr int PER_LANE = D / 32;
    auto block = cg::this_thread_block();
    auto warp = cg::tiled_partition<32>(block);
    const int lane = warp.thread_rank();
    const int w = warp.meta_group_rank();
    const int head = blockIdx.x;
    const int b = blockIdx.z;
    const int kv_head = head / GQA;
    const int length = keys_shape[2];
    const float neg_inf = __int_as_float(0xff800000);
    const float scale_log2 = __int_as_float(SCALE_BITS) * 1.44269504088896341f;

    const T* q = queries + b * queries_strides[0] + head * queries_strides[1] + lane * PER_LANE;
    const T* k = keys + b * keys_strides[0] + kv_head * keys_strides[1] + lane * PER_LANE;
    const T* v = values + b * values_strides[0] + kv_head * values_strides[1] + lane * PER_LANE;

    float qs[PER_LANE], acc[PER_LANE];
    for (int i = 0; i < PER_LANE; i++) {
        qs[i] = scale_log2 * static_cast<float>(q[i]);
        acc[i] = 0.0f;
    }
    float best = neg_inf, total = 0.0f;
    for (int j = left_padding[b] + w; j < length; j += WARPS) {
        const T* kj = k + j * keys_strides[2];
        float score = 0.0f;
        for (int i = 0; i < PER_LANE; i++) {
            score += qs[i] * static_cast<float>(kj[i]);
        }
        score = cg::reduce(warp, score, cg::plus<float>());
        const float top = fmaxf(best, score);
        const float shrink = exp2f(best - top);
        const float weight = exp2f(score - top);
        best = top;
        total = total * shrink + weight;
        const T* vj = v + j * values_strides[2];
        for (int i = 0; i < PER_LANE; i++) {
            acc[i] = acc[i] * shrink + weight * static_cast<float>(vj[i]);
        }
    }

    __shared__ float partial[WARPS][33];
    __shared__ float bests[WARPS];
    __shared__ float totals[WARPS];
    if (lane == 0) {
        bests[w] = best;
        totals[w] = total;
    }
    block.sync();
    const float top = cg::reduce(warp, bests[lane], cg::greater<float>());
    const float rescale = bests[lane] == neg_inf ? 0.0f : exp2f(bests[lane] - top);
    const float norm = cg::reduce(warp, totals[lane] * rescale, cg::plus<float>());

    T* o = out + (b * gridDim.x + head) * D;
    for (int i = 0; i < PER_LANE; i++) {
        partial[lane][w] = acc[i];
        block.sync();
        // Warp w now sums, over the 32 warps, element i of lane w's slice.
        const float sum = cg::reduce(warp, partial[w][lane] * rescale, cg::plus<float>());
        if (lane == 0) {
            o[w * PER_LANE + i] = static_cast<T>(sum / norm);
        }
        block.sync();
    }
"""

_kernel = None


def kernel():
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="mlx_serving_decode_attention",
            input_names=["queries", "keys", "values", "left_padding"],
            output_names=["out"],
            source=SOURCE,
            header="#include <cooperative_groups/reduce.h>\n",
            ensure_row_contiguous=False,
        )
    return _kernel


def applies(queries: mx.array, keys: mx.array, cache) -> bool:
    """A decode step (one query per sequence) over a left-padded batch cache, on CUDA."""
    return (
        queries.shape[2] == 1
        and isinstance(cache, BatchKVCache)
        and cache._right_padding is None
        and queries.shape[-1] in HEAD_DIMS
        and keys.shape[-1] == queries.shape[-1]
        and queries.dtype in DTYPES
        and keys.dtype == queries.dtype
        and on_cuda()
    )


def on_cuda() -> bool:
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def decode_attention(
    queries: mx.array, keys: mx.array, values: mx.array, left_padding: mx.array, scale: float
) -> mx.array:
    """Softmax attention of each sequence's one query over its keys past its left padding.

    queries (B, H, 1, D); keys and values (B, H_kv, S, D), any strides but a unit last one;
    left_padding (B,). Returns (B, 1, H * D), the heads side by side.
    """
    B, H, _, D = queries.shape
    scale_bits = struct.unpack("<i", struct.pack("<f", scale))[0]
    if left_padding.dtype != mx.int32:
        left_padding = left_padding.astype(mx.int32)
    (out,) = kernel()(
        inputs=[queries, keys, values, left_padding],
        template=[
            ("T", queries.dtype),
            ("D", D),
            ("GQA", H // keys.shape[1]),
            ("SCALE_BITS", scale_bits),
        ],
        grid=(H * 1024, 1, B),
        threadgroup=(1024, 1, 1),
        output_shapes=[(B, 1, H * D)],
        output_dtypes=[queries.dtype],
    )
    return out
