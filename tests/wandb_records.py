"""Read the records of an offline wandb run (`run-<id>.wandb`, a LevelDB-style log of protobufs).

wandb no longer ships a Python reader; this one follows the format: a 7-byte file header, then
32 KiB blocks of chunks (crc32 u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last).
"""

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, LAST = 1, 4


def wandb_records(path: Path):
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    position, pending = HEADER, b""
    while position + HEADER <= len(data):
        left_in_block = BLOCK - position % BLOCK
        if left_in_block < HEADER:  # block trailer padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position:position + HEADER])
        if kind == 0:  # zero padding up to the end of the block
            position += left_in_block
            continue
        pending += data[position + HEADER:position + HEADER + length]
        position += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def offline_run(output_dir: Path) -> dict:
    """The one offline run under `output_dir`: its run record, config, and history rows."""
    files = list((output_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) >= 1, f"no offline wandb run under {output_dir}"
    run, config, history = None, {}, []
    for path in sorted(files):
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                config.update({item.key: json.loads(item.value_json) for item in record.run.config.update})
            elif kind == "config":
                config.update({item.key: json.loads(item.value_json) for item in record.config.update})
            elif kind == "history":
                history.append({(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                                for item in record.history.item})
    return {"run": run, "config": config, "history": history, "files": files}
