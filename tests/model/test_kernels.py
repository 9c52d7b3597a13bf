"""The fused decode kernels (phi4mm/model/kernels.py) against their torch versions, and the engine's static paths
running on them against the reference loop (the checks live in tests/model/kernel_check.py).

With CUDA the compiled kernels are checked here, in fp32 and bf16 (`pytest -m gpu`). Everywhere, they are also
checked under Triton's interpreter on CPU, which must be switched on before Triton is imported: hence a child
process for that one.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[2]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _failures(results) -> list[str]:
    return [f"{name}: {detail}" for name, ok, detail in results if not ok]


@pytest.mark.slow
def test_interpreted_kernels_match_torch_and_engine_matches_reference(tiny_official):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "tests/model/kernel_check.py"), "cpu", str(tiny_official)],
                       env=env, capture_output=True, text=True, timeout=900)
    print(r.stdout, r.stderr[-3000:])
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    # 10 kernel checks and 3 engine checks, each printed once
    assert "FAIL" not in r.stdout and r.stdout.count("ok ") == 13, r.stdout


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_compiled_kernels_match_torch(dtype):
    from phi4mm.model import kernels
    from tests.model import kernel_check
    assert not kernels.INTERPRET, "TRITON_INTERPRET=1 is set: the compiled kernels would not be checked"
    results = kernel_check.kernel_results("cuda", dtype)
    assert len(results) == 10 and not _failures(results), _failures(results)


@pytest.mark.gpu
@needs_cuda
def test_engine_on_compiled_kernels_matches_reference(tiny_official):
    from tests.model import kernel_check
    results = kernel_check.engine_results("cuda", str(tiny_official), full=True)
    assert len(results) == 4 and not _failures(results), _failures(results)
