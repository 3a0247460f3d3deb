import grpc
import pytest
from model_variants import with_bos_added
from wire_helpers import field_violations, rpc_error, violated_fields

from mlx_serving.engine.config import EngineConfig
from mlx_serving.server.default_model import BOS_TOKEN
from mlx_serving.v1 import model_service_pb2 as model_pb
from mlx_serving.v1 import tokenize_service_pb2 as tokenize_pb
from mlx_serving.v1 import tokenize_service_pb2_grpc as tokenize_grpc

pytestmark = pytest.mark.asyncio(loop_scope="session")

MODEL_ID = "tiny"  # preloaded by the server fixture
TEXT = "Hello 👋 你好，世界！ 👨‍👩‍👧 🇯🇵 naïve"


def tokenize_request(text: str = TEXT, **kwargs) -> tokenize_pb.TokenizeRequest:
    return tokenize_pb.TokenizeRequest(model_id=MODEL_ID, text=text, **kwargs)


async def test_tokenize_then_detokenize_gives_back_emoji_and_cjk(tokenize, hf_tokenizer):
    tokens = await tokenize.Tokenize(tokenize_request(return_pieces=True))
    assert list(tokens.token_ids) == hf_tokenizer.encode(TEXT, add_special_tokens=False)
    assert list(tokens.pieces) == [hf_tokenizer.decode([t]) for t in tokens.token_ids]
    assert any("\ufffd" in piece for piece in tokens.pieces)  # emoji span several tokens
    text = await tokenize.Detokenize(
        tokenize_pb.DetokenizeRequest(model_id=MODEL_ID, token_ids=tokens.token_ids)
    )
    assert text.text == TEXT


async def test_pieces_only_when_asked_and_special_tokens_as_the_tokenizer_adds_them(
    tokenize, hf_tokenizer
):
    tokens = await tokenize.Tokenize(tokenize_request(add_special_tokens=True))
    assert list(tokens.token_ids) == hf_tokenizer.encode(TEXT, add_special_tokens=True)
    assert not tokens.pieces
    empty = await tokenize.Tokenize(tokenize_request(text="", return_pieces=True))
    assert not empty.token_ids and not empty.pieces


async def test_detokenize_can_skip_special_tokens(tokenize, hf_tokenizer):
    ids = hf_tokenizer.encode("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)
    kept = await tokenize.Detokenize(
        tokenize_pb.DetokenizeRequest(model_id=MODEL_ID, token_ids=ids)
    )
    skipped = await tokenize.Detokenize(
        tokenize_pb.DetokenizeRequest(model_id=MODEL_ID, token_ids=ids, skip_special_tokens=True)
    )
    assert kept.text == "<|im_start|>user\nhi<|im_end|>"
    assert skipped.text == "user\nhi"


async def test_detokenizing_ids_past_the_vocabulary_names_each_index(tokenize):
    request = tokenize_pb.DetokenizeRequest(model_id=MODEL_ID, token_ids=[1, 2, 2048, 3, 5000])
    error = await rpc_error(tokenize.Detokenize(request))
    assert field_violations(error) == [
        ("token_ids[2]", "token id 2048 is not below the vocabulary size 2048"),
        ("token_ids[4]", "token id 5000 is not below the vocabulary size 2048"),
    ]


async def test_unknown_models_are_not_found(tokenize):
    for call in (
        tokenize.Tokenize(tokenize_pb.TokenizeRequest(model_id="absent", text="hi")),
        tokenize.Detokenize(tokenize_pb.DetokenizeRequest(model_id="absent", token_ids=[1])),
    ):
        assert (await rpc_error(call)).code() is grpc.StatusCode.NOT_FOUND


async def test_a_model_id_is_required(tokenize):
    for call in (
        tokenize.Tokenize(tokenize_pb.TokenizeRequest(text="hi")),
        tokenize.Detokenize(tokenize_pb.DetokenizeRequest(token_ids=[1])),
    ):
        assert violated_fields(await rpc_error(call)) == ["model_id"]


def spans(tokens) -> list[tuple[int, int]]:
    return [(offset.start, offset.end) for offset in tokens.offsets]


def covered_text(text: str, offsets: list[tuple[int, int]]) -> str:
    """The text the offsets cover, in order, each character once (tokens that split one
    multi-byte character each cover all of it)."""
    covered, end = "", 0
    for start, stop in offsets:
        assert end >= start >= 0 and stop >= start, (start, stop)
        covered += text[max(end, start) : stop]
        end = max(end, stop)
    return covered


async def test_offsets_slice_an_ascii_text_back_into_its_pieces(tokenize):
    text = "The quick brown fox, 42 times."
    tokens = await tokenize.Tokenize(
        tokenize_request(text, return_pieces=True, return_offsets=True)
    )
    assert [text[start:end] for start, end in spans(tokens)] == list(tokens.pieces)
    assert tokens.count == len(tokens.token_ids) == len(tokens.offsets) > 1


async def test_offsets_count_characters_not_bytes(tokenize):
    tokens = await tokenize.Tokenize(tokenize_request(return_pieces=True, return_offsets=True))
    offsets = spans(tokens)
    assert len(offsets) == len(tokens.pieces)
    assert covered_text(TEXT, offsets) == TEXT  # byte offsets would run past the end
    for (start, end), piece in zip(offsets, tokens.pieces, strict=True):
        if "\ufffd" in piece:  # part of a character: its offsets cover the whole character
            assert piece.replace("\ufffd", "") in TEXT[start:end]
        else:
            assert TEXT[start:end] == piece
    assert any("\ufffd" in piece for piece in tokens.pieces)


async def test_offsets_without_pieces_and_of_an_empty_text(tokenize):
    tokens = await tokenize.Tokenize(tokenize_request(return_offsets=True))
    assert not tokens.pieces and len(tokens.offsets) == len(tokens.token_ids) == tokens.count
    empty = await tokenize.Tokenize(tokenize_request(text="", return_offsets=True))
    assert not empty.offsets and empty.count == 0


async def test_count_only_gives_the_count_alone(tokenize, hf_tokenizer):
    for add_special_tokens in (False, True):
        tokens = await tokenize.Tokenize(
            tokenize_request(
                count_only=True,
                return_pieces=True,
                return_offsets=True,
                add_special_tokens=add_special_tokens,
            )
        )
        expected = hf_tokenizer.encode(TEXT, add_special_tokens=add_special_tokens)
        assert tokens == tokenize_pb.TokenizeResponse(count=len(expected))


async def test_several_texts_are_each_tokenized_as_alone(tokenize):
    texts = [TEXT, "", "Hello world", "<|im_start|>user\nhi<|im_end|>", "naïve café"]
    options = {"return_pieces": True, "return_offsets": True, "add_special_tokens": True}
    batch = await tokenize.Tokenize(
        tokenize_pb.TokenizeRequest(model_id=MODEL_ID, texts=texts, **options)
    )
    assert not batch.token_ids and not batch.pieces and not batch.offsets
    assert len(batch.results) == len(texts)
    for text, result in zip(texts, batch.results, strict=True):
        alone = await tokenize.Tokenize(tokenize_request(text, **options))
        assert result == tokenize_pb.Tokenized(
            token_ids=alone.token_ids, pieces=alone.pieces, offsets=alone.offsets, count=alone.count
        )
    assert batch.count == sum(result.count for result in batch.results)
    counted = await tokenize.Tokenize(
        tokenize_pb.TokenizeRequest(model_id=MODEL_ID, texts=texts, count_only=True)
    )
    assert [r.count for r in counted.results] == [r.count for r in batch.results]
    assert not any(r.token_ids for r in counted.results) and counted.count == batch.count


async def test_text_and_texts_together_are_refused_naming_texts(tokenize):
    request = tokenize_pb.TokenizeRequest(model_id=MODEL_ID, text="a", texts=["b", "c"])
    assert violated_fields(await rpc_error(tokenize.Tokenize(request))) == ["texts"]


async def test_the_byte_limit_counts_all_texts_together(fresh_server):
    app = await fresh_server(EngineConfig(max_tokenize_bytes=100))
    async with grpc.aio.insecure_channel(app.address) as channel:
        stub = tokenize_grpc.TokenizeServiceStub(channel)
        fits = tokenize_pb.TokenizeRequest(model_id=MODEL_ID, texts=["é" * 25] * 2)  # 100 bytes
        assert len((await stub.Tokenize(fits)).results) == 2
        over = tokenize_pb.TokenizeRequest(model_id=MODEL_ID, texts=["x" * 40] * 3)
        error = await rpc_error(stub.Tokenize(over))
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert [field for field, _ in field_violations(error)] == ["texts"]
        one = tokenize_pb.TokenizeRequest(model_id=MODEL_ID, text="é" * 51)  # 102 bytes
        assert violated_fields(await rpc_error(stub.Tokenize(one))) == ["text"]


async def test_a_special_token_the_tokenizer_adds_covers_no_text(
    tokenize, models, model_path, tmp_path
):
    variant = with_bos_added(model_path, tmp_path / "with-bos", BOS_TOKEN)
    source = model_pb.ModelSource(local_path=str(variant))
    await models.LoadModel(model_pb.LoadModelRequest(model_id="with-bos", source=source))
    try:
        text = "Hello 👋"
        request = tokenize_pb.TokenizeRequest(
            model_id="with-bos",
            text=text,
            add_special_tokens=True,
            return_pieces=True,
            return_offsets=True,
        )
        tokens = await tokenize.Tokenize(request)
        assert tokens.pieces[0] == BOS_TOKEN
        (start, end), *rest = spans(tokens)
        assert start == end
        assert covered_text(text, rest) == text
    finally:
        await models.UnloadModel(model_pb.UnloadModelRequest(model_id="with-bos"))
