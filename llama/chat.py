"""Chat formats: Llama 3's and ChatML (SmolLM2, Qwen, ...); `chat_format(tok)` picks the one the model speaks.

Llama 3 (`ChatFormat`): the exact token sequence Meta's ChatFormat (llama_models/llama3/chat_format.py) produces.

    <|begin_of_text|>
    <|start_header_id|>system<|end_header_id|>\\n\\n{system text}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{user text}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                     <- the model continues from here

Each piece is encoded separately (header role, "\\n\\n", content) and concatenated, as Meta does. Message text is
ordinary text: a "<|eot_id|>" typed by the user stays plain text. Role "tool" is written as "ipython".

ChatML (`ChatMLFormat`), as SmolLM2's chat template renders it (a string HF then tokenizes, specials parsed):

    <|im_start|>system\\n{system text}<|im_end|>\\n
    <|im_start|>user\\n{user text}<|im_end|>\\n
    <|im_start|>assistant\\n                                             <- the model continues from here

"{role}\\n{content}" is encoded as one piece, so the ids equal the template's. A template that writes a default
system message when the dialog has none (SmolLM2: "You are a helpful AI assistant named SmolLM, trained by
Hugging Face") gets it here too. Message text stays plain text: a typed "<|im_end|>" is not the special token.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

from llama.cli import UserError
from llama.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")  # plus the tokenizer's BOS
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
# A template's default system message: a literal system turn written inside the template (SmolLM2's).
DEFAULT_SYSTEM = re.compile(r"<\|im_start\|>system(?:\n|\\n)((?:(?!<\|im_end\|>)[^'\"{}])+)<\|im_end\|>")

Message = Mapping[str, Any]  # {"role": "user", "content": "..."}; an assistant turn may add "eom": True


class ChatFormat:
    def __init__(self, tokenizer: Tokenizer):
        missing = [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
        if missing or tokenizer.bos_id < 0:
            raise UserError(f"this tokenizer has no chat special tokens {missing} (or no BOS); chat format needs a Llama 3 "
                            "tokenizer (or a SentencePiece model trained with them as control symbols)")
        self.tokenizer = tokenizer
        self.special = tokenizer.special_tokens

    def encode_header(self, role: str) -> list[int]:
        if role not in ROLES:
            raise UserError(f"unknown chat role {role!r}; expected one of {list(ROLES)}")
        return ([self.special["<|start_header_id|>"]]
                + self.tokenizer.encode("ipython" if role == "tool" else role, bos=False, eos=False)
                + [self.special["<|end_header_id|>"]]
                + self.tokenizer.encode("\n\n", bos=False, eos=False))

    def encode_message(self, message: Message) -> list[int]:
        role, content = _role_content(message)
        end = "<|eom_id|>" if role == "assistant" and message_get(message, "eom", False) else "<|eot_id|>"
        if end not in self.special:
            raise UserError(f"this tokenizer has no {end} token for the assistant message {message!r}")
        return (self.encode_header(role) + self.tokenizer.encode(content, bos=False, eos=False)
                + [self.special[end]])

    def encode_dialog_prompt(self, messages: Sequence[Message]) -> list[int]:
        """BOS, every message, then an open assistant header for the model to complete."""
        tokens = [self.tokenizer.bos_id]  # <|begin_of_text|>
        for m in messages:
            tokens.extend(self.encode_message(m))
        return tokens + self.encode_header("assistant")


def message_get(message: Any, key: str, default: Any = None) -> Any:
    return message.get(key, default) if isinstance(message, Mapping) else getattr(message, key, default)


def _role_content(message: Message) -> tuple[str, str]:
    role, content = message_get(message, "role"), message_get(message, "content")
    if not isinstance(role, str) or not isinstance(content, str):
        raise UserError(f"a chat message needs a str 'role' and str 'content', got {message!r}")
    return role, content


class ChatMLFormat:
    def __init__(self, tokenizer: Tokenizer, default_system: str | None = None):
        missing = [t for t in CHATML_TOKENS if t not in tokenizer.special_tokens]
        if missing:
            raise UserError(f"this tokenizer has no ChatML special tokens {missing}")
        self.tokenizer, self.default_system = tokenizer, default_system
        self.start, self.end = (tokenizer.special_tokens[t] for t in CHATML_TOKENS)
        self.newline = tokenizer.encode("\n", bos=False, eos=False)

    def encode_message(self, message: Message) -> list[int]:
        role, content = _role_content(message)
        if role not in ROLES:
            raise UserError(f"unknown chat role {role!r}; expected one of {list(ROLES)}")
        return [self.start] + self.tokenizer.encode(f"{role}\n{content}", bos=False, eos=False) + [self.end] \
            + self.newline

    def encode_dialog_prompt(self, messages: Sequence[Message]) -> list[int]:
        """Every message (after the default system message, when the dialog opens without one), then an open
        assistant turn for the model to complete."""
        if messages and self.default_system is not None and message_get(messages[0], "role") != "system":
            messages = [{"role": "system", "content": self.default_system}, *messages]
        tokens = [t for m in messages for t in self.encode_message(m)]
        return tokens + [self.start] + self.tokenizer.encode("assistant\n", bos=False, eos=False)


def chat_format(tokenizer: Any) -> ChatFormat | ChatMLFormat | None:
    """The chat format of the tokenizer's model: Llama 3's when its vocabulary has the header tokens, ChatML when it
    has <|im_start|>/<|im_end|> (the GGUF's chat template decides when both are there), None for a base model
    without chat tokens."""
    special = getattr(tokenizer, "special_tokens", {})
    template = getattr(tokenizer, "chat_template", None) or ""
    llama3 = all(t in special for t in CHAT_TOKENS) and tokenizer.bos_id >= 0
    chatml = all(t in special for t in CHATML_TOKENS)
    if chatml and (not llama3 or "<|im_start|>" in template):
        found = DEFAULT_SYSTEM.search(template)
        return ChatMLFormat(tokenizer, found.group(1) if found else None)
    return ChatFormat(tokenizer) if llama3 else None


def no_chat_warning(source: Any) -> str:
    """What `--chat` says for a model whose tokenizer has no chat tokens (then prompts go as plain text)."""
    return (f"warning: --chat: the tokenizer of {source} has no chat tokens (neither Llama 3's {CHAT_TOKENS[0]} "
            f"nor ChatML's {CHATML_TOKENS[0]}): a base model, so each prompt is sent as plain text")
