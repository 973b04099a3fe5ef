"""The malloc tuning of :mod:`tx_engine.host_memory`: the environment it adds, the re-exec, and
that malloc's large chunks really get transparent huge pages with it (and not without)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tx_engine.host_memory import HUGETLB_TUNABLE, tuned_environ

glibc_linux = pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc", reason="glibc Linux only"
)

# Prints its pid, re-executes with the tunable (twice: the second call must return), then
# mallocs 64 MB through libc (numpy would madvise huge pages itself), touches it, and prints
# the AnonHugePages of the mapping that holds it.
CHILD = """
import ctypes, os, sys
print("start", os.getpid(), flush=True)
from tx_engine.host_memory import reexec_with_tuned_malloc
reexec_with_tuned_malloc()
reexec_with_tuned_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 64 << 20
address = libc.malloc(size)
ctypes.memset(address, 1, size)
huge_kb = 0
for line in open("/proc/self/smaps"):
    head = line.split()[0]
    if "-" in head and ":" not in head:
        lo, hi = (int(x, 16) for x in head.split("-"))
        inside = lo <= address < hi
    elif inside and head == "AnonHugePages:":
        huge_kb = int(line.split()[1])
print("tunables", os.environ.get("GLIBC_TUNABLES"), "huge_kb", huge_kb)
"""


@glibc_linux
def test_tuned_environ_adds_the_tunable_once_and_respects_the_user() -> None:
    assert tuned_environ({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": HUGETLB_TUNABLE}
    other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert tuned_environ(other) == {"GLIBC_TUNABLES": f"glibc.malloc.arena_max=2:{HUGETLB_TUNABLE}"}
    assert tuned_environ({"GLIBC_TUNABLES": HUGETLB_TUNABLE}) is None  # no second re-exec
    assert tuned_environ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None  # opted out


def test_tuned_environ_does_nothing_off_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    assert tuned_environ({}) is None


def _run_child(extra_env: dict[str, str]) -> list[list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env | extra_env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return [line.split() for line in out.stdout.splitlines()]


def _thp_mode() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    text = path.read_text() if path.exists() else ""
    return text[text.find("[") + 1 : text.find("]")]


@glibc_linux
def test_reexec_keeps_the_pid_sets_the_tunable_and_malloc_gets_huge_pages() -> None:
    start_1, start_2, (_, tunables, _, huge_kb) = _run_child({})
    assert start_1 == start_2  # ran twice, as the same process
    assert start_1[0] == "start"
    assert tunables == HUGETLB_TUNABLE
    (_, _), (_, opted_out, _, plain_kb) = _run_child({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert opted_out == "glibc.malloc.hugetlb=0"
    if _thp_mode() != "madvise":
        pytest.skip(f"transparent huge pages are {_thp_mode()!r}: the advice changes nothing")
    assert int(huge_kb) > 0
    assert int(plain_kb) == 0
