"""The four servicers: convert → engine → convert, nothing else.

Requests are validated and engine errors mapped to statuses by the interceptor (interceptor.py).
Streams are written with `context.write` from coroutines, so a client cancel or an expired
deadline lands inside the handler, where `finally` closes the engine's stream at once.
"""

import asyncio
import logging
import time
from collections import OrderedDict

import protovalidate

from mlx_serving.engine.engine import Engine
from mlx_serving.engine.events import Event
from mlx_serving.engine.models import ModelSource
from mlx_serving.engine.requests import GenerationRequest
from mlx_serving.v1 import events_service_pb2 as events_pb
from mlx_serving.v1 import events_service_pb2_grpc as events_grpc
from mlx_serving.v1 import generate_service_pb2 as generate_pb
from mlx_serving.v1 import generate_service_pb2_grpc as generate_grpc
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import model_service_pb2_grpc as model_grpc
from mlx_serving.v1 import tokenize_service_pb2 as tokenize_pb
from mlx_serving.v1 import tokenize_service_pb2_grpc as tokenize_grpc

from . import convert, tracing
from .interceptor import current_request_id, describe

log = logging.getLogger(__name__)

# Events whose encoding is kept for the subscribers still to send them.
ENCODED_EVENTS = 4096


class ModelService(model_grpc.ModelServiceServicer):
    """Loads and unloads are logged, one line each: what the server holds changes only here (and
    at startup), and an operator reading the log must be able to tell when and why."""

    def __init__(self, engine: Engine):
        self._engine = engine

    async def LoadModel(self, request: model_pb.LoadModelRequest, context):
        source = convert.model_source(request.source)
        model_id = request.model_id or source.default_model_id()
        where = self.source_text(source)
        started = time.monotonic()
        try:
            info = await self._engine.load_model(
                source,
                request.model_id,
                requested=True,
                draft_model_id=request.draft_model_id,
                draft_tokens=request.draft_tokens if request.HasField("draft_tokens") else None,
                draft_source=convert.model_source(request.draft_source)
                if request.HasField("draft_source")
                else None,
            )
        except asyncio.CancelledError:
            # The engine does not stop a load its caller gave up on: the model appears later.
            log.info("LoadModel %s from %s: the caller left; loading goes on", model_id, where)
            raise
        except Exception as exc:
            seconds = time.monotonic() - started
            log.warning(
                "LoadModel %s from %s failed after %.1f s: %s", model_id, where, seconds, exc
            )
            raise
        seconds = time.monotonic() - started
        log.info("loaded model %s from %s in %.1f s", info.model_id, where, seconds)
        return model_pb.LoadModelResponse(model=convert.model_pb_from_info(info))

    async def UnloadModel(self, request: model_pb.UnloadModelRequest, context):
        started = time.monotonic()
        try:
            await self._engine.unload_model(request.model_id, requested=True)
        except Exception as exc:
            log.warning("UnloadModel %s failed: %s", request.model_id, exc)
            raise
        seconds = time.monotonic() - started
        log.info("unloaded model %s in %.1f s", request.model_id, seconds)
        return model_pb.UnloadModelResponse()

    @staticmethod
    def source_text(source: ModelSource) -> str:
        """A local path as is, a repository as `--model` spells it: hf:ORG/NAME[@REV]."""
        if source.local_path:
            return source.local_path
        return f"hf:{source.repo_id}" + (f"@{source.revision}" if source.revision else "")

    async def ListModels(self, request: model_pb.ListModelsRequest, context):
        models = [convert.model_pb_from_info(info) for info in self._engine.list_models()]
        return model_pb.ListModelsResponse(models=models)

    async def GetModel(self, request: model_pb.GetModelRequest, context):
        info = self._engine.get_model(request.model_id)
        return model_pb.GetModelResponse(model=convert.model_pb_from_info(info))


class GenerateService(generate_grpc.GenerateServiceServicer):
    def __init__(self, engine: Engine):
        self._engine = engine

    async def Generate(self, request: generate_pb.GenerateRequest, context) -> None:
        request_id, client_request_id = current_request_id(), request.client_request_id
        tracing.set_client_request_id(client_request_id)
        chunks = self._engine.generate(convert.generation_request(request, request_id))
        try:
            async for chunk in chunks:
                if chunk.usage is not None:  # a sample's last chunk: its phases, as spans
                    tracing.record_generation(
                        request.model_id, chunk.finish_reason, chunk.usage, request_id
                    )
                await context.write(convert.generate_response(chunk, request_id, client_request_id))
        finally:
            await chunks.aclose()


class TokenizeService(tokenize_grpc.TokenizeServiceServicer):
    def __init__(self, engine: Engine):
        self._engine = engine

    async def Tokenize(self, request: tokenize_pb.TokenizeRequest, context):
        texts, field = convert.tokenize_texts(request)
        results = await self._engine.tokenize(
            request.model_id, texts, field, convert.tokenize_options(request)
        )
        return convert.tokenize_response(results, several=field == "texts")

    async def Detokenize(self, request: tokenize_pb.DetokenizeRequest, context):
        text = await self._engine.detokenize(
            request.model_id, list(request.token_ids), request.skip_special_tokens
        )
        return tokenize_pb.DetokenizeResponse(text=text)

    async def RenderChatTemplate(self, request: tokenize_pb.RenderChatTemplateRequest, context):
        chat = GenerationRequest(
            model_id=request.model_id,
            messages=convert.chat_messages(request.chat),
            **convert.chat_options(request.chat),
        )
        text, ids = await self._engine.render_chat(chat)
        return tokenize_pb.RenderChatTemplateResponse(text=text, token_ids=ids)


class EventsService(events_grpc.EventsServiceServicer):
    """Streams engine events, each encoded and validated once whatever the subscribers."""

    def __init__(self, engine: Engine):
        self._engine = engine
        self.invalid_events = 0
        # The messages of the latest events by id(event), each with its event (which keeps the
        # id from being reused): every subscriber of an event gets the one message.
        self._encoded: OrderedDict[int, tuple[Event, events_pb.Event | None]] = OrderedDict()

    def _encode(self, event: Event) -> events_pb.Event | None:
        cached = self._encoded.get(id(event))
        if cached is not None and cached[0] is event:
            return cached[1]
        message = self._validated(event)
        self._encoded[id(event)] = (event, message)
        if len(self._encoded) > ENCODED_EVENTS:
            self._encoded.popitem(last=False)
        return message

    def _validated(self, event: Event) -> events_pb.Event | None:
        """An event breaking the contract's rules is a bug: logged, counted, never sent."""
        message = convert.event_pb(event)
        if violations := protovalidate.collect_violations(message):
            self.invalid_events += 1
            problems = "; ".join(": ".join(describe(v)) for v in violations)
            log.error("dropped an invalid %s event: %s", message.WhichOneof("payload"), problems)
            return None
        return message

    async def Subscribe(self, request: events_pb.SubscribeRequest, context) -> None:
        kinds, model_ids = convert.event_filter(request)
        events = self._engine.subscribe(kinds, model_ids)
        try:
            async for event in events:
                if (message := self._encode(event)) is None:
                    continue
                response = events_pb.SubscribeResponse(event=message, dropped_events=events.dropped)
                await context.write(response)
        finally:
            await events.aclose()
