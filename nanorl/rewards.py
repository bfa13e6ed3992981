"""Rewards: the safe expression evaluator, users' reward functions, and scoring that never stops a run.

safe_eval grades arithmetic answers (countdown) by walking the AST: integer literals, + - * /, unary
minus and parentheses over exact Fractions; names, calls, attributes, ** and floats are rejected, and
the text is capped at 128 characters, so nothing runs and no value grows huge.

score(): our own pure-Python graders (task.safe: arith, countdown, gsm8k) cannot hang, so they run
in-process with a try/except per item. Everything else (math-verify, reasoning-gym scorers, a user's
--reward-fn) runs in a persistent worker process forked from the trainer: the whole batch goes over one
pipe, results come back one by one, and an item that takes longer than `timeout` seconds scores 0, the
worker is killed and a fresh one (forked again, milliseconds) scores the rest of the batch. Forking means
the worker already holds the task and the user's function: nothing is pickled or re-imported by name
(fork needs Linux or macOS). The worker drops the trainer's SIGINT/SIGTERM handlers and exits when the
trainer does, however it ends. A result that is None, a string, NaN, inf or anything float() rejects
scores 0 and counts as an error; finite values outside [0, 1] are kept (a user's shaped reward), only
`correct` uses reward >= 1.
"""

import ast
import hashlib
import importlib
import importlib.util
import math
import multiprocessing as mp
import operator
import os
import signal
import sys
from dataclasses import dataclass
from fractions import Fraction

from nanorl import UserError


class _Reject(Exception):
    pass


OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def safe_eval(expr, max_len=128):
    """(Fraction value, [integer literals]) of an arithmetic expression, or (None, []) if it is not one."""
    lits = []

    def ev(node):
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -ev(node.operand) if isinstance(node.op, ast.USub) else ev(node.operand)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            lits.append(node.value)
            return Fraction(node.value)
        raise _Reject

    if len(expr) > max_len:
        return None, []
    try:
        return ev(ast.parse(expr.strip(), mode="eval").body), lits
    except (_Reject, SyntaxError, ValueError, ZeroDivisionError, RecursionError, MemoryError):
        return None, []


def load_reward_fn(spec):
    """fn from 'package.module:function' or 'path/to/file.py:function'."""
    mod, sep, fn = spec.rpartition(":")
    if not sep or not mod or not fn:
        raise UserError(f"--reward-fn {spec!r}: expected module:function or path/to/file.py:function")
    try:
        if mod.endswith(".py") or os.sep in mod:
            if not os.path.isfile(mod):
                raise UserError(f"--reward-fn {spec!r}: file {mod} does not exist; check the path")
            name = "nanorl_reward_" + hashlib.sha256(os.path.abspath(mod).encode()).hexdigest()[:12]
            s = importlib.util.spec_from_file_location(name, mod)
            m = sys.modules[name] = importlib.util.module_from_spec(s)
            s.loader.exec_module(m)
        else:
            if os.getcwd() not in sys.path:  # `module:fn` next to where the user runs the trainer
                sys.path.append(os.getcwd())
            m = importlib.import_module(mod)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"--reward-fn {spec!r}: cannot import {mod} ({type(e).__name__}: {e}); check the module and PYTHONPATH") from None
    f = getattr(m, fn, None)
    if not callable(f):
        raise UserError(f"--reward-fn {spec!r}: {mod} has no function {fn!r}; define {fn}(completion, example) -> float")
    return f


@dataclass
class ScoreResult:
    rewards: list[float]    # task.reward (or the user's reward_fn), sanitised: non-finite / non-number -> 0
    correct: list[bool]     # reward >= 1 - 1e-6: the accuracy metric
    formatted: list[float]  # task.format_reward
    errors: int             # reward calls that raised or returned a non-number
    timeouts: int           # reward calls that ran past the timeout


def _clean(r):
    """(float value, ok) of a reward function's result."""
    if r is None or isinstance(r, (str, bytes)):
        return 0.0, False
    try:
        r = float(r)  # int, bool, numpy scalars, 0-d tensors
    except Exception:
        return 0.0, False
    return (r, True) if math.isfinite(r) else (0.0, False)


def _call(fn, completion, example):
    try:
        return _clean(fn(completion, example))
    except Exception:
        return 0.0, False


def _serve(conn, parent_end, reward):
    """Worker loop: receive a batch [(index, completion, example)], send back (index, value, ok) per item."""
    parent_end.close()  # our fork-inherited copy of the trainer's end would hide the trainer's exit from us
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the trainer's to handle
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the trainer's graceful-stop handler: terminate() must kill
    mp.current_process().daemon = False  # we are daemonic (we die with the trainer), yet a reward may use a Pool
    trainer = os.getppid()
    while True:
        try:
            while not conn.poll(1.0):
                if os.getppid() != trainer:
                    return  # the trainer died without closing the pipe (SIGKILL)
            batch = conn.recv()
        except (EOFError, OSError):
            return  # the trainer is gone
        for i, completion, example in batch:
            try:
                value, ok = _clean(reward(completion, example))
            except BaseException:  # a user's sys.exit() too
                value, ok = 0.0, False
            conn.send((i, value, ok))


class _Worker:
    def __init__(self, reward):
        ctx = mp.get_context("fork")
        self.reward = reward
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, self.conn, reward), daemon=True)
        self.proc.start()
        child.close()  # so that the worker's death reads as EOF here

    def close(self):
        self.proc.kill()
        self.proc.join()
        self.conn.close()


def _worker(task):
    # one persistent worker per task, re-forked when the task's reward function was replaced
    w = task.__dict__.get("_reward_worker")
    if w is None or w.reward != task.reward or not w.proc.is_alive():
        if w is not None:
            w.close()
        w = task._reward_worker = _Worker(task.reward)
    return w


def _kill_worker(task):
    task._reward_worker.close()
    task._reward_worker = None


def _score_in_worker(task, completions, examples, timeout):
    rewards, errors, timeouts = [0.0] * len(completions), 0, 0
    todo = list(range(len(completions)))
    while todo:
        w = _worker(task)
        w.conn.send([(i, completions[i], examples[i]) for i in todo])
        for k, i in enumerate(todo):
            # the clock for item k starts once item k-1's result is in, i.e. no earlier than the worker began it
            if not w.conn.poll(timeout):
                timeouts += 1
            else:
                try:
                    j, value, ok = w.conn.recv()
                    rewards[j], errors = value, errors + (not ok)
                    continue
                except (EOFError, OSError):  # the worker died (os._exit, a crash in C code): an error
                    errors += 1
            _kill_worker(task)
            todo = todo[k + 1:]
            break
        else:
            todo = []
    return rewards, errors, timeouts


def score(task, completions, examples, timeout=10.0):
    """Rewards, accuracy and format flags of completions (text only, no prompt) against their examples."""
    if len(completions) != len(examples):
        raise ValueError(f"score: {len(completions)} completions for {len(examples)} examples")
    if task.safe:
        results = [_call(task.reward, c, ex) for c, ex in zip(completions, examples)]
        rewards, timeouts = [r for r, _ in results], 0
        errors = sum(not ok for _, ok in results)
    else:
        rewards, errors, timeouts = _score_in_worker(task, completions, examples, timeout)
    formatted = [_call(task.format_reward, c, ex)[0] for c, ex in zip(completions, examples)]
    return ScoreResult(rewards=rewards, correct=[r >= 1 - 1e-6 for r in rewards], formatted=formatted,
                       errors=errors, timeouts=timeouts)
