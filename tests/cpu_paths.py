"""Fixtures that force each side of the CPU-dependent branches, so one machine tests them all.

- kernel_isa: the compiled kernels' build (kernels.isa_flags: native, avx2, portable), swapped in for
  the test with kernels.forced_isa; skips where that build cannot run here (avx2 on a CPU without it).
  Parametrize it indirectly to pick builds: @pytest.mark.parametrize("kernel_isa", [...], indirect=True).
- native_bf16: MIXCHAT_NATIVE_BF16 off and on (speed.linear.native_bf16: torch's bf16 GEMM for prompts, as on
  CPUs with AVX512-BF16 or AMX where it measures faster, or the kernels' GEMM). On, MIXCHAT_PROMPT_GEMM=torch
  pins torch's side of speed.linear.prompt_gemm's measured choice; off, the kernels' GEMM takes prompts (its
  vdpbf16ps tile where the build has one).

A test module that uses them imports the fixture functions (`from cpu_paths import each_kernel_isa  # noqa:
F401`); the fixtures' own names differ, so test arguments do not shadow the import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from mixchat.speed import kernels, linear


@pytest.fixture(name="kernel_isa", params=kernels.ISAS)
def each_kernel_isa(request: pytest.FixtureRequest) -> Iterator[str]:
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(kernels.forced_isa(request.param))
        except kernels.KernelError as e:
            pytest.skip(f"the {request.param} build of the kernels cannot run here: {e}")
        yield request.param


@pytest.fixture(name="native_bf16", params=[False, True], ids=["fp32-prompts", "native-bf16"])
def each_native_bf16(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    monkeypatch.setenv("MIXCHAT_NATIVE_BF16", "1" if request.param else "0")
    monkeypatch.setenv("MIXCHAT_PROMPT_GEMM", "torch" if request.param else "kernels")
    assert linear.native_bf16() is request.param
    return request.param
