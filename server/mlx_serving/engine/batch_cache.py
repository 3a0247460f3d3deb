"""KV caches whose batch padding the host also knows, so sequences join and leave a batch
without waiting for the device.

mlx-lm's BatchKVCache keeps each row's left padding only as an `mx.array`. Whenever rows
leave the batch (a sequence finishes or is cancelled) or one row's cache is taken out (for the
prefix cache), it reads that array back with `.tolist()`, once per layer: every read waits for
the step in flight and costs a device round trip, a stall of several decode steps for every
running sequence. These subclasses keep the same padding in a Python list beside the array,
updated by the same operations, and read that instead. The device arrays, and so every
attention mask and every token, are exactly what mlx-lm computes. A row taken out is also
copied out at once (see `HostBatchKVCache.extract`).
"""

from typing import cast

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache


class HostBatchKVCache(BatchKVCache):
    def __init__(self, left_padding: list[int]):
        super().__init__(left_padding)
        self.host_left_padding = list(left_padding)
        self._host_right_padding: list[int] | None = None

    @classmethod
    def merge(cls, caches):
        if not any(c.size() for c in caches):
            return cls([0] * len(caches))  # BatchKVCache.merge would make its own class
        return super().merge(caches)

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        super().prepare(left_padding=left_padding, lengths=lengths, right_padding=right_padding)
        if left_padding is not None:
            self.host_left_padding = [
                p + q for p, q in zip(self.host_left_padding, left_padding, strict=True)
            ]
        if right_padding is not None and max(right_padding) > 0:
            self._host_right_padding = list(right_padding)

    def finalize(self):
        super().finalize()
        if self._host_right_padding is not None:
            self.host_left_padding = [
                p + q for p, q in zip(self.host_left_padding, self._host_right_padding, strict=True)
            ]
            self._host_right_padding = None

    @property
    def state(self):
        return BatchKVCache.state.fget(self)

    @state.setter
    def state(self, v):
        BatchKVCache.state.fset(self, v)
        self.host_left_padding = self.left_padding.tolist()
        self._host_right_padding = None

    def filter(self, batch_indices):
        """BatchKVCache.filter, with the shift that drops shared padding decided on the host."""
        padding = [self.host_left_padding[i] for i in batch_indices]
        if self.keys is not None:
            self.keys = self.keys[batch_indices]
            self.values = self.values[batch_indices]
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]
        shift = min(padding)
        if shift > 0:
            if self.keys is not None:
                self.keys = self.keys[..., shift:, :]
                self.values = self.values[..., shift:, :]
            self._idx -= shift
            self.left_padding -= shift
            padding = [p - shift for p in padding]
        self.host_left_padding = padding

    def extend(self, other):
        other_padding = host_left_padding(other)
        if self.keys is None and other.keys is None:
            padded = self.host_left_padding + other_padding
        else:
            longest = max(self._idx, other._idx)
            padded = [p + longest - self._idx for p in self.host_left_padding] + [
                p + longest - other._idx for p in other_padding
            ]
        super().extend(other)
        self.host_left_padding = padded

    def extract(self, idx):
        """One row's cache, copied out now (asynchronously): left lazy, as mlx-lm leaves it,
        the copy would keep the whole batch's buffer of every layer alive for as long as the
        prefix cache keeps the row, and cost the next step a full copy of that buffer."""
        padding = self.host_left_padding[idx]
        cache = HostKVCache()
        cache.keys = mx.contiguous(self.keys[idx : idx + 1, :, padding : self._idx])
        cache.values = mx.contiguous(self.values[idx : idx + 1, :, padding : self._idx])
        cache.offset = cache.keys.shape[2]
        mx.async_eval(cache.keys, cache.values)
        return cache


class HostKVCache(KVCache):
    """One sequence's cache; batched, it becomes a HostBatchKVCache."""

    @classmethod
    def merge(cls, caches):
        return HostBatchKVCache.merge(caches)


def host_left_padding(cache: BatchKVCache) -> list[int]:
    padding = getattr(cache, "host_left_padding", None)
    if padding is not None:
        return list(padding)
    # A 1-D int array: tolist() gives list[int] (its annotation covers every shape and dtype).
    return cast(list[int], cache.left_padding.tolist())


def make_cache(model) -> list:
    """A new sequence's cache: the model's own, with plain KV layers made host-padded ones."""
    return [HostKVCache() if type(c) is KVCache else c for c in make_prompt_cache(model)]
