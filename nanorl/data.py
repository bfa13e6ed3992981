"""Data files as rows of dicts: jsonl, parquet (verl's layout too) and `datasets.save_to_disk` directories.

    splits(data) -> (train path, held-out path or None)
    read_rows(path) -> Rows(rows [(record, where)], columns or None)
    read_examples(path, make) -> [make(record, where)], ids unique
    field(record, "reward_model.ground_truth")  a dotted key into nested dicts
    prompt_of(value, where, key) -> (question text, chat messages or None)

--data may be a file or a directory:
  *.parquet                   read with pyarrow (the optional extra nanorl[parquet]); nested columns
                              (verl's `prompt` list of messages, `reward_model` struct) become dicts and lists
  any other file              JSON lines, one object per line
  a save_to_disk directory    a Dataset (state.json + data-*.arrow) or a DatasetDict (dataset_dict.json +
                              one directory per split: train, and test or validation if present). The
                              arrow files are Arrow IPC streams, read with pyarrow: `datasets` is not needed.
  a directory                 train.jsonl or train.parquet [+ test.jsonl / test.parquet], as verl's
                              preprocessing scripts write them

verl's layout (examples/data_preprocess/gsm8k.py): `prompt` is a list of {"role", "content"} messages,
`reward_model.ground_truth` is the answer. A chat prompt is then rendered from those messages as they
are (they carry their own instruction); the raw prompt uses the last user message.

Every problem is a UserError naming where it is: "PATH:LINE" for jsonl (1-based, as editors count),
"PATH:row I" for parquet and arrow (0-based, as pandas and datasets index them).
"""

import json
import os
from dataclasses import dataclass

from nanorl import UserError

HELD_OUT = ("test", "validation")  # the split names read as held-out, in this order


@dataclass
class Rows:
    rows: list          # [(record dict, where)]
    columns: list | None  # the column names of a columnar file (None for jsonl: each line has its own keys)


def _pyarrow(path):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError(f"{path}: reading parquet and arrow files needs pyarrow; pip install pyarrow "
                        "(or pip install nanorl[parquet])") from None
    return pyarrow


def _is_saved_dataset(path):
    return os.path.isfile(os.path.join(path, "state.json")) or os.path.isfile(os.path.join(path, "dataset_dict.json"))


def splits(data):
    """(train, held-out or None) paths of --data; each is a file or a save_to_disk Dataset directory."""
    if not os.path.isdir(data):
        return data, None
    dd = os.path.join(data, "dataset_dict.json")
    if os.path.isfile(dd):  # DatasetDict.save_to_disk: one Dataset directory per split
        try:
            with open(dd) as f:
                names = json.load(f)["splits"]
        except (OSError, ValueError, KeyError, TypeError):
            raise UserError(f"{dd}: unreadable dataset_dict.json; write the dataset again with save_to_disk") from None
        if "train" not in names:
            raise UserError(f"{data}: the saved DatasetDict has no 'train' split (splits: {', '.join(names)}); "
                            "save one named train")
        test = next((os.path.join(data, s) for s in HELD_OUT if s in names), None)
        return os.path.join(data, "train"), test
    if _is_saved_dataset(data):
        return data, None
    for ext in (".jsonl", ".parquet"):
        if os.path.isfile(os.path.join(data, "train" + ext)):
            test = os.path.join(data, "test" + ext)
            return os.path.join(data, "train" + ext), test if os.path.isfile(test) else None
    raise UserError(f"{data}: no train.jsonl or train.parquet in the directory and not a save_to_disk dataset; "
                    "pass a .jsonl / .parquet file or a directory with train.jsonl [and test.jsonl]")


def read_rows(path):
    """The records of a data file or saved dataset, each with where it is (see the module docstring)."""
    if os.path.isdir(path) and _is_saved_dataset(path):
        return _read_arrow_dir(path)
    if not os.path.isfile(path):
        raise UserError(f"data file {path} does not exist; pass --data PATH (a .jsonl or .parquet file, a "
                        "save_to_disk directory, or a directory with train.jsonl)")
    if path.endswith(".parquet"):
        return _read_parquet(path)
    return Rows(list(_read_jsonl(path)), None)


def _read_jsonl(path):
    with open(path, "rb") as f:
        for ln, raw in enumerate(f, 1):
            where = f"{path}:{ln}"
            try:
                line = raw.decode("utf-8-sig" if ln == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not valid UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                "re-save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: malformed JSON ({e.msg} at column {e.colno}); fix or delete the line") from None
            if not isinstance(rec, dict):
                raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}; one object per line")
            yield rec, where


def _table_rows(path, table):
    return Rows([(rec, f"{path}:row {i}") for i, rec in enumerate(table.to_pylist())], table.column_names)


def _read_parquet(path):
    pa = _pyarrow(path)
    try:
        table = pa.parquet.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file ({type(e).__name__}: {e}); write it again "
                        "(pandas.DataFrame.to_parquet or datasets' to_parquet)") from None
    return _table_rows(path, table)


def _read_arrow_dir(path):
    """A Dataset.save_to_disk directory: state.json lists its Arrow IPC stream files, read in order."""
    pa = _pyarrow(path)
    state = os.path.join(path, "state.json")
    if not os.path.isfile(state):
        raise UserError(f"{path}: a saved DatasetDict, not one split; pass it as --data (its train split is used)")
    try:
        with open(state) as f:
            files = [os.path.join(path, d["filename"]) for d in json.load(f)["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise UserError(f"{state}: unreadable state.json; write the dataset again with save_to_disk") from None
    tables = []
    for name in files:
        try:
            with pa.memory_map(name) as src:
                tables.append(pa.ipc.open_stream(src).read_all())
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{name}: not a readable arrow file ({type(e).__name__}: {e}); write the dataset "
                            "again with save_to_disk") from None
    if not tables:
        raise UserError(f"{path}: the saved dataset lists no data files; write it again with save_to_disk")
    return _table_rows(path, pa.concat_tables(tables))


def read_examples(path, make, rows=None):
    """[make(record, where)] over a data file or saved dataset (or its Rows, already read); an "id" field
    must be unique, else the id is where the record is."""
    out, ids = [], {}
    for rec, where in (rows or read_rows(path)).rows:
        ex = make(rec, where)
        ex.meta["where"] = where  # so later checks (prompt too long) can name the line
        loc = where.rsplit(":", 1)[1]  # a jsonl line number or "row i"
        if "id" in rec:
            ex.id = str(rec["id"])
            if ex.id in ids:
                raise UserError(f"{where}: duplicate id {ex.id!r} (also on {ids[ex.id]}); make the ids unique")
            ids[ex.id] = f"line {loc}" if loc.isdigit() else loc
        else:
            ex.id = os.path.basename(where)  # file:line or file:row i
        out.append(ex)
    if not out:
        raise UserError(f"{path}: no examples in the file; pass a jsonl with one JSON object per line")
    return out


def text(rec, key, where, hint):
    """rec[key] as a non-empty string (numbers are converted); else a UserError ending in hint."""
    v = field(rec, key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = str(v)
    if not isinstance(v, str):
        raise UserError(f"{where}: {'missing' if v is None else 'non-text'} field {key!r}; {hint}")
    if not v.strip():
        raise UserError(f"{where}: empty {key!r}; fill it in or delete the line")
    return v


def field(rec, key):
    """rec[key], following dots into nested dicts ("reward_model.ground_truth"); None when absent."""
    if key in rec:
        return rec[key]
    for part in key.split("."):
        if not isinstance(rec, dict):
            return None
        rec = rec.get(part)
    return rec


def prompt_of(value, where, key):
    """(question, messages): a text prompt, or a chat (a list of role/content messages, verl's `prompt`)."""
    if isinstance(value, list):
        if not value or not all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role")
                                for m in value):
            raise UserError(f"{where}: field {key!r} is a list but not of chat messages with 'role' and 'content'; "
                            "use a text field or [{\"role\": \"user\", \"content\": ...}]")
        users = [m["content"] for m in value if m["role"] == "user"]
        if not users or not users[-1].strip():
            raise UserError(f"{where}: the messages in {key!r} have no (or an empty) user message; add one")
        return users[-1], [{"role": m["role"], "content": m["content"]} for m in value]
    return value, None
