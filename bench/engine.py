#!/usr/bin/env python3
"""Engine overhead and hashing speed.

1. A generated 200-stage pipeline holding 1 GiB of artifacts is built once;
   then a no-op `llmflow run` and `llmflow status` are timed (median of N).
   Goal: both under 0.1 s.
2. BLAKE3 of a 1 GiB file: llmflow's hasher (`llmflow hash`) against the
   `b3sum` tool, same file, same run, page cache warm. Goal: ratio >= 0.9.
3. The engine at scale: pipelines of 200, 1,000 and 10,000 `command` stages
   (a binary tree of inputs), built once and kept under --cache (building
   10,000 stages takes over an hour on 2 cores: each stage is a process
   that loads libtorch). Timed, median of N: a no-op `status` and `run` on
   the built store, and loading and planning the same pipeline with nothing
   built (`status` and `run --dry-run` on an empty store, after one load).
   Goals: no-op status and run on 10,000 stages < 0.2 s, planning 10,000
   < 0.5 s, 200 stages < 0.05 s. `--baseline PATH` times another llmflow
   binary (e.g. an older build, with its llmflow-stage beside it) on the
   same stores in the same run.

Usage: python3 bench/engine.py [--llmflow PATH] [--baseline PATH] [--repeat N]
                               [--scales 200,1000,10000] [--cache DIR] [--skip-hash]
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


def tree_pipeline(n, cmd):
    """n `command` stages in a binary tree: stage i reads stage (i-1)//2, so
    keys chain through many levels of inputs, as a real pipeline's do.
    `cmd(i)` is stage i's command."""
    out = [f'[pipeline]\nname = "tree{n}"\n\n']
    for i in range(n):
        out.append(f'[stages.s{i:05}]\nkind = "command"\n')
        if i > 0:
            out.append(f'input = "s{(i - 1) // 2:05}"\n')
        out.append(f'cmd = "{cmd(i)}"\n\n')
    return "".join(out)


def scale_rows(binaries, scales, cache, repeat):
    """Section 3: the engine on 200 to 10,000 stages, for each binary."""
    rows = []
    for n in scales:
        built, empty = os.path.join(cache, str(n)), os.path.join(cache, f"{n}-empty")
        for d in (built, empty):
            os.makedirs(d, exist_ok=True)
            with open(os.path.join(d, "pipeline.toml"), "w") as f:
                f.write(tree_pipeline(n, lambda i: f"echo {i} > {{out}}/id"))
        shutil.rmtree(os.path.join(empty, "artifacts"), ignore_errors=True)
        first = binaries[0][1]
        t = time.perf_counter()
        subprocess.run([first, "run", "--jobs", "2"], cwd=built, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"{n} stages built (or found built) in {time.perf_counter() - t:.1f}s", file=sys.stderr)
        limit, plan_limit = (0.05, 0.05) if n <= 200 else (0.2, 0.5)
        for label, exe in binaries:
            for d in (built, empty):
                timed([exe, "status"], d, 1)  # resolve and snapshot once, as any earlier command would
            measures = [
                ("no-op `status`", timed([exe, "status"], built, repeat), limit),
                ("no-op `run`", timed([exe, "run"], built, repeat), limit),
                ("`status`, nothing built", timed([exe, "status"], empty, repeat), plan_limit),
                ("`run --dry-run`, nothing built", timed([exe, "run", "--dry-run"], empty, repeat), plan_limit),
            ]
            for what, secs, goal in measures:
                met = "" if label != "llmflow" or n not in (200, 10000) else ("yes" if secs < goal else "NO")
                rows.append((f"{label}: {what}, {n:,} stages", f"{secs * 1000:.0f} ms", f"< {goal * 1000:.0f} ms" if met else "", met))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llmflow", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", "target"), "release", "llmflow"))
    ap.add_argument("--baseline", help="another llmflow binary to time on the same stores")
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--scales", default="200,1000,10000")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/llmflow/bench-engine"))
    ap.add_argument("--skip-hash", action="store_true", help="only section 3")
    args = ap.parse_args()
    llmflow = os.path.abspath(args.llmflow)
    b3sum = shutil.which("b3sum")
    if not b3sum and not args.skip_hash:
        sys.exit("b3sum not found: apt-get install b3sum")

    rows = []
    binaries = [("llmflow", llmflow)] + ([("baseline", os.path.abspath(args.baseline))] if args.baseline else [])
    scales = [int(x) for x in args.scales.split(",") if x]
    rows += scale_rows(binaries, scales, args.cache, args.repeat)
    if args.skip_hash:
        print_rows(rows)
        return
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "pipeline.toml"), "w") as f:
            f.write(tree_pipeline(STAGES, lambda i: f"head -c {BYTES_PER_STAGE} /dev/urandom > {{out}}/blob && echo {i} > {{out}}/id"))
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
    print_rows(rows)


def print_rows(rows):
    w = max(len(r[0]) for r in rows)
    print(f"| {'measure':<{w}} | {'result':>12} | {'goal':>8} | met |")
    print(f"|{'-' * (w + 2)}|{'-' * 14}|{'-' * 10}|-----|")
    for r in rows:
        print(f"| {r[0]:<{w}} | {r[1]:>12} | {r[2]:>8} | {r[3]:>3} |")


if __name__ == "__main__":
    main()
