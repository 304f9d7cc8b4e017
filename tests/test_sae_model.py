"""SAE model: forward/backward against a dense, written-by-definition reference; AuxK; steering; other kinds."""
from __future__ import annotations

import pytest
import torch

from llama.cli import UserError
from sae import SAE, SAEConfig
from sae.loss import fvu
from sae.model import geometric_median, init_from_sample


def make(arch: str = "topk", d: int = 16, n: int = 48, k: int = 4, **kw) -> SAE:
    sae = SAE(SAEConfig(d_in=d, n_latents=n, k=k, architecture=arch, **kw), seed=1)
    with torch.no_grad():  # break the W_enc = W_dec^T symmetry so gradients are generic
        sae.W_enc.add_(0.3 * torch.randn_like(sae.W_enc))
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        sae.norm_scale.fill_(0.7)
    return sae


def dense_reference(sae: SAE, x: torch.Tensor, dead: torch.Tensor | None):
    """TopK SAE by its definition, dense [B, n] everywhere, plain autograd."""
    s = sae.norm_scale
    x_n = x * s
    pre = (x_n - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    vals, idx = pre.topk(sae.cfg.k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
    x_hat_n = z @ sae.W_dec + sae.b_dec
    loss = ((x_n - x_hat_n) ** 2).sum() / ((x_n - x_n.mean(0)) ** 2).sum()
    aux = torch.zeros(())
    if dead is not None and dead.any():
        kk = min(sae.cfg.k_aux, int(dead.sum()))
        av, ai = torch.where(dead, pre, torch.tensor(float("-inf"))).topk(kk, dim=-1)
        za = torch.zeros_like(pre).scatter(-1, ai, torch.relu(av))
        e = (x_n - x_hat_n).detach()
        aux = ((e - za @ sae.W_dec) ** 2).sum() / ((e - e.mean(0)) ** 2).sum()
    return x_hat_n / s, loss, aux


@pytest.mark.parametrize("n_dead", [0, 1, 30])
def test_topk_forward_backward_matches_dense_reference(n_dead: int) -> None:
    torch.manual_seed(0)
    sae = make(k_aux=8)
    x = torch.randn(32, 16) * 2
    dead = torch.zeros(48, dtype=torch.bool)
    dead[torch.randperm(48)[:n_dead]] = True
    out = sae(x, dead)
    (out.fvu + out.auxk_loss).backward()
    ours = {k: p.grad.clone() for k, p in sae.named_parameters()}
    sae.zero_grad()
    x_hat, loss, aux = dense_reference(sae, x, dead)
    (loss + aux).backward()
    torch.testing.assert_close(out.x_hat, x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.fvu, loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.auxk_loss, aux, atol=1e-6, rtol=1e-5)
    assert (out.auxk_loss > 0) == (n_dead > 0)
    for k, p in sae.named_parameters():
        torch.testing.assert_close(ours[k], p.grad, atol=1e-5, rtol=1e-4, msg=f"grad of {k}")


def test_encode_decode_match_forward_and_batch_shapes() -> None:
    sae = make().eval()
    x = torch.randn(2, 5, 16)
    acts, idx = sae.encode(x)
    assert acts.shape == (2, 5, 4) and idx.shape == (2, 5, 4) and (acts >= 0).all()
    torch.testing.assert_close(sae.decode(acts, idx), sae(x.reshape(10, 16)).x_hat.reshape(2, 5, 16))


def test_normalisation_is_inside_the_sae() -> None:
    """Scaling the input by c with the dataset scale adjusted by 1/c gives the same code and c-times x_hat."""
    sae = make()
    x = torch.randn(8, 16)
    a1, i1 = sae.encode(x)
    r1 = sae.decode(a1, i1)
    with torch.no_grad():
        sae.norm_scale.div_(10.0)
    a2, i2 = sae.encode(10 * x)
    assert torch.equal(i1, i2)
    torch.testing.assert_close(sae.decode(a2, i2), 10 * r1, rtol=1e-5, atol=1e-4)


def test_token_normalisation_needs_input_to_decode() -> None:
    sae = make(normalize="token")
    x = torch.randn(4, 16) * 3 + 5
    acts, idx = sae.encode(x)
    torch.testing.assert_close(sae.decode(acts, idx, like=x), sae(x).x_hat)
    with pytest.raises(UserError, match="like"):
        sae.decode(acts, idx)


def test_steer_add_and_clamp_on_the_code() -> None:
    sae = make().eval()
    x = torch.randn(6, 16)
    acts, idx = sae.encode(x)
    base = sae.decode(acts, idx)
    j = int(idx[0, 0])
    sae.steer = {j: (3.0, "add")}
    torch.testing.assert_close(sae.decode(*sae.encode(x)), base + 3.0 * sae.W_dec[j] / sae.norm_scale)
    sae.steer = {j: (2.0, "clamp")}
    zj = torch.where(idx == j, acts, torch.zeros(())).sum(-1, keepdim=True)  # latent j's clean value per row
    want = base + (2.0 - zj) * sae.W_dec[j] / sae.norm_scale
    torch.testing.assert_close(sae.decode(*sae.encode(x)), want, atol=1e-5, rtol=1e-5)
    sae.steer = {j: (2.0, "bogus")}
    with pytest.raises(UserError, match="steer mode"):
        sae.encode(x)


def test_batchtopk_keeps_k_per_token_on_average_and_sets_threshold() -> None:
    sae = make("batchtopk", k=3)
    x = torch.randn(64, 16)
    out = sae(x)
    assert int((out.top_acts > 0).sum()) == 3 * 64  # k*B over the batch, not k per row
    assert (out.top_acts > 0).sum(-1).max() > 3 or (out.top_acts > 0).sum(-1).min() < 3
    assert sae.threshold.min() > 0
    sae.eval()  # inference: JumpReLU with the tracked threshold
    acts, idx = sae.encode(x)
    pre = sae.pre_acts(sae.normalize(x))
    assert int((acts > 0).sum()) == int((pre > sae.threshold).sum())


def test_relu_sae_l1_penalty_definition() -> None:
    sae = make("relu", l1_coef=2.0)
    x = torch.randn(16, 16)
    out = sae(x)
    x_n = sae.normalize(x)
    z = torch.relu((x_n - sae.b_dec) @ sae.W_enc.T + sae.b_enc)
    want = 2.0 * (z * sae.W_dec.norm(dim=1)).sum() / ((x_n - x_n.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.l1_loss, want)
    torch.testing.assert_close(out.x_hat, (z @ sae.W_dec + sae.b_dec) / sae.norm_scale, atol=1e-5, rtol=1e-5)


def test_fvu_definition() -> None:
    x = torch.randn(100, 8)
    assert abs(float(fvu(x, x.mean(0).expand_as(x))) - 1.0) < 1e-6
    assert float(fvu(x, x)) == 0.0


def test_geometric_median_optimality() -> None:
    """Independent check: at the geometric median the unit vectors to the points sum to ~0."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=g) + torch.tensor([3.0, 0, 0, 0, 0, 0])
    x[:20] += 50  # outliers drag the mean, not the median
    m = geometric_median(x).double()
    u = (x.double() - m) / (x.double() - m).norm(dim=1, keepdim=True)
    assert u.sum(0).norm() < 1e-3 * len(x)
    assert (x.mean(0).double() - m).norm() > 1.0


def test_init_sets_scale_and_w_enc_is_w_dec_transpose() -> None:
    sae = SAE(SAEConfig(d_in=16, n_latents=32, k=2))
    assert torch.equal(sae.W_enc, sae.W_dec)  # [n, d] storage: W_enc (SAELens [d, n]) = W_dec^T
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))
    x = torch.randn(1000, 16) * 40
    init_from_sample(sae, x, "mean")
    assert abs(float((sae.normalize(x) ** 2).sum(-1).mean()) - 16) < 1e-3
    torch.testing.assert_close(sae.b_dec, sae.normalize(x).mean(0))


def test_encoder_gemm_backends_match_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    import sae.ops
    g = torch.Generator().manual_seed(3)
    x, W, b = torch.randn(33, 40, generator=g), torch.randn(70, 40, generator=g), torch.randn(70, generator=g)
    want = x.double() @ W.double().T + b.double()
    for onednn in (True, False):  # oneDNN's GEMM (when this torch has it) and F.linear
        monkeypatch.setattr(sae.ops, "ONEDNN", onednn and sae.ops._onednn_ok())
        got = sae.ops.encoder_linear(x, W, b)
        assert got.dtype == torch.float32 and got.shape == (33, 70)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


def test_bias_grads_are_a_sorted_segment_sum_equal_to_index_add() -> None:
    """b_enc's gradient is `latent_sums` (no atomics on CUDA); on CPU it equals the index_add_ it replaced."""
    from sae.ops import latent_sums
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 50, (300, 7), generator=g)  # repeats: many occurrences per latent
    idx[:, 0] = 3  # one latent in every row (the AuxK pattern)
    v = torch.randn(300, 7, generator=g)
    want = torch.zeros(60).index_add_(0, idx.flatten(), v.flatten())
    assert torch.equal(latent_sums(v, idx, 60), want)


_ATOMIC_ON_CUDA = ("aten::index_add", "aten::scatter_add", "aten::scatter_reduce", "aten::put",
                   "aten::embedding_dense_backward", "aten::_embedding_bag_backward",
                   "aten::_embedding_bag_dense_backward", "aten::index_put", "aten::_index_put_impl")


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "relu"])
def test_backward_uses_no_op_that_adds_with_atomics_on_cuda(arch: str) -> None:
    """Resume is bit-exact only if every gradient is added in a fixed order. The ops above accumulate with
    atomics on CUDA (PyTorch's list of nondeterministic ops); the reference backward must not call any
    (index_put counts only with accumulate=True)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.bad: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            name = func.name()
            base = name.split(".")[0].rstrip("_")
            accumulate = kwargs.get("accumulate", args[3] if len(args) > 3 else False)
            if base in _ATOMIC_ON_CUDA and (not base.startswith(("aten::index_put", "aten::_index_put", "aten::put"))
                                            or accumulate):
                self.bad.append(name)
            return func(*args, **kwargs)

    sae = make(arch, k_aux=8)
    dead = torch.zeros(48, dtype=torch.bool)
    dead[:20] = True  # AuxK on
    out = sae(torch.randn(32, 16), dead)
    loss = out.fvu + out.auxk_loss + out.l1_loss
    with Record() as rec:
        loss.backward()
    assert rec.bad == [], rec.bad
    assert all(p.grad is not None for p in sae.parameters())


def test_inference_and_training_encode_with_the_same_gemm() -> None:
    """SAE.encode (inference) and the training forward compute bit-identical pre-activations, hence the same
    TopK picks even at near-ties (on CPU training uses oneDNN's GEMM; F.linear rounds differently)."""
    torch.manual_seed(0)
    sae = make(d=512, n=2048, k=16)  # at d=512 the two CPU GEMMs round differently (at d=128 they agree)
    x = torch.randn(128, 512)
    a_train, i_train = sae(x)[1:3]
    a_inf, i_inf = sae.encode(x)
    assert torch.equal(i_train, i_inf)
    assert torch.equal(a_train, a_inf)


@pytest.mark.parametrize("arch", ["batchtopk", "relu"])
def test_dense_encoder_gradients_match_autograd(arch: str) -> None:
    """batchtopk / relu backpropagate through the same encoder GEMM: gradients equal plain F.linear autograd."""
    torch.manual_seed(0)
    sae = make(arch, l1_coef=0.5)
    x = torch.randn(32, 16)
    out = sae(x)
    (out.fvu + out.l1_loss).backward()
    ours = {k: p.grad.clone() for k, p in sae.named_parameters()}
    sae.zero_grad()
    x_n = sae.normalize(x)
    pre = torch.nn.functional.linear(x_n - sae.b_dec, sae.W_enc, sae.b_enc)
    if arch == "batchtopk":  # the same kept set as the forward under test, by its definition
        flat = torch.relu(pre).flatten()
        tau = flat.detach().topk(sae.cfg.k * 32).values.min()
        z = torch.where(flat >= tau, flat, torch.zeros(())).view_as(pre)
    else:
        z = torch.relu(pre)
    x_hat = z @ sae.W_dec + sae.b_dec
    loss = ((x_n - x_hat) ** 2).sum() / ((x_n - x_n.mean(0)) ** 2).sum()
    if arch == "relu":
        loss = loss + 0.5 * (z * sae.W_dec.norm(dim=1)).sum() / ((x_n - x_n.mean(0)) ** 2).sum()
    loss.backward()
    for k, p in sae.named_parameters():
        torch.testing.assert_close(ours[k], p.grad, atol=1e-5, rtol=1e-4, msg=f"{arch}: grad of {k}")
