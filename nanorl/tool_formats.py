"""Tool-call syntaxes: how each model family writes a call, and how nanorl reads it back from a turn's text.

    fmt = detect(tok.chat_template)          # from the template, or None: a format nanorl cannot parse
    calls = parse_calls(text, names, fmt, schemas)   # [(name, arguments dict or str) | (None, "error: ...")]

The families, as their chat templates render an assistant message's `tool_calls` (the tests render real
templates from TRL's wheel and check the policy's text is exactly that):
  tags    base / tiny models (ARPO):   <calc>12*34</calc>
  hermes  Hermes, Qwen2.5, Qwen3, Qwen3-2507 (and templates without a `tools` argument, which get the Hermes
          preamble in the system prompt):   <tool_call>\\n{"name": "calc", "arguments": {"expr": "12*34"}}\\n</tool_call>
  llama3  Llama 3.1 / 3.2 JSON tool calling:   {"name": "calc", "parameters": {"expr": "12*34"}}
  xml     Qwen3.5 / Qwen3.6 / Nemotron 3:
          <tool_call>\\n<function=calc>\\n<parameter=expr>\\n12*34\\n</parameter>\\n</function>\\n</tool_call>
render_call(fmt, name, arguments) writes one call as the family's model does; tags_message turns a tags-syntax
reference turn into the assistant message a chat template renders (the warm start's reference episodes).
"arguments" given as a JSON string (as the OpenAI API sends them) are parsed. xml parameter values are text;
a value whose schema type is not "string" is read as JSON when it parses (verl's and vLLM's Qwen3-coder
parsers do the same). A malformed call becomes an error observation the policy sees, never a crash.
"""

import json
import re

FORMATS = ("tags", "hermes", "llama3", "xml")
_HERMES = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_XML_FN = re.compile(r"<function=([^>\n]+)>(.*?)</function>", re.DOTALL)
_XML_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.DOTALL)


def takes_tools(template):
    """Whether the template renders the `tools` argument (else the Hermes preamble goes in the system prompt)."""
    return "tools" in (template or "")


def detect(template):
    """The tool-call format of a chat template: 'hermes' for templates that take no tools (nanorl writes the
    Hermes preamble itself), else the one the template renders, or None if nanorl cannot parse it."""
    if not takes_tools(template):
        return "hermes"
    if "<function=" in template and "<parameter=" in template:
        return "xml"
    if "<tool_call>" in template and '"arguments"' in template and "<arg_key>" not in template:
        return "hermes"
    if '"parameters": ' in template and "<|start_header_id|>" in template:
        return "llama3"
    return None


def _arguments(call, key_names=("arguments", "parameters")):
    args = next((call[k] for k in key_names if k in call), {})
    if isinstance(args, str):  # the OpenAI convention: arguments as a JSON string
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            return None, f"error: the arguments are not JSON ({e.msg})"
    if not isinstance(args, dict):
        return None, "error: the arguments must be a JSON object"
    return args, None


def _json_call(call, needs):
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None, f'error: a tool call needs {{"name": ..., "{needs}": {{...}}}}'
    args, err = _arguments(call)
    return (None, err) if err else (call["name"], args)


def _hermes(text):
    out = []
    for body in _HERMES.findall(text):
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            out.append((None, f"error: bad JSON in <tool_call> ({e.msg})"))
            continue
        out.append(_json_call(call, "arguments"))
    return out


def _llama3(text):
    """Every top-level JSON object with a "name" and "parameters" (or "arguments"): Llama 3.2 may write
    several, separated by ';' or newlines; other braces in a final answer are left alone."""
    dec, out, i = json.JSONDecoder(), [], text.find("{")
    while i >= 0:
        try:
            obj, end = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            i = text.find("{", i + 1)
            continue
        if isinstance(obj, dict) and "name" in obj and ("parameters" in obj or "arguments" in obj):
            out.append(_json_call(obj, "parameters"))
        i = text.find("{", end)
    return out


def _param_types(schemas):
    types = {}
    for s in schemas or []:
        fn = s.get("function", s)
        for p, spec in (fn.get("parameters") or {}).get("properties", {}).items():
            types[(fn.get("name"), p)] = spec.get("type", "string")
    return types


def _xml(text, types):
    out = []
    for body in _HERMES.findall(text):
        m = _XML_FN.search(body)
        if not m:
            out.append((None, "error: a tool call needs <function=NAME>...</function> inside <tool_call>"))
            continue
        name, args = m.group(1).strip(), {}
        for p, value in _XML_PARAM.findall(m.group(2)):
            p = p.strip()
            if types.get((name, p), "string") != "string":
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            args[p] = value
        out.append((name, args))
    return out


def _tags(names):
    return re.compile(r"<(" + "|".join(map(re.escape, names)) + r")>(.*?)</\1>", re.DOTALL)


def parse_calls(text, names, fmt, schemas=None):
    """[(name, arguments) or (None, error text)] of the tool calls in one turn, in order. names: the tool
    names (the tags syntax uses them as tags); schemas: their JSON schemas (xml parameter types)."""
    if fmt == "tags":
        return [(m.group(1), m.group(2).strip()) for m in _tags(names).finditer(text)]
    if fmt == "hermes":
        return _hermes(text)
    if fmt == "llama3":
        return _llama3(text)
    if fmt == "xml":
        return _xml(text, _param_types(schemas))
    raise ValueError(f"unknown tool-call format {fmt!r}; one of {FORMATS}")


def render_call(fmt, name, arguments):
    """One tool call as the family's chat template writes an assistant message's `tool_calls` (json.dumps's
    separators are the templates' tojson); the parsers above read it back."""
    if fmt == "hermes":
        return "<tool_call>\n" + json.dumps({"name": name, "arguments": arguments}) + "\n</tool_call>"
    if fmt == "llama3":
        return json.dumps({"name": name, "parameters": arguments})
    if fmt == "xml":
        params = "".join(f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v)}\n</parameter>\n"
                         for k, v in arguments.items())
        return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"
    if fmt == "tags":
        return f"<{name}>{next(iter(arguments.values()), '')}</{name}>"
    raise ValueError(f"unknown tool-call format {fmt!r}; one of {FORMATS}")


def tags_message(text, names, schemas=None, structured=True):
    """The assistant message of a turn written in the tags syntax (a task's reference episodes:
    <calc>12*34</calc>): its calls as `tool_calls` (structured: for templates that render them), else as Hermes
    text in the content. A tags call passes one text argument: the schema's first required parameter."""
    first = {}
    for s in schemas or []:
        fn = s.get("function", s)
        params = fn.get("parameters") or {}
        first[fn.get("name")] = (params.get("required") or list(params.get("properties", {})) or ["input"])[0]
    calls = []

    def call(m):
        calls.append((m.group(1), {first.get(m.group(1), "input"): m.group(2).strip()}))
        return "" if structured else render_call("hermes", *calls[-1])
    content = _tags(names).sub(call, text)
    if not structured or not calls:
        return {"role": "assistant", "content": content}
    return {"role": "assistant", "content": content.strip(),
            "tool_calls": [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]}
