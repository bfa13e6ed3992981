"""--log tensorboard / wandb: read back with each tool's own reader, the scalars equal metrics.jsonl."""

import glob
import json
import os
import struct
import sys

import numpy as np
import pytest
from test_train import FAST, metrics, run

import train
from nanorl.sinks import tag


def expected_history(out):
    """metrics.jsonl's rows as {step: {grouped name: value}} (bools logged as 0/1)."""
    return {r["step"]: {tag(k): float(v) for k, v in r.items() if k != "step"} for r in metrics(out)}


def run_json(out):
    with open(os.path.join(out, "run.json")) as f:
        return json.load(f)


def test_tags_are_grouped():
    assert [tag(k) for k in ("reward_mean", "loss", "eval_accuracy", "time_sample", "tokens_per_s", "grad_norm")] == \
        ["rollout/reward_mean", "train/loss", "eval/accuracy", "time/sample", "time/tokens_per_s", "train/grad_norm"]


def test_tensorboard_scalars_equal_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = run(tmp_path, "--steps", "3", "--eval-every", "2", "--log", "tensorboard")
    ea = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    got = {}
    for t in ea.Tags()["scalars"]:
        for e in ea.Scalars(t):
            got.setdefault(e.step, {})[t] = e.value
    # tensorboard stores float32: the jsonl values rounded to float32 must come back exactly
    want = {s: {k: float(np.float32(v)) for k, v in row.items()} for s, row in expected_history(out).items()}
    assert got == want
    assert {"rollout/reward_mean", "train/loss", "eval/accuracy", "time/sample"} <= set(got[2])
    # the run's config, once, as a text summary holding run.json
    (event,) = ea.Tensors("config/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert json.loads(text.strip().strip("`")) == run_json(out)
    with open(os.path.join(out, "reward.png"), "rb") as f:  # nanorl/plot.py drew the run
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def read_wandb_records(path):
    """The records of a .wandb file: LevelDB-log framing (32 KiB blocks, 7-byte chunk headers) of wandb's protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST chunk: a record is complete
            records.append(pb.Record.FromString(buf))
            buf = b""
    return records


def test_wandb_offline_run_holds_the_history(tmp_path, monkeypatch):
    for k, v in dict(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONSOLE="off", WANDB_CONFIG_DIR=tmp_path / "cfg",
                     WANDB_CACHE_DIR=tmp_path / "cache", WANDB_DATA_DIR=tmp_path / "data").items():
        monkeypatch.setenv(k, str(v))
    out = run(tmp_path, "--steps", "3", "--eval-every", "2", "--log", "wandb")
    (path,) = glob.glob(os.path.join(out, "wandb", "offline-run-*", "run-*.wandb"))
    records = read_wandb_records(path)
    got, config = {}, {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            got[items["_step"]] = {k: v for k, v in items.items() if not k.startswith("_")}
        elif r.WhichOneof("record_type") == "run":
            config = {u.key: json.loads(u.value_json) for u in r.run.config.update if not u.key.startswith("_")}
    assert got == expected_history(out)
    assert config == run_json(out)


@pytest.mark.parametrize("sink,module", [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_missing_extra_is_one_line(tmp_path, monkeypatch, capsys, sink, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    out = tmp_path / "out"
    assert train.cli(FAST + ["--out", str(out), "--steps", "1", "--log", sink]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'nanorl[{sink}]'" in lines[0], lines
    assert not out.exists()


def test_moving_average_and_held_out_curve():
    from nanorl.plot import held_out_curve, moving_average

    assert moving_average([1.0, 0.0, 1.0, 1.0, 0.0], 2) == [1.0, 0.5, 0.5, 1.0, 0.5]
    rows = [{"step": 1, "reward_mean": 0.0}, {"step": 2, "reward_mean": 1.0, "eval_accuracy": 0.5},
            {"step": 3, "reward_mean": 1.0}]
    assert held_out_curve(rows, {"acc_before": 0.25, "acc_after": 0.75, "steps": 3}) == [(0, 0.25), (2, 0.5), (3, 0.75)]

