"""Our generated schema vs the SDK's compiled ``tinker_public`` descriptor.

Wire compatibility depends on field numbers, types, labels and oneof/optional membership only;
this test checks all of them for every message and enum, so a schema edit that would change
bytes on the wire fails here even before the cross-codec tests.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from google.protobuf import descriptor as _descriptor
from google.protobuf import descriptor_pb2, descriptor_pool, text_format
from tinker.proto import tinker_public_pb2 as sdk_pb

from tx_types.proto import tinker_public_pb2 as tx_pb

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _normalized(
    file: _descriptor.FileDescriptor, package: str
) -> descriptor_pb2.FileDescriptorProto:
    """The file as a FileDescriptorProto with the package name factored out."""
    proto = descriptor_pb2.FileDescriptorProto()
    file.CopyToProto(proto)
    text = text_format.MessageToString(proto).replace(f'".{package}.', '".PKG.')
    normalized = text_format.Parse(text, descriptor_pb2.FileDescriptorProto())
    normalized.ClearField("name")
    normalized.ClearField("package")
    return normalized


def test_descriptor_matches_sdk_field_for_field() -> None:
    """Every message, enum, field number, type, label, oneof and proto3 ``optional`` agrees."""
    ours = _normalized(tx_pb.DESCRIPTOR, "tx_types.tinker_public")
    sdk = _normalized(sdk_pb.DESCRIPTOR, "tinker_public")
    assert [m.name for m in ours.message_type] == [m.name for m in sdk.message_type]
    for mine, theirs in zip(ours.message_type, sdk.message_type, strict=True):
        assert mine == theirs, mine.name
    assert ours == sdk
    assert tx_pb.DESCRIPTOR.package == "tx_types.tinker_public"
    assert sdk_pb.DESCRIPTOR.package == "tinker_public"


def test_committed_proto_matches_generated_module() -> None:
    """The .pb2 must be regenerated whenever the .proto changes (scripts/gen_proto.sh)."""
    proto_text = (PACKAGE_DIR / "src/tx_types/proto/tinker_public.proto").read_text()
    generated = descriptor_pb2.FileDescriptorProto()
    tx_pb.DESCRIPTOR.CopyToProto(generated)
    messages = re.findall(r"^message (\w+) \{", proto_text, flags=re.MULTILINE)
    enums = re.findall(r"^enum (\w+) \{", proto_text, flags=re.MULTILINE)
    assert messages == [m.name for m in generated.message_type]
    assert enums == [e.name for e in generated.enum_type]
    for message in generated.message_type:
        for field in message.field:
            if field.label != field.LABEL_REPEATED or not field.type_name.endswith("Entry"):
                assert re.search(rf"\b{field.name} = {field.number};", proto_text), field.name


def test_sdk_and_tx_modules_load_in_one_process() -> None:
    """Both register in protobuf's default pool; the same full name twice would raise at import.

    This module imports both, so merely being collected proves they coexist (the clash does not
    depend on import order: whichever file is added second would be refused). The pool lookups
    show the two schemas are distinct entries of the same default pool.
    """
    pool = descriptor_pool.Default()
    assert pool.FindMessageTypeByName("tinker_public.Tensor") is sdk_pb.Tensor.DESCRIPTOR
    assert pool.FindMessageTypeByName("tx_types.tinker_public.Tensor") is tx_pb.Tensor.DESCRIPTOR
    ours = tx_pb.Tensor(dense=b"1234", dtype=tx_pb.DTYPE_FLOAT32, shape=[1])
    assert sdk_pb.Tensor.FromString(ours.SerializeToString()).dense == b"1234"
    assert sdk_pb.Tensor.DESCRIPTOR.full_name == "tinker_public.Tensor"
    assert tx_pb.Tensor.DESCRIPTOR.full_name == "tx_types.tinker_public.Tensor"


def test_declared_protobuf_lower_bound_satisfies_gencode() -> None:
    """The generated module refuses runtimes older than its gencode version."""
    header = (PACKAGE_DIR / "src/tx_types/proto/tinker_public_pb2.py").read_text()
    match = re.search(r"# Protobuf Python Version: (\d+)\.(\d+)\.(\d+)", header)
    assert match is not None
    gencode = tuple(int(x) for x in match.groups())
    deps = tomllib.loads((PACKAGE_DIR / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if re.match(r"protobuf\b", d))
    bound = re.search(r">=\s*(\d+)\.(\d+)(?:\.(\d+))?", spec)
    assert bound is not None, spec
    declared = tuple(int(x or 0) for x in bound.groups())
    assert declared >= gencode, f"tx-types declares {spec}, gencode needs >= {gencode}"
