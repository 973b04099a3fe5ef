"""The ``tinker://`` path grammar: valid paths of every kind parse; malformed ones fail clearly."""

from __future__ import annotations

import pytest

import tx_types as X  # noqa: N812  (X mirrors the SDK-side alias T)


@pytest.mark.parametrize(
    ("path", "run_id", "ctype", "ckpt_id"),
    [
        (
            "tinker://sess-1:train:0/weights/step-10",
            "sess-1:train:0",
            "training",
            "weights/step-10",
        ),
        ("tinker://abc/sampler_weights/final.v2", "abc", "sampler", "sampler_weights/final.v2"),
        (
            "tinker://r_1/external_weights/HF_export",
            "r_1",
            "external",
            "external_weights/HF_export",
        ),
        ("tinker://8f0e-uuid:train:12/weights/a", "8f0e-uuid:train:12", "training", "weights/a"),
    ],
)
def test_valid_paths(path: str, run_id: str, ctype: str, ckpt_id: str) -> None:
    parsed = X.ParsedCheckpointTinkerPath.from_tinker_path(path)
    assert (parsed.tinker_path, parsed.training_run_id) == (path, run_id)
    assert (parsed.checkpoint_type, parsed.checkpoint_id) == (ctype, ckpt_id)
    assert parsed.kind + "/" + parsed.name == ckpt_id
    assert X.make_tinker_path(run_id, parsed.checkpoint_type, parsed.name) == path


def test_valid_paths_agree_with_sdk() -> None:
    sdk = pytest.importorskip("tinker.types")
    for path in ["tinker://a:train:0/weights/s", "tinker://b/sampler_weights/x.y"]:
        ours = X.ParsedCheckpointTinkerPath.from_tinker_path(path)
        theirs = sdk.ParsedCheckpointTinkerPath.from_tinker_path(path)
        assert ours.model_dump() == theirs.model_dump()


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("s3://bucket/weights/a", "must start with 'tinker://'"),
        ("weights/a", "must start with 'tinker://'"),
        ("tinker://run/weights", "3 parts"),
        ("tinker://run/weights/a/b", "3 parts"),
        ("tinker://run", "3 parts"),
        ("tinker://run/checkpoints/a", "unknown checkpoint kind 'checkpoints'"),
        ("tinker://run/Weights/a", "unknown checkpoint kind"),
        ("tinker:///weights/a", "invalid training run id ''"),
        ("tinker://my run/weights/a", "invalid training run id"),
        ("tinker://run/weights/", "invalid checkpoint name ''"),
        ("tinker://run/weights/..", "invalid checkpoint name '..'"),
        ("tinker://run/weights/.", "invalid checkpoint name '.'"),
        ("tinker://run/weights/a b", "invalid checkpoint name 'a b'"),
        ("tinker://run/weights/a?x=1", "invalid checkpoint name"),
        ("tinker://run/weights/naïve", "invalid checkpoint name"),
    ],
)
def test_malformed_paths(path: str, problem: str) -> None:
    with pytest.raises(ValueError, match="invalid tinker path") as info:
        X.ParsedCheckpointTinkerPath.from_tinker_path(path)
    assert problem in str(info.value)
    assert isinstance(info.value, X.InvalidTinkerPathError)
    assert isinstance(info.value, X.TxTypesError)


def test_make_tinker_path_validates() -> None:
    with pytest.raises(X.InvalidTinkerPathError, match="checkpoint name"):
        X.make_tinker_path("run", "training", "a/b")
    with pytest.raises(X.InvalidTinkerPathError, match="training run id"):
        X.make_tinker_path("a/b", "sampler", "x")
    assert X.validate_checkpoint_name("step_1-a.b") == "step_1-a.b"
