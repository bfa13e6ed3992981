"""--config FILE.toml and recipes/: file values as defaults, flags win, unknown keys fail in one line, and a
config rebuilt from run.json reproduces the run bit for bit."""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from test_faults import TIMING
from test_train import FAST, metrics, run, weights

import train
from nanorl import config

RECIPES = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.toml")))


def test_recipes_exist_and_parse():
    names = {os.path.basename(p) for p in RECIPES}
    assert {"dapo.toml", "dr_grpo.toml", "gspo.toml", "nanochat-gsm8k.toml", "smollm2-135m-cpu.toml"} <= names
    for path in RECIPES:
        keys = config.load(path)
        args = train.parse_args(["--config", path])  # every key maps to a flag, every value converts
        for k, v in keys.items():
            k = k.replace("-", "_")
            got = getattr(args, k) if hasattr(args, k) else getattr(args.cfg, k)
            assert got == v, (path, k, got, v)


def test_flags_win_over_the_file(tmp_path):
    path = os.path.join(ROOT, "recipes", "dapo.toml")
    args = train.parse_args(["--config", path, "--eps-high", "0.3", "--steps", "2", "--lr", "1e-3"])
    assert (args.cfg.eps_high, args.steps, args.lr) == (0.3, 2, 1e-3)  # the flags
    assert (args.cfg.eps_low, args.weight_decay, args.mini_batches) == (0.2, 0.1, 4)  # the file
    assert args.cfg.name == "dapo" and args.cfg.filter_groups == "nonconstant"


def test_dapo_recipe_runs_two_steps(tmp_path):
    # the recipe, made tiny-sized by flags: the tiny model, 4-token answers, small batches
    out = run(tmp_path, "--config", os.path.join(ROOT, "recipes", "dapo.toml"), "--steps", "2", "--chat", "false",
              "--max-new-tokens", "4", "--prompts-per-step", "4", "-n", "4", "--mini-batches", "2", "--eval-n", "8")
    assert [r["step"] for r in metrics(out)] == [1, 2]
    saved = json.load(open(os.path.join(out, "run.json")))
    assert saved["cfg"]["name"] == "dapo" and saved["cfg"]["eps_high"] == 0.28 and saved["weight_decay"] == 0.1
    assert saved["model"] == "tiny" and saved["steps"] == 2


@pytest.mark.parametrize("text,words", [
    ("eps_hihg = 0.3\n", ["eps_hihg", "eps_high"]),
    ("prompts-per-stp = 4\n", ["prompts-per-stp", "prompts_per_step"]),
    ("steps = 2.5\n", ["steps", "int"]),
    ("kernel_impl = \"cuda\"\n", ["kernel_impl", "triton"]),
    ("steps = \n", ["not valid TOML"]),
])
def test_bad_config_is_one_line(tmp_path, capsys, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = tmp_path / "out"
    assert train.cli(FAST + ["--out", str(out), "--config", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}"), lines
    for w in words:
        assert w in lines[0], lines
    assert not out.exists()


def test_config_from_run_json_reproduces_the_run(tmp_path):
    a = run(tmp_path, "--algo", "dapo", "--eps-high", "0.3", "--steps", "2", "--seed", "3", name="a")
    res = subprocess.run([sys.executable, "-m", "nanorl.config", os.path.join(a, "run.json")], capture_output=True,
                         text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
    assert res.returncode == 0, res.stderr
    (tmp_path / "run.toml").write_text(res.stdout)
    assert "eps_high = 0.3" in res.stdout and "algo = \"dapo\"" in res.stdout and "eps_low" not in res.stdout
    b, c = str(tmp_path / "b"), str(tmp_path / "c")
    assert train.main(["--config", str(tmp_path / "run.toml"), "--out", b]) == 0  # nothing else on the command line
    assert train.main(["--config", os.path.join(a, "run.json"), "--out", c]) == 0  # run.json works as it is

    def untimed(out):
        return [{k: v for k, v in r.items() if k not in TIMING} for r in metrics(out)]
    for other in (b, c):
        assert untimed(other) == untimed(a)
        wa, wo = weights(a), weights(other)
        assert all(torch.equal(wa[k], wo[k]) for k in wa)
        assert json.load(open(os.path.join(a, "summary.json")))["acc_after"] == \
            json.load(open(os.path.join(other, "summary.json")))["acc_after"]
