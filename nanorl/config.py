"""Config files: train.py's flags read from TOML (recipes/*.toml), and a run's run.json turned back into one.

    python train.py --config recipes/dapo.toml --steps 2   # flags given on the command line win over the file
    python -m nanorl.config out/run.json > run.toml         # the config that reproduces a run
    python train.py --config run.toml --out again           # ... bit for bit on a CPU, same seed
    python train.py --config out/run.json --out again       # run.json is also accepted as it is

A key is a flag's name with - or _ (eps-high, eps_high; group_size for -n). Values are TOML ints, floats,
booleans and strings ("none" where a flag takes none), a list for a repeatable flag (log = ["wandb"]);
tables are only headings ([rollout] prompts_per_step = 32 is prompts_per_step = 32). A repeatable flag
given on the command line adds to the file's list. An unknown key is one error naming the closest flag.
Like a YAML config in TRL / verl, but a flat file of the same names the command line uses, read by the
stdlib (tomllib, Python >= 3.11; `pip install tomli` on 3.10), without a config framework.
"""

import argparse
import dataclasses
import difflib
import json
import os
import sys

from nanorl import UserError, algos

_NOT_FLAGS = {"cfg", "resume", "config", "defaults"}  # run.json keys that are not settings of the run


def _read_toml(path):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli as tomllib
        except ImportError:
            raise UserError(f"--config {path}: reading TOML needs Python >= 3.11 or pip install tomli") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}; fix the file") from None


def load(path):
    """The file's {key: value} (.toml, or a run.json), tables flattened; keys not yet checked against the flags."""
    if not os.path.isfile(path):
        raise UserError(f"--config {path}: no such file; give a .toml file such as recipes/dapo.toml, or a run.json")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                return from_run(json.load(f))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a run.json written by train.py ({e}); give a .toml file") from None
    flat = {}
    for k, v in _read_toml(path).items():
        for kk, vv in (v.items() if isinstance(v, dict) else [(k, v)]):
            if kk in flat:
                raise UserError(f"{path}: {kk} is set twice; keep one")
            flat[kk] = vv
    return flat


def from_run(run):
    """run.json -> config dict: the run's flags, and its algorithm settings that differ from its --algo preset.

    Flags whose value was None are left out (None is their default); --resume and --config are not
    settings of a run. The preset's resolved fields (cfg) are compared with the preset so that a config
    keeps reading as "dapo with eps_high 0.3" rather than as every field of AlgoConfig.
    """
    out = {k: v for k, v in run.items() if k not in _NOT_FLAGS and not k.startswith("algo_") and v is not None}
    preset = dataclasses.asdict(algos.PRESETS.get(run["algo"], algos.AlgoConfig()))
    for k, v in run["cfg"].items():
        if k not in ("name", "doc", "kind", "seed") and v != preset.get(k):
            out[k] = "none" if v is None else v
    return out


def _flags(parser):
    """{name with _: action} for every --flag of the parser."""
    names = {}
    for a in parser._actions:
        for opt in a.option_strings:
            if opt.startswith("--") and a.dest not in ("help", "config"):
                names[opt[2:].replace("-", "_")] = a
    return names


def _convert(path, key, action, value):
    where = f"{path}: {key} = {value!r}"
    if isinstance(value, (dict, list)) and not isinstance(action, argparse._AppendAction):
        raise UserError(f"{where}: expected one value; see python train.py --help")
    if action.nargs == 0:  # store_true flags
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false")
        return value
    if isinstance(action, argparse._AppendAction):
        return [_convert(path, key, argparse.Action([], action.dest, type=action.type, choices=action.choices), v)
                for v in (value if isinstance(value, list) else [value])]
    s = ("true" if value else "false") if isinstance(value, bool) else str(value)
    try:
        out = action.type(s) if action.type else s
    except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
        raise UserError(f"{where}: {e or 'wrong type'}; expected {getattr(action.type, '__name__', 'a value')}") from None
    if action.choices is not None and out not in action.choices:
        raise UserError(f"{where}: choose one of {', '.join(map(str, action.choices))}")
    return out


def apply(parser, argv=None):
    """If argv has --config FILE, make the file's values the parser's defaults (so command-line flags win)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    path = pre.parse_known_args(sys.argv[1:] if argv is None else argv)[0].config
    if path is None:
        return
    flags = _flags(parser)
    defaults = {}
    for key, value in load(path).items():
        name = key.replace("-", "_")
        if name not in flags:
            close = difflib.get_close_matches(name, flags, n=1)
            hint = f"did you mean {close[0]}?" if close else "it is not a flag of train.py;"
            raise UserError(f"{path}: unknown key {key!r}: {hint} keys are flag names (python train.py --help)")
        defaults[flags[name].dest] = _convert(path, key, flags[name], value)
    parser.set_defaults(**defaults)


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(_toml_value, v)) + "]"
    return json.dumps(str(v))  # a TOML basic string: JSON's escapes are TOML's


def to_toml(cfg, header=""):
    """A config dict as TOML text, one `key = value` line each, in the dict's order."""
    lines = [f"# {line}" for line in header.splitlines()]
    return "\n".join(lines + [f"{k} = {_toml_value(v)}" for k, v in cfg.items()]) + "\n"


if __name__ == "__main__":
    if len(sys.argv) != 2 or not sys.argv[1].endswith(".json"):
        sys.exit("usage: python -m nanorl.config OUT/run.json > run.toml")
    try:
        print(to_toml(load(sys.argv[1]), f"rebuilt from {sys.argv[1]} by python -m nanorl.config; "
                                         f"python train.py --config THIS.toml reproduces the run"), end="")
    except UserError as e:
        sys.exit(f"error: {e}")
