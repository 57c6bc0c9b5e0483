"""Every GPU check of the serving engine in one run, each with its own time limit, logs in one folder.

A GPU is lent for minutes, not hours: run this once there, after it has passed on the CPU at tiny
sizes (`--quick`), and read the logs afterwards.

    python benchmarks/gpu_checks.py --device cuda --out "$OUT"
    python benchmarks/gpu_checks.py --device cpu --quick --out /tmp/gpu-dry-run

It runs, in order: the CUDA tests (equivalence with transformers, the captured decode step against
the eager one), `decode.py` (batch 1, every dtype, Sol against transformers), `batch_decode.py`
(1/4/8/16 streams) and `train_gpu.py` (training: nanoGPT and Sol to validation loss 1.47, and the
124M shape's tokens/s and MFU). `summary.json` gathers each one's exit status, seconds and last JSON
line. `--only NAME ...` runs some of them (together they take longer than one 10-minute command).

Where Sol is not installed (a bare GPU machine), the repository's folders are put on PYTHONPATH as the
`sol` package for every check (side_by_side.sol_env). ../shared does not travel to such a machine:
copy ../shared/reference and ../shared/data into shared/ inside the repository first.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
NAMES = ("tests", "decode", "batch_decode", "train_gpu")


def checks(device: str, quick: bool) -> list[tuple[str, list[str], int]]:
    py = sys.executable
    if quick:   # a dry run: the same scripts at tiny sizes
        return [
            ("tests", [py, "-m", "pytest", "-q", "-x", "tests/test_batch.py", "-k", "alone or captured or shapes"], 300),
            ("decode", [py, "benchmarks/decode.py", "--device", device, "--all-dtypes", "--only", "small",
                        "--new-tokens", "8", "--reps", "1", "--json"], 300),
            ("batch_decode", [py, "benchmarks/batch_decode.py", "--device", device, "--only", "small",
                              "--new-tokens", "8", "--streams", "1", "8", "--json"], 300),
            ("train_gpu", [py, "benchmarks/train_gpu.py", "--device", device, "--tiny", "--json"], 300),
        ]
    return [
        ("tests", [py, "-m", "pytest", "-q", "tests/test_hf_equivalence.py", "tests/test_batch.py"], 240),
        ("decode", [py, "benchmarks/decode.py", "--device", device, "--reps", "3", "--json"], 240),
        ("batch_decode", [py, "benchmarks/batch_decode.py", "--device", device, "--json"], 180),
        # four child runs: two of at most 120 s, two of at most 170 s (train_gpu.py's own limits)
        ("train_gpu", [py, "benchmarks/train_gpu.py", "--device", device, "--timeout", "120", "--timeout-gpt2", "170",
                       "--json"], 590),
    ]


def last_json(text: str):
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a dry run of this script")
    p.add_argument("--only", nargs="+", choices=NAMES, default=None, help="run these checks only")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import side_by_side
    env = {**os.environ, **side_by_side.sol_env()}
    summary = {}
    for name, cmd, limit in checks(args.device, args.quick):
        if args.only and name not in args.only:
            continue
        t = time.perf_counter()
        try:
            r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit, env=env)
            rc, out, err = r.returncode, r.stdout, r.stderr
        except subprocess.TimeoutExpired as e:
            rc, out, err = "timeout", e.stdout or "", e.stderr or ""
            out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
        seconds = round(time.perf_counter() - t, 1)
        (args.out / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{out}\n--- stderr ---\n{err}")
        summary[name] = {"rc": rc, "seconds": seconds, "result": last_json(out)}
        print(f"{name}: rc={rc} in {seconds} s", flush=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0 if all(v["rc"] == 0 for v in summary.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
