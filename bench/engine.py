#!/usr/bin/env python3
"""Engine overhead and hashing speed.

1. A generated 200-stage pipeline holding 1 GiB of artifacts is built once;
   then a no-op `llmflow run` and `llmflow status` are timed (median of N).
   Goal: both under 0.1 s.
2. BLAKE3 of a 1 GiB file: llmflow's hasher (`llmflow hash`) against the
   `b3sum` tool, same file, same run, page cache warm. Goal: ratio >= 0.9.

Usage: python3 bench/engine.py [--llmflow PATH] [--repeat N]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

STAGES = 200
BYTES_PER_STAGE = (1 << 30) // STAGES


def timed(cmd, cwd=None, repeat=10):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def pipeline_text():
    # A binary tree of stages: stage i reads stage (i-1)//2, so keys chain
    # through many levels of inputs, as a real pipeline's do.
    out = ['[pipeline]\nname = "bench200"\n']
    for i in range(STAGES):
        out.append(f"[stages.s{i:03}]\nkind = \"command\"\n")
        if i > 0:
            out.append(f'input = "s{(i - 1) // 2:03}"\n')
        out.append(f'cmd = "head -c {BYTES_PER_STAGE} /dev/urandom > {{out}}/blob && echo {i} > {{out}}/id"\n\n')
    return "".join(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llmflow", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "llmflow"))
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()
    llmflow = os.path.abspath(args.llmflow)
    b3sum = shutil.which("b3sum")
    if not b3sum:
        sys.exit("b3sum not found: apt-get install b3sum")

    rows = []
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "pipeline.toml"), "w") as f:
            f.write(pipeline_text())
        t = time.perf_counter()
        subprocess.run([llmflow, "run", "--jobs", "2"], cwd=d, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        build = time.perf_counter() - t
        size = sum(os.path.getsize(os.path.join(r, x)) for r, _, fs in os.walk(os.path.join(d, "artifacts")) for x in fs)
        print(f"built {STAGES} stages, {size / 2**30:.2f} GiB of artifacts, in {build:.1f}s", file=sys.stderr)
        noop = timed([llmflow, "run"], d, args.repeat)
        status = timed([llmflow, "status"], d, args.repeat)
        rows.append((f"no-op `llmflow run`, {STAGES} stages, 1 GiB", f"{noop * 1000:.1f} ms", "< 100 ms", "yes" if noop < 0.1 else "NO"))
        rows.append((f"`llmflow status`, {STAGES} stages, 1 GiB", f"{status * 1000:.1f} ms", "< 100 ms", "yes" if status < 0.1 else "NO"))

        blob = os.path.join(d, "blob")
        with open(blob, "wb") as f:
            for _ in range(1024):
                f.write(os.urandom(1 << 20))
        ours_out = subprocess.run([llmflow, "hash", blob], capture_output=True, text=True, check=True).stdout.split()[0]
        theirs_out = subprocess.run([b3sum, blob], capture_output=True, text=True, check=True).stdout.split()[0]
        assert ours_out == theirs_out, "digests differ"
        timed([b3sum, blob], repeat=1)  # warm the page cache
        ours = timed([llmflow, "hash", blob], repeat=5)
        theirs = timed([b3sum, blob], repeat=5)
        ratio = theirs / ours
        rows.append(("blake3 1 GiB: llmflow hash", f"{1 / ours:.2f} GiB/s", "", ""))
        rows.append(("blake3 1 GiB: b3sum", f"{1 / theirs:.2f} GiB/s", "", ""))
        rows.append(("llmflow / b3sum throughput", f"{ratio:.2f}x", ">= 0.9x", "yes" if ratio >= 0.9 else "NO"))

    w = max(len(r[0]) for r in rows)
    print(f"| {'measure':<{w}} | {'result':>12} | {'goal':>8} | met |")
    print(f"|{'-' * (w + 2)}|{'-' * 14}|{'-' * 10}|-----|")
    for r in rows:
        print(f"| {r[0]:<{w}} | {r[1]:>12} | {r[2]:>8} | {r[3]:>3} |")


if __name__ == "__main__":
    main()
