"""Test helper shared by the GGUF model and tokenizer tests."""
from __future__ import annotations

from typing import Any


def finish(writer: Any) -> None:
    """Write a gguf.GGUFWriter's header, metadata and tensors, and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
