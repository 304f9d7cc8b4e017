"""SAE configuration: the model's hyperparameters (SAEConfig) and the training job's flags (TrainConfig).

Both are dataclasses; TrainConfig is the single source of `scripts/train_sae.py`'s command-line flags.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from llama.cli import UserError

ARCHITECTURES = ("topk", "batchtopk", "relu")
NORMALIZATIONS = ("scalar", "token", "none")


@dataclass
class SAEConfig:
    """Hyperparameters of one SAE (what the saved file's cfg.json records)."""
    d_in: int
    n_latents: int
    k: int = 32
    architecture: str = "topk"  # topk | batchtopk (JumpReLU threshold at inference) | relu (L1 penalty)
    normalize: str = "scalar"  # scalar: x * s with E||x s||^2 = d_in | token: per-token standardisation | none
    k_aux: int = 0  # AuxK latents per token; 0 -> d_in // 2
    aux_coef: float = 1 / 32
    l1_coef: float = 5.0  # relu architecture only: weight of sum_i z_i ||W_dec_i||
    hook_name: str = ""
    model: str = ""

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UserError(f"SAE architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.normalize not in NORMALIZATIONS:
            raise UserError(f"SAE normalize must be one of {NORMALIZATIONS}, got {self.normalize!r}")
        if self.d_in <= 0 or self.n_latents <= 0:
            raise UserError(f"SAE d_in and n_latents must be positive, got {self.d_in}, {self.n_latents}")
        if self.architecture != "relu" and not 0 < self.k <= self.n_latents:
            raise UserError(f"SAE k must be in [1, n_latents={self.n_latents}], got {self.k}")
        if self.k_aux <= 0:
            self.k_aux = max(1, self.d_in // 2)
        self.k_aux = min(self.k_aux, self.n_latents)

    @classmethod
    def from_dict(cls, d: dict) -> "SAEConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainConfig:
    """Flags of `scripts/train_sae.py` (and `torchrun ... scripts/train_sae.py`)."""
    store: str = field(default="", metadata={"help": "activation store folder (from scripts/capture.py)"})
    out: str = field(default="runs/sae", metadata={"help": "output folder: sae/, checkpoints, metrics.jsonl"})
    point: str = field(default="", metadata={"help": "capture point to train on when the store holds several"})
    # model
    architecture: str = field(default="topk", metadata={"help": "SAE kind", "choices": list(ARCHITECTURES)})
    expansion: int = field(default=8, metadata={"help": "n_latents = expansion * d_model (unless --n-latents)"})
    n_latents: int = field(default=0, metadata={"help": "number of latents (0: expansion * d_model)"})
    k: int = field(default=32, metadata={"help": "active latents per token (topk/batchtopk)"})
    normalize: str = field(default="scalar", metadata={"help": "input normalisation", "choices": list(NORMALIZATIONS)})
    k_aux: int = field(default=0, metadata={"help": "AuxK latents (0: d_model // 2)"})
    aux_coef: float = field(default=1 / 32, metadata={"help": "AuxK loss weight"})
    l1_coef: float = field(default=5.0, metadata={"help": "L1 weight (relu architecture)"})
    dead_tokens: int = field(default=10_000_000, metadata={"help": "a latent is dead after this many tokens unfired"})
    b_dec_init: str = field(default="median", metadata={"help": "b_dec init", "choices": ["median", "mean", "zero"]})
    init_rows: int = field(default=16384, metadata={"help": "rows sampled for normalisation and b_dec init"})
    # optimisation
    steps: int = field(default=10_000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=4096, metadata={"help": "GLOBAL batch (split evenly across DDP ranks)"})
    # LR default: 2e-4 / sqrt(n_latents / 2^14), the width scaling of Gao et al. 2024 (OpenAI TopK SAEs) that
    # EleutherAI sparsify also uses: 2e-4 at 16k latents, 8e-4 at 1k, 1.4e-4 at 32k. Wider SAEs get smaller
    # steps because each latent's rows see fewer tokens per step. The earlier project's fixed 5e-5 is 4x below
    # this at 16k latents and 16x below at the small SAEs of the demo (slow to converge, more dead latents);
    # bench/sae_recovery.py reaches recovery >= 0.99 at the formula's value (8e-4 for 1024 latents).
    lr: float = field(default=0.0, metadata={"help": "peak LR (0: 2e-4 / sqrt(n_latents / 2^14), OpenAI scaling)"})
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = field(default=6.25e-10, metadata={"help": "Adam eps (small: SAE grads are tiny)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW decay on weight matrices (never biases)"})
    # Cosine decay to 10% of peak after a short warmup: the late small steps settle the decoder directions
    # (bench/sae_recovery.py is measured with it); use --schedule constant for open-ended runs.
    schedule: str = field(default="cosine", metadata={"help": "LR after warmup", "choices": ["constant", "cosine"]})
    warmup_steps: int = field(default=100, metadata={"help": "linear LR warmup steps (capped at steps // 10)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine floor as a fraction of peak"})
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm (0: off)"})
    ema_decay: float = field(default=0.0, metadata={"help": "EMA of weights (0: off); the EMA is what is saved"})
    autocast: bool = field(default=False, metadata={"help": "bf16 autocast (CUDA only; fp32 master weights)"})
    seed: int = 0
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda"})
    # bookkeeping
    log_every: int = 50
    val_every: int = field(default=500, metadata={"help": "validation every N steps (0: off)"})
    val_batches: int = 8
    ckpt_every: int = field(default=1000, metadata={"help": "atomic checkpoint every N steps (0: only at end)"})
    resume: bool = field(default=False, metadata={"help": "continue exactly from OUT/checkpoint.pt"})
    overwrite: bool = field(default=False, metadata={"help": "replace the run already in OUT (its SAE, checkpoint, "
                                                             "metrics and the SAE's results there)"})
    wandb_project: str = field(default="", metadata={"help": "log to Weights & Biases (when installed)"})
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "val_batches"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")

    def peak_lr(self, n_latents: int) -> float:
        return self.lr if self.lr > 0 else 2e-4 / math.sqrt(n_latents / 2**14)
