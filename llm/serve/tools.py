"""Tool calling: `tools` rendered through the chat template, the model's call parsed into OpenAI `tool_calls`.

  tool_choice "none"       the tools are not shown to the model; plain text back
  tool_choice "auto"       the tools are shown (the template's `tools` variable); a reply holding calls
                           (`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, as Hermes / Qwen templates
                           teach, or a bare JSON object with name + arguments / parameters, as Llama 3.1) becomes
                           tool_calls, anything else is content
  tool_choice "required"   the reply is constrained (llm.serve.grammar) to one call of one of the tools, its
                           arguments valid under the tool's parameters schema
  {"type": "function", "function": {"name": N}}   the same, to tool N

A template that never reads `tools` cannot show them to the model, so a request with tools (and a choice
other than "none") on such a model is a 400, like an unknown name in tool_choice.
"""

from __future__ import annotations

import json
import re
import secrets

import jinja2
import jinja2.meta

CALL_TAG = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)


class ToolError(ValueError):
    """A tools / tool_choice combination the server cannot serve; the message is one line."""


def template_reads_tools(template: str | None) -> bool:
    """Whether a jinja2 chat template uses the `tools` variable (None: the plain template, which does not)."""
    if not template:
        return False
    return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))


def choose(tools: list[dict], choice) -> tuple[list[dict] | None, dict | None]:
    """(tools to render, JSON schema the reply must follow or None) for a request's tools and tool_choice."""
    names = [t["function"]["name"] for t in tools]
    if choice == "none":
        return None, None
    if choice in (None, "auto"):
        return tools, None
    if choice == "required":
        return tools, {"anyOf": [call_schema(t) for t in tools]}
    name = choice["function"]["name"]
    if name not in names:
        raise ToolError(f"tool_choice names the function {name!r}, which is not in tools ({', '.join(names)})")
    return tools, call_schema(tools[names.index(name)])


def call_schema(tool: dict) -> dict:
    """{"name": <the tool's name>, "arguments": <its parameters>} as a JSON schema."""
    f = tool["function"]
    params = f.get("parameters") or {"type": "object", "properties": {}}
    return {"type": "object", "properties": {"name": {"const": f["name"]}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


def parse_calls(text: str) -> list[dict] | None:
    """OpenAI tool_calls from a reply, or None if it holds no call."""
    found = [m.group(1) for m in CALL_TAG.finditer(text)] or [text.strip()]
    calls = []
    for raw in found:
        try:
            obj = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
    return calls or None
