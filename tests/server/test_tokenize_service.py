import grpc
import pytest
from wire_helpers import field_violations, rpc_error, violated_fields

from mlx_serving.v1 import tokenize_service_pb2 as tokenize_pb

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
