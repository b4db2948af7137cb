"""What `precision: auto` picks on this CPU and on this CPU held to older instruction sets, and what deciding costs.

    .venv/bin/python bench/cpu_detection.py

Every command that loads a model on a CPU measures bf16 against fp32 matrix products once at start-up
(core/devices.py). An older CPU has no native bf16: its products fall to an emulated kernel, slow and slower as the
size grows. Held to AVX2 or to AVX-512 without BF16 (oneDNN's and ATen's instruction sets capped by their
environment variables), this CPU shows what such a CPU measures, in a fresh process each: the speed-up, the dtype
`auto` picks, the seconds the decision took, and the seconds the same products take at the full size only (how
affiner measured before the small first product).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HELD_TO = {"this CPU": {},
           "AVX-512 without BF16": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE", "ATEN_CPU_CAPABILITY": "avx512"},
           "AVX2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}

PROBE = """
import json, time
from affiner.core import devices
started = time.perf_counter()
speedup = devices.cpu_bf16_speedup()
decided = time.perf_counter() - started
dtype = str(devices.resolve_dtype("auto")).replace("torch.", "")
started = time.perf_counter()
devices.bf16_product_speedup(1024, 4)
print(json.dumps({"speedup": speedup, "dtype": dtype, "decided": decided, "full": time.perf_counter() - started}))
"""


def main() -> None:
    print(f"{os.cpu_count()} cores; each line a fresh process")
    for name, variables in HELD_TO.items():
        env = {k: v for k, v in os.environ.items() if k != "AFFINER_CPU_BF16"} | variables
        done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"  {name:22s} bf16 {result['speedup']:5.2f}x fp32 -> {result['dtype']:8s} decided in "
              f"{result['decided']:5.2f} s (at the full size only: {result['full']:5.2f} s)")


if __name__ == "__main__":
    main()
