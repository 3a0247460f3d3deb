"""Test models made from the tiny one: another config, chat template or vocabulary."""

import json
import shutil
from pathlib import Path

import mlx.core as mx


def model_variant(
    source: Path,
    target: Path,
    config: dict | None = None,
    drop: tuple[str, ...] = (),
    chat_template: str | None = None,
    rows: int | None = None,
) -> Path:
    """A copy of the test model with its config changed (`config` merged, `drop` keys removed),
    another chat template, or `rows` rows in its embedding and output layer."""
    shutil.copytree(source, target)
    settings = json.loads((target / "config.json").read_text())
    settings.update(config or {})
    for key in drop:
        settings.pop(key, None)
    if rows is not None:
        settings["vocab_size"] = rows
        weights = mx.load(str(target / "model.safetensors"))
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            weight = weights[name]
            extra = rows - weight.shape[0]
            weights[name] = (
                weight[:rows] if extra <= 0 else mx.concatenate([weight, weight[:extra]])
            )
        mx.save_safetensors(str(target / "model.safetensors"), weights, {"format": "mlx"})
    (target / "config.json").write_text(json.dumps(settings))
    if chat_template is not None:
        path = target / "tokenizer_config.json"
        tokenizer_config = json.loads(path.read_text())
        tokenizer_config["chat_template"] = chat_template
        path.write_text(json.dumps(tokenizer_config))
        for extra in target.glob("chat_template.*"):
            extra.unlink()
    return target


def with_generation_config(source: Path, target: Path, text: str) -> Path:
    """A copy of the test model whose generation_config.json holds `text`, valid JSON or not."""
    shutil.copytree(source, target)
    (target / "generation_config.json").write_text(text)
    return target


def with_bos_added(source: Path, target: Path, bos: str) -> Path:
    """A copy of the test model whose tokenizer starts every text with `bos`, as Llama's does
    (the test model's adds no special token)."""
    shutil.copytree(source, target)
    path = target / "tokenizer.json"
    tokenizer = json.loads(path.read_text())
    (bos_id,) = [token["id"] for token in tokenizer["added_tokens"] if token["content"] == bos]
    single = [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]
    prefix = {
        "type": "TemplateProcessing",
        "single": single,
        "pair": single + [{"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }
    steps = [tokenizer["post_processor"], prefix]
    tokenizer["post_processor"] = {"type": "Sequence", "processors": steps}
    path.write_text(json.dumps(tokenizer))
    return target


def model_without_chat_template(source: Path, target: Path) -> Path:
    """A copy of the test model whose tokenizer has no chat template."""
    shutil.copytree(source, target)
    path = target / "tokenizer_config.json"
    tokenizer_config = json.loads(path.read_text())
    tokenizer_config.pop("chat_template", None)
    path.write_text(json.dumps(tokenizer_config))
    for extra in target.glob("chat_template.*"):
        extra.unlink()
    return target


def with_weights_header(source: Path, target: Path, change) -> Path:
    """A copy of the test model whose model.safetensors header is `change(header)` (a dict,
    changed in place), its data left as it was: a header that lies about the bytes after it."""
    shutil.copytree(source, target)
    path = target / "model.safetensors"
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    change(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + length :])
    return target


def with_weights_bytes(source: Path, target: Path, change) -> Path:
    """A copy of the test model whose model.safetensors is `change(its bytes)`: cut short,
    or with another header length."""
    shutil.copytree(source, target)
    path = target / "model.safetensors"
    path.write_bytes(change(path.read_bytes()))
    return target
