"""llama: Llama 3.x from scratch (model, loading, tokenizer, generation) with a native residual-stream API."""
from llama.cli import UserError
from llama.config import PRESETS, ModelArgs
from llama.cpu_linear import pack_for_cpu, unpack_for_cpu
from llama.model import ForwardOutput, Transformer

__all__ = ["ModelArgs", "PRESETS", "Transformer", "ForwardOutput", "UserError", "pack_for_cpu", "unpack_for_cpu"]

try:  # filled in as the modules land
    from llama.checkpoint import load_model  # noqa: F401
    __all__.append("load_model")
except ImportError:  # pragma: no cover
    pass
try:
    from llama.chat import ChatFormat  # noqa: F401
    from llama.tokenizer import Tokenizer  # noqa: F401
    __all__ += ["Tokenizer", "ChatFormat"]
except ImportError:  # pragma: no cover
    pass
