#!/bin/sh
# Size and word counts of a documents artifact: the example user stage.
# usage: corpus_stats.sh DOCS.parquet OUT.txt
set -eu
{
  echo "file: $(basename "$1")"
  echo "bytes: $(wc -c < "$1")"
} > "$2"
