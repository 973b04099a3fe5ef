#!/usr/bin/env bash
# Run tx's GPU checks on a lent device machine, from this checkout, in one `run` call each.
#
#   here:   python3 scripts/device/fetch_wheels.py            (once: fills .whl/)
#   there:  run(command="bash scripts/device/run.sh check sample", carry=[".whl"])
#
# Plans (each writes $OUT/<plan>.log; run several in one call: a fresh machine takes minutes):
#   check   versions, the devices JAX sees, every tx package and the SDK import
#   sample  benchmarks/engine_sample.py, tiny + small, 1/8/16 decode steps per dispatch (#4)
#   train   benchmarks/engine_train.py, small, float32 and bfloat16
#   e2e     benchmarks/e2e.py --presets small: the SDK against a real server (#5), ~4 min
#   tests   the engine's reference, sampling and logprob-consistency tests on the GPU
# TX_PLAN_SECONDS (default 540) bounds each plan, so that a call ends inside its 600 s.
#
# Why this script: the device image holds JAX with CUDA, flax, optax and transformers, but not
# the server's stack or the `tinker` SDK, and it cannot reach PyPI; sessions that were lent a
# GPU spent part of their 30 minutes assembling this by hand.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/tx-device-out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
fi
PYTHONPATH="/tmp/site:$(ls -d "$PWD"/packages/*/src | tr '\n' ':')${PYTHONPATH:-}"
export PYTHONPATH PYTHONUNBUFFERED=1
limit="${TX_PLAN_SECONDS:-540}"

plan() {  # plan NAME COMMAND...: run it under the time limit, log to $OUT/NAME.log
  local name="$1"; shift
  echo "=== $name: $*" | tee -a "$OUT/$name.log"
  timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.log"
  echo "=== $name: exit ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}

for name in "${@:-check}"; do
  case "$name" in
    check)
      plan check nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      plan check python3 -c 'import jax, flax, optax, transformers, tinker, fastapi, sqlalchemy
import tx_types, tx_engine, tx_server, tx_client
print("jax", jax.__version__, jax.devices(), "flax", flax.__version__, "optax", optax.__version__)
print("transformers", transformers.__version__, "tinker", tinker.__version__)' ;;
    sample)
      plan sample python3 benchmarks/engine_sample.py --presets tiny-qwen3,small \
        --decode-chunks 1,8,16 ;;
    train)
      plan train python3 benchmarks/engine_train.py --presets small --json "$OUT/train32.json"
      plan train python3 benchmarks/engine_train.py --presets small --dtype bfloat16 \
        --json "$OUT/train16.json" ;;
    e2e)
      plan e2e python3 benchmarks/e2e.py --presets small --json "$OUT/e2e.json" ;;
    tests)
      plan tests python3 -m pytest -q -x -p no:cacheprovider -m "not slow" \
        packages/tx-engine/tests/test_engine_models.py \
        packages/tx-engine/tests/test_engine_sampling_logprobs.py \
        packages/tx-engine/tests/test_engine_sampling_bf16.py \
        packages/tx-engine/tests/test_engine_sampling_chunks.py \
        packages/tx-engine/tests/test_engine_losses.py ;;
    *) echo "unknown plan $name (check, sample, train, e2e, tests)"; exit 2 ;;
  esac
done
