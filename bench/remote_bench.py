"""Helpers of bench/remote.sh (standard library only, but `bucket`: boto3).

  time RESULTS LOG LABEL -- CMD...   run CMD (output to LOG), append to RESULTS
                                     {"label", "seconds", "max_rss_mb", "cpu_s", "server_cpu_s"}:
                                     the S3 server's CPU time from $S3_LOCAL_DIR/weed.pid; on failure
                                     print LOG's tail and exit with CMD's status
  tree RESULTS LABEL DIR...          append {"label", "files", "bytes"} of the files under DIRs
  bucket RESULTS LABEL PREFIX        append the objects and bytes under s3://$S3_BUCKET/PREFIX
  status-pipeline N ARTIFACTS REMOTE print bench/engine.py's N-stage pipeline with
                                     `artifacts` and `remote` set in its [pipeline]
  table RESULTS                      print the comparison
"""
import json
import os
import resource
import subprocess
import sys
import time


def append(results, row):
    with open(results, "a") as f:
        f.write(json.dumps(row) + "\n")


def server_cpu():
    """CPU seconds the S3 server ($S3_LOCAL_DIR/weed.pid) has used, or None."""
    try:
        pid = open(os.path.join(os.environ["S3_LOCAL_DIR"], "weed.pid")).read().strip()
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (KeyError, OSError, ValueError, IndexError):
        return None


def timed(results, log, label, cmd):
    server = server_cpu()
    t = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - t
    # Linux: kilobytes, the largest of the waited-for descendants (this process runs one command).
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_after = server_cpu()
    server = server_after - server if server is not None and server_after is not None else None
    rss, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
    if rc != 0:
        tail = open(log, errors="replace").read().splitlines()[-30:]
        print(f"remote.sh: `{' '.join(cmd)}` ({label}) failed with status {rc} after {seconds:.1f} s; "
              f"the end of {log}:", *tail, sep="\n", file=sys.stderr)
        sys.exit(rc if 0 < rc < 256 else 1)
    append(results, {"label": label, "seconds": seconds, "max_rss_mb": rss, "cpu_s": cpu, "server_cpu_s": server})
    print(f"  {label}: {seconds:.2f} s, CPU {cpu:.2f} s (server {server or 0:.2f} s), max RSS {rss:.0f} MB", file=sys.stderr)


def tree(results, label, dirs):
    files = size = 0
    for d in dirs:
        for root, _, names in os.walk(d):
            for n in names:
                files += 1
                size += os.lstat(os.path.join(root, n)).st_size
    append(results, {"label": label, "files": files, "bytes": size})


def bucket(results, label, prefix):
    import boto3

    s3 = boto3.client("s3")
    objects = size = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=os.environ["S3_BUCKET"], Prefix=prefix.rstrip("/") + "/"):
        for o in page.get("Contents", []):
            objects += 1
            size += o["Size"]
    append(results, {"label": label, "files": objects, "bytes": size})


def status_pipeline(n, artifacts, remote):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from engine import tree_pipeline

    # The same stages as engine.py's cached store (same commands, same name).
    text = tree_pipeline(n, lambda i: f"echo {i} > {{out}}/id")
    head = f'[pipeline]\nname = "tree{n}"\n'
    assert text.startswith(head)
    sys.stdout.write(head + f"artifacts = {json.dumps(artifacts)}\nremote = {json.dumps(remote)}\n" + text[len(head):])


def table(results):
    rows = {}
    for line in open(results):
        r = json.loads(line)
        rows.setdefault(r["label"], []).append(r)
    one = lambda label: rows[label][-1] if label in rows else None
    best = lambda label: min(rows[label], key=lambda r: r["seconds"]) if label in rows else None
    meta = one("meta") or {}
    ours, theirs = one("llmflow_artifacts"), one("dvc_artifacts")
    art = ours or theirs
    mb = lambda b: b / 1e6
    fmt = lambda s: f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"
    secs = lambda r: fmt(r["seconds"]) if r else "n/a"
    dvc = f"DVC {meta.get('dvc_version', '3')}"
    print(f"\n| {mb(art['bytes']) / 1000:.2f} GB of artifacts ({art['files']} files) | llmflow | {dvc} | DVC / llmflow |")
    print("|---|---|---|---|")
    for what, key in [("push, cold", "push_cold"), ("push, nothing to send", "push_noop"),
                      ("pull, cold", "pull_cold"), ("pull, nothing to fetch", "pull_noop")]:
        a, b = one(f"llmflow_{key}"), one(f"dvc_{key}")
        ratio = f"{b['seconds'] / a['seconds']:.1f}x" if a and b else ""
        print(f"| {what} | {secs(a)} | {secs(b)} | {ratio} |")
    st = best("llmflow_status")
    if st:
        n = meta.get("status_stages", 0)
        print(f"| no-op status, {n:,} stages, remote set (best of {len(rows['llmflow_status'])}) | {fmt(st['seconds'])} | | |")

    print("\n| | llmflow | DVC |")
    print("|---|---|---|")
    if ours and theirs:
        print(f"| artifact files (`out/` dirs) | {ours['files']} files, {mb(ours['bytes']):.1f} MB | {theirs['files']} files, {mb(theirs['bytes']):.1f} MB |")
    for key, what in [("push_cold", "push, cold"), ("pull_cold", "pull, cold")]:
        cells = []
        for side, a in (("llmflow", ours), ("dvc", theirs)):
            r = one(f"{side}_{key}")
            cells.append(f"{mb(a['bytes']) / r['seconds']:.1f} MB/s" if r and a else "n/a")
        print(f"| {what}: throughput (artifact MB / s) | {cells[0]} | {cells[1]} |")
    remote = [one("llmflow_bucket"), one("dvc_bucket")]
    if any(remote):
        cells = [f"{r['files']} objects, {mb(r['bytes']):.1f} MB" if r else "n/a" for r in remote]
        print(f"| on the remote after the push | {cells[0]} | {cells[1]} |")
    for key, what in [("push_cold", "push, cold"), ("push_noop", "push, nothing to send"),
                      ("pull_cold", "pull, cold"), ("pull_noop", "pull, nothing to fetch")]:
        cells = [f"{r['max_rss_mb']:.0f} MB" if r else "n/a" for r in (one(f"llmflow_{key}"), one(f"dvc_{key}"))]
        print(f"| {what}: peak RSS | {cells[0]} | {cells[1]} |")
    for key, what in [("push_cold", "push, cold"), ("pull_cold", "pull, cold")]:
        cells = [f"{r['cpu_s']:.1f} s" if r else "n/a" for r in (one(f"llmflow_{key}"), one(f"dvc_{key}"))]
        print(f"| {what}: the client's CPU time (user + sys) | {cells[0]} | {cells[1]} |")
        cells = [f"{r['server_cpu_s']:.1f} s" if r and r.get("server_cpu_s") is not None else "n/a"
                 for r in (one(f"llmflow_{key}"), one(f"dvc_{key}"))]
        print(f"| {what}: the S3 server's CPU time meanwhile | {cells[0]} | {cells[1]} |")
    add = one("dvc_add")
    if add:
        print(f"| hashing the artifacts (not timed above) | at build | `dvc add`: {add['seconds']:.2f} s |")
    off = best("llmflow_status_offline")
    if st and off:
        print(f"| no-op status, {meta.get('status_stages', 0):,} stages, `--offline` | {fmt(off['seconds'])} | |")
    print(f"\nllmflow {meta.get('llmflow', '?')}; {dvc}, dvc-s3 {meta.get('dvc_s3_version', '?')}; "
          f"SeaweedFS {meta.get('seaweedfs', '?')} on loopback; {meta.get('cpus', '?')} CPUs; default parallelism "
          f"(llmflow: 8 files at a time, 64 MB parts; DVC: jobs = 4 x CPUs).")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "time":
        results, log, label, sep, *rest = args
        assert sep == "--" and rest
        timed(results, log, label, rest)
    elif cmd == "tree":
        tree(args[0], args[1], args[2:])
    elif cmd == "bucket":
        bucket(*args)
    elif cmd == "status-pipeline":
        status_pipeline(int(args[0]), args[1], args[2])
    elif cmd == "table":
        table(args[0])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
