"""What a TrainingClient sends, byte for byte, compared with the official SDK.

The tx-server does not serve the training endpoints yet, so a scripted HTTP server plays the
protocol (submission → request id, ``retrieve_future`` → results computed from the decoded
request). The oracle for every body is the SDK's own encoder
(``tinker.proto.request_conv.forward_backward_request_to_proto``) applied to the SDK's own
chunking of the same data.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tinker
import zstandard
from tinker.proto.request_conv import forward_backward_request_to_proto

import tx_client
from tx_client import types
from tx_types.proto import (
    decode_forward_backward_request,
    encode_forward_backward_output,
)

API_KEY = "tml-tx-client-tests-0001"
MODEL_ID = "sess:train:0"


class FakeTrainer:
    """The server side of the script: records decoded requests, answers their futures.

    Logprobs are a fixed function of the target token (``-token/100``) so results are exact.
    """

    def __init__(self) -> None:
        self.requests: dict[str, Any] = {}
        self.order: list[tuple[str, int]] = []
        self.lock = threading.Lock()

    def forward_backward(self, req: Any) -> Any:
        decoded = decode_forward_backward_request(req.body, req.headers.get("content-encoding"))
        with self.lock:
            self.order.append(("forward_backward", decoded.seq_id))
            self.requests[f"fb-{decoded.seq_id}"] = decoded
        return {"request_id": f"fb-{decoded.seq_id}"}

    def optim_step(self, req: Any) -> Any:
        body = json.loads(req.body)
        with self.lock:
            self.order.append(("optim_step", body["seq_id"]))
            self.requests[f"opt-{body['seq_id']}"] = body
        return {"request_id": f"opt-{body['seq_id']}"}

    def result(self, request_id: str) -> tuple[bytes | dict[str, Any], str]:
        if request_id == "create":
            return {"model_id": MODEL_ID}, "application/json"
        if request_id.startswith("opt-"):
            return {"metrics": {"step:unique": 1.0}}, "application/json"
        decoded = self.requests[request_id]
        outputs, loss = [], 0.0
        for datum in decoded.forward_backward_input.data:
            target = datum.loss_fn_inputs["target_tokens"].to_numpy()
            weights = datum.loss_fn_inputs["weights"].to_numpy()
            logprobs = (-target / 100.0).astype(np.float32)
            loss += float(np.sum(-logprobs * weights))
            outputs.append({"logprobs": types.TensorData.from_numpy(logprobs)})
        output = types.ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord",
            loss_fn_outputs=outputs,
            metrics={"loss:sum": loss, "seq:max": float(decoded.seq_id)},
        )
        return encode_forward_backward_output(output), "application/x-protobuf"


@pytest.fixture
def trainer(scripted: Any) -> FakeTrainer:
    fake = FakeTrainer()
    r = scripted.reply
    scripted.replies.clear()
    scripted.script("client/config", r(200, {"fwdbwd_max_chunk_len": 2}))
    scripted.script("client/dynamic_config", r(404, {"detail": "absent"}))
    scripted.script("create_session", r(200, {"session_id": "sess"}))
    scripted.script("create_model", r(200, {"request_id": "create"}))
    info = {"model_id": MODEL_ID, "model_data": {"model_name": "Qwen/Qwen3-0.6B"}}
    scripted.script("get_info", r(200, info))
    scripted.script("forward_backward", lambda req: r(200, fake.forward_backward(req)))
    scripted.script("optim_step", lambda req: r(200, fake.optim_step(req)))

    def retrieve(req: Any) -> Any:
        body, content_type = fake.result(json.loads(req.body)["request_id"])
        return r(200, body, content_type=content_type)

    scripted.script("retrieve_future", retrieve)
    scripted.script("sessions/sess/finish", r(204, b""))
    return fake


def _data(seed: int = 0, n: int = 5) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(2, 9))
        out.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(rng.integers(0, 500, length).tolist()),
                loss_fn_inputs={
                    "target_tokens": rng.integers(0, 500, length),
                    "weights": rng.random(length).astype(np.float32),
                },
            )
        )
    return out


def _sdk_bodies(data: list[types.Datum], loss_fn: str, first_seq: int) -> list[bytes]:
    """The bodies the SDK would send: its chunking (len 2) and its encoder."""
    sdk_data = [
        tinker.types.Datum(
            model_input=tinker.types.ModelInput.from_ints(d.model_input.to_ints()),
            loss_fn_inputs={
                k: tinker.types.TensorData(data=list(v.data), dtype=v.dtype, shape=v.shape)
                for k, v in d.loss_fn_inputs.items()
            },
        )
        for d in data
    ]
    chunks = [sdk_data[i : i + 2] for i in range(0, len(sdk_data), 2)]
    bodies = []
    for i, chunk in enumerate(chunks):
        request = tinker.types.ForwardBackwardRequest(
            forward_backward_input=tinker.types.ForwardBackwardInput(data=chunk, loss_fn=loss_fn),
            model_id=MODEL_ID,
            seq_id=first_seq + i,
        )
        bodies.append(forward_backward_request_to_proto(request).SerializeToString())
    return bodies


def _client(open_service_client: Callable[..., Any], scripted: Any) -> tx_client.ServiceClient:
    """A tx-client on the scripted server, closed by the fixture when the test ends."""
    client: tx_client.ServiceClient = open_service_client(scripted.url, API_KEY, sdk=tx_client)
    return client


def test_create_forward_backward_and_optim_step_on_the_wire(
    scripted: Any, trainer: FakeTrainer, open_service_client: Callable[..., Any]
) -> None:
    with _client(open_service_client, scripted) as sc:
        tc = sc.create_lora_training_client("Qwen/Qwen3-0.6B", rank=8, user_metadata={"k": "v"})
        data = _data()
        fb = tc.forward_backward(data, "cross_entropy")  # returns at once; both pipeline
        opt = tc.optim_step(types.AdamParams(learning_rate=1e-3))
        result, step = fb.result(timeout=20), opt.result(timeout=20)
    create = json.loads(scripted.calls("create_model")[0].body)
    assert create == {
        "session_id": "sess", "model_seq_id": 0, "base_model": "Qwen/Qwen3-0.6B",
        "user_metadata": {"k": "v"}, "type": "create_model", "optimizer_config": {"type": "adamw"},
        "lora_config": {"rank": 8, "train_unembed": True, "train_mlp": True, "train_attn": True},
    }  # fmt: skip
    posts = scripted.calls("forward_backward")
    by_seq = {decode_forward_backward_request(p.body).seq_id: p for p in posts}
    # Compared as decoded messages: protobuf leaves the order of map entries (loss_fn_inputs)
    # unspecified, so equal requests need not be equal bytes; message equality checks every field.
    sdk = tinker.proto.tinker_public_pb2.ForwardBackwardRequest
    assert [sdk.FromString(p.body) for _, p in sorted(by_seq.items())] == [
        sdk.FromString(b) for b in _sdk_bodies(data, "cross_entropy", 1)
    ]
    assert all(p.headers["content-type"] == "application/x-protobuf" for p in posts)
    assert "content-encoding" not in posts[0].headers
    # Chunks 2 and 3 concurrently, the first chunk last, then the optimizer step (spec §3.8).
    assert sorted(trainer.order[:2]) == [("forward_backward", 2), ("forward_backward", 3)]
    assert trainer.order[2:] == [("forward_backward", 1), ("optim_step", 4)]
    assert trainer.requests["opt-4"]["adam_params"]["learning_rate"] == 1e-3
    assert len(result.loss_fn_outputs) == 5
    for datum, out in zip(data, result.loss_fn_outputs, strict=True):
        expected = -datum.loss_fn_inputs["target_tokens"].to_numpy() / 100.0
        np.testing.assert_allclose(out["logprobs"].to_numpy(), expected, rtol=1e-6)
    assert result.metrics["seq:max"] == 3.0
    assert step.metrics == {"step:unique": 1.0}
    assert tc.get_info().model_data.model_name == "Qwen/Qwen3-0.6B"


def test_forward_is_forward_only_and_compression_follows_config(
    scripted: Any, trainer: FakeTrainer, open_service_client: Callable[..., Any]
) -> None:
    scripted.replies["/api/v1/client/config"].clear()
    scripted.script(
        "client/config",
        scripted.reply(200, {"fwdbwd_max_chunk_len": 2, "proto_compress_fwdbwd": True,
                             "parallel_fwdbwd_chunks": False}),
    )  # fmt: skip
    sc = _client(open_service_client, scripted)
    tc = sc.create_lora_training_client("Qwen/Qwen3-0.6B")
    data = _data(seed=3, n=3)
    tc.forward(data, "cross_entropy").result(timeout=20)
    posts = scripted.calls("forward_backward")
    assert {p.headers["content-encoding"] for p in posts} == {"zstd"}
    sdk = tinker.proto.tinker_public_pb2.ForwardBackwardRequest
    # Keyed by seq_id: a transport retry under a loaded CI machine may re-send a chunk.
    by_seq = {}
    for p in posts:
        body = zstandard.ZstdDecompressor().decompress(p.body)
        by_seq[sdk.FromString(body).seq_id] = body
    raw = [body for _, body in sorted(by_seq.items())]
    assert all(sdk.FromString(b).forward_only for b in raw)
    plain = [sdk.FromString(b) for b in _sdk_bodies(data, "cross_entropy", 1)]
    for msg in plain:
        msg.forward_only = True
    assert [sdk.FromString(b) for b in raw] == plain  # messages: map order is unspecified
    assert [s for _, s in trainer.order] == [1, 2]  # sequential when parallel is off
    sc.close().result(timeout=10)


def _custom_loss_numpy(data: Any, logprobs: list[np.ndarray]) -> Any:
    loss = sum(float(np.sum(lp**2)) for lp in logprobs)
    return loss, {"custom:mean": 7.0}, [2.0 * lp for lp in logprobs]


def _custom_loss_jax(data: Any, logprobs: list[Any]) -> Any:
    import jax.numpy as jnp

    return sum(jnp.sum(lp**2) for lp in logprobs), {"custom:mean": 7.0}


@pytest.mark.parametrize(
    ("fn", "backend"), [(_custom_loss_numpy, "numpy"), (_custom_loss_jax, "jax")]
)
def test_forward_backward_custom_two_passes(
    scripted: Any,
    trainer: FakeTrainer,
    fn: Any,
    backend: str,
    open_service_client: Callable[..., Any],
) -> None:
    sc = _client(open_service_client, scripted)
    tc = sc.create_lora_training_client("Qwen/Qwen3-0.6B")
    data = _data(seed=5, n=3)
    result = tc.forward_backward_custom(data, fn, backend=backend).result(timeout=30)
    after = tc.optim_step(types.AdamParams()).result(timeout=20)
    seqs = [s for kind, s in trainer.order if kind == "forward_backward"]
    assert sorted(seqs) == [1, 2, 3, 4]  # 2 chunks × 2 passes; optim_step gets seq 5
    assert ("optim_step", 5) in trainer.order
    assert after.metrics
    forward = [trainer.requests[f"fb-{s}"] for s in (1, 2)]
    backward = [trainer.requests[f"fb-{s}"] for s in (3, 4)]
    assert all(r.forward_only for r in forward)
    assert not any(r.forward_only for r in backward)
    logprobs = [-d.loss_fn_inputs["target_tokens"].to_numpy() / 100.0 for d in data]
    sent = [d for r in backward for d in r.forward_backward_input.data]
    for lp, datum in zip(logprobs, sent, strict=True):
        np.testing.assert_allclose(datum.loss_fn_inputs["weights"].to_numpy(), -2.0 * lp, rtol=1e-5)
    custom = sum(float(np.sum(lp.astype(np.float32) ** 2)) for lp in logprobs)
    assert result.metrics["loss:sum"] == pytest.approx(custom, rel=1e-5)
    surrogate = sum(float(np.sum(-lp * 2.0 * lp)) for lp in logprobs)
    assert result.metrics["surrogate_loss:sum"] == pytest.approx(-surrogate, rel=1e-4)
    assert result.metrics["custom:mean"] == 7.0


def test_custom_loss_failure_does_not_block_later_calls(
    scripted: Any, trainer: FakeTrainer, open_service_client: Callable[..., Any]
) -> None:
    tc = _client(open_service_client, scripted).create_lora_training_client("Qwen/Qwen3-0.6B")

    def broken(data: Any, logprobs: Any) -> Any:
        return 1.0, {}  # numpy backend needs grads too

    with pytest.raises(TypeError, match=r"\(loss, metrics, grads\)"):
        tc.forward_backward_custom(_data(n=1), broken, backend="numpy").result(timeout=20)
    assert tc.optim_step(types.AdamParams()).result(timeout=20).metrics == {"step:unique": 1.0}
    assert trainer.order[-1] == ("optim_step", 3)  # ids 1 (forward) and 2 (skipped) used


def test_async_variants_return_futures_after_submission(
    scripted: Any, trainer: FakeTrainer, open_service_client: Callable[..., Any]
) -> None:
    async def main() -> Any:
        sc = _client(open_service_client, scripted)
        tc = await sc.create_lora_training_client_async("Qwen/Qwen3-0.6B")
        future = await tc.forward_backward_async(_data(n=2), "cross_entropy")
        assert ("forward_backward", 1) in trainer.order  # POSTed before we await the result
        result = await future
        step = await (await tc.optim_step_async(types.AdamParams())).result_async(timeout=20)
        return result, step

    result, step = asyncio.run(main())
    assert len(result.loss_fn_outputs) == 2
    assert step.metrics == {"step:unique": 1.0}


def test_empty_data_and_no_train_flags_are_rejected(
    scripted: Any, trainer: FakeTrainer, open_service_client: Callable[..., Any]
) -> None:
    sc = _client(open_service_client, scripted)
    with pytest.raises(ValueError, match="at least one of train_mlp"):
        sc.create_lora_training_client("m", train_mlp=False, train_attn=False, train_unembed=False)
    tc = sc.create_lora_training_client("Qwen/Qwen3-0.6B")
    with pytest.raises(ValueError, match="at least one Datum"):
        tc.forward_backward([], "cross_entropy")


def test_saves_loads_and_create_from_state_bodies(
    scripted: Any, trainer: FakeTrainer, open_service_client: Callable[..., Any]
) -> None:
    r = scripted.reply
    results = {
        "save": {"path": f"tinker://{MODEL_ID}/weights/s1"},
        "sampler": {"path": f"tinker://{MODEL_ID}/sampler_weights/w1"},
        "snapshot": {"sampling_session_id": "sess:sample:9"},
        "load": {"type": "load_weights"},
        "resume": {},
    }
    scripted.script("save_weights", r(200, {"request_id": "save"}))
    scripted.script(
        "save_weights_for_sampler",
        lambda req: r(
            200, {"request_id": "sampler" if "path" in json.loads(req.body) else "snapshot"}
        ),
    )
    scripted.script(
        "load_weights", r(200, {"request_id": "load"}), r(200, {"request_id": "resume"})
    )
    original = trainer.result
    trainer.result = lambda rid: (
        (results[rid], "application/json") if rid in results else original(rid)
    )  # type: ignore[method-assign]
    sc = _client(open_service_client, scripted)
    tc = sc.create_lora_training_client("Qwen/Qwen3-0.6B")
    save = tc.save_state("s1", ttl_seconds=3600)
    exported = tc.save_weights_for_sampler("w1")
    sampling = tc.save_weights_and_get_sampling_client()
    loaded = tc.load_state_with_optimizer(save.result(timeout=20).path)
    assert exported.result(timeout=20).path.endswith("/sampler_weights/w1")
    assert loaded.result(timeout=20).type == "load_weights"
    assert sampling.get_base_model() == "Qwen/Qwen3-0.6B"  # from get_info, no extra request
    resumed = sc.create_training_client_from_state_with_optimizer(f"tinker://{MODEL_ID}/weights/s1")
    assert resumed.model_id == "sess:train:1"  # derived client-side, then get_info on it
    bodies = {p: [json.loads(c.body) for c in scripted.calls(p)] for p in
              ("save_weights", "save_weights_for_sampler", "load_weights", "get_info")}  # fmt: skip
    assert bodies["save_weights"] == [{"model_id": MODEL_ID, "seq_id": 1, "path": "s1",
        "ttl_seconds": 3600, "overwrite": False, "type": "save_weights"}]  # fmt: skip
    assert bodies["save_weights_for_sampler"] == [
        {"model_id": MODEL_ID, "seq_id": 2, "path": "w1", "kind": "snapshot",
         "type": "save_weights_for_sampler"},
        {"model_id": MODEL_ID, "seq_id": 3, "kind": "snapshot", "sampling_session_seq_id": 0,
         "type": "save_weights_for_sampler"},
    ]  # fmt: skip
    assert bodies["load_weights"] == [
        {"model_id": MODEL_ID, "seq_id": 4, "path": f"tinker://{MODEL_ID}/weights/s1",
         "optimizer": True, "type": "load_weights"},
        {"session_id": "sess", "model_seq_id": 1, "path": f"tinker://{MODEL_ID}/weights/s1",
         "optimizer": True, "type": "load_weights"},
    ]  # fmt: skip
    assert bodies["get_info"][-1] == {"model_id": "sess:train:1", "type": "get_info"}
