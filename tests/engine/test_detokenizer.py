from mlx_serving.engine.detokenizer import StreamingDetokenizer

TEXTS = ["héllo 👋 你好 世界 👨‍👩‍👧 🇯🇵", " leading space", "nul\x00byte", "a  b   c"]


def test_stream_concatenates_to_the_full_decode_and_never_splits_a_character(reference):
    _, tokenizer = reference
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        detokenizer = StreamingDetokenizer(tokenizer)
        pieces = [detokenizer.add_token(t) for t in ids] + [detokenizer.finalize()]
        assert "".join(pieces) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in p for p in pieces)
