"""TensorBoard's reader against metrics.jsonl: every number of every row
(but `step`) is a scalar of the event file at that row's step, equal as a
float32, and the event file holds nothing else.

usage: check_events.py OUT_DIR   (holding metrics.jsonl and the event file)
"""
import json
import sys

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

out = sys.argv[1]
expected = {}
for line in open(f"{out}/metrics.jsonl"):
    row = json.loads(line)
    for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
            expected.setdefault(key, []).append((row["step"], np.float32(value)))

events = EventAccumulator(out, size_guidance={"scalars": 0})
events.Reload()
got = {tag: [(e.step, np.float32(e.value)) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
assert got == expected, f"event file:\n{got}\nmetrics.jsonl:\n{expected}"
print(f"{sum(map(len, got.values()))} scalars in {len(got)} tags equal metrics.jsonl")
