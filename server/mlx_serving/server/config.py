"""The server's configuration: one `mlx_serving.v1.Config` from four layers.

Defaults, then a YAML or TOML file, then `MLX_SERVING_<SECTION>_<KEY>` environment variables,
then command-line flags; each layer overrides the one before. Every layer is read strictly: an
unknown key, or a value of the wrong type, is a problem naming its key path. What the layers
give is then checked against the contract's protovalidate rules, and every problem is reported
at once in one `ConfigError`.
"""

import json
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import protovalidate
import tomli_w
import yaml
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.models import LoadPolicy, ModelSource
from mlx_serving.v1 import config_pb2 as config_pb

from . import convert
from .app import DEFAULT_HOST, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_PORT
from .auth import DEFAULT_MAX_STREAMS_PER_CLIENT, DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT
from .default_model import cache_root
from .interceptor import describe
from .telemetry import (
    DEFAULT_EXPORT_INTERVAL_MS,
    DEFAULT_PROMETHEUS_HOST,
    DEFAULT_PROMETHEUS_PORT,
    DEFAULT_SERVICE_NAME,
)

ENV_PREFIX = "MLX_SERVING_"
# The config file's path when no --config flag is given; not a config key.
CONFIG_ENV = "MLX_SERVING_CONFIG"
# Read by the built-in model's cache (server/default_model.py); not a config key.
CACHE_ENV = "MLX_SERVING_CACHE"

DEFAULT_LOG_LEVEL = "info"
# A 4 MiB prompt (the contract's largest) and the rest of its request.
DEFAULT_MAX_REQUEST_BYTES = 8 << 20
DEFAULT_MAX_LOADED_MODELS = 16
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")

INT_LIMITS = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
FLOAT_TYPES = (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT)

FORMATS = ("yaml", "toml", "json")

Problem = tuple[str, str]  # (key path, what is wrong)


class ConfigError(Exception):
    """Every problem found in the configuration, one `key.path: message` per line."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = [f"{path}: {text}" if path else text for path, text in problems]
        super().__init__("\n".join(self.problems))


def load_config(
    path: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> config_pb.Config:
    """The effective config: defaults ← file ← env ← `overrides` (a file-shaped nested dict).

    Raises `ConfigError` listing every problem in every layer.
    """
    problems: list[Problem] = []
    layers = [checked(read_file(path, problems), config_pb.Config.DESCRIPTOR, "", problems)]
    layers.append(env_layer(env or {}, problems))
    layers.append(checked(overrides or {}, config_pb.Config.DESCRIPTOR, "", problems))
    given = build(config_pb.Config(), merge(*layers))
    misfits = {where for where, _ in problems}
    problems += [p for p in contract_problems(given) if not within(p[0], misfits)]
    if problems:
        raise ConfigError(problems)
    return build(config_pb.Config(), merge(to_dict(default_config()), *layers))


def within(path: str, paths: set[str]) -> bool:
    """Whether `path` is one of `paths` or lies inside one (a misfit's rule is moot)."""
    return any(path == p or path.startswith((f"{p}.", f"{p}[")) for p in paths)


def default_config() -> config_pb.Config:
    """Every default, spelled out; the engine's come from `EngineConfig` itself."""
    engine = EngineConfig()
    return config_pb.Config(
        server=config_pb.ServerSettings(
            host=DEFAULT_HOST,
            port=DEFAULT_PORT,
            shutdown_grace_seconds=engine.shutdown_grace_seconds,
            log_level=DEFAULT_LOG_LEVEL,
            max_response_bytes=DEFAULT_MAX_RESPONSE_BYTES,
            max_request_bytes=DEFAULT_MAX_REQUEST_BYTES,
            max_streams_per_client=DEFAULT_MAX_STREAMS_PER_CLIENT,
            max_subscriptions_per_client=DEFAULT_MAX_SUBSCRIPTIONS_PER_CLIENT,
            drain_delay_seconds=0.0,
        ),
        security=config_pb.SecuritySettings(
            protect_health=False,
            allow_loading=True,
            model_roots=[str(root) for root in default_model_roots()],
            allow_hugging_face=True,
            trust_remote_code=False,
            max_loaded_models=DEFAULT_MAX_LOADED_MODELS,
            max_loaded_bytes=0,
        ),
        engine=config_pb.EngineSettings(**{key: getattr(engine, key) for key in engine_keys()}),
        telemetry=config_pb.TelemetrySettings(
            enabled=False,
            service_name=DEFAULT_SERVICE_NAME,
            prometheus_port=DEFAULT_PROMETHEUS_PORT,
            export_interval_ms=DEFAULT_EXPORT_INTERVAL_MS,
            prometheus_host=DEFAULT_PROMETHEUS_HOST,
        ),
    )


def default_model_roots() -> list[Path]:
    """Where LoadModel may read local models unless configured: the Hugging Face cache and the
    built-in model's cache."""
    from huggingface_hub import constants

    return [Path(constants.HF_HUB_CACHE), cache_root(None)]


def engine_keys() -> list[str]:
    return [field.name for field in config_pb.EngineSettings.DESCRIPTOR.fields]


def engine_config(config: config_pb.Config) -> EngineConfig:
    """The engine's knobs from an effective config (the shutdown grace lives in `server`)."""
    knobs = {key: getattr(config.engine, key) for key in engine_keys()}
    return EngineConfig(**knobs, shutdown_grace_seconds=config.server.shutdown_grace_seconds)


def load_policy(config: config_pb.Config) -> LoadPolicy:
    """What a client's LoadModel may load, from an effective config's `security` (the models in
    `models` load whatever it says)."""
    security = config.security
    return LoadPolicy(
        allow_loading=security.allow_loading,
        model_roots=tuple(security.model_roots),
        allow_hugging_face=security.allow_hugging_face,
        hugging_face_organizations=tuple(security.hugging_face_organizations),
        trust_remote_code=security.trust_remote_code,
        max_loaded_models=security.max_loaded_models,
        max_loaded_bytes=security.max_loaded_bytes,
    )


def preload_models(
    config: config_pb.Config,
) -> list[tuple[str, ModelSource] | tuple[str, ModelSource, str, int | None]]:
    """(model id or "", source) of each configured model, in order; with a draft model
    (speculative decoding), (model id, source, draft model id, draft tokens or None)."""
    models: list[tuple[str, ModelSource] | tuple[str, ModelSource, str, int | None]] = []
    for spec in config.models:
        source = convert.model_source(spec.source)
        if spec.draft_model_id:
            tokens = spec.draft_tokens if spec.HasField("draft_tokens") else None
            models.append((spec.model_id, source, spec.draft_model_id, tokens))
        else:
            models.append((spec.model_id, source))
    return models


# ---- reading the layers ------------------------------------------------------------------


class StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing duplicate keys (it would keep the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = []
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                found = f"found duplicate key {key!r}"
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, found, key_node.start_mark
                )
            seen.append(key)
        return super().construct_mapping(node, deep)


READERS: dict[str, Callable[[str], Any]] = {
    ".toml": tomllib.loads,
    ".yaml": lambda text: yaml.load(text, Loader=StrictLoader),
    ".yml": lambda text: yaml.load(text, Loader=StrictLoader),
}


def read_file(path: Path | None, problems: list[Problem]) -> Any:
    """The file's contents as plain data ({} if there is no file or it cannot be read)."""
    if path is None:
        return {}
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        problems.append((str(path), f"not a config file (allowed: {', '.join(READERS)})"))
        return {}
    try:
        data = reader(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        problems.append((str(path), " ".join(str(exc).split())))
        return {}
    return {} if data is None else data  # an empty YAML file


def env_names() -> dict[str, tuple[str, FieldDescriptor]]:
    """`MLX_SERVING_<SECTION>_<KEY>` → (section, field), for every key of every section."""
    return {
        f"{ENV_PREFIX}{section.name}_{field.name}".upper(): (section.name, field)
        for section in config_pb.Config.DESCRIPTOR.fields
        if section.message_type is not None and not section.is_repeated
        for field in section.message_type.fields
        if field.message_type is None
    }


def env_layer(env: Mapping[str, str], problems: list[Problem]) -> dict:
    """The config keys set by `MLX_SERVING_*` variables; any other such name is a problem."""
    names = env_names()
    layer: dict[str, dict] = {}
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or name in (CONFIG_ENV, CACHE_ENV):
            continue
        if name not in names:
            problems.append((name, f"unknown variable (allowed: {allowed_env(name, names)})"))
            continue
        section, field = names[name]
        try:
            if field.is_repeated:  # a list: comma-separated
                value = [fitted(field, parsed(field, part)) for part in text.split(",") if part]
            else:
                value = fitted(field, parsed(field, text))
            layer.setdefault(section, {})[field.name] = value
        except ValueError as exc:
            problems.append((f"{section}.{field.name}", f"{name}={text!r}: {exc}"))
    return layer


def allowed_env(name: str, names: Mapping[str, tuple[str, FieldDescriptor]]) -> str:
    """The variables of the section `name` seems meant for, or else every section's pattern."""
    prefixes = sorted({f"{ENV_PREFIX}{section.upper()}_" for section, _ in names.values()})
    if near := [p for p in prefixes if name.startswith(p)]:
        return ", ".join(n for n in names if n.startswith(near[0]))
    return ", ".join([CONFIG_ENV, CACHE_ENV, *(f"{p}*" for p in prefixes)])


def parse_override(key: str, text: str) -> Any:
    """A flag's text as the value of config key `key` (`section.name`), checked by its rules.

    Raises ValueError saying what is wrong.
    """
    section, _, name = key.partition(".")
    field = config_pb.Config.DESCRIPTOR.fields_by_name[section].message_type.fields_by_name[name]
    try:
        value = fitted(field, parsed(field, text))
    except ValueError as exc:
        raise ValueError(f"{key}: {exc}, got {text!r}") from None
    alone = build(config_pb.Config(), {section: {name: value}})
    if texts := [text for where, text in contract_problems(alone) if where == key]:
        raise ValueError(f"{key}: {'; '.join(texts)}")
    return value


def parsed(field: FieldDescriptor, text: str) -> Any:
    """Text (an environment variable, a flag) read as the field's type."""
    kind = field.cpp_type
    if kind == FieldDescriptor.CPPTYPE_BOOL:
        word = text.strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise ValueError(f"expected a boolean ({' or '.join(TRUE_WORDS + FALSE_WORDS)})")
        return word in TRUE_WORDS
    try:
        if kind in INT_LIMITS:
            return int(text)
        if kind in FLOAT_TYPES:
            return float(text)
    except ValueError:
        raise ValueError(f"expected {type_name(field)}") from None
    return text


# ---- checking the data against the schema ------------------------------------------------


# Not json_format.ParseDict: it stops at the first error; this reports every misfit at once,
# naming its key path and, for an unknown key, the allowed keys.
def checked(data: Any, descriptor: Descriptor, path: str, problems: list[Problem]) -> dict:
    """The keys and values of `data` that fit `descriptor`; each misfit becomes a problem."""
    if not isinstance(data, Mapping):
        problems.append((path, f"expected a table, got {shown(data)}"))
        return {}
    kept = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        field = descriptor.fields_by_name.get(key) if isinstance(key, str) else None
        if field is None:
            allowed = ", ".join(descriptor.fields_by_name)
            problems.append((where, f"unknown key (allowed: {allowed})"))
            continue
        try:
            kept[key] = checked_value(field, value, where, problems)
        except ValueError as exc:
            problems.append((where, f"{exc}, got {shown(value)}"))
    return without_clashes(descriptor, kept, path, problems)


def without_clashes(descriptor: Descriptor, kept: dict, path: str, problems: list) -> dict:
    """`kept` less the members of a oneof given together (a message would keep only the last)."""
    for oneof in descriptor.oneofs:
        given = [field.name for field in oneof.fields if field.name in kept]
        if len(given) > 1:
            problems.append((path, f"set only one of {', '.join(given)}"))
            kept = {key: value for key, value in kept.items() if key not in given}
    return kept


def checked_value(field: FieldDescriptor, value: Any, where: str, problems: list[Problem]) -> Any:
    if field.is_repeated:
        if not isinstance(value, list):
            raise ValueError("expected a list")
        kind = field.message_type
        if kind is None:
            return [fitted(field, item) for item in value]
        return [checked(item, kind, f"{where}[{i}]", problems) for i, item in enumerate(value)]
    if field.message_type is not None:
        return checked(value, field.message_type, where, problems)
    return fitted(field, value)


def fitted(field: FieldDescriptor, value: Any) -> Any:
    """`value` if its type fits the scalar field, else ValueError naming the expected type.

    An integer beyond the field's width is clamped to it, so that the field's own range rule
    reports it in its own words (every integer key has both bounds; a test checks).
    """
    kind = field.cpp_type
    if kind == FieldDescriptor.CPPTYPE_BOOL and isinstance(value, bool):
        return value
    if kind == FieldDescriptor.CPPTYPE_STRING and isinstance(value, str):
        return value
    if isinstance(value, bool):
        pass
    elif kind in INT_LIMITS and isinstance(value, int):
        low, high = INT_LIMITS[kind]
        return min(max(value, low), high)
    elif kind in FLOAT_TYPES and isinstance(value, int | float):
        return float(value)
    raise ValueError(f"expected {type_name(field)}")


def type_name(field: FieldDescriptor) -> str:
    if field.cpp_type in INT_LIMITS:
        return "an integer"
    if field.cpp_type in FLOAT_TYPES:
        return "a number"
    if field.cpp_type == FieldDescriptor.CPPTYPE_BOOL:
        return "a boolean (true or false)"
    return "a string"


def shown(value: Any) -> str:
    """`int 5`, `str 'abc'`, `null`: a value as an error message shows it (cut short)."""
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def contract_problems(config: config_pb.Config) -> list[Problem]:
    """The protovalidate violations of `config`, as (key path, rule message)."""
    return [describe(violation) for violation in protovalidate.collect_violations(config)]


# ---- plain data <-> message ----------------------------------------------------------------


def merge(*layers: Mapping) -> dict:
    """Later layers win; tables merge key by key, lists (models) are replaced whole."""
    merged: dict = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
                value = merge(merged[key], value)
            merged[key] = value
    return merged


# Not json_format.ParseDict: it refuses a float NaN or infinity, which must reach the range
# rules to be reported under its key.
def build(message: Message, data: Mapping) -> Message:
    """`message` with checked data set into it; a table given, even empty, is present."""
    for key, value in data.items():
        field = message.DESCRIPTOR.fields_by_name[key]
        if field.is_repeated and field.message_type is None:
            getattr(message, key).extend(value)
        elif field.is_repeated:
            for item in value:
                build(getattr(message, key).add(), item)
        elif field.message_type is not None:
            getattr(message, key).SetInParent()
            build(getattr(message, key), value)
        else:
            setattr(message, key, value)
    return message


# Not json_format.MessageToDict: it writes a 64-bit integer as a string ("2147483648"), which
# the strict reader refuses for an integer key, so a printed config would not load back.
def to_dict(message: Message) -> dict:
    """The fields set in `message`, as plain data in the shape of a config file."""
    data: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        value = getattr(message, field.name)
        if field.is_repeated:
            data[field.name] = (
                [to_dict(item) for item in value] if field.message_type else list(value)
            )
        elif not field.has_presence or message.HasField(field.name):
            data[field.name] = value if field.message_type is None else to_dict(value)
    return data


# ---- printing ------------------------------------------------------------------------------


def render(config: config_pb.Config, form: str) -> str:
    """`config` as a YAML, TOML or JSON document that `load_config` reads back."""
    data = to_dict(config)
    if form == "json":
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if form == "toml":
        return tomli_w.dumps(data)
    return yaml.dump(data, Dumper=PrintDumper, sort_keys=False, allow_unicode=True)


class PrintDumper(yaml.SafeDumper):
    """PyYAML's safe dumper, double-quoting (escaping) a string with a Unicode line break: in a
    style of PyYAML's choosing, a lone U+0085 reads back as a space."""


def represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = '"' if any(ch in text for ch in "\x85\u2028\u2029") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


PrintDumper.add_representer(str, represent_str)
