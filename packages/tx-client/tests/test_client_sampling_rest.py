"""SamplingClient and RestClient requests on the wire (scripted server; the tx-server does not
serve sampling or checkpoint routes yet), plus tokenizer resolution."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import tx_client
from tx_client import types
from tx_client._tokenizer import tokenizer_id_for
from tx_types.proto import encode_sample_response

API_KEY = "tml-tx-client-tests-0001"


@pytest.fixture
def sampler(scripted: Any) -> Any:
    r = scripted.reply
    scripted.script("create_session", r(200, {"session_id": "sess"}))
    scripted.script("create_sampling_session", r(200, {"sampling_session_id": "sess:sample:0"}))
    scripted.script(
        "samplers/sess:sample:0",
        r(200, {"sampler_id": "sess:sample:0", "base_model": "Qwen/Qwen3-0.6B"}),
    )

    def asample(req: Any) -> Any:
        body = json.loads(req.body)
        ids = [f"seq-{body['seq_id']}-{i}" for i in range(body["num_samples"])]
        return r(200, {"request_id": f"s-{body['seq_id']}-{body['num_samples']}",
                       "sample_sequence_ids": ids})  # fmt: skip

    def retrieve(req: Any) -> Any:
        _, seq, n = json.loads(req.body)["request_id"].split("-")
        response = types.SampleResponse(
            sequences=[
                types.SampledSequence(
                    stop_reason="length", tokens=[7, int(seq)], logprobs=[-0.5, -1.0]
                )
                for _ in range(int(n))
            ],
            prompt_logprobs=[None, -1.5, -2.5],
        )
        return r(200, encode_sample_response(response), content_type="application/x-protobuf")

    scripted.script("asample", asample)
    scripted.script("retrieve_future", retrieve)
    return scripted


def test_sample_and_compute_logprobs(sampler: Any, open_service_client: Callable[..., Any]) -> None:
    sc = open_service_client(sampler.url, API_KEY, sdk=tx_client)
    client = sc.create_sampling_client(base_model=None, model_path="tinker://run/sampler_weights/s")
    assert client.get_base_model() == "Qwen/Qwen3-0.6B"  # from GET /samplers/{id}
    prompt = types.ModelInput.from_ints([1, 2, 3])
    params = types.SamplingParams(max_tokens=2, temperature=0.7, stop=["\n"])
    first = client.sample(prompt, 2, params, include_prompt_logprobs=True).result(timeout=20)
    assert [s.sequence_id for s in first.sequences] == ["seq-0-0", "seq-0-1"]
    assert first.sequences[0].tokens == [7, 0]
    assert first.prompt_logprobs == [None, -1.5, -2.5]
    logprobs = client.compute_logprobs(prompt).result(timeout=20)
    assert logprobs == [None, -1.5, -2.5]
    bodies = [json.loads(c.body) for c in sampler.calls("asample")]
    assert bodies[0] == {
        "num_samples": 2, "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {"max_tokens": 2, "stop": ["\n"], "temperature": 0.7, "top_k": -1,
                            "top_p": 1.0},
        "sampling_session_id": "sess:sample:0", "seq_id": 0, "prompt_logprobs": True,
        "topk_prompt_logprobs": 0, "topk_sample_logprobs": 0, "prompt_alt_tokens_k": 0,
        "record_stability_info": False, "type": "sample",
    }  # fmt: skip
    assert bodies[1]["seq_id"] == 1
    assert bodies[1]["num_samples"] == 1
    assert bodies[1]["sampling_params"] == {"max_tokens": 1, "temperature": 1.0, "top_k": -1,
                                            "top_p": 1.0}  # fmt: skip
    assert all(c.headers["x-tinker-sampling-backpressure"] == "1" for c in sampler.calls("asample"))
    create = json.loads(sampler.calls("create_sampling_session")[0].body)
    assert create == {"session_id": "sess", "sampling_session_seq_id": 0,
                      "model_path": "tinker://run/sampler_weights/s",
                      "type": "create_sampling_session"}  # fmt: skip


def test_sampling_client_argument_checks(
    sampler: Any, open_service_client: Callable[..., Any]
) -> None:
    sc = open_service_client(sampler.url, API_KEY, sdk=tx_client)
    with pytest.raises(ValueError, match="model_path or base_model"):
        sc.create_sampling_client()
    with pytest.raises(ValueError, match="tinker://"):
        sc.create_sampling_client(model_path="/tmp/x")
    client = sc.create_sampling_client(base_model="Qwen/Qwen3-0.6B")
    with pytest.raises(ValueError, match="set include_prompt_logprobs"):
        client.sample(
            types.ModelInput.from_ints([1]), 1, {"max_tokens": 1}, prompt_logprobs_last_n=1
        )
    assert sampler.calls("samplers/sess:sample:0") == []  # base model given: no lookup


def test_rest_client_routes(scripted: Any) -> None:
    r = scripted.reply
    run = {"training_run_id": "s:train:0", "base_model": "m", "model_owner": "me",
           "is_lora": True, "last_request_time": "2026-01-01T00:00:00Z"}  # fmt: skip
    scripted.script("training_runs", r(200, {"training_runs": [run],
                    "cursor": {"offset": 5, "limit": 1, "total_count": 9}}))  # fmt: skip
    scripted.script("training_runs/s:train:0", r(200, run))
    scripted.script("training_runs/s:train:0/checkpoints/weights/step1", r(204, b""))
    scripted.script("training_runs/s:train:0/checkpoints/weights/step1/publish", r(204, b""))
    scripted.script("weights_info", r(200, {"base_model": "m", "is_lora": True, "lora_rank": 8}))
    rest = tx_client.RestClient(base_url=scripted.url, api_key=API_KEY)
    page = rest.list_training_runs(limit=1, offset=5).result(timeout=10)
    assert page.cursor.total_count == 9
    assert page.training_runs[0].training_run_id == "s:train:0"
    path = "tinker://s:train:0/weights/step1"
    assert rest.get_training_run_by_tinker_path(path).result(timeout=10).base_model == "m"
    rest.delete_checkpoint_from_tinker_path(path).result(timeout=10)
    rest.publish_checkpoint_from_tinker_path(path).result(timeout=10)
    rest.unpublish_checkpoint_from_tinker_path(path).result(timeout=10)
    assert rest.get_weights_info_by_tinker_path(path).result(timeout=10).lora_rank == 8
    seen = [(c.method, c.path) for c in scripted.received if "config" not in c.path]
    assert seen == [
        ("GET", "/api/v1/training_runs?limit=1&offset=5&access_scope=owned"),
        ("GET", "/api/v1/training_runs/s:train:0?access_scope=owned"),
        ("DELETE", "/api/v1/training_runs/s:train:0/checkpoints/weights/step1"),
        ("POST", "/api/v1/training_runs/s:train:0/checkpoints/weights/step1/publish"),
        ("DELETE", "/api/v1/training_runs/s:train:0/checkpoints/weights/step1/publish"),
        ("POST", "/api/v1/weights_info"),
    ]
    assert "content-type" not in scripted.received[-5].headers  # GET carries no body type
    assert json.loads(scripted.received[-1].body) == {"tinker_path": path}


@pytest.mark.parametrize(
    ("name", "tokenizer_id", "expected"),
    [
        ("Qwen/Qwen3-0.6B", None, "Qwen/Qwen3-0.6B"),
        ("org/model/variant", None, "org/model"),
        ("meta-llama/Llama-3.2-1B", None, "thinkingmachineslabinc/meta-llama-3-instruct-tokenizer"),
        ("Qwen/Qwen3-8B:peft", None, "Qwen/Qwen3-8B"),
        ("/data/models/Qwen3-0.6B", None, "/data/models/Qwen3-0.6B"),
        ("/models/Qwen3-0.6B", None, "/models"),  # the SDK's heuristic mangles 2-slash paths
        ("anything", "/abs/tokenizer/dir", "/abs/tokenizer/dir"),
    ],
)
def test_tokenizer_resolution_matches_spec(
    name: str, tokenizer_id: str | None, expected: str
) -> None:
    assert tokenizer_id_for(name, tokenizer_id) == expected


def test_get_tokenizer_loads_a_local_directory(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    from tx_client._http import Transport
    from tx_client._session import SessionHolder

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    raw = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(
        tmp_path / "tok"
    )
    info = types.GetInfoResponse(
        model_id="s:train:0",
        model_data=types.ModelData(
            model_name="Qwen/Qwen3-0.6B", tokenizer_id=str(tmp_path / "tok")
        ),
    )
    holder = SessionHolder(Transport("http://127.0.0.1:1", API_KEY))
    tc = tx_client.TrainingClient(holder, "s:train:0", info)
    assert tc.get_tokenizer().encode("hello world") == [1, 2]
    assert np.array_equal(tc.get_tokenizer().encode("world"), [2])
