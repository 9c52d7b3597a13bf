"""The fused decode kernels (phi4mm/model/kernels.py) against their torch versions, and the engine's static decode
path running on them against the reference loop. On CPU the kernels run under Triton's interpreter, which must
be switched on before Triton is imported: hence a child process (tests/model/kernel_check.py)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]


def test_kernels_match_torch_and_engine_matches_reference(tiny_official):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "tests/model/kernel_check.py"), "cpu", str(tiny_official)],
                       env=env, capture_output=True, text=True, timeout=900)
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert "FAIL" not in r.stdout and r.stdout.count("ok ") >= 12
