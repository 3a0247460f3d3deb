import mlx.core as mx
import pytest

from mlx_serving.engine.config import EngineConfig
from mlx_serving.engine.engine import Engine
from mlx_serving.engine.loading import load_model
from mlx_serving.engine.models import ModelSource
from mlx_serving.engine.scheduler import Scheduler

MODEL_ID = "tiny"


@pytest.fixture
async def engine(model_path):
    engine = Engine()
    await engine.start()
    await engine.load_model(ModelSource(local_path=str(model_path)), MODEL_ID)
    yield engine
    await engine.shutdown(0)


@pytest.fixture(scope="session")
def reference(model_path):
    """The same weights loaded by mlx-lm itself, for parity checks."""
    import mlx_lm

    return mlx_lm.load(str(model_path))


@pytest.fixture(scope="module")
def loaded(model_path):
    """The tiny model loaded in this process, for a Scheduler stepped directly."""
    return load_model(ModelSource(local_path=str(model_path)), MODEL_ID)


@pytest.fixture
def scheduler(loaded):
    scheduler = Scheduler(EngineConfig(prefill_gather_seconds=0))
    scheduler.add_model(loaded)
    with mx.stream(scheduler.stream):
        yield scheduler
    scheduler.close()
