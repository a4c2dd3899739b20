"""TensorBoard scalars read straight from the event files, to show them in the GUI (behind its login).

A remote user of a share link cannot reach TensorBoard's own port (it listens on 127.0.0.1 only), so the run monitor
plots the scalars itself. Event files are TFRecord files of `Event` protos (tensorboard's compiled protos; no
TensorFlow, no torch). Damaged records end the file's reading quietly.
"""
from __future__ import annotations

import os
import struct

MAX_POINTS = 5000


def _records(path: str):
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,) = struct.unpack("<Q", header[:8])
            if length > 64 << 20:
                return
            data = f.read(length)
            if len(data) < length or len(f.read(4)) < 4:
                return
            yield data


def _value(value) -> float | None:
    if value.HasField("simple_value"):
        return float(value.simple_value)
    if value.HasField("tensor"):
        tensor = value.tensor
        if tensor.float_val:
            return float(tensor.float_val[0])
        if tensor.double_val:
            return float(tensor.double_val[0])
        if len(tensor.tensor_content) == 4:
            return struct.unpack("<f", tensor.tensor_content)[0]
    return None


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] from every events file under `logdir` (sorted by step)."""
    from tensorboard.compat.proto import event_pb2

    series: dict[str, list[tuple[int, float]]] = {}
    if not logdir or not os.path.isdir(logdir):
        return series
    for folder, _dirs, files in os.walk(logdir):
        for name in sorted(files):
            if "tfevents" not in name:
                continue
            try:
                for data in _records(os.path.join(folder, name)):
                    event = event_pb2.Event()
                    try:
                        event.ParseFromString(data)
                    except Exception:  # noqa: BLE001 - a damaged record
                        break
                    for value in event.summary.value:
                        number = _value(value)
                        if number is not None:
                            series.setdefault(value.tag, []).append((int(event.step), number))
            except OSError:
                continue
    for tag, points in series.items():
        points.sort()
        if len(points) > MAX_POINTS:
            series[tag] = points[:: len(points) // MAX_POINTS + 1]
    return series
