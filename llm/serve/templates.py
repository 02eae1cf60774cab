"""How the server turns a chat request into prompt ids and knows where the assistant's turn ends.

The model's own chat template renders the conversation, the same one fine-tuning trains on and
`sample.py --chat` samples with (`llm.chat.prompt_ids`: an HF `chat_template` through jinja2, ChatML for a
checkpoint of ours fine-tuned for chat), or a `--chat-template FILE` in its place. The turn ends at the
tokenizer's end-of-text id (ChatML's <|im_end|>, Llama 3's <|eot_id|>) or any other end-of-turn special token
the vocabulary holds. A model without a template (a base model) gets the plain text template below,
and the server says so at start.
"""

from __future__ import annotations

from pathlib import Path

from llm.chat import ChatError, compile_template, prompt_ids
from llm.tokenizer import Tokenizer

PLAIN_STOP = "\nUser:"  # the plain template's next user turn: a reply ends before it
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>", "<|end|>", "</s>",
               "<|eom_id|>")
PLAIN_NAMES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


def plain_prompt(messages: list[dict]) -> str:
    """The plain chat template, for models with none:

        System: {content}        (system and developer messages)
        User: {content}
        Assistant: {content}
        ...
        Assistant:               (the model continues from here; PLAIN_STOP ends its turn)
    """
    lines = [f"{PLAIN_NAMES[m['role']]}: {m['content']}" for m in messages]
    return "\n".join(lines + ["Assistant:"])


def read_template(path: str | Path) -> str:
    """A --chat-template file's text, checked to compile (OSError / ChatError with one line)."""
    p = Path(path)
    if not p.is_file():
        raise OSError(f"--chat-template {p}: no such file")
    text = p.read_text()
    try:
        compile_template(text)
    except ChatError as e:
        raise ChatError(f"--chat-template {p}: {e}") from None
    return text


class ChatFormat:
    """The server's chat rendering: a jinja2 template (the model's or a file's) or the plain text one."""

    def __init__(self, tok: Tokenizer, template: str | None = None, source: str = "") -> None:
        self.tok = tok
        self.template = template if template is not None else tok.info.get("chat_template")
        self.source = source or ("the checkpoint's chat template" if self.template else "")
        if self.template:
            compile_template(self.template)
        special = tok.special_tokens()
        self.stop_ids = frozenset({tok.eot_id} | {special[t] for t in END_OF_TURN if t in special}) \
            if self.template else frozenset()
        self.stop_strings = [] if self.template else [PLAIN_STOP]

    @property
    def plain(self) -> bool:
        return not self.template

    def describe(self) -> str:
        """One line for the start-up message."""
        if self.plain:
            return ("chat: the model has no chat template, so /v1/chat/completions uses the plain "
                    "'System:/User:/Assistant:' text (give one with --chat-template FILE)")
        ends = ", ".join(repr(self.tok.decode([i])) for i in sorted(self.stop_ids))
        return f"chat: {self.source}, turns end at {ends}"

    def prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Prompt ids of a conversation up to the assistant's opening (what `sample.py --chat` feeds the model)."""
        if self.plain:
            return self.tok.encode(plain_prompt(messages), bos=self.tok.add_bos) or [self.tok.bos_id]
        return prompt_ids(self.tok, messages, self.template, tools)
