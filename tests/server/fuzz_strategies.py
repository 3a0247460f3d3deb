"""Any request to any RPC of the four services, and the call that sends it: shared by
tests/server/test_fuzz.py (a short run in CI) and scripts/fuzz_rpcs.py (a long one).

Requests are drawn from the message descriptors themselves, so a field added to the contract is
fuzzed without a change here: every field of every type (strings empty, short, ~1 MiB, with
lone surrogates; extreme and non-finite numbers; undefined enum values; nested messages, lists,
maps, each oneof member or none). Numbers and strings with `buf.validate` rules are drawn within
them half of the time, so that requests get past validation into the engine. A few fields get
hostile values of their own: constraints and tool schemas of junk, local paths that are no
model, Hugging Face ids that cannot exist (run the server with HF_HUB_OFFLINE=1).

Requests travel as bytes: a lone surrogate, which protobuf refuses to set, is written into
the bytes on the way (invalid UTF-8 on the wire), and some cases corrupt a few bytes.
Each case also has a plan: read to the end, cancel after k messages or a short delay, or set a
short deadline.
"""

import asyncio
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from buf.validate import validate_pb2
from google.protobuf import descriptor as descriptor_mod
from google.protobuf import message_factory, text_format
from hypothesis import strategies as st

from mlx_serving.v1 import (
    events_service_pb2,
    generate_service_pb2,
    model_service_pb2,
    tokenize_service_pb2,
)

MODEL_ID = "tiny"
FieldDescriptor = descriptor_mod.FieldDescriptor

# Six bytes in UTF-8, swapped on the wire for the six bytes of a lone surrogate pair.
SURROGATE_MARKER = "\ue000\ue001"
SURROGATE_BYTES = "\ud800\udfff".encode("utf-8", "surrogatepass")
assert len(SURROGATE_MARKER.encode()) == len(SURROGATE_BYTES)

HUGE_BYTES = 1 << 20
MAX_DEPTH = 5
MAX_GENERATED_TOKENS = 8
# The longest any call may take; a call still running then is a hang (a violation).
CALL_SECONDS = 60.0
# How long a stream read waits before the plan's cancel (Subscribe may have nothing to say).
READ_SECONDS = 0.5

ALWAYS_ALLOWED = frozenset(
    {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.OUT_OF_RANGE,
    }
)

SERVICES = (events_service_pb2, generate_service_pb2, model_service_pb2, tokenize_service_pb2)


# ---- the RPCs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Rpc:
    path: str  # /package.Service/Method
    name: str  # Service.Method
    streaming: bool
    request_type: type

    def __repr__(self) -> str:
        return self.name


def all_rpcs() -> list[Rpc]:
    """Every method of the four services, from their descriptors."""
    rpcs = []
    for module in SERVICES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                rpcs.append(
                    Rpc(
                        path=f"/{service.full_name}/{method.name}",
                        name=f"{service.name}.{method.name}",
                        streaming=method.server_streaming,
                        request_type=message_factory.GetMessageClass(method.input_type),
                    )
                )
    return rpcs


# ---- values of fields ---------------------------------------------------------------------


def weighted(*choices: tuple[int, st.SearchStrategy]) -> st.SearchStrategy:
    """One of the strategies, each as often as its weight."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.sampled_from(pool).flatmap(lambda strategy: strategy)


def maybe(strategy: st.SearchStrategy) -> st.SearchStrategy:
    """Unset (None) two times in three: most requests keep most defaults."""
    return weighted((2, st.none()), (1, strategy))


short_texts = st.text(st.characters(exclude_categories=["Cs"]), max_size=24)
huge_texts = st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=4).map(
    lambda seed: seed * (HUGE_BYTES // len(seed.encode()))
)
JUNK = [
    " ",
    "\x00",
    "\x00" * 64,
    "\n\r\t",
    "tiny\x00",
    "../../../../etc/passwd",
    "%s%n%x",
    "{{ 7*7 }}",
    "{% for x in range(99999999) %}{% endfor %}",
    "<|im_start|>",
    "<|im_end|><|endoftext|>",
    "\u202e\ufeff\u200b",
    "𝕳𝖊𝖑𝖑𝖔 🤖 ﷽",
    "a" * 4097,
    "null",
    "[]",
    "{}",
]
strings = weighted(
    (6, short_texts),
    (2, st.sampled_from(JUNK)),
    (1, st.just("")),
    (1, short_texts.map(lambda text: text + SURROGATE_MARKER)),
    (1, huge_texts),
)

JUNK_JSON = [
    "",
    "{",
    "}",
    "[]",
    "null",
    "1e999999",
    "NaN",
    '{"type": "object"',
    '{"type": "nonsense"}',
    '{"type": "object", "properties": {"a": {"$ref": "#"}}}',
    '{"$ref": "#"}',
    '{"type": "string", "pattern": "(a+)+$"}',
    '{"type": "string", "minLength": 99999999}',
    '{"type": "integer", "minimum": 5, "maximum": 1}',
    '{"type": "array", "items": {"type": "array", "items": {"type": "array"}}, "minItems": 1e9}',
    '{"anyOf": [], "oneOf": [], "allOf": []}',
    '{"enum": []}',
    '{"type": "object", "required": ["a"], "additionalProperties": false}',
    '{"x-guidance": {"whitespace_flexible": "yes"}}',
    "[" * 10000,
    '{"a":' * 5000,
    '"\\ud800"',
]
JUNK_REGEX = ["(", ")", "[", "a{99999999}", "(a+)+$", "\\", "(?<x>", "\\p{Nope}", "a|", "", ".*"]
JUNK_GRAMMAR = [
    "start:",
    "start: start",
    'start: "a"*',
    "start: foo",
    "%import common.WORD\nstart: WORD",
    "start: /[/",
    "start: " + " | ".join(f'"{i}"' for i in range(2000)),
    "?start: a\na: a",
    "%llguidance {}\nstart: %json{ nope }",
]
json_texts = weighted((3, st.sampled_from(JUNK_JSON)), (1, strings))
regex_texts = weighted((3, st.sampled_from(JUNK_REGEX)), (1, strings))
grammar_texts = weighted((3, st.sampled_from(JUNK_GRAMMAR)), (1, strings))


def token_ids() -> st.SearchStrategy:
    return weighted((8, st.integers(0, 2047)), (1, st.integers(2048, 2**32 - 1)))


def token_id_lists() -> st.SearchStrategy:
    """Mostly short prompts; some longer than the context (2048), some huge."""
    return weighted(
        (8, st.lists(token_ids(), min_size=1, max_size=12)),
        (1, st.integers(1, 3000).map(lambda n: [i % 2048 for i in range(n)])),
        (1, st.just([7] * 100_000)),
    )


def hostile_paths(extra: list[str]) -> st.SearchStrategy:
    """Local paths that are no model (or that no server should read)."""
    fixed = [
        "/",
        "/etc",
        "/etc/passwd",
        "/etc/shadow",
        "/dev/null",
        "/dev/zero",
        "/dev/urandom",
        "/proc/self",
        "/proc/self/mem",
        "/proc/self/environ",
        "/sys",
        ".",
        "..",
        "../../../../../../etc",
        "~",
        "~root",
        "~/.ssh",
        "\x00",
        "/tmp/\x00/x",
        "/" + "a" * 4095,
        "a/" * 2000,
        "/nonexistent/mlx-serving-fuzz",
        "file:///etc/passwd",
        "http://127.0.0.1:1/model",
        "hf:mlx-serving-fuzz/none",
        "C:\\Windows\\System32",
        "$HOME",
        "`id`",
    ]
    return weighted((4, st.sampled_from(fixed + list(extra))), (1, strings))


# Hugging Face ids that cannot exist (and the server runs offline anyway).
impossible_repo_ids = weighted(
    (3, st.from_regex(r"mlx-serving-fuzz-none/[a-z0-9]{1,12}", fullmatch=True)),
    (1, st.sampled_from(["a", "a/b", "x" * 200, "-", "a/b/c", "mlx-serving-fuzz-none"])),
    (1, strings),
)


def model_ids(loaded_weight: int) -> st.SearchStrategy:
    return weighted((loaded_weight, st.just(MODEL_ID)), (1, strings))


# Field (full name) → its own strategy, in place of the generic one.
def overrides(extra_paths: list[str]) -> dict[str, st.SearchStrategy]:
    v1 = "mlx_serving.v1."
    return {
        v1 + "GenerateRequest.model_id": model_ids(8),
        v1 + "TokenizeRequest.model_id": model_ids(8),
        v1 + "DetokenizeRequest.model_id": model_ids(8),
        v1 + "RenderChatTemplateRequest.model_id": model_ids(8),
        v1 + "GetModelRequest.model_id": model_ids(2),
        v1 + "LoadModelRequest.model_id": model_ids(1),
        # Never the test model: every other test needs it.
        v1 + "UnloadModelRequest.model_id": strings.filter(lambda text: text != MODEL_ID),
        v1 + "GenerateRequest.max_tokens": weighted(
            (8, st.integers(1, MAX_GENERATED_TOKENS)),
            (1, st.sampled_from([0, 131073, 2**32 - 1])),
        ),
        v1 + "GenerateRequest.time_limit": st.builds(
            lambda seconds, nanos: {"seconds": seconds, "nanos": nanos},
            st.sampled_from([0, 1, -1, 86401, 2**63 - 1, -(2**63)]),
            st.sampled_from([0, 1, 999_999_999, 10**9, -1]),
        ),
        v1 + "GenerateRequest.json_schema": json_texts,
        v1 + "GenerateRequest.regex": regex_texts,
        v1 + "GenerateRequest.grammar": grammar_texts,
        v1 + "Tool.parameters": json_texts,
        v1 + "ToolCall.arguments": json_texts,
        v1 + "ChatMessage.role": weighted(
            (3, st.sampled_from(["system", "user", "assistant", "tool"])), (1, strings)
        ),
        v1 + "TokenIds.ids": token_id_lists(),
        v1 + "DetokenizeRequest.token_ids": token_id_lists(),
        v1 + "GenerateRequest.stop_token_ids": st.lists(token_ids(), max_size=4),
        v1 + "ModelSource.local_path": hostile_paths(extra_paths),
        v1 + "HuggingFaceRepo.repo_id": impossible_repo_ids,
    }


# Fields always set: an unset max_tokens is 256, and the run would get slow.
# Model ids: an unset one is refused by validation, and the engine would see few requests.
ALWAYS_SET = {
    "mlx_serving.v1.GenerateRequest.max_tokens",
    "mlx_serving.v1.GenerateRequest.model_id",
    "mlx_serving.v1.TokenizeRequest.model_id",
    "mlx_serving.v1.DetokenizeRequest.model_id",
    "mlx_serving.v1.RenderChatTemplateRequest.model_id",
    "mlx_serving.v1.GetModelRequest.model_id",
    "mlx_serving.v1.UnloadModelRequest.model_id",
}


def rules_of(fd: FieldDescriptor):
    """The field's buf.validate rules for its own kind (None when it has none)."""
    rules = fd.GetOptions().Extensions[validate_pb2.field]
    kind = rules.WhichOneof("type")
    return getattr(rules, kind) if kind else None


INTEGER_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}


def integers(fd: FieldDescriptor, within: bool) -> st.SearchStrategy:
    low, high = INTEGER_RANGES[fd.cpp_type]
    anything = weighted(
        (2, st.integers(low, high)),
        (1, st.sampled_from(sorted({low, high, 0, 1, max(low, -1), high // 2}))),
    )
    rules = rules_of(fd)
    if rules is None or not hasattr(rules, "gte"):
        small = st.integers(max(low, 0), min(high, 64))
        return small if within else weighted((1, small), (1, anything))
    within_low = rules.gte if rules.HasField("gte") else rules.gt + 1 if rules.HasField("gt") else 0
    within_high = (
        rules.lte if rules.HasField("lte") else rules.lt - 1 if rules.HasField("lt") else 64
    )
    return st.integers(within_low, within_high) if within else anything


def floats(fd: FieldDescriptor, within: bool) -> st.SearchStrategy:
    width = 32 if fd.cpp_type == FieldDescriptor.CPPTYPE_FLOAT else 64
    extremes = [math.nan, math.inf, -math.inf, -0.0, 0.0, 3.4e38, -3.4e38, 1e-45, 1.0, -1.0]
    anything = weighted((1, st.floats(width=width)), (1, st.sampled_from(extremes)))
    rules = rules_of(fd)
    if rules is None or not hasattr(rules, "gte"):
        return anything
    low = rules.gte if rules.HasField("gte") else rules.gt if rules.HasField("gt") else None
    high = rules.lte if rules.HasField("lte") else rules.lt if rules.HasField("lt") else None
    in_bounds = st.floats(
        low,
        high,
        exclude_min=rules.HasField("gt"),
        exclude_max=rules.HasField("lt"),
        width=width,
        allow_nan=False,
    )
    return in_bounds if within else anything


def text_values(fd: FieldDescriptor, within: bool) -> st.SearchStrategy:
    rules = rules_of(fd)
    pattern = getattr(rules, "pattern", "") if rules is not None else ""
    if pattern and within:
        return st.from_regex(pattern, fullmatch=True).filter(lambda text: len(text) <= 64)
    if within:
        return short_texts.filter(bool)
    return strings


def enums(fd: FieldDescriptor, within: bool) -> st.SearchStrategy:
    numbers = [value.number for value in fd.enum_type.values]
    defined = st.sampled_from([number for number in numbers if number] or numbers)
    if within:
        return defined
    return weighted((3, defined), (1, st.integers(-(2**31), 2**31 - 1)))


def scalar(fd: FieldDescriptor, depth: int, within: bool) -> st.SearchStrategy:
    cpp = fd.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_MESSAGE:
        return messages(fd.message_type, depth + 1, within)
    if cpp == FieldDescriptor.CPPTYPE_STRING:
        return text_values(fd, within)
    if cpp == FieldDescriptor.CPPTYPE_BOOL:
        return st.booleans()
    if cpp == FieldDescriptor.CPPTYPE_ENUM:
        return enums(fd, within)
    if cpp in (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE):
        return floats(fd, within)
    return integers(fd, within)


def is_map(fd: FieldDescriptor) -> bool:
    return fd.message_type is not None and fd.message_type.GetOptions().map_entry


def field_values(fd: FieldDescriptor, depth: int, within: bool) -> st.SearchStrategy:
    """A field's value: a dict for a map, a list for a repeated field, else one value."""
    special = OVERRIDES.get(fd.full_name)
    if special is not None:
        return special
    if is_map(fd):
        key, value = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
        keys, values = scalar(key, depth, within), scalar(value, depth, within)
        if within and value.cpp_type == FieldDescriptor.CPPTYPE_FLOAT:  # logit_bias: ±100
            values = st.floats(-100, 100, width=32)
        return st.dictionaries(keys, values, max_size=4)
    if fd.is_repeated:
        rules = rules_of(fd) if within else None
        least = rules.min_items if rules is not None and hasattr(rules, "min_items") else 0
        unique = str if within else None
        return st.lists(scalar(fd, depth, within), min_size=least, max_size=4, unique_by=unique)
    return scalar(fd, depth, within)


def needed(fd: FieldDescriptor) -> bool:
    """Whether the rules refuse the field unset: required, a least count, a least length."""
    if fd.GetOptions().Extensions[validate_pb2.field].required:
        return True
    rules = rules_of(fd)
    return bool(getattr(rules, "min_items", 0) or getattr(rules, "min_len", 0))


@st.composite
def message_fields(draw, descriptor, depth: int, within: bool) -> dict:
    """Field name → value: each oneof with one member or none, other fields set or not."""
    if depth > MAX_DEPTH:
        return {}
    values = {}
    for oneof in descriptor.oneofs:
        if oneof.name.startswith("_"):  # proto3 `optional`: a field of its own
            continue
        required = within and oneof.GetOptions().Extensions[validate_pb2.oneof].required
        member = draw(st.sampled_from([*([] if required else [None]), *oneof.fields]))
        if member is not None:
            values[member.name] = draw(field_values(member, depth, within))
    for fd in descriptor.fields:
        oneof = fd.containing_oneof
        if oneof is not None and not oneof.name.startswith("_"):
            continue  # drawn above
        values_of_field = field_values(fd, depth, within)
        if fd.full_name not in ALWAYS_SET and not (within and needed(fd)):
            values_of_field = maybe(values_of_field)
        if (value := draw(values_of_field)) is not None:
            values[fd.name] = value
    return values


def messages(descriptor, depth: int, within: bool) -> st.SearchStrategy:
    """A message of this type; `within`: numbers, enums and patterned strings within their
    `buf.validate` rules (so that the request may get past validation)."""
    fields = message_fields(descriptor, depth, within)
    return fields.map(lambda values: build(descriptor, values))


def requests_of(descriptor) -> st.SearchStrategy:
    """Half of them within the rules, half anything."""
    return st.booleans().flatmap(lambda within: messages(descriptor, 0, within))


def build(descriptor, values: dict):
    message = message_factory.GetMessageClass(descriptor)()
    for name, value in values.items():
        set_field(message, descriptor.fields_by_name[name], value)
    return message


def set_field(message, fd: FieldDescriptor, value) -> None:
    if isinstance(value, dict) and not is_map(fd):  # a message given as its fields
        value = build(fd.message_type, value)
    container = getattr(message, fd.name) if fd.is_repeated else None
    if is_map(fd):
        for key, item in value.items():
            if hasattr(item, "DESCRIPTOR"):
                container[key].CopyFrom(item)
            else:
                container[key] = item
    elif container is not None:
        for item in value:
            if hasattr(item, "DESCRIPTOR"):
                container.add().CopyFrom(item)
            else:
                container.append(item)
    elif hasattr(value, "DESCRIPTOR"):
        getattr(message, fd.name).CopyFrom(value)
    else:
        setattr(message, fd.name, value)


OVERRIDES: dict[str, st.SearchStrategy] = overrides([])


def use_hostile_paths(paths: list[str]) -> None:
    """Add the caller's own hostile paths (files it made) to those LoadModel draws."""
    OVERRIDES.update(overrides(paths))


# ---- cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What the client does: read all, cancel after `messages` or `delay`, or a deadline."""

    kind: str  # "complete", "cancel_after_messages", "cancel_after_delay", "deadline"
    messages: int = 0
    seconds: float = 0.0


plans = weighted(
    (4, st.just(Plan("complete"))),
    (1, st.builds(Plan, st.just("cancel_after_messages"), messages=st.integers(0, 3))),
    (1, st.builds(Plan, st.just("cancel_after_delay"), seconds=st.floats(0, 0.05))),
    (1, st.builds(Plan, st.just("deadline"), seconds=st.floats(0.001, 0.2))),
)


@dataclass(frozen=True)
class Case:
    rpc: Rpc
    request: object
    plan: Plan
    corruptions: tuple[tuple[int, int], ...] = field(default=())

    def payload(self) -> bytes:
        """The request's bytes: surrogate markers made invalid UTF-8, corruptions applied."""
        data = bytearray(
            self.request.SerializeToString().replace(SURROGATE_MARKER.encode(), SURROGATE_BYTES)
        )
        for position, byte in self.corruptions:
            if data:
                data[position % len(data)] = byte
        return bytes(data)

    def __repr__(self) -> str:
        text = text_format.MessageToString(self.request, as_one_line=True, as_utf8=True)
        if len(text) > 2000:
            text = text[:2000] + f"... ({len(text)} characters)"
        return f"Case({self.rpc.name}, {self.plan}, corruptions={self.corruptions}, {{{text}}})"


def cases_for(rpc: Rpc) -> st.SearchStrategy:
    corruptions = weighted(
        (9, st.just(())),
        (1, st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 255)), max_size=3).map(tuple)),
    )
    requests = st.deferred(lambda: requests_of(rpc.request_type.DESCRIPTOR))
    return st.builds(Case, st.just(rpc), requests, plans, corruptions)


def cases() -> st.SearchStrategy:
    return st.one_of([cases_for(rpc) for rpc in all_rpcs()])


# ---- sending a case -----------------------------------------------------------------------


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    messages: list[bytes]


async def run_case(channel: grpc.aio.Channel, case: Case) -> Outcome:
    """Send the case's bytes as its plan says; the status it ended with."""
    timeout = case.plan.seconds if case.plan.kind == "deadline" else CALL_SECONDS
    if case.rpc.streaming:
        call = channel.unary_stream(case.rpc.path)(case.payload(), timeout=timeout)
        received = await read_stream(call, case)
    else:
        call = channel.unary_unary(case.rpc.path)(case.payload(), timeout=timeout)
        received = await await_unary(call, case)
    return Outcome(await call.code(), await call.details() or "", received)


async def read_stream(call, case: Case) -> list[bytes]:
    """Up to the plan's cancel point; Subscribe, which never ends, is always cancelled."""
    plan, received = case.plan, []
    never_ends = case.rpc.name == "EventsService.Subscribe"
    limit = plan.messages if plan.kind == "cancel_after_messages" else 3 if never_ends else None
    until = asyncio.get_running_loop().time() + (
        plan.seconds if plan.kind == "cancel_after_delay" else CALL_SECONDS
    )
    try:
        while limit is None or len(received) < limit:
            wait = until - asyncio.get_running_loop().time()
            if never_ends:
                wait = min(wait, READ_SECONDS)
            message = await asyncio.wait_for(call.read(), max(wait, 0.0))
            if message is grpc.aio.EOF:
                return received
            received.append(message)
    except TimeoutError:
        pass
    except grpc.RpcError:
        return received
    call.cancel()
    return received


async def await_unary(call, case: Case) -> list[bytes]:
    plan = case.plan
    if plan.kind in ("cancel_after_delay", "cancel_after_messages"):
        await asyncio.sleep(plan.seconds)
        call.cancel()
    try:
        return [await call]
    except (grpc.RpcError, asyncio.CancelledError):
        return []


def cancelled_by_client(case: Case) -> bool:
    """The plan cancels, or the RPC is Subscribe (which never ends, so it is always cancelled)."""
    return case.plan.kind.startswith("cancel") or case.rpc.name == "EventsService.Subscribe"


def violation(case: Case, outcome: Outcome) -> str | None:
    """Why this outcome breaks the property, or None."""
    code, plan = outcome.code, case.plan
    if code in ALWAYS_ALLOWED:
        return unfinished_stream(case, outcome) if code == grpc.StatusCode.OK else None
    if code == grpc.StatusCode.CANCELLED and cancelled_by_client(case):
        return None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and plan.kind == "deadline":
        return None
    return f"{code.name}: {outcome.details}"


def unfinished_stream(case: Case, outcome: Outcome) -> str | None:
    """A Generate read to its OK end must end with a finish reason (the contract's last
    message)."""
    if case.rpc.name != "GenerateService.Generate" or case.plan.kind != "complete":
        return None
    if not outcome.messages:
        return "Generate ended OK with no message"
    last = generate_service_pb2.GenerateResponse.FromString(outcome.messages[-1])
    if last.finish_reason == generate_service_pb2.FINISH_REASON_UNSPECIFIED:
        return "Generate ended OK without a finish reason"
    return None


async def greedy_generate_works(channel: grpc.aio.Channel) -> bool:
    """After the storm: a normal greedy request is served to its end."""
    request = generate_service_pb2.GenerateRequest(
        model_id=MODEL_ID, text="Hello", max_tokens=4, temperature=0, ignore_eos=True
    )
    stub = channel.unary_stream(
        "/mlx_serving.v1.GenerateService/Generate",
        request_serializer=generate_service_pb2.GenerateRequest.SerializeToString,
        response_deserializer=generate_service_pb2.GenerateResponse.FromString,
    )
    replies = [reply async for reply in stub(request, timeout=CALL_SECONDS)]
    tokens = sum(len(reply.token_ids) for reply in replies)
    finished = replies[-1].finish_reason == generate_service_pb2.FINISH_REASON_MAX_TOKENS
    return tokens == 4 and finished


def make_hostile_files(root) -> list[str]:
    """Paths under `root` that look like models and are not: junk config, a config that is a
    directory, a symlink loop, weights of junk."""
    root = Path(root)
    junk = root / "junk-config"
    junk.mkdir()
    (junk / "config.json").write_text("{not json")
    directory = root / "config-is-a-directory"
    (directory / "config.json").mkdir(parents=True)
    loop = root / "symlink-loop"
    os.symlink(loop, loop)
    weights = root / "junk-weights"
    weights.mkdir()
    (weights / "config.json").write_text('{"model_type": "llama", "vocab_size": -1}')
    (weights / "model.safetensors").write_bytes(b"\xff" * 64)
    unknown = root / "unknown-architecture"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "no-such-architecture"}')
    return [str(junk), str(directory), str(loop), str(weights), str(unknown)]
