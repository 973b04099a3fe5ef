"""The README's copy-paste examples must keep working (conventions §7).

The `tx train` blocks (the basic example, then the LoRA and W&B extras) are run as written, with `uv run ` dropped (the test already runs inside the
workspace environment) and `/tmp` redirected to a private directory. `tx demo` itself is run
by `packages/tx-cli/tests/test_cli_demo.py`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bash_blocks_containing(marker: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b for b in blocks if marker in b]


def test_readme_tx_train_example_runs(tmp_path: Path) -> None:
    basic, extras = _bash_blocks_containing("tx train --model")
    script = basic + extras
    script = script.replace("uv run ", "").replace("/tmp/", f"{tmp_path}/")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "trained 10 steps" in proc.stdout
    assert (tmp_path / "tx-run" / "checkpoint-10" / "model.safetensors").is_file()
    assert (tmp_path / "tx-lora" / "checkpoint-10" / "adapter_model.safetensors").is_file()
    assert list((tmp_path / "tx-wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
