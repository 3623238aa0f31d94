"""Optimizers and the learning-rate schedule.

* ``adamw``: AdamW with decay on matrices (ndim >= 2: projections, embeddings, conv kernels) and none on
  vectors (norm weights, DeltaNet A_log / dt_bias).
* ``muon``: ``torch.optim.Muon`` on the 2-D hidden matrices (every nn.Linear inside the blocks and the MTP
  head), AdamW on the rest (embedding / tied head, norms, conv kernels, decay parameters). Lightning's
  automatic optimisation drives one optimizer, so both live in ``MuonAdamW``.
* Under FSDP the parameters the optimizer sees are flat shards, so groups are decided from the shapes the
  model had when it was built (``ndims``), by name; Muon needs whole matrices and is refused there.
* Schedule: linear warmup to ``lr`` then cosine to ``min_lr_ratio * lr`` at the last step.
"""

import math
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

OPTIMIZERS = ("adamw", "muon")
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def unwrapped_name(name: str) -> str:
    """A parameter's name as the bare model has it (FSDP and activation-checkpointing wrappers removed)."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def adamw_groups(
    params: Dict[str, nn.Parameter], weight_decay: float, ndims: Optional[Dict[str, int]] = None
) -> List[dict]:
    """Decay on matrices, none on vectors; `ndims` gives the original ranks when params are flat shards."""

    def is_matrix(name: str, p: nn.Parameter) -> bool:
        return (ndims[unwrapped_name(name)] if ndims is not None else p.ndim) >= 2

    decay = [p for n, p in params.items() if is_matrix(n, p)]
    no_decay = [p for n, p in params.items() if not is_matrix(n, p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def muon_parameter_names(model: nn.Module) -> List[str]:
    """2-D weights of nn.Linear layers that are not the (tied) LM head."""
    head = getattr(model, "lm_head", None)
    names = []
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head:
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names


class MuonAdamW(torch.optim.Optimizer):
    """Muon for hidden matrices + AdamW for everything else, stepping together as one optimizer."""

    def __init__(
        self,
        muon_params: List[nn.Parameter],
        adamw_param_groups: List[dict],
        lr: float,
        weight_decay: float,
        betas=(0.9, 0.95),
        momentum: float = 0.95,
        eps: float = 1e-8,
    ):
        # Muon's "match_rms_adamw" scaling lets both halves share one learning rate and one schedule.
        self.muon = torch.optim.Muon(
            muon_params, lr=lr, weight_decay=weight_decay, momentum=momentum, adjust_lr_fn="match_rms_adamw"
        )
        self.adamw = torch.optim.AdamW(adamw_param_groups, lr=lr, betas=betas, eps=eps)
        super().__init__([{"params": []}], {"lr": lr})
        self.param_groups = self.muon.param_groups + self.adamw.param_groups

    @property
    def state(self):  # schedulers and strategies read/move optimizer state through this
        return {**self.muon.state, **self.adamw.state}

    @state.setter
    def state(self, value):  # Optimizer.__init__ assigns an empty state; the children own theirs
        pass

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.muon.step()
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        self.param_groups = self.muon.param_groups + self.adamw.param_groups


def build_optimizer(
    model: nn.Module,
    name: str,
    lr: float,
    weight_decay: float,
    betas=(0.9, 0.95),
    eps: float = 1e-8,
    fused: Optional[bool] = None,
    sharded_ndims: Optional[Dict[str, int]] = None,
) -> torch.optim.Optimizer:
    """`sharded_ndims` (FSDP): {bare parameter name: ndim} recorded before the model was sharded."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer.name={name!r} is unknown; allowed: {list(OPTIMIZERS)}")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if name == "adamw":
        groups = adamw_groups(params, weight_decay, sharded_ndims)
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)
    if sharded_ndims is not None:
        raise ValueError(
            "optimizer.name=muon needs whole weight matrices, which FSDP shards; "
            "use optimizer=adamw with trainer=fsdp, or trainer=ddp with Muon"
        )
    muon_names = set(muon_parameter_names(model)) & set(params)
    muon = [params[n] for n in sorted(muon_names)]
    rest = {n: p for n, p in params.items() if n not in muon_names}
    return MuonAdamW(
        muon, adamw_groups(rest, weight_decay), lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps
    )


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float) -> Callable[[int], float]:
    """LR multiplier for LambdaLR: linear warmup, then cosine decay to min_lr_ratio at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
