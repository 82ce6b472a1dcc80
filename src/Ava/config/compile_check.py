"""Whether ``torch.compile`` can run here (``performance.compile``), checked before a run starts."""

from __future__ import annotations

import sys

import torch


def compile_problem(device: torch.device) -> str | None:
    """Why ``torch.compile`` (inductor) cannot run on ``device`` here, or None when it can.

    Checked before training starts, so a missing toolchain is one line at the start of a run
    rather than a traceback at its first step: a Python that dynamo supports, a C++ compiler on
    CPU (inductor builds its CPU kernels with it: g++, or the one ``$CXX`` names), Triton on
    CUDA; then a one-op function is compiled and run on ``device``.

    Args:
        device: where the model will train.

    Returns:
        A one-line reason, or None.
    """
    if not torch._dynamo.is_dynamo_supported():
        return f"torch.compile does not support Python {sys.version.split()[0]}"
    if device.type == "cpu":
        from torch._inductor import cpp_builder

        try:
            cpp_builder.get_cpp_compiler()
        except RuntimeError:  # InvalidCxxCompiler, or the Windows compiler checks
            return "no working C++ compiler (inductor builds CPU kernels with g++, or the compiler $CXX names)"
    elif device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            return "Triton is missing or this GPU is older than compute capability 7.0"
    try:
        torch.compile(_compile_probe)(torch.ones(8, device=device))
    except Exception as err:  # noqa: BLE001 (compiler, linker, header or OpenMP errors all differ)
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return f"a test compilation failed ({first_line})"
    return None


def _compile_probe(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x) * 2.0 + 1.0
