"""What the engine knows about a model, independent of the wire."""

import enum
import os
from dataclasses import dataclass

# Speculative decoding: the draft tokens per step of a pairing that does not say, and the most
# a pairing or a request may ask for (the contract says the same).
DEFAULT_DRAFT_TOKENS = 4
MAX_DRAFT_TOKENS = 16


class ModelState(enum.Enum):
    LOADING = "loading"
    READY = "ready"


@dataclass(frozen=True)
class ModelSource:
    """Exactly one of local_path or repo_id is set."""

    local_path: str | None = None
    repo_id: str | None = None
    revision: str | None = None

    def default_model_id(self) -> str:
        if self.repo_id:
            return self.repo_id.rsplit("/", 1)[-1]
        return os.path.basename(os.path.normpath(self.local_path or "")) or "model"


@dataclass(frozen=True)
class LoadPolicy:
    """What a client's LoadModel may load (the config's `security` section); the operator's own
    models (config `models`, `--model`) load whatever it says. The default allows any source
    and no cap, but never a model's own code: for the engine's tests and tools."""

    # Whether LoadModel and UnloadModel are served at all.
    allow_loading: bool = True
    # The directories local models may come from (symlinks and ".." resolved); None: any.
    model_roots: tuple[str, ...] | None = None
    allow_hugging_face: bool = True
    # The organisations repositories may come from; empty: any.
    hugging_face_organizations: tuple[str, ...] = ()
    trust_remote_code: bool = False
    # Most models held at once, loading ones included; 0: no cap.
    max_loaded_models: int = 0
    # Most bytes of weights held at once, all models together; 0: no cap.
    max_loaded_bytes: int = 0


@dataclass(frozen=True)
class Quantization:
    bits: int
    group_size: int
    mode: str


@dataclass(frozen=True)
class GenerationDefaults:
    """The sampling parameters a model's authors recommend (its generation_config.json): only
    reported, requests that leave a parameter unset get the server's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    source: ModelSource
    state: ModelState
    context_length: int = 0
    parameter_count: int = 0
    dtype: str = ""
    quantization: Quantization | None = None
    vocab_size: int = 0
    has_chat_template: bool = False
    architecture: str = ""
    loaded_time: float | None = None
    # The weights' size in memory, and how much of it is read (a load's progress).
    weight_bytes: int = 0
    weight_bytes_loaded: int = 0
    # The ids that end a generation (the tokenizer's, which the scheduler stops on) and the
    # tokenizer's BOS.
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    generation_defaults: GenerationDefaults = GenerationDefaults()
    # Most sequences decoded together, and the KV bytes they may reserve: configured, or
    # derived from memory when the model loaded (see capacity.py); 0 until it has.
    max_batch_size: int = 0
    max_kv_bytes: int = 0
    # Speculative decoding: the draft model paired with this one ("" for none), and the draft
    # tokens per step of a request that does not say.
    draft_model_id: str = ""
    draft_tokens: int = 0
