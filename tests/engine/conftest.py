import pytest

from mlx_serving.engine.engine import Engine
from mlx_serving.engine.models import ModelSource

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
