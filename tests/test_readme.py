"""The README's copy-paste examples must keep working (conventions §7).

The `tx train` block is run as written, with `uv run ` dropped (the test already runs inside the
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


def _bash_block_containing(marker: str) -> str:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if marker in b]
    return block


def test_readme_tx_train_example_runs(tmp_path: Path) -> None:
    script = _bash_block_containing("tx train --model")
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
