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
