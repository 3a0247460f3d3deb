"""The engine's knobs, validated once by the server and frozen from then on."""

import ctypes.util
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EngineConfig:
    # Most sequences decoded together per model (mlx-lm's completion_batch_size); 0: derived
    # at each model's load from the memory its KV caches may take (see capacity.py).
    max_batch_size: int = 0
    # The KV-cache bytes a model's running sequences may reserve together (each its prompt
    # plus max_tokens); past it, arrivals wait. 0: kv_memory_fraction of the memory free at
    # the model's load.
    max_kv_bytes: int = 0
    # The share of free memory (less the weights) a model's KV caches may take when
    # max_kv_bytes is 0; the rest covers batch padding, activations and the prefix cache.
    kv_memory_fraction: float = 0.5
    # The tokens a typical sequence holds (prompt and reply), which a derived batch size is
    # sized for; no more than the model's context.
    capacity_context_tokens: int = 2048
    # Requests allowed to wait for a batch slot; beyond them new requests are refused.
    max_queued_requests: int = 256
    # Most prompts prefilled together per model.
    prefill_batch_size: int = 8
    # Prompt tokens processed per prefill step, so a long prompt does not stall decoding.
    prefill_step_size: int = 512
    # When idle, wait this long for more arrivals before the first step, to batch them.
    coalesce_seconds: float = 0.002
    # While a batch runs, the longest an arrival waits for others to share its prefill.
    prefill_gather_seconds: float = 0.005
    # Llama/Qwen q/k/v and gate/up projections run as one matmul each: fewer kernel launches
    # per decode step, the same dot products.
    fuse_projections: bool = True
    # On CUDA and the CPU, a fused model's decode attention runs as one native kernel of ours
    # rather than MLX's masked fallback (see decode_attention.py).
    decode_attention_kernel: bool = True
    # Sampled rows draw their tokens in one fused call per step (bias, penalties, top-k/p,
    # min-p, seeded randomness), the native kernel where built, else its pure-MLX twin; off:
    # mlx-lm's sampler and logits processors per row (see fused_batch.py).
    fused_sampler: bool = True
    # The compiled extension's kernels (native/) where built for the device; off: their pure-MLX
    # twins (the same results), to measure what the extension is worth.
    native_kernels: bool = True
    # On CUDA, whether prefill attention is cuDNN's fused kernel (MLX's default). cuDNN builds a
    # graph for each new shape, and each new prompt length is one: 60 ms to 900 ms before the
    # first token of every sequence prefilled with it, against 10 to 20 ms for MLX's own.
    cudnn_prefill_attention: bool = False
    # Prefill chunks padded to a few fixed lengths, each compiled at a model's load before it
    # serves, so that no new prompt length stalls a batch to compile (prefill.py): on, off, or
    # auto (on where shapes cost compiles: GPUs).
    prefill_buckets: str = "auto"
    # While sequences decode, a step prefills the longest chunk whose measured time fits this
    # minus 1 times the p99 of decode-only steps, so running streams' p99 inter-token latency
    # while a prompt prefills stays near this multiple of their steady p99; a chunk may always
    # take twice the shortest one's time, so a large fixed cost per prefill pass never shrinks
    # chunks to a crawl (prefill.PrefillPacer). 0 (default): prefill_step_size tokens a step.
    # Off by default: paced at 3, an 8,000-token prompt slowed 16 streams on an H200 to 6.5x their
    # steady p99 (5.8x unpaced) and took 1.36 s to its first token (0.47 s); on the 2-core CPU a
    # 1,500-token prompt slowed 4 streams to 5-6x (its join, and passes dearer with the context).
    prefill_pacing: float = 0.0
    # KV-cache bytes kept for prefix reuse, counting the caches of the running batch.
    prefix_cache_bytes: int = 2 << 30
    # Most cached prefixes kept, whatever their size.
    prefix_cache_entries: int = 64
    # Seconds a shutdown waits for in-flight generations before cancelling them.
    shutdown_grace_seconds: float = 10.0
    # What a refused request is told to wait before retrying.
    retry_after_seconds: float = 1.0
    # An engine process that shows no progress for this long (a batch step, a command, or an
    # idle wait that never wakes) is wedged: it is declared dead.
    wedge_timeout_seconds: float = 30.0
    # The context a model is given when its config states none: prompt plus generation.
    default_context_length: int = 8192
    # Threads that tokenize prompts and serve Tokenize and Detokenize.
    tokenizer_threads: int = 2
    # Processes that render chat templates, and how long one rendering may take.
    chat_template_workers: int = 1
    chat_template_timeout_seconds: float = 5.0
    # Tokenize and Detokenize calls served at once; more are refused (retry later).
    max_concurrent_tokenize: int = 4
    # The longest text Tokenize accepts.
    max_tokenize_bytes: int = 1 << 20
    # The largest constraint (schema, regex, grammar, choices) a request may give.
    max_constraint_bytes: int = 64 << 10
    # Per-request limits (0: none beyond the model's context): prompt tokens, max_tokens,
    # prompt + n x max_tokens, stop strings.
    max_prompt_tokens: int = 0
    max_generation_tokens: int = 131072
    max_request_tokens: int = 0
    max_stop_strings: int = 16
    # A dead or wedged engine process is restarted this many times in a row, the first after
    # engine_restart_backoff_seconds, doubling; then the server exits.
    max_engine_restarts: int = 3
    engine_restart_backoff_seconds: float = 1.0
    # The engine process allocates with jemalloc where the system has it (see JEMALLOC_CONF).
    jemalloc: bool = True


# glibc's malloc raises its mmap threshold each time a large block is freed, up to 32 MiB, so
# the engine's ever-changing buffers (batches, KV caches, prompts) come to live in its heap
# arenas, which fragment: under a 64-stream soak the engine's RSS doubled in 10 minutes while
# MLX's own count of live and cached bytes stayed flat. A fixed threshold keeps large buffers
# in mmaps the system gets back when they are freed (RSS stayed within 200-260 MiB instead of
# climbing past 450 MiB in two minutes). Read by glibc at the process's start.
MALLOC_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "131072"}


# glibc's heap still fragments under that threshold: a 64-stream soak grew the engine by ~15 MiB
# a minute (malloc_trim every few seconds included) while jemalloc's heap profile of the same
# run showed live bytes flat. With jemalloc returning freed pages promptly, the engine's RSS
# stayed flat at the same speed (docs/RELIABILITY.md). Preloaded into the engine process only.
# Freed pages go back after a second; returning them at once as well as on a background thread
# (decay 0 with background_thread) stalled a slow reader's stream in tests (slow_readers.py).
JEMALLOC_CONF = "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"


def allocator_environment(config: EngineConfig) -> dict[str, str]:
    """LD_PRELOAD (ahead of any already set) and MALLOC_CONF for jemalloc, if it is wanted and
    installed (Debian: libjemalloc2); else nothing, and glibc with MALLOC_ENVIRONMENT."""
    library = ctypes.util.find_library("jemalloc") if config.jemalloc else None
    if library is None:
        return {}
    preload = os.environ.get("LD_PRELOAD", "")
    if library in preload.split(":"):
        return {}
    return {
        "LD_PRELOAD": f"{library}:{preload}" if preload else library,
        "MALLOC_CONF": os.environ.get("MALLOC_CONF", JEMALLOC_CONF),
    }


def mlx_environment(config: EngineConfig) -> dict[str, str]:
    """What MLX (and the C library under it) reads from the engine process's environment."""
    cudnn = "1" if config.cudnn_prefill_attention else "0"
    native = {} if config.native_kernels else {"MLX_SERVING_NATIVE": "0"}
    return {"MLX_CUDA_USE_CUDNN_SDPA": cudnn, **native, **MALLOC_ENVIRONMENT}
