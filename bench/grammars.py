"""Grammar-constrained decoding: llguidance against xgrammar and outlines-core.

For each tokenizer, library and workload (a compact JSON schema, an email-like regex, a choice
of five words): the compile time, and the time to fill one decode step's token masks for every
row of a batch, averaged over a seeded random walk in which each row takes a random token its
mask allows (a row that ends, or is refused a token, starts over from a fresh matcher); the
median over --rounds walks, each from its own compile.

Compile: the median of --compiles compiles from scratch: a new llguidance matcher from the
grammar, xgrammar's compiler with its cache disabled, a new outlines-core Index. The tokenizer
side (llguidance's token trie, xgrammar's TokenizerInfo, outlines' Vocabulary) is built once,
outside the timing. "first mask" is a fresh matcher's first mask (llguidance builds its lexer
lazily; xgrammar precomputes at compile). Fill "batched" is the library's parallel batch API
(--threads threads), "per row" one call per row; outlines-core has only the latter.

Tokenizers: --tokenizer DIR (Hugging Face layout), else the embedded test model's; --vocab N
adds a byte-level BPE of N tokens trained on this Python's standard library sources, built once
into --tokenizer-cache. Libraries not installed are skipped with a note.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from . import report
from .options import choice_list, int_list

LIBRARIES = ("llguidance", "xgrammar", "outlines-core")
WORKLOADS = ("json", "regex", "choice")
BATCHED, PER_ROW = "batched", "per row"

JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "active": {"type": "boolean"},
        "role": {"enum": ["admin", "editor", "viewer", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "street": {"type": "string", "maxLength": 16},
                "city": {"type": "string", "maxLength": 12},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["street", "city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "active", "role", "tags", "address"],
    "additionalProperties": False,
}
# outlines-core ignores minimum and maximum; its own maxDigits bounds the integer instead, or
# a random walk would add digits for ever.
OUTLINES_SCHEMA = json.loads(json.dumps(JSON_SCHEMA))
OUTLINES_SCHEMA["properties"]["age"]["maxDigits"] = 3
# No free whitespace, in all three: a random walk would otherwise wander among the
# vocabulary's many whitespace tokens instead of through the schema.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
EMAIL_REGEX = r"[a-z0-9._]{1,24}@[a-z0-9]{1,12}\.(com|org|net|io)"
CHOICES = ("positive", "negative", "neutral", "mixed", "unknown")

BPE_RECIPE_VERSION = "1"
BPE_CORPUS_CHARS = 20_000_000
BPE_EOS = "<|endoftext|>"
DEFAULT_TOKENIZER_CACHE = Path(tempfile.gettempdir()) / "mlx-serving-bench-tokenizers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tokenizer",
        action="append",
        default=[],
        help="a Hugging Face tokenizer directory (repeatable); default: the test model's",
    )
    parser.add_argument(
        "--vocab",
        type=int_list,
        default=[],
        help="also train a byte-level BPE of each size (e.g. 32000), cached",
    )
    parser.add_argument("--tokenizer-cache", type=Path, default=DEFAULT_TOKENIZER_CACHE)
    parser.add_argument(
        "--libraries", type=choice_list(LIBRARIES), default=list(LIBRARIES), metavar="NAMES"
    )
    parser.add_argument(
        "--workloads", type=choice_list(WORKLOADS), default=list(WORKLOADS), metavar="NAMES"
    )
    parser.add_argument("--batch", type=int_list, default=[16, 32], help="rows per step")
    parser.add_argument("--steps", type=int, default=50, help="decode steps per walk")
    parser.add_argument("--compiles", type=int, default=5, help="compiles per median")
    parser.add_argument("--rounds", type=int, default=3, help="walks per median")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)


@dataclass
class Vocab:
    name: str
    path: Path
    size: int
    eos_id: int
    # Byte-level strings ("Ġword"), by id; None for special tokens.
    tokens: list[str | None]


def load_vocab(path: Path, name: str) -> Vocab:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    config = json.loads((path / "tokenizer_config.json").read_text())
    eos = config["eos_token"]
    eos_id = tokenizer.token_to_id(eos["content"] if isinstance(eos, dict) else eos)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    special = {t.content for t in tokenizer.get_added_tokens_decoder().values() if t.special}
    tokens: list[str | None] = [None] * size
    for text, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        tokens[token_id] = None if text in special else text
    return Vocab(name, path, size, eos_id, tokens)


def chosen_vocabs(args) -> list[Vocab]:
    paths = [(Path(p).name, Path(p)) for p in args.tokenizer]
    if not paths:
        from mlx_serving.server.default_model import default_model_path

        paths = [("test model", default_model_path())]
    paths += [(f"bpe-{n}", trained_tokenizer_path(n, args.tokenizer_cache)) for n in args.vocab]
    return [load_vocab(path, name) for name, path in paths]


def trained_tokenizer_path(vocab_size: int, cache: Path) -> Path:
    """The cached byte-level BPE of `vocab_size` tokens, trained on first use; the same
    Python's standard library gives the same tokenizer."""
    recipe = [BPE_RECIPE_VERSION, vocab_size, BPE_CORPUS_CHARS, sysconfig.get_python_version()]
    digest = hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:10]
    path = cache / f"bpe-{vocab_size}-{digest}"
    if (path / "tokenizer_config.json").is_file():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=cache))
    try:
        write_bpe_tokenizer(staged, vocab_size)
        shutil.rmtree(path, ignore_errors=True)
        staged.rename(path)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return path


def write_bpe_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    print(f"training a {vocab_size}-token BPE into {out.parent} ...", flush=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BPE_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(stdlib_sources(BPE_CORPUS_CHARS), trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"corpus too small for {vocab_size} tokens")
    tokenizer.save(str(out / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": BPE_EOS}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def stdlib_sources(limit: int):
    """Python sources of the standard library, in path order, up to `limit` characters."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(stdlib.rglob("*.py")):
        if "site-packages" in path.parts or total >= limit:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")[: limit - total]
        total += len(text)
        yield text


def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character → byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    shifted = (b for b in range(256) if b not in chars)
    for n, b in enumerate(shifted):
        chars[b] = chr(256 + n)
    return {c: b for b, c in chars.items()}


class Library:
    """One library's way to compile a workload, make a row's matcher, fill masks and advance."""

    name = distribution = ""
    has_batched_fill = True

    def __init__(self, vocab: Vocab):
        self.vocab_size, self.eos_id = vocab.size, vocab.eos_id

    def mask_target(self, bitmask: np.ndarray):
        """What the library writes masks into, sharing the bitmask's memory."""
        return bitmask


class Llguidance(Library):
    name, distribution = "llguidance", "llguidance"

    def __init__(self, vocab: Vocab, threads: int):
        import llguidance

        super().__init__(vocab)
        self.llg = llguidance
        self.tokenizer = llguidance.LLTokenizer(
            str(vocab.path / "tokenizer.json"), n_vocab=vocab.size, eos_token=vocab.eos_id
        )
        self.executor = llguidance.LLExecutor(num_threads=threads)

    def compile(self, workload: str):
        matcher_class = self.llg.LLMatcher
        if workload == "json":
            grammar = matcher_class.grammar_from_json_schema(JSON_SCHEMA, overrides=COMPACT_JSON)
        elif workload == "regex":
            grammar = matcher_class.grammar_from_regex(EMAIL_REGEX)
        else:
            lark = "start: " + " | ".join(json.dumps(c) for c in CHOICES)
            grammar = matcher_class.grammar_from_lark(lark)
        matcher = matcher_class(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise RuntimeError(f"llguidance: {matcher.get_error()}")
        return matcher

    def new_row(self, compiled):
        return compiled.deep_copy()

    def fill_row(self, row, bitmask: np.ndarray, index: int) -> None:
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(row, bitmask, index)

    def fill_batched(self, rows, bitmask: np.ndarray) -> None:
        from llguidance.numpy import fill_next_token_bitmask_par

        matchers = [(row, i) for i, row in enumerate(rows)]
        fill_next_token_bitmask_par(self.executor, matchers, bitmask)

    def advance(self, row, token: int) -> bool:
        return row.consume_token(token)


class Xgrammar(Library):
    name, distribution = "xgrammar", "xgrammar"

    def __init__(self, vocab: Vocab, threads: int):
        import xgrammar
        from transformers import PreTrainedTokenizerFast

        super().__init__(vocab)
        self.xgr = xgrammar
        hf = PreTrainedTokenizerFast(tokenizer_file=str(vocab.path / "tokenizer.json"))
        info = xgrammar.TokenizerInfo.from_huggingface(
            hf, vocab_size=vocab.size, stop_token_ids=[vocab.eos_id]
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=threads, cache_enabled=False)
        self.batch = xgrammar.BatchGrammarMatcher(max_threads=threads)

    def compile(self, workload: str):
        if workload == "json":
            return self.compiler.compile_json_schema(
                json.dumps(JSON_SCHEMA), any_whitespace=False, separators=(",", ":")
            )
        if workload == "regex":
            return self.compiler.compile_regex(EMAIL_REGEX)
        ebnf = "root ::= " + " | ".join(json.dumps(c) for c in CHOICES)
        return self.compiler.compile_grammar(ebnf)

    def mask_target(self, bitmask: np.ndarray):
        import torch

        return torch.from_numpy(bitmask)

    def new_row(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill_row(self, row, bitmask, index: int) -> None:
        row.fill_next_token_bitmask(bitmask, index)

    def fill_batched(self, rows, bitmask) -> None:
        self.batch.batch_fill_next_token_bitmask(rows, bitmask)

    def advance(self, row, token: int) -> bool:
        return row.accept_token(token)


class OutlinesCore(Library):
    name, distribution = "outlines-core", "outlines_core"
    has_batched_fill = False

    def __init__(self, vocab: Vocab, threads: int):
        import outlines_core

        super().__init__(vocab)
        self.oc = outlines_core
        self.vocabulary = outlines_core.Vocabulary(vocab.eos_id, outlines_vocabulary(vocab))

    def compile(self, workload: str):
        if workload == "json":
            from outlines_core.json_schema import build_regex_from_schema

            regex = build_regex_from_schema(json.dumps(OUTLINES_SCHEMA), whitespace_pattern="")
        elif workload == "regex":
            regex = EMAIL_REGEX
        else:
            regex = "(" + "|".join(CHOICES) + ")"
        return self.oc.Index(regex, self.vocabulary)

    def new_row(self, compiled):
        return self.oc.Guide(compiled)

    def fill_row(self, row, bitmask: np.ndarray, index: int) -> None:
        target = bitmask[index]
        row.write_mask_into(target.ctypes.data, target.size, target.itemsize)

    def advance(self, row, token: int) -> bool:
        try:
            row.advance(token, return_tokens=False)
        except ValueError:
            return False
        return True


def outlines_vocabulary(vocab: Vocab) -> dict[bytes, list[int]]:
    """Token bytes → ids, without the special tokens (EOS is the Vocabulary's own)."""
    decoder = byte_decoder()
    by_bytes: dict[bytes, list[int]] = {}
    for token_id, text in enumerate(vocab.tokens):
        if text is None or token_id == vocab.eos_id:
            continue
        if not set(text) <= decoder.keys():
            raise RuntimeError(f"{vocab.name}: outlines-core here needs a byte-level BPE")
        by_bytes.setdefault(bytes(decoder[c] for c in text), []).append(token_id)
    return by_bytes


ADAPTERS = {cls.name: cls for cls in (Llguidance, Xgrammar, OutlinesCore)}


def available_libraries(names: list[str]) -> list[type[Library]]:
    """The chosen libraries that import; a note for each that does not."""
    import importlib

    found = []
    for name in names:
        module = name.replace("-", "_")
        try:
            importlib.import_module(module)
        except ImportError as exc:
            print(f"skipping {name}: not importable here ({exc})", flush=True)
            continue
        found.append(ADAPTERS[name])
    return found


def library_version(adapter) -> str | None:
    try:
        return version(adapter.distribution)
    except PackageNotFoundError:
        return None


def time_compiles(library, workload: str, compiles: int) -> tuple[float, float]:
    """Medians of compile and of a fresh matcher's first mask, in ms."""
    compile_s, first_s = [], []
    bitmask = np.zeros((1, mask_words(library.vocab_size)), dtype=np.int32)
    for _ in range(compiles):
        started = time.perf_counter()
        compiled = library.compile(workload)
        compiled_at = time.perf_counter()
        library.fill_row(library.new_row(compiled), library.mask_target(bitmask), 0)
        compile_s.append(compiled_at - started)
        first_s.append(time.perf_counter() - compiled_at)
    return statistics.median(compile_s) * 1e3, statistics.median(first_s) * 1e3


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allowed_tokens(mask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    bits = np.unpackbits(mask_row.view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


def walk(library, workload: str, batch: int, steps: int, fill: str, rng) -> dict:
    """Mean ms to fill every row's mask per step, over `steps` random steps. Each walk has
    its own compile, so what one walk's matchers build lazily never warms the next."""
    compiled = library.compile(workload)
    rows = [library.new_row(compiled) for _ in range(batch)]
    bitmask = np.zeros((batch, mask_words(library.vocab_size)), dtype=np.int32)
    target = library.mask_target(bitmask)
    seconds, finished, rejected = [], 0, 0
    for _ in range(steps):
        started = time.perf_counter()
        if fill == BATCHED:
            library.fill_batched(rows, target)
        else:
            for i, row in enumerate(rows):
                library.fill_row(row, target, i)
        seconds.append(time.perf_counter() - started)
        for i in range(batch):
            allowed = allowed_tokens(bitmask[i], library.vocab_size)
            token = int(rng.choice(allowed)) if allowed.size else None
            if token == library.eos_id:
                finished += 1
            elif token is not None and library.advance(rows[i], token):
                continue
            else:
                rejected += 1
            rows[i] = library.new_row(compiled)
    return {"mask_ms": statistics.fmean(seconds) * 1e3, "finished": finished, "rejected": rejected}


def measure_library(adapter: type[Library], vocab: Vocab, args) -> list[dict]:
    """One row per workload and fill; each mask figure is the median over --rounds walks,
    the fills taking turns within a round so that load on the host hits them alike."""
    library = adapter(vocab, args.threads)
    fills = [BATCHED, PER_ROW] if library.has_batched_fill else [PER_ROW]
    rows = []
    for workload in args.workloads:
        compile_ms, first_ms = time_compiles(library, workload, args.compiles)
        walks: dict[tuple[str, int], list[dict]] = {(f, b): [] for f in fills for b in args.batch}
        for _ in range(args.rounds):
            for (fill, batch), results in walks.items():
                rng = np.random.default_rng(args.seed)
                results.append(walk(library, workload, batch, args.steps, fill, rng))
        for fill in fills:
            row = {
                "tokenizer": vocab.name,
                "vocab": vocab.size,
                "library": adapter.name,
                "version": library_version(adapter),
                "workload": workload,
                "fill": fill,
                "compile_ms": compile_ms,
                "first_mask_ms": first_ms,
            }
            mine = {batch: walks[fill, batch] for batch in args.batch}
            for batch, results in mine.items():
                row[f"mask_ms_{batch}"] = statistics.median(r["mask_ms"] for r in results)
            # The same seed each round: every round's walks end the same sequences.
            row["finished"] = sum(results[-1]["finished"] for results in mine.values())
            row["rejected"] = sum(r["rejected"] for results in mine.values() for r in results)
            rows.append(row)
        print(f"  {vocab.name} {adapter.name} {workload}: done", flush=True)
    return rows


def ratios_to_llguidance(rows: list[dict], batches: list[int]) -> list[dict]:
    """Each other library's batched fill (outlines-core: per row) against llguidance's."""
    reference = {
        (r["vocab"], r["workload"]): r
        for r in rows
        if r["library"] == "llguidance" and r["fill"] == BATCHED
    }
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["vocab"], r["workload"], r["library"])
        if r["library"] != "llguidance" and (key not in best or r["fill"] == BATCHED):
            best[key] = r
    ratios = []
    for (vocab, workload, library), r in best.items():
        if (base := reference.get((vocab, workload))) is None:
            continue
        for metric in ["compile_ms", *(f"mask_ms_{b}" for b in batches)]:
            ratios.append(
                report.ratio_entry(
                    f"{library} {r['fill']}/llguidance batched",
                    r[metric] / base[metric],
                    vocab=vocab,
                    workload=workload,
                    metric=metric,
                )
            )
    return ratios


def run(args) -> dict:
    adapters = available_libraries(args.libraries)
    if not adapters:
        raise RuntimeError("none of the chosen grammar libraries is installed")
    rows = []
    for vocab in chosen_vocabs(args):
        print(f"{vocab.name}: {vocab.size} tokens ({vocab.path})", flush=True)
        for adapter in adapters:
            rows += measure_library(adapter, vocab, args)
    rejected = sum(r["rejected"] for r in rows)
    checks = [
        report.check_entry(
            "tokens refused after their mask allowed them", rejected, "0", rejected == 0
        )
    ]
    return report.make_report(
        "grammars", args, rows, ratios_to_llguidance(rows, args.batch), checks
    )


def render(result: dict) -> str:
    batches = result["arguments"]["batch"]
    columns = [
        report.Column("tokenizer", "tokenizer"),
        report.Column("vocab", "vocab"),
        report.Column("library", "library"),
        report.Column("version", "version"),
        report.Column("workload", "workload"),
        report.Column("fill", "fill"),
        report.Column("compile ms", "compile_ms", ".2f"),
        report.Column("first mask ms", "first_mask_ms", ".3f"),
        *(report.Column(f"mask ms/step @{b}", f"mask_ms_{b}", ".3f") for b in batches),
        report.Column("finished", "finished"),
        report.Column("refused", "rejected"),
    ]
    return report.format_report(result, columns)
