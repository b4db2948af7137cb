"""How Ollama renders a Modelfile's TEMPLATE for a chat request, emulated for the Go template constructs affiner
writes (text, {{ if }}/{{ else }}/{{ end }}, {{ range $i, $_ := .Messages }}, fields, "{{" literals, trim
markers), so that tests can check an exported Modelfile against the prompt affiner itself gives the model.
Ollama itself cannot run here. Its rules, from its template package:
- a template that names .Messages is executed once, with .System (the system messages, or the Modelfile's
  SYSTEM when the request has none) and .Messages;
- any other is executed once per turn with .System (first turn only), .Prompt and .Response, the turns
  concatenated; the last turn stops where {{ .Response }} is, the answer to come.
"""

from __future__ import annotations

import re

ACTION = re.compile(r"\{\{(-?)\s*(.*?)\s*(-?)\}\}", re.DOTALL)
LAST_USER = 'and (eq .Role "user") (eq (len (slice $.Messages $i)) 1)'


class _Cut(Exception):
    """Raised at {{ .Response }} in the last turn: nothing after it is rendered."""


def _parse(source: str) -> list:
    """A tree: strings, ("field", name), ("if", cond, then, else), ("range", body)."""
    tokens, at = [], 0
    for match in ACTION.finditer(source):
        text = source[at:match.start()]
        if match.group(1):
            text = text.rstrip()
        if tokens and tokens[-1][0] == "trim-next":
            tokens.pop()
            text = text.lstrip()
        tokens.append(("text", text))
        tokens.append(("action", match.group(2)))
        if match.group(3):
            tokens.append(("trim-next", ""))
        at = match.end()
    rest = source[at:]
    if tokens and tokens[-1][0] == "trim-next":
        tokens.pop()
        rest = rest.lstrip()
    tokens.append(("text", rest))
    tree, _ = _block(tokens, 0)
    return tree


def _block(tokens: list, i: int) -> tuple[list, int]:
    nodes = []
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "text":
            nodes.append(value)
        elif value in ("end", "else"):
            return nodes, i
        elif value.startswith("if "):
            then, i = _block(tokens, i + 1)
            other = []
            if tokens[i][1] == "else":
                other, i = _block(tokens, i + 1)
            nodes.append(("if", value[3:], then, other))
        elif value.startswith("range "):
            assert value == "range $i, $_ := .Messages", value
            body, i = _block(tokens, i + 1)
            nodes.append(("range", body))
        elif value == '"{{"':
            nodes.append("{{")
        else:
            nodes.append(("field", value))
        i += 1
    return nodes, i


def _render(nodes: list, scope: dict, cut_at_response: bool) -> str:
    out = []
    try:
        for node in nodes:
            if isinstance(node, str):
                out.append(node)
            elif node[0] == "field":
                if node[1] == ".Response" and cut_at_response:
                    raise _Cut("")
                out.append(str(scope[node[1]]))
            elif node[0] == "if":
                chosen = node[2] if _true(node[1], scope) else node[3]
                out.append(_render(chosen, scope, cut_at_response))
            else:  # range over the messages
                for i, message in enumerate(scope["$.Messages"]):
                    inner = {**scope, ".Role": message["role"], ".Content": message["content"], "$i": i}
                    out.append(_render(node[1], inner, cut_at_response))
    except _Cut as cut:  # what was rendered before the cut, at every level
        raise _Cut("".join(out) + str(cut)) from None
    return "".join(out)


def _true(condition: str, scope: dict) -> bool:
    if condition == LAST_USER:
        return scope[".Role"] == "user" and scope["$i"] == len(scope["$.Messages"]) - 1
    return bool(scope[condition])


def render(template: str, messages: list[dict[str, str]], system: str | None) -> str:
    """The prompt Ollama gives the model for `messages`, with the Modelfile's SYSTEM `system`."""
    if not any(m["role"] == "system" for m in messages) and system:
        messages = [{"role": "system", "content": system}, *messages]
    tree = _parse(template)
    if ".Messages" in template:
        system_text = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        return _render(tree, {".System": system_text, "$.System": system_text, "$.Messages": messages}, False)
    turns, current = [], {"system": "", "prompt": "", "response": ""}
    for message in messages:
        if message["role"] == "system":
            if current["prompt"] or current["response"]:
                turns.append(current)
                current = {"system": "", "prompt": "", "response": ""}
            current["system"] = message["content"]
        elif message["role"] == "user":
            if current["response"]:
                turns.append(current)
                current = {"system": "", "prompt": "", "response": ""}
            current["prompt"] = message["content"]
        else:
            current["response"] = message["content"]
    turns.append(current)
    out = []
    for n, turn in enumerate(turns):
        scope = {".System": turn["system"] if n == 0 else "", ".Prompt": turn["prompt"], ".Response": turn["response"]}
        try:
            out.append(_render(tree, scope, cut_at_response=n == len(turns) - 1))
        except _Cut as cut:
            out.append(str(cut))
    return "".join(out)
