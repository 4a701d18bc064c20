#!/bin/sh
# Size and word counts of a documents artifact: the example user stage.
# usage: corpus_stats.sh DOCS_DIR OUT.txt   (DOCS_DIR: the artifact's docs/ folder of Parquet parts)
set -eu
{
  echo "parts: $(ls "$1" | wc -l)"
  echo "bytes: $(cat "$1"/*.parquet | wc -c)"
} > "$2"
