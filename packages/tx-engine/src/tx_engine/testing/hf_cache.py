"""Install a local model directory into a Hugging Face hub cache so hub names resolve offline.

With `HF_HOME=<hf_home>` and `HF_HUB_OFFLINE=1`, transformers and huggingface_hub look a repo
up as `<hf_home>/hub/models--Org--Name/refs/main` (a commit hash) and read files from
`snapshots/<hash>/`. Plain files suffice (a real download uses symlinks into `blobs/`).

Offline, a file that is in neither the snapshot nor `.no_exist/<hash>/` makes the loaders raise
instead of treating it as absent, because they cannot ask the hub. A real online download would
have left `.no_exist` markers for every optional file it probed and did not find; we write the
same markers for the optional files the loaders probe (e.g. `config.json` of a tokenizer-only
repo, which `AutoTokenizer` requires to be known-missing).

The commit hash is a sha1 over the file names and contents, so reinstalling the same files is a
no-op and different contents get a different snapshot, as on the hub.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")

# Files transformers / huggingface_hub may look for in a model or tokenizer repo. Each one the
# source directory lacks gets a `.no_exist` marker.
OPTIONAL_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
    "processor_config.json",
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "adapter_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "custom_generate/generate.py",
)


def repo_folder_name(repo_id: str) -> str:
    """`Org/Name` -> `models--Org--Name`, the cache folder huggingface_hub uses."""
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"repo_id: expected 'Org/Name', got {repo_id!r}")
    return "models--" + repo_id.replace("/", "--")


def content_commit_hash(files: list[Path], root: Path) -> str:
    """A 40-hex commit id determined by the relative names and bytes of `files`."""
    h = hashlib.sha1()
    for f in sorted(files, key=lambda p: p.relative_to(root).as_posix()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def install_into_hf_cache(
    model_dir: Path | str,
    repo_id: str,
    hf_home: Path | str,
    *,
    tokenizer_only: bool = False,
) -> Path:
    """Copy `model_dir` into `<hf_home>/hub` as the `main` revision of `repo_id`.

    `tokenizer_only=True` installs only the tokenizer files, as for a tokenizer-only hub repo
    such as `thinkingmachineslabinc/meta-llama-3-instruct-tokenizer`. Returns the snapshot dir.
    """
    src = Path(model_dir)
    if not src.is_dir():
        raise FileNotFoundError(f"model_dir: {src} is not a directory")
    files = [f for f in sorted(src.rglob("*")) if f.is_file()]
    if tokenizer_only:
        files = [f for f in files if _is_tokenizer_file(f.name)]
    if not files:
        raise ValueError(f"model_dir: no files to install from {src}")
    commit = content_commit_hash(files, src)
    repo_dir = Path(hf_home) / "hub" / repo_folder_name(repo_id)
    snapshot = repo_dir / "snapshots" / commit
    for f in files:
        dest = snapshot / f.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dest)
    present = {f.relative_to(src).as_posix() for f in files}
    for missing in OPTIONAL_FILES:
        if missing not in present:
            marker = repo_dir / ".no_exist" / commit / missing
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def _is_tokenizer_file(name: str) -> bool:
    return name.startswith(
        ("tokenizer", "special_tokens_map", "added_tokens", "chat_template")
    ) or name in (
        "vocab.json",
        "merges.txt",
    )
