"""Builds the dedup benchmark corpus from the shipped novels.

Every paragraph of at least 20 words is a document; a seeded random half of
them get a planted copy with random word substitutions (a tenth exact copies),
so the copies span Jaccard similarities from about 0.3 to 1. Writes
OUT/corpus.jsonl ({"id", "text"}) and OUT/truth.jsonl ({"a", "b", "jaccard"}:
b is the planted copy of a, jaccard over word 5-gram shingles of the
normalized texts, as both implementations compare them).

usage: python3 bench/make_corpus.py OUT_DIR [REPEAT]
REPEAT (default 1) plants that many rounds to make the corpus larger.
"""
import json
import os
import random
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "data", "corpora")


def normalize(text):
    return " ".join(re.sub(r"[^\w\s]|_", "", text.lower()).split())


def shingles(text, n=5):
    words = normalize(text).split()
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i:i + n]) for i in range(len(words) - n + 1)}


def jaccard(a, b):
    a, b = shingles(a), shingles(b)
    return len(a & b) / len(a | b)


def main():
    out = sys.argv[1]
    repeat = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    os.makedirs(out, exist_ok=True)
    paragraphs = []
    for name in ("austen.txt", "moby_dick.txt", "tinyshakespeare.txt"):
        text = open(os.path.join(ROOT, name), encoding="utf-8").read().replace("\r\n", "\n")
        paragraphs += [p.strip() for p in text.split("\n\n") if len(p.split()) >= 20]
    rng = random.Random(7)
    docs = list(paragraphs)
    truth = []
    for _ in range(repeat):
        for base in rng.sample(range(len(paragraphs)), len(paragraphs) // 2):
            words = paragraphs[base].split()
            edits = 0 if rng.random() < 0.1 else rng.randrange(max(1, len(words) // 3))
            for pos in rng.sample(range(len(words)), edits):
                words[pos] = "qz%d" % rng.getrandbits(48)
            copy = " ".join(words)
            truth.append({"a": base, "b": len(docs), "jaccard": jaccard(paragraphs[base], copy)})
            docs.append(copy)
    with open(os.path.join(out, "corpus.jsonl"), "w", encoding="utf-8") as f:
        for i, text in enumerate(docs):
            f.write(json.dumps({"id": str(i), "text": text}) + "\n")
    with open(os.path.join(out, "truth.jsonl"), "w") as f:
        for t in truth:
            f.write(json.dumps(t) + "\n")
    print(f"{len(docs)} documents, {len(truth)} planted pairs -> {out}")


if __name__ == "__main__":
    main()
