"""Tasks: training prompts, a held-out split and a verifiable reward for each of them.

    make_task(name, data=None, seed=0, reward_fn=None, prompt_key=None, answer_key=None) -> Task
    name: arith[:digits=2,ops=+,terms=2,worked=0.5] | countdown[:n=3,max_num=99,max_target=100] | gsm8k | math
          | calc[:digits=2,terms=2,ops=*,tools=1,tool_frac=0.3] | guess[:n=16]
          | rg:NAME[:key=value,...] (any reasoning-gym dataset, options go to its config)

A Task gives train_example(i) (deterministic in (seed, i); procedural tasks are infinite, files cycle
through a seeded permutation per epoch), eval_examples(n) (the first n of a fixed held-out split that
does not depend on the seed, so runs with different seeds evaluate on the same problems), prompt(ex,
tok, chat), reward(completion, ex) in [0, 1] and format_reward(completion, ex) in {0, 1}. The reward
sees the completion text only. One extraction rule per task serves both prompt styles:

arith      raw "37+48=" -> "85" or, worked, "7+8=15 3+4+1=8 #### 85" (see ArithTask). chat: "What is 37 + 48?
           Give the final answer as a number after '####'."
           Extraction: the number after the last "####"; else the first line if it is exactly an integer
           (raw); else the last integer in the text. Integer compare. Format: "####" + number, or a bare
           integer first line. Held out: expressions whose sha256 % 10 == 0, which training never draws.
countdown  TinyZero's task (Jiayi Pan, TinyZero countdown.py): reach the target using each given number
           exactly once with + - * / and parentheses. raw "nums 3 5 7 target 22:" -> "3*5+7". chat: TinyZero's
           instruction, answer in <answer> </answer>. Extraction: the last <answer> block, else the first
           line; a trailing "= 22" is dropped. Graded by safe_eval (an AST walk over integer literals,
           + - * /, unary minus, parentheses; exact Fractions; at most 128 characters; anything else, ** and
           names included, is invalid). Every target is reachable: it is built from a random expression.
           Format: the extracted expression parses. Held out by hash of (numbers, target).
gsm8k      --data (any layout of nanorl/data.py: jsonl, parquet, save_to_disk): question/answer (final
           answer after "####"), or verl's prompt/reward_model.ground_truth; default ../shared/data/gsm8k.
           raw "Question: Q\\nAnswer:\\n" -> the dataset's worked answer ending "#### 72"; chat: Q + "...
           final answer after '####'". Extraction (after cutting the completion at a hallucinated
           "\\nQuestion:"): the number after the last "####", else the last number; commas, "$",
           spaces, a final "." are dropped; numeric compare (1e-6 relative). Format: "####" + a number.
math       --data: problem and answer (or verl's prompt/reward_model.ground_truth), or a solution with
           \\boxed{} (the last one is the answer). raw "Problem: P\\nSolution:\\n"; chat: P + "put your final
           answer within \\boxed{}".
           Graded by math-verify: verify(parse("$gold$"), parse(last \\boxed{} of the completion, else all
           of it)). Format: a \\boxed{} present.
rg:NAME    reasoning_gym.create_dataset(NAME): question/answer of its entries, graded by the dataset's
           own score_answer (partial credit possible). raw "Question: Q\\nAnswer:\\n"; chat: reasoning-gym's
           default system prompt (answer in <answer> </answer>). Extraction: the last <answer> block, else
           the first line. Format: an answer block, or a one-line completion (raw). Training draws fresh
           dataset seeds chunk by chunk (infinite); evaluation uses seeds 0..n-1.

calc, guess multi-turn tasks with a calculator tool / higher-lower feedback: see nanorl/tool_tasks.py.

Files without a test split hold out their last 10% (at most 500) lines. Solutions (Example.solution,
for supervised warm starts) are the bare answer for countdown/rg, bare or worked for arith, the worked
solution for gsm8k/math. A bad data line is a UserError "PATH:LINE: problem; fix". --prompt-key /
--answer-key name other fields (dotted for nested ones); a prompt that is a list of chat messages is
rendered as is in chat mode (no instruction added). --reward-fn module:function or
path/file.py:function replaces reward() with fn(completion, example) -> float, run sandboxed (rewards.py).
"""

import ast
import difflib
import hashlib
import os
import re
import threading
from dataclasses import dataclass
from fractions import Fraction

from nanorl import UserError
from nanorl.data import field as get_field
from nanorl.data import prompt_of, read_examples, read_rows, splits
from nanorl.data import text as _text
from nanorl.rewards import OPS, ScoreResult, load_reward_fn, safe_eval, score  # noqa: F401  (tasks.score etc.)
from nanorl.task_base import (  # noqa: F401  (tasks.Example etc.: the public names stay here)
    REPO, _TAG, Example, Task, _close, _int_line, _pairs, _Procedural, _require, _rng, hash_answer, last_boxed,
    last_number, tagged_answer, to_number)
from nanorl.tool_tasks import CalcTask, GuessTask


def worked_solution(expr, value):
    """The answer with its work shown, ending "#### value".

    A sum of two numbers is worked in columns, units first, carries written out:
    "37+48" -> "7+8=15 3+4+1=8 #### 85" (each step needs only a one-digit fact: easy for a small model).
    Anything else is one operation per step, products first: "9-4*2+3" -> "4*2=8 9-8=1 1+3=4 #### 4".
    """
    m = re.fullmatch(r"(\d+)\+(\d+)", expr)
    if m:
        a, b = m.group(1), m.group(2)
        n = max(len(a), len(b))
        a, b, carry, steps = a.zfill(n), b.zfill(n), 0, []
        for x, y in zip(reversed(a), reversed(b)):
            col = int(x) + int(y) + carry
            steps.append(f"{x}+{y}" + ("+1" if carry else "") + f"={col}")
            carry = col // 10
        return " ".join(steps) + f" #### {value}"
    tokens, steps = re.findall(r"[+*-]|\d+", expr), []
    while "*" in tokens:  # products first, leftmost first
        i = tokens.index("*")
        x, y = int(tokens[i - 1]), int(tokens[i + 1])
        steps.append(f"{x}*{y}={x * y}")
        tokens[i - 1:i + 2] = [str(x * y)]
    acc = int(tokens[0])
    for op, x in zip(tokens[1::2], tokens[2::2]):
        new = acc + int(x) if op == "+" else acc - int(x)
        steps.append(f"{acc}{op}{x}={new}")
        acc = new
    return " ".join(steps) + f" #### {value}"


class ArithTask(_Procedural):
    """Integer arithmetic for the tiny character model: 'terms' operands of up to 'digits' digits.

    The reference solutions (for the supervised warm start) mix two styles, as human data does: a
    fraction 'worked' of them show their work (worked_solution), the rest give the bare answer. Which
    style an example gets is a hash of the problem, so a model imitating them picks a style at random;
    RL with the correctness reward then learns which one pays (the worked one, for a small model), a
    choice that carries over to every problem. Evaluation is always on problems never trained on.
    """
    name, instruction = "arith", " Give the final answer as a number after '####'."

    @dataclass
    class Options:
        digits: int = 2     # operands in [0, 10**digits)
        ops: str = "+"      # any of + - * (results may be negative)
        terms: int = 2      # operands per expression
        worked: float = 0.5  # fraction of reference solutions that show their work

    def check(self):
        o = self.opts
        if not (1 <= o.digits <= 9 and 2 <= o.terms <= 8 and o.ops and set(o.ops) <= set("+-*")
                and 0 <= o.worked <= 1):
            raise UserError(f"arith options {o}: need 1 <= digits <= 9, 2 <= terms <= 8, ops a subset of +-*, "
                            f"0 <= worked <= 1")

    def draw(self, rng):
        o = self.opts
        nums = [rng.randrange(10 ** o.digits) for _ in range(o.terms)]
        ops = [rng.choice(o.ops) for _ in range(o.terms - 1)]
        expr = str(nums[0]) + "".join(op + str(x) for op, x in zip(ops, nums[1:]))
        value = int(safe_eval(expr)[0])
        shown = int(hashlib.sha256(("worked:" + expr).encode()).hexdigest()[:8], 16) % 1000 < 1000 * o.worked
        solution = worked_solution(expr, value) if shown else str(value)
        return Example("", f"What is {' '.join(re.findall(r'[+*-]|[0-9]+', expr))}?", str(value), solution,
                       {"key": expr, "expr": expr})

    def raw_prompt(self, ex):
        return ex.meta["expr"] + "="

    @staticmethod
    def extract(c):
        for v in (hash_answer(c), _int_line(c), last_number(c)):
            if v is not None:
                return v

    def reward(self, completion, ex):
        return float(_close(self.extract(completion), float(ex.answer)))

    def format_reward(self, completion, ex):
        return float(hash_answer(completion) is not None or _int_line(completion) is not None)


class CountdownTask(_Procedural):
    """TinyZero's countdown: combine the numbers, each exactly once, with + - * / to reach the target."""
    name = "countdown"
    instruction = (" Show your work in <think> </think> tags. And return the final answer in <answer> </answer>"
                   " tags, for example <answer> (1 + 2) / 3 </answer>.")

    @dataclass
    class Options:
        n: int = 3             # how many numbers (TinyZero: 3 or 4)
        max_num: int = 99      # numbers are drawn from 1..max_num
        max_target: int = 100  # targets are integers in 1..max_target

    def check(self):
        o = self.opts
        if not (2 <= o.n <= 6 and 1 <= o.max_num and 1 <= o.max_target):
            raise UserError(f"countdown options {o}: need 2 <= n <= 6, max_num >= 1, max_target >= 1")

    def draw(self, rng):
        o = self.opts
        while True:  # combine random pairs until one expression is left; keep it if it is a valid target
            nums = [rng.randint(1, o.max_num) for _ in range(o.n)]
            items = [(str(x), 3, Fraction(x)) for x in nums]  # (text, precedence, value)
            while len(items) > 1:
                a, b = rng.sample(range(len(items)), 2)
                (sa, pa, va), (sb, pb, vb) = items[a], items[b]
                op = rng.choice("+-*/" if vb else "+-*")
                p = 1 if op in "+-" else 2
                sa = f"({sa})" if pa < p else sa
                sb = f"({sb})" if pb < p or (pb == p and op in "-/") else sb
                items = [it for k, it in enumerate(items) if k not in (a, b)]
                items.append((sa + op + sb, p, OPS[op](va, vb)))
            expr, _, v = items[0]
            if v.denominator == 1 and 1 <= v <= o.max_target:
                t = int(v)
                q = (f"Using the numbers {nums}, create an equation that equals {t}. You can use basic arithmetic "
                     "operations (+, -, *, /) and each number must be used exactly once.")
                return Example("", q, str(t), expr, {"key": f"{sorted(nums)}={t}", "nums": nums, "target": t})

    def raw_prompt(self, ex):
        return f"nums {' '.join(map(str, ex.meta['nums']))} target {ex.meta['target']}:"

    @staticmethod
    def extract(c):
        return tagged_answer(c).split("=", 1)[0]

    def reward(self, completion, ex):
        v, lits = safe_eval(self.extract(completion))
        return float(v is not None and v == ex.meta["target"] and sorted(lits) == sorted(ex.meta["nums"]))

    def format_reward(self, completion, ex):
        return float(safe_eval(self.extract(completion))[0] is not None)


# ------------------------------------------------------------------------------------------- data files

class _FileTask(Task):
    """Examples from a data file or directory (data.splits); fields found by prompt_keys / answer_keys.

    The first key a record has is used: the task's own field name, then verl's. --prompt-key and
    --answer-key replace the list with one (dotted) key.
    """
    fields = ""  # for messages
    prompt_keys, answer_keys = ("question", "prompt"), ("answer", "reward_model.ground_truth")

    def __init__(self, spec, data, seed, prompt_key=None, answer_key=None):
        if spec:
            raise UserError(f"the {self.name} task takes no options (got {spec!r}); pass the data with --data PATH")
        self.prompt_keys = (prompt_key,) if prompt_key else self.prompt_keys
        self.answer_keys = (answer_key,) if answer_key else self.answer_keys
        data = data or self.default_data()
        train, test = splits(data)
        self.train = self.read(train)
        self.heldout = self.read(test) if test else None
        if self.heldout is None:  # hold out the file's tail: the last 10%, at most 500 examples
            k = max(1, min(500, len(self.train) // 10))
            if len(self.train) < 2:
                raise UserError(f"{data}: one example cannot be split into train and held-out; add examples or a test.jsonl")
            self.train, self.heldout = self.train[:-k], self.train[-k:]
        self.seed, self.n_train, self._perm = seed, len(self.train), (None, None)

    def read(self, path):
        rows = read_rows(path)
        for keys, flag in ((self.prompt_keys, "--prompt-key"), (self.answer_keys, "--answer-key")):
            if rows.columns is not None and not any(k.split(".")[0] in rows.columns for k in keys):
                raise UserError(f"{path}: no column {' or '.join(map(repr, keys))} (columns: {', '.join(rows.columns)}); "
                                f"pass {flag} COLUMN")
        return read_examples(path, self.example, rows)

    def key(self, rec, keys):
        """The first of keys the record holds (the first one, to name in an error, when it holds none)."""
        return next((k for k in keys if get_field(rec, k) is not None), keys[0])

    def question(self, rec, where):
        """(question, chat messages or None) from the prompt field: a text or verl's list of messages."""
        key = self.key(rec, self.prompt_keys)
        q, msgs = prompt_of(get_field(rec, key), where, key)
        return _text({key: q}, key, where, f"{self.name} rows need {self.fields}, or pass --prompt-key NAME"), msgs

    def default_data(self):
        raise UserError(f"the {self.name} task needs --data PATH: a jsonl with {self.fields} (or a directory with train.jsonl)")

    def messages(self, ex):
        return ex.meta.get("messages") or super().messages(ex)

    def train_example(self, i):
        epoch, j = divmod(i, self.n_train)
        if self._perm[0] != epoch:  # a fresh seeded permutation per epoch; cached, the trainer walks forward
            perm = list(range(self.n_train))
            _rng(type(self).name, self.seed, "epoch", epoch).shuffle(perm)
            self._perm = (epoch, perm)
        return self.train[self._perm[1][j]]

    def eval_examples(self, n):
        return self.heldout[:n]


class GSM8KTask(_FileTask):
    name, fields = "gsm8k", "question and answer (final answer after '####')"
    instruction = " Solve it step by step, then give the final answer as a number after '####'."

    def default_data(self):
        path = os.path.join(REPO, "..", "shared", "data", "gsm8k")
        return os.path.normpath(path) if os.path.isdir(path) else super().default_data()

    def example(self, rec, where):
        q, msgs = self.question(rec, where)
        a = _text(rec, self.key(rec, self.answer_keys), where, "gsm8k rows need 'question' and 'answer' (or pass "
                  "--prompt-key / --answer-key)")
        final = a.rsplit("####", 1)[-1].strip()
        if to_number(final) is None:
            raise UserError(f"{where}: final answer {final!r} is not a number; gsm8k answers end in '#### <number>'")
        return Example("", q, final.replace(",", "").replace("$", ""), a if "####" in a else f"#### {final}",
                       {"messages": msgs} if msgs else {})

    @staticmethod
    def extract(c):
        c = c.split("\nQuestion:", 1)[0]  # a raw-prompted base model may go on to invent the next problem
        v = hash_answer(c)
        return v if v is not None else last_number(c)

    def reward(self, completion, ex):
        return float(_close(self.extract(completion), to_number(ex.answer)))

    def format_reward(self, completion, ex):
        return float(hash_answer(completion) is not None)


class MathTask(_FileTask):
    name, fields, safe = "math", "problem and answer (or a solution with \\boxed{})", False
    prompt_keys = ("problem", "prompt")
    instruction = "\nPlease reason step by step, and put your final answer within \\boxed{}."
    _gold = {}

    answer_keys = ("answer", "reward_model.ground_truth", "solution")  # a solution's last \\boxed{} is its answer

    def __init__(self, spec, data, seed, prompt_key=None, answer_key=None):
        _require("math_verify", "math-verify")
        super().__init__(spec, data, seed, prompt_key, answer_key)

    def raw_prompt(self, ex):
        return f"Problem: {ex.question}\nSolution:\n"

    def example(self, rec, where):
        q, msgs = self.question(rec, where)
        sol = rec.get("solution") if isinstance(rec.get("solution"), str) else None
        for key in self.answer_keys:
            ans = get_field(rec, key)
            ans = last_boxed(ans) if isinstance(ans, str) and (key == "solution" or "\\boxed" in ans) else ans
            if ans is not None and str(ans).strip():
                break
        else:
            raise UserError(f"{where}: no {self.answer_keys[0]!r} (nor {', '.join(map(repr, self.answer_keys[1:]))} "
                            f"with a \\boxed{{}}); add one of them or pass --answer-key NAME")
        ans = str(ans).strip()
        return Example("", q, ans, sol or f"The final answer is $\\boxed{{{ans}}}$.", {"messages": msgs} if msgs else {})

    def reward(self, completion, ex):
        from math_verify import parse, verify

        # math-verify's own timeouts use signal.alarm, which only works in the main thread; elsewhere
        # rely on score()'s worker timeout (the worker runs us in its main thread, where it works)
        t = 5 if threading.current_thread() is threading.main_thread() else None
        boxed = last_boxed(completion)
        pred = parse(f"\\boxed{{{boxed}}}" if boxed is not None else completion, parsing_timeout=t)
        if ex.answer not in self._gold:  # parsed once per problem (the worker is persistent)
            self._gold[ex.answer] = parse(f"${ex.answer}$", parsing_timeout=t)
        gold = self._gold[ex.answer]
        return float(bool(gold) and bool(pred) and verify(gold, pred, timeout_seconds=t))

    def format_reward(self, completion, ex):
        return float(last_boxed(completion) is not None)


class RGTask(Task):
    """Any reasoning-gym dataset, scored by its own score_answer."""
    safe, CHUNK, EVAL_SPAN = False, 10_000, 1_000_000

    def __init__(self, rg_name, spec, seed):
        _require("reasoning_gym", "reasoning-gym")
        import reasoning_gym
        from reasoning_gym.factory import DATASETS
        from reasoning_gym.utils import SYSTEM_PROMPTS

        if rg_name not in DATASETS:
            close = difflib.get_close_matches(rg_name, DATASETS, n=5, cutoff=0.5)
            hint = f"did you mean {', '.join('rg:' + c for c in close)}?" if close else f"valid names: {', '.join(sorted(DATASETS))}"
            raise UserError(f"unknown reasoning-gym dataset {rg_name!r}; {hint}")
        self.name, self.rg_name, self.seed, self.system = f"rg:{rg_name}", rg_name, seed, SYSTEM_PROMPTS["default"]
        self.kw = {}
        for _, k, v in _pairs(spec, self.name):
            try:
                self.kw[k] = ast.literal_eval(v)  # numbers, lists, tuples; anything else stays a string
            except (ValueError, SyntaxError):
                self.kw[k] = v
        self._create = reasoning_gym.create_dataset
        self.scorer, self._chunk = self.dataset(0, 1), (None, None)  # validates the options early

    def dataset(self, seed, size):
        try:
            return self._create(self.rg_name, seed=seed, size=size, **self.kw)
        except (TypeError, ValueError, AssertionError, KeyError) as e:
            raise UserError(f"rg:{self.rg_name}: cannot create the dataset ({type(e).__name__}: {e}); check its options") from None

    def _example(self, entry, id):
        a = "" if entry.get("answer") is None else str(entry["answer"])
        return Example(id, str(entry["question"]), a, a, {"entry": entry})

    def train_example(self, i):
        # reasoning-gym seeds item idx with Random(seed + idx): chunk c of training uses dataset seeds
        # EVAL_SPAN + c*CHUNK + (0..CHUNK-1), disjoint from evaluation's 0..n-1; kept below 2**31
        # because some generators seed numpy with it. Datasets that precompute stay cheap per chunk.
        c, j = divmod(i, self.CHUNK)
        if self._chunk[0] != c:
            start = (self.seed * 100_003 + c) * self.CHUNK % (2**31 - self.EVAL_SPAN - self.CHUNK)
            self._chunk = (c, self.dataset(self.EVAL_SPAN + start, self.CHUNK))
        return self._example(self._chunk[1][j], str(i))

    def eval_examples(self, n):
        n = min(n, self.EVAL_SPAN)
        ds = self.dataset(0, max(n, 1))
        return [self._example(ds[j], f"eval-{j}") for j in range(n)]

    def reward(self, completion, ex):
        return self.scorer.score_answer(tagged_answer(completion), ex.meta["entry"])

    def format_reward(self, completion, ex):
        # an answer block (chat), or a one-line completion (raw)
        return float(bool(_TAG.search(completion)) or ("\n" not in completion.strip() and bool(completion.strip())))


# --------------------------------------------------------------------------------------------- factory

TASKS = {"arith": ArithTask, "countdown": CountdownTask, "gsm8k": GSM8KTask, "math": MathTask, "calc": CalcTask,
         "guess": GuessTask}


def make_task(name, data=None, seed=0, reward_fn=None, prompt_key=None, answer_key=None):
    """A Task from its name (see the module docstring); reward_fn replaces its reward()."""
    kind, _, spec = name.partition(":")
    if (prompt_key or answer_key) and kind not in ("gsm8k", "math"):
        raise UserError(f"--prompt-key / --answer-key map the fields of a data file (gsm8k, math); {name} has none, drop them")
    if kind == "rg":
        rg_name, _, spec = spec.partition(":")
        if data:
            raise UserError(f"--data is for gsm8k and math; {name} is generated by reasoning-gym, drop --data")
        task = RGTask(rg_name, spec, seed)
    elif kind in TASKS:
        keys = dict(prompt_key=prompt_key, answer_key=answer_key) if prompt_key or answer_key else {}
        task = TASKS[kind](spec, data, seed, **keys)
        task.name = name
    else:
        close = difflib.get_close_matches(kind, list(TASKS) + ["rg"], n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UserError(f"unknown task {name!r}{hint}; valid: {', '.join(TASKS)}, rg:<reasoning-gym dataset>")
    if reward_fn:
        task.reward, task.safe, task.reward_fn = load_reward_fn(reward_fn), False, reward_fn
    return task
