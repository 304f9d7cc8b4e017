"""llama.load_model: layouts, dtypes, tied storage, and one clear UserError for every kind of bad input."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import llama
from llama.checkpoint_files import HF_TO_META, hf_to_meta
from llama.cli import UserError

ARGS = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, multiple_of=32, ffn_dim_multiplier=None,
            norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True)


def random_model(tied: bool = False, seed: int = 0) -> llama.Transformer:
    torch.manual_seed(seed)
    model = llama.Transformer(llama.ModelArgs(**ARGS, tie_embeddings=tied))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.eval()


def meta_folder(folder: Path, state: dict[str, torch.Tensor], params: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "consolidated.00.pth")
    (folder / "params.json").write_text(json.dumps(params or ARGS))
    return folder


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small folder written by HF transformers' own save_pretrained (untied, GQA)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("hf")
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def copy_hf(src: Path, dst: Path, edit=None) -> Path:
    """Copy an HF folder, optionally editing its tensor dict on the way."""
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    save_file(edit(tensors) if edit else tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def raises(match: str, *names: str):
    """Expect exactly one UserError whose one-line message names every string in `names`."""
    class Ctx:
        def __enter__(self):
            self.cm = pytest.raises(UserError, match=match)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.cm.__exit__(*exc)
            msg = str(self.info.value)
            assert "\n" not in msg, msg
            for n in names:
                assert n in msg, f"{n!r} not named in: {msg}"
            return handled
    return Ctx()


# ----------------------------------------------------------------------------------------------- good input
def test_meta_roundtrip_exact_in_fp32_and_bf16(tmp_path: Path) -> None:
    model = random_model()
    folder = meta_folder(tmp_path, model.state_dict())
    for dtype in (torch.float32, torch.bfloat16):
        loaded = llama.load_model(folder, dtype=dtype)
        for name, p in model.state_dict().items():
            got = loaded.state_dict()[name]
            assert got.dtype == dtype and got.device.type == "cpu"
            assert torch.equal(got, p.to(dtype)), name
    x = torch.randint(0, 96, (2, 10))
    with torch.no_grad():
        assert torch.equal(llama.load_model(folder)(x).logits, model(x).logits)


@pytest.mark.parametrize("store_copy", [False, True])
def test_meta_tied_output_shares_storage(tmp_path: Path, store_copy: bool) -> None:
    """No output.weight (or Meta 3.2's stored copy of the embeddings) -> one Parameter used twice."""
    state = dict(random_model(tied=False).state_dict())
    if store_copy:
        state["output.weight"] = state["tok_embeddings.weight"].clone()
    else:
        del state["output.weight"]
    loaded = llama.load_model(meta_folder(tmp_path, state))
    assert loaded.args.tie_embeddings
    assert loaded.output.weight is loaded.tok_embeddings.weight
    assert loaded.output.weight.data_ptr() == loaded.tok_embeddings.weight.data_ptr()
    n_unique = sum(p.numel() for p in loaded.parameters())
    assert n_unique == sum(t.numel() for k, t in state.items() if k != "output.weight")


def test_hf_tied_shares_storage_and_untied_does_not(hf_dir: Path, tmp_path: Path) -> None:
    untied = llama.load_model(hf_dir)
    assert untied.output.weight.data_ptr() != untied.tok_embeddings.weight.data_ptr()
    cfg = json.loads((hf_dir / "config.json").read_text())
    tied_dir = copy_hf(hf_dir, tmp_path / "tied", lambda t: {k: v for k, v in t.items() if k != "lm_head.weight"})
    (tied_dir / "config.json").write_text(json.dumps({**cfg, "tie_word_embeddings": True}))
    tied = llama.load_model(tied_dir, dtype="bf16")
    assert tied.output.weight is tied.tok_embeddings.weight and tied.output.weight.dtype == torch.bfloat16


def test_hf_names_and_unpermute_against_hf_state(hf_dir: Path) -> None:
    """Every HF tensor lands under its Meta name; q/k rows are HF's rows re-interleaved per head."""
    hf = load_file(hf_dir / "model.safetensors")
    ours = llama.load_model(hf_dir).state_dict()
    for hf_name, t in hf.items():
        name = hf_to_meta(hf_name, hf_dir)
        if ".wq." in name or ".wk." in name:
            heads = 4 if ".wq." in name else 2
            dh = t.shape[0] // heads
            # Meta row (head h, pair i, member j) = HF row (head h, half j, index i)
            expect = torch.stack([t.view(heads, 2, dh // 2, -1)[:, j] for j in range(2)], dim=2).reshape(t.shape)
            assert torch.equal(ours[name], expect) and not torch.equal(ours[name], t), name
        else:
            assert torch.equal(ours[name], t), name
    assert len({k.split(".{}.")[-1] for k in HF_TO_META}) == len(HF_TO_META)  # table is one-to-one


def test_loaded_model_has_no_meta_tensors_and_is_eval(hf_dir: Path) -> None:
    model = llama.load_model(hf_dir)
    assert not model.training
    assert all(not p.is_meta for p in model.parameters())


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_folder_and_missing_files(tmp_path: Path) -> None:
    with raises("does not exist", str(tmp_path / "nope")):
        llama.load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with raises("no params.json", "empty", "config.json"):
        llama.load_model(tmp_path / "empty")
    (tmp_path / "meta").mkdir()
    (tmp_path / "meta" / "params.json").write_text(json.dumps(ARGS))
    with raises("consolidated.00.pth", "meta"):
        llama.load_model(tmp_path / "meta")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with raises("missing key 'hidden_size'", "config.json"):
        llama.load_model(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text("{not json")
    with raises("not valid JSON", "config.json"):
        llama.load_model(tmp_path / "hf")
    with raises("is a file", "params.json"):
        llama.load_model(tmp_path / "meta" / "params.json")


def test_hf_config_without_weights(hf_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    with raises("no model.safetensors", str(tmp_path)):
        llama.load_model(tmp_path)


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(hf_dir: Path, tmp_path: Path, how: str) -> None:
    folder = copy_hf(hf_dir, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    bad = {"truncated": data[: len(data) * 2 // 3], "garbage": b"\x07" * 500, "empty": b""}[how]
    (folder / "model.safetensors").write_bytes(bad)
    with raises("not a readable safetensors file", "model.safetensors"):
        llama.load_model(folder)


def test_sharded_index_pointing_at_missing_shard(hf_dir: Path, tmp_path: Path) -> None:
    folder = copy_hf(hf_dir, tmp_path)
    keys = list(load_file(folder / "model.safetensors"))
    weight_map = {k: "model-00001-of-00002.safetensors" if i % 2 else "model.safetensors" for i, k in enumerate(keys)}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with raises("does not exist", "model-00001-of-00002.safetensors", "index.json"):
        llama.load_model(folder)


def test_misshaped_missing_and_unexpected_tensors(hf_dir: Path, tmp_path: Path) -> None:
    name = "model.layers.1.mlp.up_proj.weight"
    bad = copy_hf(hf_dir, tmp_path / "shape", lambda t: {**t, name: t[name][:-1].clone()})
    with raises("has shape", "layers.1.feed_forward.w3.weight", "model.safetensors", "[191, 64]", "[192, 64]"):
        llama.load_model(bad)
    bad = copy_hf(hf_dir, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != name})
    with raises("missing tensor", "layers.1.feed_forward.w3.weight", "model.safetensors"):
        llama.load_model(bad)
    bad = copy_hf(hf_dir, tmp_path / "extra", lambda t: {**t, "model.layers.0.mlp.extra.weight": torch.zeros(2)})
    with raises("unexpected tensor", "model.layers.0.mlp.extra.weight", "model.safetensors"):
        llama.load_model(bad)
    bad = copy_hf(hf_dir, tmp_path / "int", lambda t: {**t, name: t[name].to(torch.int8)})
    with raises("quantized", "layers.1.feed_forward.w3.weight"):
        llama.load_model(bad)


@pytest.mark.parametrize("change", [dict(dim=128), dict(n_kv_heads=4), dict(n_layers=3), dict(n_layers=1),
                                    dict(vocab_size=100), dict(multiple_of=256)])
def test_params_json_disagreeing_with_weights(tmp_path: Path, change: dict) -> None:
    folder = meta_folder(tmp_path, random_model().state_dict(), {**ARGS, **change})
    with pytest.raises(UserError) as err:
        llama.load_model(folder)
    msg = str(err.value)
    assert "consolidated.00.pth" in msg or str(folder) in msg, msg
    assert any(w in msg for w in ("params.json implies", "missing tensor", "unexpected tensor")), msg


def test_pth_whose_pickle_would_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # unpickling this creates the marker file

    state = dict(random_model().state_dict())
    state["layers.0.attention.wq.weight"] = Payload()  # type: ignore[assignment]
    folder = meta_folder(tmp_path / "ck", state)
    with raises("refused to load", "consolidated.00.pth"):
        llama.load_model(folder)
    assert not marker.exists()
    # the payload is live: a plain unpickler would have run it (so the check above can fail)
    pickle.loads(pickle.dumps(Payload())).close()
    assert marker.exists()


def test_pth_that_is_not_a_state_dict(tmp_path: Path) -> None:
    folder = meta_folder(tmp_path / "a", {"x": 1})  # type: ignore[dict-item]
    with raises("expected a dict of name -> tensor", "consolidated.00.pth"):
        llama.load_model(folder)
    (folder / "consolidated.00.pth").write_bytes(b"not a zip file at all")
    with raises("not a readable PyTorch checkpoint", "consolidated.00.pth"):
        llama.load_model(folder)


def test_model_parallel_shards_are_refused_clearly(tmp_path: Path) -> None:
    folder = meta_folder(tmp_path, random_model().state_dict())
    torch.save(random_model().state_dict(), folder / "consolidated.01.pth")
    with raises("model-parallel shards", str(folder)):
        llama.load_model(folder)


def test_bad_dtype_and_device(hf_dir: Path) -> None:
    with raises("dtype", "int8"):
        llama.load_model(hf_dir, dtype="int8")
    with raises("device", "nonsense"):
        llama.load_model(hf_dir, device="nonsense")
    if not torch.cuda.is_available():
        with raises("CUDA is not available"):
            llama.load_model(hf_dir, device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_loads_onto_cuda_in_bf16(hf_dir: Path) -> None:
    model = llama.load_model(hf_dir, device="cuda", dtype=torch.bfloat16)
    assert {(p.device.type, p.dtype) for p in model.parameters()} == {("cuda", torch.bfloat16)}
    cpu = llama.load_model(hf_dir, dtype=torch.float32)
    x = torch.randint(0, 96, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(x.cuda()).logits.float().cpu(), cpu(x).logits, atol=0.05, rtol=0.05)
