"""The host-padded caches compute exactly what mlx-lm's own do, and never read the device."""

import random

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache, KVCache

from mlx_serving.engine.batch_cache import HostBatchKVCache, HostKVCache, make_cache

HEADS, DIM = 2, 4


def filled(cache_class, length: int, seed: int):
    cache = cache_class()
    if length:
        keys = mx.random.normal((1, HEADS, length, DIM), key=mx.random.key(seed))
        cache.update_and_fetch(keys, keys * 2)
    return cache


def same(host: HostBatchKVCache, stock: BatchKVCache) -> None:
    assert type(host) is HostBatchKVCache
    assert host.host_left_padding == host.left_padding.tolist() == stock.left_padding.tolist()
    assert host._idx == stock._idx
    assert host.offset.tolist() == stock.offset.tolist()
    if stock.keys is None:
        assert host.keys is None
    else:
        assert mx.array_equal(host.keys, stock.keys) and mx.array_equal(host.values, stock.values)


def test_every_batch_operation_matches_mlx_lm_and_keeps_the_padding_on_the_host():
    rng = random.Random(0)
    lengths = [5, 0, 3, 9]
    host = HostKVCache.merge([filled(HostKVCache, n, i) for i, n in enumerate(lengths)])
    stock = KVCache.merge([filled(KVCache, n, i) for i, n in enumerate(lengths)])
    same(host, stock)

    for step in range(40):
        op = rng.choice(["decode", "filter", "extend", "extract"])
        rows = len(stock.left_padding.tolist())
        if op == "decode" or rows < 2:
            keys = mx.random.normal((rows, HEADS, 1, DIM), key=mx.random.key(100 + step))
            host.update_and_fetch(keys, keys)
            stock.update_and_fetch(keys, keys)
        elif op == "filter":
            keep = sorted(rng.sample(range(rows), rng.randint(1, rows - 1)))
            host.filter(keep)
            stock.filter(keep)
        elif op == "extend":
            more = [rng.randint(0, 12) for _ in range(rng.randint(1, 3))]
            host.extend(HostKVCache.merge([filled(HostKVCache, n, step) for n in more]))
            stock.extend(KVCache.merge([filled(KVCache, n, step) for n in more]))
        else:
            row = rng.randrange(rows)
            one, reference = host.extract(row), stock.extract(row)
            assert type(one) is HostKVCache and one.offset == reference.offset
            assert mx.array_equal(one.keys, reference.keys)
        same(host, stock)


def test_right_padded_prefill_is_rolled_the_same_way():
    host, stock = HostBatchKVCache([0, 0, 0]), BatchKVCache([0, 0, 0])
    lengths = [4, 7, 2]
    right = [7 - n for n in lengths]
    for cache in (host, stock):
        cache.prepare(lengths=lengths, right_padding=right)
        keys = mx.random.normal((3, HEADS, 7, DIM), key=mx.random.key(1))
        cache.update_and_fetch(keys, keys)
        cache.finalize()
    same(host, stock)
    assert host.host_left_padding == right


def test_an_empty_merge_is_host_padded_too():
    assert type(HostKVCache.merge([HostKVCache(), HostKVCache()])) is HostBatchKVCache


def test_a_batch_generator_gives_the_same_tokens_with_host_caches(model_path):
    """Sequences joining in groups, finishing at different lengths and being removed: the same
    tokens as with mlx-lm's own caches, and the host's padding always the device's."""
    import mlx_lm

    model, tokenizer = mlx_lm.load(str(model_path))
    prompts = [tokenizer.encode(f"prompt number {i} " * (1 + i % 4)) for i in range(10)]
    max_tokens = [3 + (i * 5) % 11 for i in range(10)]

    def run(cache_factory):
        generator = BatchGenerator(model, completion_batch_size=6, prefill_batch_size=3)
        tokens: dict[int, list[int]] = {}
        by_uid: dict[int, int] = {}
        waiting = list(range(10))
        removed = False
        while waiting or len(generator._generation_batch) or generator._unprocessed_sequences:
            if waiting:
                take, waiting = waiting[:2], waiting[2:]
                uids = generator.insert(
                    [prompts[i] for i in take],
                    max_tokens=[max_tokens[i] for i in take],
                    caches=[cache_factory(model) for _ in take],
                )
                by_uid.update(zip(uids, take, strict=True))
            _, responses = generator.next()
            for r in responses:
                tokens.setdefault(by_uid[r.uid], []).append(r.token)
            for cache in generator._generation_batch.prompt_cache:
                if isinstance(cache, HostBatchKVCache):
                    assert cache.host_left_padding == cache.left_padding.tolist()
            running = generator._generation_batch.uids
            if not removed and len(running) >= 4:
                generator.remove([running[1]], return_prompt_caches=True)
                removed = True
        generator.close()
        return tokens

    stock = run(lambda model: [KVCache() for _ in model.layers])
    host = run(make_cache)
    assert host == stock and len(host) == 10


def test_a_row_taken_out_does_not_keep_the_batch_buffer_alive():
    """mlx-lm's extract leaves the row a lazy slice of the batch's buffer: kept (as the prefix
    cache keeps it) while the batch decodes on, it holds a whole buffer per row taken."""

    def growth(merge, cache_class) -> int:
        mx.synchronize()
        mx.clear_cache()
        before = mx.get_active_memory()
        batch = merge([filled(cache_class, 300, i) for i in range(16)])
        kept = []
        for step in range(12):
            kept.append(batch.extract(step))
            keys = mx.random.normal((16, HEADS, 1, DIM), key=mx.random.key(step))
            batch.update_and_fetch(keys, keys)
            mx.eval(batch.keys, batch.values)
        mx.synchronize()
        grown = mx.get_active_memory() - before
        del batch, kept
        return grown

    stock = growth(KVCache.merge, KVCache)
    host = growth(HostKVCache.merge, HostKVCache)
    assert host * 3 < stock, (host, stock)
