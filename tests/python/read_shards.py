"""Reads a split of llmflow token shards with numpy alone (llm.c's layout).

usage: read_shards.py SHARDS_DIR SPLIT OUT   writes the split's tokens to OUT as little-endian int64
"""
import json, sys
import numpy as np

def read_shard(path):
    header = np.fromfile(path, dtype="<i4", count=256)
    dtype = {(20240520, 1): "<u2", (20240801, 7): "<u4"}[(int(header[0]), int(header[1]))]
    tokens = np.fromfile(path, dtype=dtype, offset=1024)
    assert len(tokens) == header[2], f"{path}: header says {header[2]} tokens, file has {len(tokens)}"
    return tokens

if __name__ == "__main__":
    directory, split, out = sys.argv[1:]
    manifest = json.load(open(f"{directory}/manifest.json"))
    shards = [read_shard(f"{directory}/{s['file']}") for s in manifest[split]["shards"]]
    np.concatenate(shards).astype("<i8").tofile(out)
