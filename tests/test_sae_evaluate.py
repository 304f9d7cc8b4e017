"""SAE evaluation: activation metrics vs direct computation; CE-loss recovered with the SAE spliced into a small
random-weight Llama, checked on SAEs whose answer is known (perfect reconstruction -> 1, zero output -> 0)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from llama import ModelArgs, Transformer
from sae import SAE, SAEConfig, TensorSource, save
from sae.evaluate import activation_metrics, format_table, lm_metrics

HOOK = "blocks.0.hook_resid_post"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llm() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelArgs(dim=16, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=50, multiple_of=16,
                                 max_seq_len=32)).eval()


def identity_sae(d: int) -> SAE:
    """n = 2d latents [+e_i; -e_i], k = d: exactly one of each pair is positive, so x_hat == x."""
    m = SAE(SAEConfig(d_in=d, n_latents=2 * d, k=d, normalize="none", hook_name=HOOK))
    eye = torch.eye(d)
    with torch.no_grad():
        m.W_enc.copy_(torch.cat([eye, -eye]))
        m.W_dec.copy_(torch.cat([eye, -eye]))
        m.b_enc.zero_()
        m.b_dec.zero_()
    return m.eval()


def test_ce_recovered_on_known_answers(llm: Transformer) -> None:
    tokens = torch.randint(0, 50, (6, 12), generator=torch.Generator().manual_seed(1))
    ident = identity_sae(16)
    r = lm_metrics(ident, llm, tokens, batch_size=4)
    with torch.no_grad():
        # position 0 (an attention sink) is never spliced nor scored: predictions from positions 1..T-2
        clean = F.cross_entropy(llm(tokens).logits[:, 1:-1].reshape(-1, 50), tokens[:, 2:].reshape(-1))
    assert r["ce_clean"] == pytest.approx(float(clean), rel=1e-5)
    assert r["ce_sae"] == pytest.approx(r["ce_clean"], abs=1e-5)
    assert r["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    assert abs(r["delta_lm_loss"]) < 1e-5
    assert r["ce_zero_ablation"] != pytest.approx(r["ce_clean"], abs=1e-3)

    zero = identity_sae(16)
    with torch.no_grad():
        zero.W_dec.zero_()  # reconstructs 0 everywhere: exactly zero ablation
    z = lm_metrics(zero, llm, tokens, batch_size=4)
    assert z["ce_sae"] == pytest.approx(z["ce_zero_ablation"], rel=1e-6)
    assert z["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-5)

    mean = identity_sae(16)  # outputs the mean activation: b_dec = mean, decoder silent
    acts = llm(tokens, capture=[HOOK]).activations[HOOK][:, 1:].reshape(-1, 16)  # the mean leaves position 0 out
    with torch.no_grad():
        mean.W_dec.zero_()
        mean.b_dec.copy_(acts.mean(0))
    mm = lm_metrics(mean, llm, tokens, batch_size=4)
    assert mm["ce_sae"] == pytest.approx(mm["ce_mean_ablation"], rel=1e-5)
    assert mm["ce_loss_recovered_mean_ablation"] == pytest.approx(0.0, abs=1e-4)


def test_activation_metrics_match_direct_computation() -> None:
    torch.manual_seed(0)
    x = torch.randn(1000, 8) * 3 + 1
    m = SAE(SAEConfig(d_in=8, n_latents=32, k=3, normalize="none"), seed=4).eval()
    with torch.no_grad():
        m.b_enc[:4] = -100.0  # four latents can never fire
        m.b_enc[4] = 100.0  # one always fires (dense)
    src = TensorSource(x, val_fraction=0.2)
    r = activation_metrics(m, src, batch_size=200, max_tokens=2000)
    xv = x[800:]
    with torch.no_grad():
        pre = (xv - m.b_dec) @ m.W_enc.T + m.b_enc
        v, i = pre.topk(3, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
        x_hat = z @ m.W_dec + m.b_dec
    assert r["tokens"] == 200
    assert r["fvu"] == pytest.approx(float(((xv - x_hat) ** 2).sum() / ((xv - xv.mean(0)) ** 2).sum()), rel=1e-4)
    assert r["l0"] == pytest.approx(float((z > 0).sum(-1).float().mean()))
    assert r["dead_fraction"] == pytest.approx(float(((z > 0).sum(0) == 0).float().mean()))
    assert r["dead_fraction"] >= 4 / 32
    assert r["dense_fraction"] == pytest.approx(float(((z > 0).float().mean(0) > 0.1).float().mean()))
    assert sum(r["density_hist"]["counts"]) + r["density_hist"]["dead"] == 32
    table = format_table(r)
    assert "fvu" in table and "latent density" in table


def test_evaluate_script_errors_cleanly(tmp_path: Path) -> None:
    save(identity_sae(4), tmp_path / "sae")
    r = subprocess.run([sys.executable, str(ROOT / "scripts/evaluate.py"), "--sae", str(tmp_path / "sae")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "nothing to evaluate" in r.stderr and "Traceback" not in r.stderr


def test_activation_metrics_use_the_whole_validation_split() -> None:
    x = torch.randn(1250, 8)
    m = SAE(SAEConfig(d_in=8, n_latents=16, k=2, normalize="none"), seed=1).eval()
    r = activation_metrics(m, TensorSource(x, val_fraction=0.2), batch_size=100)  # 250 rows: 2.5 batches
    xv = x[1000:]
    with torch.no_grad():
        x_hat = m.decode(*m.encode(xv), like=xv)
    assert r["tokens"] == 250
    assert r["fvu"] == pytest.approx(float(((xv - x_hat) ** 2).sum() / ((xv - xv.mean(0)) ** 2).sum()), rel=1e-4)
    assert activation_metrics(m, TensorSource(x, val_fraction=0.2), batch_size=100, max_tokens=120)["tokens"] == 120


def test_evaluation_reports_its_held_out_tokens_and_where_it_wrote(tmp_path: Path, capsys) -> None:
    """The store's validation split is chosen at capture (--val-fraction, recorded in the manifest), so training
    and evaluation agree on it; evaluation uses all of it and says how many tokens, and where eval.json went."""
    from llama.cli import UserError
    from sae.activations.capture import CaptureConfig, run_capture
    from sae.activations.store import open_store
    from sae.evaluate import EvalConfig, run_evaluation
    store = tmp_path / "acts"
    cfg = CaptureConfig(out=str(store), max_docs=60, val_fraction=0.4, progress=False, device="cpu")
    run_capture(cfg)
    opened = open_store(store)
    assert opened.val_fraction == 0.4 and 0.2 < opened.num_rows("val") / len(opened) < 0.6
    sae_dir = save(SAE(SAEConfig(d_in=opened.d_model, n_latents=64, k=4, hook_name=opened.manifest["hook_name"])),
                   tmp_path / "sae")
    capsys.readouterr()
    metrics = run_evaluation(EvalConfig(sae=str(sae_dir), store=str(store), act_batch_size=1000))
    printed = capsys.readouterr().out
    assert metrics["tokens"] == opened.num_rows("val")
    assert f"on {opened.num_rows('val'):,} held-out tokens: the validation split of {store} (40% of" in printed
    assert f"wrote {sae_dir / 'eval.json'}, eval.txt and eval_config.json (into the SAE folder)" in printed
    with pytest.raises(UserError, match=r"other settings \(val_fraction: 0.4 -> 0.05\)"):
        run_capture(CaptureConfig(out=str(store), max_docs=60, progress=False, device="cpu"))


class _Recording:
    """The model seen by lm_metrics, recording for every edited forward which [B, T] positions the edit changed."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.changed = model, []

    def valid_points(self) -> list[str]:
        return self.model.valid_points()

    def parameters(self):
        return self.model.parameters()

    def __call__(self, tokens: torch.Tensor, capture=(), edit=None):
        def wrap(fn):
            def recorded(h: torch.Tensor) -> torch.Tensor:
                out = fn(h)
                self.changed.append(((out != h).any(-1), out))
                return out
            return recorded
        return self.model(tokens, capture=capture, edit={k: wrap(f) for k, f in (edit or {}).items()})


def test_lm_metrics_splice_only_ordinary_positions_of_the_tiny_model() -> None:
    """On the tiny model and its tokenizer, with BOS-prefixed documents packed into rows: the SAE splice and both
    ablations change exactly the ordinary positions (never position 0, never a BOS/EOS token), the ablation mean
    is the mean over ordinary positions only, and CE averages only the predictions made at ordinary positions."""
    import llama
    from sae.evaluate import sink_token_ids, tokenize_documents
    tiny = ROOT / "weights" / "tiny"
    model = llama.load_model(tiny, device="cpu", dtype=torch.float32)
    tok = llama.Tokenizer.from_file(tiny)
    assert sink_token_ids(tok) == {tok.bos_id, tok.eos_id}  # <s>, </s>: this vocabulary has no <|endoftext|>
    docs = (tiny / "heldout.txt").read_text().splitlines()[:40]
    tokens = tokenize_documents(tok, docs, seq_len=48, max_seqs=6)
    expected = (tokens != tok.bos_id) & (tokens != tok.eos_id)  # independent of the code under test
    expected[:, 0] = False
    assert (~expected[:, 1:]).any(), "the rows should hold BOS tokens past position 0"
    hook = "blocks.2.hook_resid_post"
    sae = SAE(SAEConfig(d_in=model.args.dim, n_latents=4 * model.args.dim, k=8, hook_name=hook), seed=0).eval()
    rec = _Recording(model)
    r = lm_metrics(sae, rec, tokens, batch_size=len(tokens), sink_ids=sink_token_ids(tok))
    assert len(rec.changed) == 3  # one batch: SAE splice, zero ablation, mean ablation
    for changed, _ in rec.changed:
        assert torch.equal(changed, expected)
    with torch.no_grad():
        out = model(tokens, capture=[hook])
    clean = out.activations[hook]
    torch.testing.assert_close(rec.changed[2][1][expected], clean[expected].mean(0).expand(int(expected.sum()), -1))
    keep = expected[:, :-1]
    ce = F.cross_entropy(out.logits[:, :-1][keep], tokens[:, 1:][keep])
    assert r["lm_tokens"] == int(keep.sum())
    assert r["ce_clean"] == pytest.approx(float(ce), rel=1e-5)


def test_lm_metrics_leave_positions_below_min_pos_and_huge_norm_positions_clean() -> None:
    """min_pos (the store's) and sink_norm: positions < min_pos of each row, and a position whose clean activation
    is planted far above the batch median, are never edited nor scored."""
    import llama
    tiny = ROOT / "weights" / "tiny"
    model = llama.load_model(tiny, device="cpu", dtype=torch.float32)
    tok = llama.Tokenizer.from_file(tiny)
    docs = (tiny / "heldout.txt").read_text().splitlines()[:40]
    ids = [t for d in docs for t in tok.encode(d, bos=False, eos=False)]
    tokens = torch.tensor(ids[:4 * 32]).view(4, 32)  # no BOS/EOS inside: only position rules apply
    hook = "blocks.2.hook_resid_post"
    sae = SAE(SAEConfig(d_in=model.args.dim, n_latents=4 * model.args.dim, k=8, hook_name=hook), seed=0).eval()

    class Planted(_Recording):  # the clean activation at row 1, position 9 is made 1000x larger
        def __call__(self, tokens, capture=(), edit=None):
            def plant(h):
                h = h.clone()
                h[1, 9] *= 1000.0
                return h
            if edit is None:
                return self.model(tokens, capture=capture, edit={hook: plant})

            def planted_then_edited(h, f=edit[hook]):
                h = plant(h)
                out = f(h)
                self.changed.append(((out != h).any(-1), out))
                return out
            return self.model(tokens, capture=capture, edit={hook: planted_then_edited})
    rec = Planted(model)
    r = lm_metrics(sae, rec, tokens, batch_size=4, min_pos=3)
    expected = torch.ones(4, 32, dtype=torch.bool)
    expected[:, :3] = False
    expected[1, 9] = False
    assert r["sink_positions"] == 1 and r["lm_tokens"] == int(expected[:, :-1].sum())
    for changed, _ in rec.changed:
        assert torch.equal(changed, expected)
