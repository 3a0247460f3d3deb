"""A tiny random-weight Llama model, built offline and deterministically.

Tests and local development need a real MLX model that loads with
``mlx_lm.load`` and generates varied text, without downloading anything.
The weights are random, so the text is gibberish, but every code path of a
real checkpoint is exercised: Hugging Face layout, byte-level BPE with
special tokens, a ChatML chat template and an EOS token.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import mlx.core as mx
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

DEFAULT_MODEL_NAME = "tiny-llama"

# Bump when the build changes in a way the digest of the inputs cannot see.
RECIPE_VERSION = "2"

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, IM_START, IM_END, PAD_TOKEN]

VOCAB_SIZE = 2048
MAX_POSITIONS = 2048
SEED = 0

MODEL_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 64,
    "hidden_act": "silu",
    "max_position_embeddings": MAX_POSITIONS,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}

# ChatML, with tools as Qwen2.5 (Hermes) writes them: listed in the system turn, called in
# <tool_call> JSON, answered in a user turn of <tool_response>s. mlx-lm reads calls in this
# format back with its json_tools parser, which it picks for a template naming both
# `<tool_call>` and `tool_call.name`.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}"
    "{{- messages[0].content + '\\n\\n' }}"
    "{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}"
    "{{- '\\n' + tool | tojson }}"
    "{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\\n'
    "</tool_call><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first and tools %}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}"
    "{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}"
    "{{- '\\n' + message.content }}"
    "{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}"
    "{%- set tool_call = tool_call.function %}"
    "{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson + '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
)

CORPUS = """\
The morning fog rolled slowly over the harbour, and the fishing boats waited at
their moorings for the tide. On the quay, an old woman sold bread, cheese and
small paper cones of roasted chestnuts. Children ran between the stalls,
laughing, while their parents argued about the price of onions and the weather.
"It will rain before noon," said the baker. "It always rains on market day."

Every language model begins with a tokenizer. The tokenizer splits text into
pieces, maps each piece to a number, and later turns numbers back into text.
A byte-level tokenizer can represent any string at all, because every string is
just a sequence of bytes. Common words become single tokens; rare words are
spelled out from smaller pieces, and unusual symbols fall back to raw bytes.

Recipe for a simple tomato soup: heat two tablespoons of olive oil in a large
pot. Add one chopped onion and three cloves of garlic, and cook for five
minutes until soft. Stir in 800 g of tomatoes, 500 ml of vegetable stock, a
pinch of salt and a little sugar. Simmer for twenty minutes, then blend until
smooth. Serve hot with fresh basil, black pepper and a slice of warm bread.

In 1969, the first humans walked on the Moon. The journey took about three days
each way, and the astronauts brought back 21.5 kilograms of rock and dust.
Scientists are still studying those samples today, more than fifty years later,
to learn how the Moon formed and why its surface looks the way it does.

Q: What is the capital of France?
A: The capital of France is Paris.
Q: How many legs does a spider have?
A: A spider has eight legs.
Q: Why is the sky blue?
A: Sunlight is scattered by the air, and blue light is scattered the most.

She opened the letter carefully, as if the paper might break. Inside there was
a single photograph: a garden, a wooden bench, and a dog she had not seen in
twenty years. On the back, in faded ink, someone had written only a date and
the words "we never forgot you". She sat down and read it again, and again.

The train to the mountains leaves at 7:45 from platform 3. Passengers should
arrive early, buy their tickets at the machine, and keep their luggage close.
The ride takes four hours and passes through forests, tunnels, small villages
and a long bridge above a bright green river.

Café au lait, crème brûlée, naïve façade, jalapeño, smörgåsbord, São Paulo,
Zürich, Kraków, Ærøskøbing, Dvořák, Ångström, piñata, résumé, déjà vu.
Le petit déjeuner est prêt ; nous partirons à huit heures précises.
Über den Wolken muss die Freiheit wohl grenzenlos sein, sagte er fröhlich.
¿Dónde está la estación? Está al final de la calle, a la izquierda.
Ελληνικά: καλημέρα κόσμε. Русский: привет, мир, как дела?

中文：你好，世界！今天天气很好，我们一起去公园散步吧。
学习新的语言需要时间和耐心，但是非常有意思。
日本語：こんにちは、世界。東京の桜はとても美しいです。
한국어: 안녕하세요, 세계! 오늘은 좋은 날입니다.

Emoji: 👋 🙂 😂 🎉 🚀 🌍 ❤️ 👍 🔥 ✨ 🐍 🍕 ☕ 🌧️ 👨‍👩‍👧 🏳️‍🌈 🇫🇷 🇯🇵
Good morning 🌞! The launch was a success 🚀🎉 and everyone cheered 👏👏.

def fibonacci(n: int) -> list[int]:
    \"\"\"Return the first n Fibonacci numbers.\"\"\"
    values = [0, 1]
    while len(values) < n:
        values.append(values[-1] + values[-2])
    return values[:n]


for i, value in enumerate(fibonacci(10)):
    print(f"{i}: {value}")

class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    def pop(self):
        return self.items.pop()

{"name": "mlx-serving", "version": "0.1.0", "tags": ["llm", "grpc", "mlx"]}
SELECT id, name, email FROM users WHERE active = 1 ORDER BY name LIMIT 10;
$ git clone https://example.com/repo.git && cd repo && make test
int main(void) { printf("hello, world\\n"); return 0; }

The committee met on Tuesday to discuss the budget for the coming year. After
a long debate, the members agreed to spend more on libraries, parks and public
transport, and less on new roads. The decision was not popular with everyone,
but most people in the town seemed pleased when the news was announced.

Rivers carve valleys over millions of years. Water carries sand and stones
downstream, grinding the rock away grain by grain. Where the river meets the
sea, the sediment settles and builds a delta, a wide flat land of marshes,
channels and islands that shift with every flood.

"Could you help me with my homework?" asked Tom.
"Of course," said Maria. "What is the problem?"
"I need to write a short story about a journey, but I have no ideas."
"Then start with a door," she said. "Every journey starts with a door."

The lighthouse keeper climbed the spiral staircase every evening at sunset.
He polished the brass, trimmed the wick, and wrote a line in his logbook:
wind from the northwest, visibility moderate, two ships passed safely. Winter
storms sometimes kept him awake for whole nights, listening to the waves.

Photosynthesis converts sunlight, water and carbon dioxide into sugar and
oxygen. Green plants, algae and certain bacteria depend on chlorophyll, a
pigment that absorbs red and blue wavelengths while reflecting green ones.
Without this quiet chemistry, almost every creature on Earth would starve.

Dear customer, thank you for your order. Your package was shipped yesterday
and should arrive within three to five business days. If anything is missing
or damaged, please reply to this message and we will gladly help. Kind regards.

Numbers and dates: 0 1 2 3 4 5 6 7 8 9 10 42 100 256 1024 2048 3.14159 2.71828
1st 2nd 3rd 4th, 12:30, 2024-05-17, 99%, $19.99, €5, £3, ¥1000, #1, @user.
"""


def make_default_model(path: Path) -> Path:
    """Build the model into ``path``, replacing whatever is there.

    The files are written to a staging directory next to ``path`` and moved
    into place with a rename, so readers never see a half-written model.
    """
    return _build(Path(path), keep_existing=False)


def default_model_path(cache_dir: Path | None = None) -> Path:
    """Return the cached model directory, building it on first use.

    The directory name carries the recipe version and a digest of its
    inputs, so changing the recipe builds a fresh model next to the old one.
    """
    path = cache_root(cache_dir) / f"{DEFAULT_MODEL_NAME}-v{RECIPE_VERSION}-{recipe_digest()}"
    if _is_complete(path):
        return path
    return _build(path, keep_existing=True)


def recipe_digest() -> str:
    """Short digest of everything that shapes the built files."""
    recipe = [CORPUS, MODEL_CONFIG, CHAT_TEMPLATE, SPECIAL_TOKENS, VOCAB_SIZE, SEED]
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:10]


def cache_root(cache_dir: Path | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MLX_SERVING_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mlx-serving"


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in MODEL_FILES)


def _build(path: Path, keep_existing: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _staging_dir(path) as staged:
        _write_model(staged)
        _install(staged, path, keep_existing)
    return path


@contextlib.contextmanager
def _staging_dir(path: Path) -> Iterator[Path]:
    """A sibling temp dir (same filesystem, so rename is atomic), removed on exit."""
    staged = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    staged.chmod(0o755)
    try:
        yield staged
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def _install(staged: Path, path: Path, keep_existing: bool) -> None:
    """Rename ``staged`` to ``path``; a complete model already there wins if asked."""
    try:
        os.rename(staged, path)
        return
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if keep_existing and _is_complete(path):
        return
    aside = staged.with_name(staged.name + ".old")
    os.rename(path, aside)
    try:
        os.rename(staged, path)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def _write_model(out: Path) -> None:
    tokenizer = _train_tokenizer()
    ids = _special_token_ids(tokenizer)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "config.json", _model_config(ids))
    _write_json(out / "generation_config.json", _generation_config(ids))
    _write_json(out / "tokenizer_config.json", _tokenizer_config())
    _write_json(out / "special_tokens_map.json", _special_tokens_map())
    weights = _init_weights(list(ids.values()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})


def _special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The ids of SPECIAL_TOKENS, which the trainer always adds to the vocabulary."""
    ids = {}
    for token in SPECIAL_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise RuntimeError(f"the trained tokenizer lacks the special token {token!r}")
        ids[token] = token_id
    return ids


def _train_tokenizer() -> Tokenizer:
    """Byte-level BPE (GPT-2 style), so any UTF-8 text is encodable.

    The ByteLevel decoder is what makes mlx-lm pick its BPE streaming
    detokenizer, which holds back incomplete multi-byte characters.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(keepends=True), trainer=trainer)
    if tokenizer.get_vocab_size() != VOCAB_SIZE:
        raise RuntimeError(
            f"corpus too small: tokenizer has {tokenizer.get_vocab_size()} tokens, "
            f"expected {VOCAB_SIZE}"
        )
    return tokenizer


def _model_config(ids: dict[str, int]) -> dict:
    return {
        **MODEL_CONFIG,
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[PAD_TOKEN],
    }


def _generation_config(ids: dict[str, int]) -> dict:
    """With sampling defaults, as real checkpoints recommend (reported by GetModel only)."""
    return {
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[IM_END],
        "pad_token_id": ids[PAD_TOKEN],
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
    }


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": IM_END,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IM_START, IM_END],
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
    }


def _special_tokens_map() -> dict:
    return {
        "bos_token": BOS_TOKEN,
        "eos_token": IM_END,
        "pad_token": PAD_TOKEN,
        "additional_special_tokens": [IM_START, IM_END],
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _init_weights(special_ids: list[int]) -> dict[str, mx.array]:
    """Random float32 weights, each drawn from its own name-derived key.

    Explicit keys leave the global RNG untouched, so callers' seeded sampling
    does not depend on whether the model came from the cache. The scales keep
    the logits spread out enough for greedy decoding to wander instead of
    locking onto one token, and the special tokens' rows are zeroed so random
    decoding never emits EOS or chat markers by itself.
    """
    weights = {
        name: _init_param(name, shape)
        for name, shape in llama_param_shapes({**MODEL_CONFIG, "vocab_size": VOCAB_SIZE}).items()
    }
    weights["lm_head.weight"][mx.array(special_ids)] = 0.0
    mx.eval(weights)
    return weights


def llama_param_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint names and shapes of mlx-lm's llama for a config.json (``load`` checks them)."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_dim = config["num_attention_heads"] * head_dim
    kv_dim = config["num_key_value_heads"] * head_dim
    layer = {
        "input_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (q_dim, hidden),
        "self_attn.k_proj.weight": (kv_dim, hidden),
        "self_attn.v_proj.weight": (kv_dim, hidden),
        "self_attn.o_proj.weight": (hidden, q_dim),
        "post_attention_layernorm.weight": (hidden,),
        "mlp.gate_proj.weight": (inter, hidden),
        "mlp.up_proj.weight": (inter, hidden),
        "mlp.down_proj.weight": (hidden, inter),
    }
    shapes = {
        "model.embed_tokens.weight": (config["vocab_size"], hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{name}": shape for name, shape in layer.items()})
    return dict(sorted(shapes.items()))


def _init_param(name: str, shape: tuple[int, ...]) -> mx.array:
    if name.endswith("norm.weight"):
        return mx.ones(shape, dtype=mx.float32)
    key = mx.random.key(zlib.crc32(f"{SEED}:{name}".encode()))
    scale = 1.0 if name.endswith("embed_tokens.weight") else shape[-1] ** -0.5
    return mx.random.normal(shape, dtype=mx.float32, key=key) * scale
