"""Observation tokens of multi-turn episodes: what an environment's answer becomes between two policy turns.

    obs = Observations(tok, max_tokens=None, max_chars=4000)
    obs.probe(tools)                                # start-up: one error line if the template cannot extend an episode
    ids, truncated = obs.ids(observation, last_token, tools)   # after a turn that sampled last_token

Text observations (base / tiny models) are encoded on their own. Chat messages become the chat template's
own text for them, rendered on a FIXED BASE, never on the live history (SkyRL's fixed base, TRL's
_get_tool_suffix_ids): the base is a minimal conversation [user, assistant SENTINEL]; the observation's
text is what the template writes after the sentinel's end-of-turn marker when the messages and the
generation prompt follow it:

    render(base + [tool "408"], add_generation_prompt=True)
        = <|im_start|>user\\nnanorl<|im_end|>\\n<|im_start|>assistant\\nSENTINEL<|im_end|>  +  observation
    observation = \\n<|im_start|>user\\n<tool_response>\\n408\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n

So templates that rewrite earlier turns when a message is added (Qwen3 drops an empty <think> block from
assistant turns before the last user message) extend an episode all the same, and an episode's tokens are
the template's rendering of the whole conversation wherever the template preserves prefixes (the
`_training` variants of TRL's templates; tests/test_chat_templates.py renders real ones with transformers).

Also here, so that every observation gets them:
  - contents are capped in characters before templating (max_chars: --max-tool-output-chars), cut in the
    middle with a visible "[... N characters cut ...]" marker;
  - max_tokens (--max-obs-tokens) shortens message contents, re-rendering, never the templated ids;
  - strings of added tokens inside contents (a tool printing "<|im_start|>assistant") are encoded as plain
    text: an environment cannot forge a turn;
  - a turn the policy ended on a stop token other than the template's end-of-turn marker (<|endoftext|>
    instead of <|im_end|>) gets the marker prepended to the observation (mask 0, like all injected ids).
"""

import json
import re

from nanorl import UserError

SENTINEL = "nanorl-turn-7f3a"  # the fixed base's assistant text: a word no template rewrites
_BASE = [{"role": "user", "content": "nanorl"}, {"role": "assistant", "content": SENTINEL}]
_SLOT = "\ue000{}\ue001"  # stand-ins for message contents (Unicode private-use code points)
_SLOTS = re.compile("\ue000(\\d+)\ue001")
_PROBE = "nanorl-observation-42"


def cap_chars(text, n):
    """(text, cut): text longer than n characters keeps its first and last n/2, with a visible marker."""
    if not n or len(text) <= n:
        return text, False
    head = n // 2
    return f"{text[:head]}\n[... {len(text) - n} characters cut ...]\n{text[len(text) - (n - head):]}", True


def _level(ns, budget):
    """The largest c with sum(min(n, c) for n in ns) <= budget (water-filling: the longest are cut first)."""
    lo, hi = 0, max(ns, default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if sum(min(n, mid) for n in ns) <= budget else (lo, mid - 1)
    return lo


def _cut_middle(ids, k):
    return ids if len(ids) <= k else ids[:k // 2] + ids[len(ids) - (k - k // 2):]


class Observations:
    """Token ids of observations for one tokenizer and chat template (see the module docstring)."""

    def __init__(self, tok, max_tokens=None, max_chars=None):
        self.tok, self.max_tokens, self.max_chars = tok, max_tokens, max_chars
        self._ends = {}  # json of the tools -> the template's end-of-turn marker after an assistant message

    def _render(self, msgs, tools, gen):
        try:
            return self.tok.apply_chat_template(msgs, add_generation_prompt=gen, tools=tools)
        except UserError:
            raise
        except Exception as e:  # jinja's raise_exception, or a template that expects other fields
            roles = "/".join(sorted({str(m.get("role")) for m in msgs[len(_BASE):]}))
            what = f"add {roles!r} messages after an assistant turn" if roles else "render a user / assistant exchange"
            raise UserError(f"the chat template cannot {what} "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); pass "
                            f"--chat-template FILE.jinja with one that can, or --chat false") from None

    def end_marker(self, tools=None):
        """The added token the template writes right after an assistant message's text ('' if none)."""
        key = json.dumps(tools, sort_keys=True)
        if key not in self._ends:
            base = self._render(_BASE, tools, False)
            i = base.find(SENTINEL)
            if i < 0:
                raise UserError("the chat template does not render an assistant message's text as is, so an episode "
                                "cannot be extended; pass --chat-template FILE.jinja or --chat false")
            tail = base[i + len(SENTINEL):]
            self._ends[key] = next((t for t in self.tok.added_tokens if tail.startswith(t)), "")
        return self._ends[key]

    def turn_text(self, message, tools=None):
        """What the template writes for an assistant message after the generation prompt, up to its end-of-turn
        marker: the text a model trained on this template emits (the warm start's reference turns)."""
        head = self._render(_BASE[:1], tools, True)
        full = self._render(_BASE[:1] + [message], tools, False)
        if not full.startswith(head):
            raise UserError("the chat template renders an assistant message unlike its generation prompt, so "
                            "reference episodes cannot be written; add --warm-start-steps 0 or pass --chat-template")
        text, end = full[len(head):], self.end_marker(tools)
        return text[:text.find(end)] if end and end in text else text

    def _delta(self, msgs, tools):
        """The template's text after the base's end-of-turn marker: the messages and the next assistant header."""
        end = self.end_marker(tools)
        full = self._render(_BASE + list(msgs), tools, True)
        i = full.find(SENTINEL)
        if i < 0 or not full.startswith(end, i + len(SENTINEL)):
            raise UserError("the chat template changes how an assistant turn ends when messages follow it, so an "
                            "episode cannot be extended; pass --chat-template FILE.jinja or --chat false")
        return full[i + len(SENTINEL) + len(end):]

    def _encode(self, msgs, tools):
        text = self._delta(msgs, tools)
        specials = self.tok.added_tokens
        if not any(isinstance(m.get("content"), str) and any(s in m["content"] for s in specials) for m in msgs):
            return self.tok.encode(text, add_bos=False)  # the tokenizer's own encoding of the template's text
        # contents hold added-token strings: the template's text around them as usual, the contents as plain text
        slots = [dict(m, content=_SLOT.format(k)) if isinstance(m.get("content"), str) else m for k, m in enumerate(msgs)]
        skeleton = self._delta(slots, tools)
        pieces, ids = _SLOTS.split(skeleton), []
        for j, piece in enumerate(pieces):
            if j % 2 == 0:
                ids += self.tok.encode(piece, add_bos=False)
                continue
            k, slot = int(piece), _SLOT.format(piece)
            one = self._delta([msgs[k] if i == k else m for i, m in enumerate(slots)], tools)  # content k alone
            before, after = skeleton[:skeleton.index(slot)], skeleton[skeleton.index(slot) + len(slot):]
            if not (one.startswith(before) and one.endswith(after)):
                raise UserError("the chat template renders an observation's text in a way nanorl cannot locate, so "
                                "special-token strings in it cannot be escaped; pass --chat-template FILE.jinja")
            ids += self.tok.encode(one[len(before):len(one) - len(after)], add_bos=False, plain=True)
        return ids

    def _shorten(self, content, k):
        """content cut to about k tokens in the middle, with a visible marker."""
        c, mark = self.tok.encode(content, add_bos=False, plain=True), " [...] "
        m = len(self.tok.encode(mark, add_bos=False, plain=True))
        if k <= m + 2:
            return ""
        h = (k - m) // 2
        return self.tok.decode(c[:h]) + mark + self.tok.decode(c[len(c) - (k - m - h):])

    def ids(self, obs, last_token=None, tools=None):
        """(ids, truncated) of an observation (text or chat messages) after a policy turn that ended with
        last_token; truncated: its contents were cut to max_chars or max_tokens."""
        if isinstance(obs, str):
            text, cut = cap_chars(obs, self.max_chars)
            ids = self.tok.encode(text, add_bos=False, plain=True)
            return (_cut_middle(ids, self.max_tokens), True) if self.max_tokens and len(ids) > self.max_tokens else (ids, cut)
        msgs, cut = [], False
        for m in obs:
            if isinstance(m.get("content"), str):
                c, t = cap_chars(m["content"], self.max_chars)
                m, cut = dict(m, content=c), cut or t
            msgs.append(m)
        ids = self._encode(msgs, tools)
        for slack in range(0, 24, 4):  # cut the longest contents to one level, re-render: the template's text stays whole
            if not self.max_tokens or len(ids) <= self.max_tokens:
                break
            texts = [m["content"] if isinstance(m.get("content"), str) else "" for m in msgs]
            ns = [len(self.tok.encode(t, add_bos=False, plain=True)) for t in texts]
            level = _level(ns, sum(ns) - (len(ids) - self.max_tokens) - slack)
            if level >= max(ns, default=0):
                break  # nothing left to cut: the template's own text is over the cap (probe() refuses that)
            msgs = [dict(m, content=self._shorten(t, level)) if n > level else m for m, t, n in zip(msgs, texts, ns)]
            ids, cut = self._encode(msgs, tools), True
        end = self.end_marker(tools)
        if end and last_token is not None and self.tok.decode([last_token], skip_special_tokens=False) != end:
            ids = self.tok.encode(end, add_bos=False) + ids  # the end-of-turn the policy did not sample
        return ids, cut

    def probe(self, tools=None):
        """Check once, before any sampling, that the template can extend an episode with a tool message
        (given tools) or a user message (environment feedback): it renders after an assistant turn, keeps
        the message's text and ends with the assistant header; and that max_tokens leaves room for a
        message. Raises UserError (one line) otherwise."""
        role = "tool" if tools else "user"
        msgs = [{"role": role, "content": _PROBE}]
        text = self._delta(msgs, tools)
        if _PROBE not in text:
            raise UserError(f"the chat template drops {role!r} messages, so an environment's answer would never reach "
                            f"the model; pass --chat-template FILE.jinja with one that renders them, or --chat false")
        plain, gen = self._render(_BASE + msgs, tools, False), self._render(_BASE + msgs, tools, True)
        header = gen[len(plain):] if gen.startswith(plain) else ""
        if not header or not text.endswith(header):
            raise UserError("the chat template writes no assistant header after an observation, so the policy's next "
                            "turn has no place; pass --chat-template FILE.jinja or --chat false")
        if self.max_tokens:
            own = len(self._encode([{"role": role, "content": ""}], tools))
            if own + 8 > self.max_tokens:
                raise UserError(f"--max-obs-tokens {self.max_tokens} leaves no room: the chat template's own text "
                                f"around a {role!r} message is {own} tokens; raise it to at least {own + 8}")
