"""Fixtures shared by every test directory: the tiny test model, built once per session."""

from pathlib import Path

import pytest

from mlx_serving.server.default_model import DEFAULT_MODEL_NAME, make_default_model


@pytest.fixture(scope="session")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random-weight test model (Hugging Face layout), in a directory named after it."""
    return make_default_model(tmp_path_factory.mktemp("models") / DEFAULT_MODEL_NAME)


@pytest.fixture(scope="session")
def hf_tokenizer(model_path: Path):
    """The test model's tokenizer as transformers loads it: the reference for chat templates."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


# ---- repository checks first, and a failing one ends the run ------------------------------

HYGIENE = Path(__file__).with_name("test_repo_hygiene.py")
FAIL_FAST_FAILED = pytest.StashKey[bool]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The repository checks (lint, format, import contracts, stub drift, types) run first; the
    sort is stable, so every other test keeps its place."""
    items.sort(key=lambda item: item.path != HYGIENE)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed and item.get_closest_marker("fail_fast") is not None:
        item.stash[FAIL_FAST_FAILED] = True
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    """After a `fail_fast` check fails (and its report is out), stop: a lint error costs
    seconds, not the whole suite."""
    result = yield
    if item.stash.get(FAIL_FAST_FAILED, False):
        pytest.exit(
            f"{item.nodeid} failed; the rest of the suite was not run",
            returncode=pytest.ExitCode.TESTS_FAILED,
        )
    return result
