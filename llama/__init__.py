"""llama: Llama 3.x from scratch, with a native residual-stream API (capture and edit points).

What lives here is the model a student reads: `config.py` (ModelArgs, presets), `rope.py` (rotary embeddings and
Llama 3's frequency scaling), `model.py` (RMSNorm, grouped-query attention with a KV cache, SwiGLU, the
Transformer), `checkpoint.py` + `checkpoint_files.py` + `gguf_file.py` (loading Meta, HF and GGUF checkpoints),
`tokenizer.py` (+ `tokenizer_gguf.py`, `gguf_metadata.py`) and `chat.py` (tiktoken / SentencePiece / GGUF BPE
tokenizers, Llama 3 and ChatML chat formats), `generate.py` (sampling, streaming) and `cli.py` (shared script
helpers: dataclass flags, atomic writes, UserError). Two subfolders keep the rest out of the way: `cpu/` (CPU
inference fast paths behind one narrow seam) and `tiny/` (the embedded tiny model's corpus and training recipe, and
the random-weight writer). Nothing here imports `sae`.
"""
from llama.cli import UserError
from llama.config import PRESETS, ModelArgs
from llama.cpu import pack_for_cpu, unpack_for_cpu
from llama.model import ForwardOutput, Transformer

__all__ = ["ModelArgs", "PRESETS", "Transformer", "ForwardOutput", "UserError", "pack_for_cpu", "unpack_for_cpu"]

try:  # filled in as the modules land
    from llama.checkpoint import load_model, model_name, resolve_model  # noqa: F401
    __all__ += ["load_model", "model_name", "resolve_model"]
except ImportError:  # pragma: no cover
    pass
try:
    from llama.chat import ChatFormat  # noqa: F401
    from llama.tokenizer import Tokenizer  # noqa: F401
    __all__ += ["Tokenizer", "ChatFormat"]
except ImportError:  # pragma: no cover
    pass
from llama import generate  # noqa: E402, F401  (llama.generate.text_completion(...) after a bare `import llama`)

__all__.append("generate")
