#!/usr/bin/env bash
# Regenerate tx-types' protobuf Python modules from the committed schema.
#
# protoc comes from a pinned grpcio-tools run through uvx, so every machine produces
# byte-identical output without a system protoc. grpcio-tools 1.75.1 bundles protoc 31.1,
# whose Python gencode (6.31.1) asserts at import time that the protobuf runtime is
# >= 6.31.1: that is why tx-types declares `protobuf>=6.31.1`. Bump both together.
#
# The proto path root is packages/tx-types/src, so the file registers in the descriptor pool as
# "tx_types/proto/tinker_public.proto" (distinct from the SDK's "tinker_public.proto").
set -euo pipefail

GRPCIO_TOOLS_VERSION="1.75.1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SRC="$ROOT/packages/tx-types/src"

cd "$SRC"
uvx --from "grpcio-tools==${GRPCIO_TOOLS_VERSION}" python -m grpc_tools.protoc \
    --proto_path=. \
    --python_out=. \
    --pyi_out=. \
    tx_types/proto/tinker_public.proto
echo "generated: $SRC/tx_types/proto/tinker_public_pb2.py{,i}"
