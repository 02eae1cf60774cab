"""Chat templates: a conversation -> text, rendered with jinja2 the way transformers' apply_chat_template does.

A Hugging Face model brings its `chat_template` (tokenizer_config.json, or chat_template.jinja) in its
tokenizer info; our checkpoints get DEFAULT_TEMPLATE (ChatML), whose special tokens `chat_tokenizer` adds to
the tokenizer (the model's embedding and head grow to match: `llm.lora.grow_vocab`). The end-of-turn token
is the tokenizer's end-of-text id (`tok.eot_id`): ChatML's <|im_end|> for ours, the model's eos for HF ones
(Llama 3 <|eot_id|>, Qwen <|im_end|>), so generation stops at the end of the assistant's turn.

`encode_chat` turns a conversation into ids and a mask of the scored ids (the assistant turns, each with the
markup that closes it), by rendering growing prefixes: the prompt before each assistant turn is exactly what
a generation call renders (`render(messages[:i], add_generation_prompt=True)`), so training and sampling see
the same tokens.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llm.tokenizer import Tokenizer

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
DEFAULT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
DEFAULT_TOKENS = (IM_START, IM_END)
ROLES = ("system", "user", "assistant")


class ChatError(ValueError):
    """A conversation or template cannot be rendered; the message is one line."""


class _Generation(jinja2.ext.Extension):
    """transformers' `{% generation %}...{% endgeneration %}` tag (marks assistant text); renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """The environment transformers renders chat templates in: sandboxed, trim/lstrip blocks, loop controls."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatError(f"the chat template is not valid jinja2 (line {e.lineno}: {e.message})") from None


def template_of(tok: Tokenizer) -> str:
    """The tokenizer's chat template (an HF model's own, or ours once `chat_tokenizer` added it)."""
    return tok.info.get("chat_template") or DEFAULT_TEMPLATE


def special_tokens_map(tok: Tokenizer) -> dict[str, str]:
    """bos_token / eos_token as the template sees them (transformers passes the tokenizer's special tokens)."""
    return {"bos_token": tok.decode([tok.bos_id]), "eos_token": tok.decode([tok.eot_id])}


def render(template: str, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None,
           **kw) -> str:
    """`messages` as text; tools: function specs ({"type": "function", "function": {...}}) as transformers passes
    them; kw are the other template variables transformers passes (bos_token, eos_token, ...)."""
    try:
        return _compile(template).render(messages=messages, tools=tools, documents=None,
                                         add_generation_prompt=add_generation_prompt, **kw)
    except jinja2.TemplateError as e:
        raise ChatError(f"the chat template refused the conversation: {e}") from None


def chat_tokenizer(tok: Tokenizer) -> tuple[Tokenizer, list[str]]:
    """`tok` ready for chat: as it is if it has a template, else with DEFAULT_TEMPLATE, its tokens added and
    <|im_end|> as the end-of-turn (= end-of-text) id. Returns (tokenizer, the token strings added)."""
    if tok.info.get("chat_template"):
        return tok, []
    new = [t for t in DEFAULT_TOKENS if t not in tok.special_tokens()]
    bos = tok.decode([tok.bos_id])
    return tok.with_special(new, chat_template=DEFAULT_TEMPLATE, eot=IM_END, bos=bos), new


def compile_template(template: str) -> None:
    """Raise ChatError (one line) if `template` is not valid jinja2."""
    _compile(template)


def prompt_ids(tok: Tokenizer, messages: list[dict], template: str | None = None,
               tools: list[dict] | None = None) -> list[int]:
    """The ids a generation call feeds the model: the conversation and the assistant's opening, rendered with
    `template` (default: the tokenizer's, `template_of`)."""
    text = render(template or template_of(tok), messages, add_generation_prompt=True, tools=tools,
                  **special_tokens_map(tok))
    return tok.encode(text, allow_special=True)


def encode_chat(tok: Tokenizer, messages: list[dict], score_all: bool = False) -> tuple[list[int], list[bool]]:
    """(ids, scored) of a conversation: scored marks each assistant turn's ids (its content and the markup that
    closes it, the end-of-turn token included); score_all marks every id."""
    template, kw = template_of(tok), special_tokens_map(tok)
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(template, messages[:i], add_generation_prompt=True, **kw)
        after = render(template, messages[: i + 1], **kw)
        if not (before.startswith(done) and after.startswith(before)):
            raise ChatError("the chat template does not render a conversation's turns as growing prefixes, so the "
                            "answer tokens cannot be told apart")
        pieces += [(before[len(done):], False), (after[len(before):], True)]
        done = after
    pieces.append((render(template, messages, **kw)[len(done):], False))
    ids: list[int] = []
    scored: list[bool] = []
    for text, answer in pieces:
        t = tok.encode(text, allow_special=True) if text else []
        ids += t
        scored += [answer or score_all] * len(t)
    return ids, scored
