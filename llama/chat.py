"""Llama 3 chat format: the exact token sequence Meta's ChatFormat (llama_models/llama3/chat_format.py) produces.

    <|begin_of_text|>
    <|start_header_id|>system<|end_header_id|>\\n\\n{system text}<|eot_id|>
    <|start_header_id|>user<|end_header_id|>\\n\\n{user text}<|eot_id|>
    <|start_header_id|>assistant<|end_header_id|>\\n\\n                     <- the model continues from here

Each piece is encoded separately (header role, "\\n\\n", content) and concatenated, as Meta does. Message text is
ordinary text: a "<|eot_id|>" typed by the user stays plain text. Role "tool" is written as "ipython".
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from llama.cli import UserError
from llama.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")
CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")  # plus the tokenizer's BOS

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
