"""Properties of the stop matcher and the streaming detokenizer, over random inputs."""

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.tokenizer_utils import load

from mlx_serving.engine.detokenizer import StreamingDetokenizer
from mlx_serving.engine.stopping import StopMatcher

# ---- stop strings ------------------------------------------------------------------------

# A small alphabet, so that stop strings occur often; with a character beyond the BMP.
ALPHABET = "ab\né😀"
chunks_of_text = st.lists(st.text(ALPHABET, max_size=6), max_size=12)
stop_strings = st.lists(st.text(ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3)


def stream(matcher: StopMatcher, chunks: list[str]) -> tuple[list[tuple[str, str]], str | None]:
    """(text fed so far, text emitted so far) after each feed, then after the flush; the stop."""
    fed = shown = ""
    seen = []
    for chunk in chunks:
        fed += chunk
        text, stop = matcher.feed(chunk)
        shown += text
        seen.append((fed, shown))
        if stop is not None:
            return seen, stop
    seen.append((fed, shown + matcher.flush()))
    return seen, None


def cut(text: str, stops: list[str], include_stop: bool) -> tuple[str, str | None]:
    """The whole text at once: cut before its first stop (the longest of those starting there)."""
    found = [(text.find(s), -len(s), s) for s in stops if s in text]
    if not found:
        return text, None
    start, _, stop = min(found)
    return text[: start + (len(stop) if include_stop else 0)], stop


def without_nesting(stops: list[str]) -> list[str]:
    """The stops that contain no other stop: with nested ones, which stop matches first
    depends on where the chunks end (a stream stops as soon as the inner one is complete)."""
    return [s for s in dict.fromkeys(stops) if not any(t != s and t in s for t in stops)]


@settings(max_examples=400, deadline=None)
@given(chunks=chunks_of_text, stops=stop_strings, include_stop=st.booleans())
def test_streamed_text_is_never_retracted_and_holds_back_only_a_partial_stop(
    chunks, stops, include_stop
):
    seen, stop = stream(StopMatcher(tuple(stops), include_stop), chunks)
    output = seen[-1][1]
    for fed, shown in seen:
        assert output.startswith(shown)  # nothing shown is taken back
        assert fed.startswith(shown)
    longest = max(len(s) for s in stops)
    for fed, shown in seen[:-1]:  # only what might still become a stop is held back
        assert len(fed) - len(shown) < longest
    text = seen[-1][0]
    if stop is None:
        assert output == text
        assert not any(s in text for s in stops)
        return
    before = output[: len(output) - len(stop)] if include_stop else output
    assert stop in stops and text.startswith(before + stop)
    assert output == before + (stop if include_stop else "")
    assert not any(s in before for s in stops)
    if len(seen) > 1:  # it stopped at the first chunk that completed a stop string
        assert not any(s in seen[-2][0] for s in stops)


@settings(max_examples=400, deadline=None)
@given(chunks=chunks_of_text, stops=stop_strings, include_stop=st.booleans())
def test_streamed_text_and_flush_equal_the_text_cut_at_once(chunks, stops, include_stop):
    stops = without_nesting(stops)
    seen, stop = stream(StopMatcher(tuple(stops), include_stop), chunks)
    assert (seen[-1][1], stop) == cut("".join(chunks), stops, include_stop)


# ---- the streaming detokenizer -------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(model_path):
    return load(model_path)


# Any text: multi-byte characters, combining marks, control characters, and special tokens.
any_text = st.lists(
    st.one_of(
        st.characters(exclude_categories=["Cs"]),
        st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", " ", "\n", "👨‍👩‍👧"]),
    ),
    max_size=30,
).map("".join)


def detokenized(tokenizer, ids: list[int]) -> str:
    detokenizer = StreamingDetokenizer(tokenizer)
    return "".join(detokenizer.add_token(t) for t in ids) + detokenizer.finalize()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=any_text)
def test_the_stream_of_encoded_text_is_its_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert detokenized(tokenizer, ids) == tokenizer.decode(ids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_the_stream_of_any_ids_is_their_decode(tokenizer, data):
    """Raw ids, mixed with encoded text: bytes of characters left incomplete, or out of order."""
    vocab = len(tokenizer.get_vocab())
    pieces = data.draw(
        st.lists(
            st.one_of(
                st.lists(st.integers(0, vocab - 1), min_size=1, max_size=4),
                any_text.map(lambda text: tokenizer.encode(text, add_special_tokens=False)),
            ),
            max_size=6,
        )
    )
    ids = [token for piece in pieces for token in piece]
    assert detokenized(tokenizer, ids) == tokenizer.decode(ids)
