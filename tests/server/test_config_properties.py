"""`mlx-serving config print` reads back: any config within the contract, printed as YAML, TOML
or JSON (`render`, what `config print` writes), loads back as the same config."""

import json
import tempfile
from pathlib import Path

from buf.validate import validate_pb2
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mlx_serving.server.config import FORMATS, load_config, render
from mlx_serving.v1 import config_pb2 as config_pb
from mlx_serving.v1 import model_service_pb2 as model_pb

# Any text a file can hold: every character but the lone surrogates UTF-8 cannot encode.
any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)

label = r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?"
hostnames = st.from_regex(rf"{label}(\.{label}){{0,3}}", fullmatch=True)
addresses = st.one_of(
    hostnames,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.sampled_from(["localhost", "0.0.0.0", "::", "::1"]),
)
uris = st.builds(
    "{}://{}:{}{}".format,
    st.sampled_from(["http", "https"]),
    hostnames,
    st.integers(1, 65535),
    st.from_regex(r"(/[a-z0-9]{1,5}){0,3}", fullmatch=True),
)


def pattern(field) -> str:
    return field.GetOptions().Extensions[validate_pb2.field].string.pattern


paths = any_text.filter(bool)
security = config_pb.SecuritySettings.DESCRIPTOR.fields_by_name

# The string keys, each drawn within its own rule; every string key must have one here (a
# list's items, for a list).
STRINGS = {
    "security.tokens_file": paths,
    "security.tokens_env": st.from_regex(
        pattern(security["tokens_env"]).strip("^$"), fullmatch=True
    ),
    "security.model_roots": paths,
    "security.hugging_face_organizations": st.from_regex(r"[A-Za-z0-9-]{1,20}", fullmatch=True),
    "server.host": addresses,
    "server.log_level": st.sampled_from(["debug", "info", "warning", "error"]),
    "engine.prefill_buckets": st.sampled_from(["auto", "on", "off"]),
    "telemetry.service_name": st.from_regex(r"[A-Za-z0-9_-]{1,100}", fullmatch=True),
    "telemetry.otlp_endpoint": st.one_of(st.just(""), uris),
    "telemetry.prometheus_host": addresses,
}


def number(field):
    """Integers or finite numbers between the field's bounds (both are set: test_config.py)."""
    rules = field.GetOptions().Extensions[validate_pb2.field]
    bounds = getattr(rules, rules.WhichOneof("type"))
    low = bounds.gte if bounds.HasField("gte") else bounds.gt
    high = bounds.lte if bounds.HasField("lte") else bounds.lt
    if field.cpp_type in (field.CPPTYPE_DOUBLE, field.CPPTYPE_FLOAT):
        return st.floats(
            low, high, exclude_min=bounds.HasField("gt"), exclude_max=bounds.HasField("lt")
        )
    return st.integers(low + bounds.HasField("gt"), high - bounds.HasField("lt"))


def value(section: str, field):
    if field.message_type is not None:  # server.tls
        return st.fixed_dictionaries(
            {"cert_file": paths, "key_file": paths}, optional={"client_ca_file": any_text}
        )
    if field.is_repeated:
        return st.lists(STRINGS[f"{section}.{field.name}"], max_size=3)
    if field.cpp_type == field.CPPTYPE_BOOL:
        return st.booleans()
    if field.cpp_type == field.CPPTYPE_STRING:
        return STRINGS[f"{section}.{field.name}"]
    return number(field)


def section(name: str, required: tuple[str, ...] = ()):
    """A table with any of the section's keys (and those `required`), or no table at all."""
    fields = config_pb.Config.DESCRIPTOR.fields_by_name[name].message_type.fields
    keys = {field.name: value(name, field) for field in fields}
    table = st.fixed_dictionaries({key: keys.pop(key) for key in required}, optional=keys)
    return st.one_of(st.none(), table)


repo = model_pb.HuggingFaceRepo.DESCRIPTOR.fields_by_name
repo_ids = st.from_regex(pattern(repo["repo_id"]).strip("^$"), fullmatch=True).filter(
    lambda text: len(text) <= 200
)
revisions = st.from_regex(pattern(repo["revision"]).strip("^$"), fullmatch=True).filter(
    lambda text: len(text) <= 200
)
sources = st.one_of(
    st.fixed_dictionaries({"local_path": any_text.filter(bool)}),
    st.fixed_dictionaries(
        {
            "hugging_face": st.fixed_dictionaries(
                {"repo_id": repo_ids}, optional={"revision": revisions}
            )
        }
    ),
)
model_ids = st.from_regex(
    pattern(config_pb.ModelSpec.DESCRIPTOR.fields_by_name["model_id"]).strip("^$"), fullmatch=True
)
models = st.lists(
    st.fixed_dictionaries({"source": sources}, optional={"model_id": model_ids}), max_size=3
)


@st.composite
def configs(draw) -> dict:
    """A config file's contents, within the contract."""
    given = {
        "server": draw(section("server")),
        "engine": draw(section("engine")),
        "telemetry": draw(section("telemetry", required=("enabled",))),
        "models": draw(st.one_of(st.none(), models)),
        "security": draw(section("security")),
    }
    return {key: table for key, table in given.items() if table is not None}


def test_every_string_key_is_drawn():
    strings = {
        f"{section.name}.{field.name}"
        for section in config_pb.Config.DESCRIPTOR.fields
        if section.message_type is not None and not section.is_repeated
        for field in section.message_type.fields
        if field.cpp_type == field.CPPTYPE_STRING
    }
    assert strings == set(STRINGS)


@settings(max_examples=300, deadline=None)
@given(given=configs())
@example(given={"models": [{"source": {"local_path": "\x85"}}]})  # YAML read it back as " "
def test_a_printed_config_loads_back_as_itself(given):
    config = load_config(None, {}, given)
    with tempfile.TemporaryDirectory() as folder:
        for form in FORMATS:
            text = render(config, form)
            if form == "json":
                again = load_config(None, {}, json.loads(text))
            else:
                path = Path(folder) / f"printed.{form}"
                path.write_text(text, encoding="utf-8")
                again = load_config(path)
            assert again == config, f"{form}:\n{text}"
