"""Builds the corpus-scale benchmark corpus from the shipped novels.

Each document joins 2-6 random paragraphs of the shipped corpora with a
fifth of their words replaced by random words of the same corpora, so
documents are distinct. After every 50 documents comes a planted copy of a
random earlier document of the same file: a tenth exact, the others with k
random words replaced by unseen ones, k drawn so the true Jaccard (word
5-grams of the normalized text, computed here) spans about 0.3-1. Files
are JSONL ({"text"}) of about FILE_MB each; download numbers documents
`FILE#N` in file order, which truth.jsonl uses: {"a", "b", "jaccard"}.

usage: python3 bench/make_scale_corpus.py OUT_DIR TOTAL_MB FILE_MB [FIRST_FILE]
"""
import json
import os
import random
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "corpora")


def shingles(text, n=5):
    words = " ".join(re.sub(r"[^\w\s]|_", "", text.lower()).split()).split()
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a, b):
    a, b = shingles(a), shingles(b)
    return len(a & b) / len(a | b)


def main():
    out, total_mb, file_mb = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    first = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    os.makedirs(out, exist_ok=True)
    paragraphs = []
    for name in ("austen.txt", "moby_dick.txt", "tinyshakespeare.txt"):
        text = open(os.path.join(ROOT, name), encoding="utf-8").read().replace("\r\n", "\n")
        paragraphs += [" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) >= 20]
    vocabulary = sorted({w for p in paragraphs for w in p.split()})
    rng = random.Random(7 + first)
    truth = open(os.path.join(out, f"truth-{first:03d}.jsonl"), "w")
    for f in range(first, first + max(1, total_mb // file_mb)):
        label = f"raw/{f:03d}.jsonl"
        docs, size = [], 0
        with open(os.path.join(out, f"{f:03d}.jsonl"), "w", encoding="utf-8") as fh:
            while size < file_mb << 20:
                if docs and len(docs) % 51 == 50:
                    base = rng.randrange(len(docs))
                    words = docs[base].split()
                    target = 1.0 if rng.random() < 0.1 else rng.uniform(0.3, 1.0)
                    # k scattered edits break about 5k of the S shingles.
                    edits = round((1 - target) / (1 + target) * len(words) / 5)
                    for pos in rng.sample(range(len(words)), min(edits, len(words))):
                        words[pos] = "qz%d" % rng.getrandbits(48)
                    text = " ".join(words)
                    truth.write(json.dumps({"a": f"{label}#{base}", "b": f"{label}#{len(docs)}", "jaccard": jaccard(docs[base], text)}) + "\n")
                else:
                    words = " ".join(rng.choice(paragraphs) for _ in range(rng.randint(2, 6))).split()
                    text = " ".join(rng.choice(vocabulary) if rng.random() < 0.2 else w for w in words)
                fh.write(json.dumps({"text": text}) + "\n")
                docs.append(text)
                size += len(text)


if __name__ == "__main__":
    main()
