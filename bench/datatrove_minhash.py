"""Runs datatrove's MinHash deduplication on the benchmark corpus and prints
its throughput and recall on the planted near-duplicates as one JSON line.

Same parameters as llmflow's default `dedup`: word 5-grams, 14 buckets of 8
hashes, 64-bit hashes (SHA-1 based: datatrove 0.10.1's xxhash path passes
str where the current xxhash package wants bytes). All four datatrove stages
are timed together.

usage: python3 bench/datatrove_minhash.py CORPUS_DIR WORK_DIR WORKERS
"""
import json
import os
import shutil
import sys
import time

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup import MinhashDedupBuckets, MinhashDedupCluster, MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.dedup.minhash import MinhashConfig
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers.jsonl import JsonlWriter
from datatrove.utils.hashing import HashConfig


def main():
    corpus, work, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
    shutil.rmtree(work, ignore_errors=True)
    shards = os.path.join(work, "input")
    os.makedirs(shards)
    # One shard per worker so the signature stage runs in parallel.
    lines = open(os.path.join(corpus, "corpus.jsonl"), encoding="utf-8").readlines()
    for w in range(workers):
        with open(os.path.join(shards, f"{w:02d}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(lines[w::workers])
    config = MinhashConfig(hash_config=HashConfig(precision=64, hash_fc="sha1"), num_buckets=14, hashes_per_bucket=8, n_grams=5)
    logs = os.path.join(work, "logs")
    signatures = LocalPipelineExecutor(
        pipeline=[JsonlReader(shards), MinhashDedupSignature(output_folder=f"{work}/signatures", config=config)],
        tasks=workers, workers=workers, logging_dir=f"{logs}/1")
    buckets = LocalPipelineExecutor(
        pipeline=[MinhashDedupBuckets(input_folder=f"{work}/signatures", output_folder=f"{work}/buckets", config=config)],
        tasks=config.num_buckets, workers=workers, logging_dir=f"{logs}/2", depends=signatures)
    cluster = LocalPipelineExecutor(
        pipeline=[MinhashDedupCluster(input_folder=f"{work}/buckets", output_folder=f"{work}/remove", config=config)],
        tasks=1, logging_dir=f"{logs}/3", depends=buckets)
    final = LocalPipelineExecutor(
        pipeline=[
            JsonlReader(shards),
            MinhashDedupFilter(input_folder=f"{work}/remove", exclusion_writer=JsonlWriter(f"{work}/removed", compression=None)),
            JsonlWriter(f"{work}/kept", compression=None),
        ],
        tasks=workers, workers=workers, logging_dir=f"{logs}/4", depends=cluster)
    start = time.perf_counter()
    final.run()
    seconds = time.perf_counter() - start

    removed = set()
    for name in os.listdir(f"{work}/removed"):
        for line in open(os.path.join(work, "removed", name), encoding="utf-8"):
            removed.add(int(json.loads(line)["id"]))
    truth = [json.loads(line) for line in open(os.path.join(corpus, "truth.jsonl"))]
    high = [t for t in truth if t["jaccard"] >= 0.85]
    found = sum(1 for t in high if t["a"] in removed or t["b"] in removed)
    low = [t for t in truth if t["jaccard"] < 0.6]
    merged_low = sum(1 for t in low if t["a"] in removed or t["b"] in removed)
    size = sum(len(json.loads(line)["text"].encode()) for line in lines)
    print(json.dumps({
        "impl": "datatrove", "documents": len(lines), "seconds": round(seconds, 3),
        "docs_per_s": round(len(lines) / seconds, 1), "mb_per_s": round(size / 1e6 / seconds, 3),
        "removed": len(removed), "recall_above_0.85": round(found / len(high), 4), "merged_below_0.6": merged_low,
    }))


if __name__ == "__main__":
    main()
