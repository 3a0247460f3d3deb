"""Backends that run in this process: stock mlx-lm, and our engine without the wire.

Every backend is an async context manager with a `name`, `run_level(prompts, concurrency,
max_tokens)` returning (results, wall seconds), `server_pids()` (the processes that serve
it apart from this one, whose CPU time is the server's) and `report_exit()`.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

from mlx_serving.engine.config import EngineConfig

from .client import Prompt, RequestResult, closed_loop, describe_error, generator_closed_loop

STOCK, ENGINE = "stock", "engine"
MODEL_ID = "bench"


def stock_generator(model, config: EngineConfig):
    """mlx-lm's BatchGenerator with mlx-lm's own KV caches, and the engine's batch sizes: the
    same batching, none of our code."""
    from mlx_lm.generate import BatchGenerator

    from mlx_serving.engine.capacity import model_capacity

    # max_batch_size 0: what the engine would derive (its context read from the config there;
    # both are capped by capacity_context_tokens, so the same for any real model).
    return BatchGenerator(
        model,
        stop_tokens=None,
        completion_batch_size=model_capacity(model, 0, config).batch_size,
        prefill_batch_size=config.prefill_batch_size,
        prefill_step_size=config.prefill_step_size,
    )


class StockBackend:
    """What a user would otherwise run: BatchGenerator on the model exactly as `mlx_lm.load`
    returns it (no fused projections, no decode attention kernel, MLX's own defaults)."""

    name = STOCK

    def __init__(self, model: Path, config: EngineConfig):
        self.model_path = model
        self.config = config

    async def __aenter__(self) -> StockBackend:
        from mlx_lm import load

        self.model, _ = load(str(self.model_path))
        return self

    async def __aexit__(self, *exc) -> None:
        del self.model

    def server_pids(self) -> list[int]:
        return []

    def report_exit(self) -> None:
        pass

    async def run_level(self, prompts, concurrency, max_tokens):
        """Blocks the event loop: nothing else runs meanwhile (MLX streams are per thread)."""
        generator = stock_generator(self.model, self.config)
        try:
            return generator_closed_loop(generator, prompts, concurrency, max_tokens)
        finally:
            generator.close()


class EngineBackend:
    """Our engine facade (its process, its asyncio hand-off) with asyncio callers: no gRPC.
    A diagnostic: against stock it is the engine's cost, against mlx_serving the wire's."""

    name = ENGINE

    def __init__(self, model: Path, config: EngineConfig):
        self.model_path = model
        self.config = config

    async def __aenter__(self) -> EngineBackend:
        from mlx_serving.engine.engine import Engine
        from mlx_serving.engine.models import ModelSource

        self.engine = Engine(self.config)
        await self.engine.start()
        try:
            await self.engine.load_model(ModelSource(local_path=str(self.model_path)), MODEL_ID)
        except BaseException:
            await self.engine.shutdown()
            raise
        return self

    async def __aexit__(self, *exc) -> None:
        await self.engine.shutdown()

    def server_pids(self) -> list[int]:
        """The engine's processes: those multiprocessing started (servers are not among them)."""
        return [child.pid for child in multiprocessing.active_children()]

    def report_exit(self) -> None:
        pass

    async def run_level(self, prompts, concurrency, max_tokens):
        return await closed_loop(self.generate, prompts, concurrency, max_tokens)

    async def generate(self, prompt: Prompt, max_tokens: int) -> RequestResult:
        return await engine_generate(self.engine, prompt.ids, max_tokens)


async def engine_generate(engine, token_ids: list[int], max_tokens: int, **fields) -> RequestResult:
    """One request (greedy unless `fields` has a sampling), EOS ignored, as the engine's chunks
    reach this caller; `fields` are more GenerationRequest fields (such as a constraint)."""
    from mlx_serving.engine.requests import GenerationRequest, SamplingParams

    fields.setdefault("sampling", SamplingParams(temperature=0.0))
    request = GenerationRequest(
        model_id=MODEL_ID,
        token_ids=tuple(token_ids),
        max_tokens=max_tokens,
        ignore_eos=True,
        **fields,
    )
    result = RequestResult(start=time.perf_counter(), prompt_tokens=len(token_ids))
    try:
        async for chunk in engine.generate(request):
            result.arrived(len(chunk.token_ids), time.perf_counter())
            if chunk.usage is not None:
                result.engine_ttft = chunk.usage.time_to_first_token
                result.engine_tok_s = chunk.usage.tokens_per_second
    except Exception as exc:
        result.error = describe_error(exc)
    return result
