"""Wall time of `solverlab compare`, `solverlab ems` and `solverlab train` alone and under
torchrun with 2 processes (whole command, start-up included), for bench/scale.md.

    OMP_NUM_THREADS=1 python bench/scale.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

COMPARE = ["compare", "--solvers", "ddim,dpmpp-2m,unipc", "--nfe", "5,10,20", "--samples",
           "512", "--no-progress"]
EMS = ["ems", "gaussian-mixture", "--grid-size", "100", "--samples", "256", "--no-progress"]
TRAIN = ["train", "--data", "moons", "--objective", "simple", "--steps", "300",
         "--batch-size", "1024", "--save-every", "300", "--no-progress"]


def run(n: int, args: list[str], out: str) -> float:
    cmd = [sys.executable, "-m", "solverlab", *args, "--out", out] if n == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={n}", "-m", "solverlab", *args, "--out", out]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ,
                                                               "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for name, args, out in (("compare", COMPARE, "cmp"), ("ems", EMS, "e.safetensors"),
                                ("train", TRAIN, "t.safetensors")):
            for n in (1, 2):
                t = run(n, args, os.path.join(tmp, f"{n}-{out}"))
                print(f"{name:8s} {n} process(es): {t:6.1f} s", flush=True)
