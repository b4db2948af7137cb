"""This process's device and the precision it computes in: decided by what the hardware does natively,
measured where it can be (a CPU's bf16 speed), never assumed from folklore."""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable

import torch

from affiner.core.errors import AffinerError

# bf16 on a CPU only where it clearly wins, as it costs some precision in the forward. Native bf16 measures 2-3x
# (AVX512-BF16: an AMD EPYC Zen 4, whose training steps then run 1.67x faster, bench/cpu_precision.py) to 6x (AMX);
# emulated bf16 (AVX2) measures under 1x. The threshold sits between, with room for a noisy measurement either way:
# at 2.0 the Zen 4 measured 1.82-2.41 over ten processes, so its precision, and its results, changed from run to run.
CPU_BF16_MIN_SPEEDUP = 1.5


def device() -> torch.device:
    """This process's own device: its GPU (`cuda:LOCAL_RANK`, one per process under torchrun), Apple's MPS, or the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK") or 0))
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------- precision

# Model types whose activations exceed fp16's range (65504): Gemma 3 was trained in bf16 and its residual
# stream grows past that, so in fp16 the gradient scaler skips every step and the losses are NaN.
FP16_OVERFLOW = frozenset({"gemma3", "gemma3_text"})


@functools.cache
def note(message: str) -> None:
    """Print a note once per process (the loader and the training loop both resolve the precision), on stderr:
    `affiner chat --prompt ... > answer.txt` keeps the answer alone on stdout."""
    print(f"note: {message}", file=sys.stderr)


def native_bf16() -> bool:
    """Whether this process's GPU computes bf16 in hardware: compute capability 8.0 (Ampere) or newer.
    torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated (a T4, sm75), many times
    slower than fp16, so only its ROCm answer is taken."""
    if torch.version.hip:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.cuda.get_device_capability(device())[0] >= 8


def resolve_dtype(precision: str = "auto", model_type: str | None = None) -> torch.dtype:
    """The dtype a model of `model_type` computes in on this process's device, for the config's `precision`.

    CPU: bf16 where this CPU multiplies bf16 matrices much faster than fp32 ones (AMX, AVX512-BF16: measured,
    see `cpu_bf16_speedup`), for training and generation alike, else fp32 (an AVX2 CPU emulates bf16, slower).
    MPS: fp32 unless fp16 or bf16 is asked. CUDA: bf16 where native, else fp16 with the gradient scaler, except models that overflow in fp16
    (FP16_OVERFLOW): fp32. Trainable weights, the optimizer and the loss stay fp32 whatever this says.
    """
    kind = device().type
    if precision == "fp32":
        return torch.float32
    if kind == "cpu":
        return _cpu_dtype(precision)
    bf16 = torch.backends.mps.is_macos_or_newer(14, 0) if kind == "mps" else native_bf16()
    overflows = model_type in FP16_OVERFLOW
    if precision == "bf16" or (precision == "auto" and bf16 and kind == "cuda"):
        if bf16:
            return torch.bfloat16
        fallback = f"fp32 ({model_type} overflows in fp16)" if overflows else "fp16 (or fp32)"
        raise AffinerError(("precision: bf16 needs macOS 14 or newer on Apple MPS" if kind == "mps" else
                            f"precision: bf16 is only emulated on this GPU ({gpu_capability()}), many times slower; "
                            "it is native from compute capability 8.0 (A100, L4, RTX 30xx)") +
                           f". Use precision: {fallback}.")
    if precision == "auto" and kind == "mps":
        return torch.float32
    if not overflows:
        return torch.float16
    if precision == "fp16":
        raise AffinerError(f"precision: fp16 overflows on {model_type} models: their activations exceed fp16's range, "
                           "so the gradient scaler skips every step and the loss is NaN. Use precision: "
                           f"{'bf16 (or fp32)' if bf16 else 'fp32 (or bf16 on a GPU with compute capability 8.0+)'}.")
    note(f"{model_type} models overflow in fp16 and this GPU ({gpu_capability()}) has no native bf16; using fp32 "
         "(slower, twice the memory). A GPU with compute capability 8.0+ (A100, L4, RTX 30xx) trains it in bf16.")
    return torch.float32


def gpu_capability() -> str:
    major, minor = torch.cuda.get_device_capability(device())
    return f"compute capability {major}.{minor}"


@functools.cache
def cpu_bf16_speedup(size: int = 1024, rounds: int = 4) -> float:
    """How many times faster this CPU multiplies bf16 matrices than fp32 ones: measured once per process (the best
    of `rounds` products of `size` x `size` matrices in each dtype, taken in turn so that a burst of load on a shared
    machine slows both; a few tenths of a second). AMX or AVX512-BF16 make bf16 several times faster; a CPU with
    AVX2 only emulates it, slower than fp32, and is told by a first product at half the size."""
    # Emulated bf16 slows down faster than the size grows (torch's fallback kernel, no oneDNN): on a 2-core Zen 4
    # held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2) one product of 1024 took 2.3 s, 0.013x fp32,
    # so measuring at 1024 cost every command 12 s at start-up. Half the size costs an eighth of the work, and
    # there emulation already measures 0.1x and native bf16 above 1.5x: only a CPU not clearly slower goes on.
    first = bf16_product_speedup(size // 2, rounds=2)
    if first < CPU_BF16_MIN_SPEEDUP / 2:
        return first
    return bf16_product_speedup(size, rounds)


def bf16_product_speedup(size: int, rounds: int) -> float:
    """fp32's time over bf16's for a product of two `size` x `size` matrices, the best of `rounds` of each."""
    # Drawn from a generator of its own: the global one seeds the run's LoRA weights and data order, which were
    # otherwise not the same measured (a CPU) and not (AFFINER_CPU_BF16 set, a GPU), nor from one version to the next.
    draw = torch.Generator().manual_seed(0)
    matrices = {dtype: tuple(torch.randn(size, size, generator=draw).to(dtype) for _ in range(2))
                for dtype in (torch.float32, torch.bfloat16)}
    best = dict.fromkeys(matrices, float("inf"))
    for a, b in matrices.values():
        a @ b  # the first call pays for the kernel's set-up
    for _ in range(rounds):
        for dtype, (a, b) in matrices.items():
            started = time.perf_counter()
            a @ b
            best[dtype] = min(best[dtype], time.perf_counter() - started)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


# The main process's measurement when several processes train on CPUs (share_cpu_bf16_speedup), else None.
_shared_speedup: float | None = None


def share_cpu_bf16_speedup(share: Callable[[float | None], float | None], is_main: bool) -> None:
    """Every process of a training on CPUs takes the main process's `cpu_bf16_speedup` (through `share`, a
    broadcast), so that all compute in one dtype: each measuring its own while the others load the same cores could
    land on either side of the threshold. Nothing to share on a GPU, or where AFFINER_CPU_BF16 decides."""
    global _shared_speedup
    if device().type == "cpu" and os.environ.get("AFFINER_CPU_BF16") not in {"0", "1"}:
        _shared_speedup = share(cpu_bf16_speedup() if is_main else None)


def _cpu_speedup() -> float:
    return cpu_bf16_speedup() if _shared_speedup is None else _shared_speedup


def _cpu_dtype(precision: str) -> torch.dtype:
    if precision == "auto" and os.environ.get("AFFINER_CPU_BF16") in {"0", "1"}:
        # Set by whoever needs one answer on every machine (the test suite, a benchmark of fp32 against bf16).
        return torch.bfloat16 if os.environ["AFFINER_CPU_BF16"] == "1" else torch.float32
    if precision == "fp16":
        note("precision fp16 needs a GPU; using fp32 on this CPU.")
        return torch.float32
    speedup = _cpu_speedup()
    if precision == "bf16":
        if speedup < 1:
            note(f"bf16 is emulated on this CPU ({speedup:.1f}x the speed of fp32): expect slower steps.")
        return torch.bfloat16
    if speedup >= CPU_BF16_MIN_SPEEDUP:
        note(f"precision auto: bf16 on this CPU (its bf16 matrix products run {speedup:.1f}x faster than fp32; "
             "in training the trained weights, optimizer and loss stay fp32). To compare with fp32: "
             "AFFINER_CPU_BF16=0 before any affiner command, or model.precision: fp32 in a config to train.")
        return torch.bfloat16
    return torch.float32


def precision_reason(dtype: torch.dtype, precision: str = "auto") -> str:
    """Why a run computes in `dtype` on this device, for the config's `precision`, as run.json records it."""
    kind = device().type
    if kind == "cpu" and precision != "auto":
        return f"{kind}: model.precision {precision}"
    if kind == "cpu" and os.environ.get("AFFINER_CPU_BF16") in {"0", "1"}:
        return f"{kind}: AFFINER_CPU_BF16={os.environ['AFFINER_CPU_BF16']}"
    if kind == "cpu":
        whose = "" if _shared_speedup is None else " (by the main process, for every process)"
        return f"{kind}: bf16 matrix products measured {_cpu_speedup():.1f}x fp32's speed{whose}"
    if kind == "cuda":
        return f"{kind}: {gpu_capability()}, native bf16: {native_bf16()}"
    return kind
