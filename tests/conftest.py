"""Fixtures shared by every test directory: the tiny test model, built once per session."""

from pathlib import Path

import pytest

from mlx_serving.engine.default_model import DEFAULT_MODEL_NAME, make_default_model


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight test model (Hugging Face layout), in a directory named after it."""
    return make_default_model(tmp_path_factory.mktemp("models") / DEFAULT_MODEL_NAME)


@pytest.fixture(scope="session")
def hf_tokenizer(model_path: Path):
    """The test model's tokenizer as transformers loads it: the reference for chat templates."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))
