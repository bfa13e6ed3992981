"""What every task shares: the Task interface (prompt, reward, environment), Example, the procedural
train / held-out split, and the answer extraction rules (nanorl/tasks.py documents them per task).

nanorl/tasks.py (arith, countdown, gsm8k, math, rg) and nanorl/tool_tasks.py (calc, guess) build on this
module; make_task in tasks.py is the one factory.
"""

import dataclasses
import hashlib
import os
import random
import re
from dataclasses import dataclass, field

from nanorl import UserError
from nanorl.env import SingleTurnEnv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Example:
    id: str               # unique within the split
    question: str         # the problem text shown to the model
    answer: str           # the reference final answer (what the grader compares against)
    solution: str         # a reference completion for supervised warm starts
    meta: dict = field(default_factory=dict)  # task specific: countdown numbers/target, the raw rg entry, ...


def _rng(*key):
    # one private generator per (task, seed, index): random access to an infinite stream, no global state
    return random.Random(":".join(map(str, key)))


def _held_out(key):
    # a fixed 10% of the problem space, the same for every seed: training rejects it, evaluation draws only it
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10 == 0


def _pairs(spec, task, keys=None):
    """(item, key, value) of a 'k=v,k=v' option string."""
    for kv in filter(None, spec.split(",")):
        k, sep, v = (s.strip() for s in kv.partition("="))
        if not sep or (keys is not None and k not in keys):
            raise UserError(f"task option {kv!r} of {task!r}: expected key=value"
                            + (f" with key one of {', '.join(keys)}" if keys else " (a field of its config)"))
        yield kv, k, v


def _options(cls, spec, task):
    """Parse 'k=v,k=v' into the dataclass cls; the value types are those of the defaults."""
    opts = cls()
    for kv, k, v in _pairs(spec, task, [f.name for f in dataclasses.fields(cls)]):
        try:
            setattr(opts, k, type(getattr(opts, k))(v))
        except ValueError:
            raise UserError(f"task option {kv!r} of {task!r}: {v!r} is not a {type(getattr(opts, k)).__name__}") from None
    return opts


# ---------------------------------------------------------------------------------------------- answers

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def to_number(s):
    """float of a final answer like '$1,000.', ' -3 '; None if it is not a plain number."""
    s = s.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    return float(s) if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s) else None


def hash_answer(text):
    """The number after the last '####' (None when there is no '####' or no number follows it)."""
    if "####" not in text:
        return None
    m = _NUMBER.search(text.rsplit("####", 1)[1].split("\n", 1)[0])
    return to_number(m.group()) if m else None


def last_number(text):
    nums = _NUMBER.findall(text)
    return to_number(nums[-1]) if nums else None


def tagged_answer(text):
    """The last <answer>...</answer> block, else the first line; stripped."""
    tags = _TAG.findall(text)
    return (tags[-1] if tags else text.split("\n", 1)[0]).strip()


def last_boxed(text):
    """Content of the last \\boxed{...} (nested braces allowed), or None."""
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    m = re.match(r"\\boxed ([^\s$]+)", text[i:])  # \boxed 5
    if m:
        return m.group(1)
    if text[i + 6:i + 7] != "{":
        return None
    depth = 0
    for k in range(i + 6, len(text)):
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[i + 7:k]
    return None  # unclosed: a truncated completion


def _int_line(text):
    """The first line as an integer, if it is exactly one (the raw arith format)."""
    first = text.split("\n", 1)[0].strip()
    return int(first) if re.fullmatch(r"-?\d+", first) else None


def _require(module, package):
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"this task needs the {package} package; pip install {package} (or pip install nanorl[tasks])")


def _close(a, b):
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


# ------------------------------------------------------------------------------------------------ tasks

class Task:
    """The shared pieces; a subclass defines the examples, the raw prompt, the chat instruction, the grader."""
    name = "task"
    safe = True            # reward() is our own pure-Python code that cannot hang: score in-process
    n_train = None         # None: infinite (procedural)
    system = None          # chat system prompt (None: the template's default)
    instruction = ""       # appended to the question in the chat user message
    max_turns = 1          # default --max-turns (tool tasks: more)

    def make_env(self, tok, chat):
        """A fresh environment for one episode (nanorl.env); a plain task is the one-turn episode."""
        return SingleTurnEnv(self, tok, chat)

    def raw_prompt(self, ex):
        return f"Question: {ex.question}\nAnswer:\n"

    def prompt(self, ex, tok, chat):
        """chat=False: a completion-style prompt for base/tiny models; chat=True: the rendered chat template."""
        if not chat:
            return self.raw_prompt(ex)
        return tok.apply_chat_template(self.messages(ex), add_generation_prompt=True)

    def messages(self, ex):
        """The chat messages of the prompt (what chat=True renders; reward models and judges see them too)."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": ex.question + self.instruction}]


class _Procedural(Task):
    """Infinite train stream drawn per index, held-out split = the hash bucket that training rejects."""

    def __init__(self, spec, data, seed):
        if data:
            raise UserError(f"--data is for gsm8k and math; the {self.name} task is procedural, drop --data")
        self.seed, self.opts = seed, _options(self.Options, spec, self.name)
        self.check()

    def train_example(self, i):
        rng = _rng(type(self).name, self.seed, i)
        while True:
            ex = self.draw(rng)
            if not _held_out(ex.meta["key"]):
                ex.id = str(i)
                return ex

    def eval_examples(self, n):
        rng, out, seen = _rng(type(self).name, "eval"), [], set()
        for _ in range(100 * n + 1000):  # a tiny option space may hold fewer than n distinct problems
            if len(out) == n:
                break
            ex = self.draw(rng)
            if _held_out(ex.meta["key"]) and ex.meta["key"] not in seen:
                seen.add(ex.meta["key"])
                ex.id = f"eval-{len(out)}"
                out.append(ex)
        return out
