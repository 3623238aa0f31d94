"""LightningModule: next-token training of HydraLM (or the dense baseline) with its metrics.

Loss = CE(logits, labels, ignore_index=-100) + mtp_aux_loss (when mtp_depth > 0) + every auxiliary loss
the model reports through ``auxiliary_losses`` (the hook the compressive memory's reconstruction loss uses).

Hyperparameters are plain dicts (never Hydra partials or objects), so checkpoints load with
``torch.load(..., weights_only=True)``.
"""

import math
import time
from typing import Dict, Optional, Union

import lightning as L
import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from torchmetrics.aggregation import MeanMetric

from hydralm.baselines.dense_transformer import DenseTransformer
from hydralm.config import HydraConfig
from hydralm.eval.routing_recall import routing_hits
from hydralm.model import HydraLM
from hydralm.modules.routing_log import retrieval_layers, start_routing_log, stop_routing_log
from hydralm.training.optim import build_optimizer, warmup_cosine

DEPTH_BUCKETS = ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0 + 1e-9))
ARCHITECTURES = {"hydra": HydraLM, "dense": DenseTransformer}
NONFINITE_POLICIES = ("skip", "stop")


class HydraLMModule(L.LightningModule):
    def __init__(
        self,
        model: Dict,
        optimizer: Dict,
        architecture: str = "hydra",
        compile: Union[bool, str] = False,
        nonfinite: str = "skip",
        max_consecutive_skips: int = 10,
        activation_checkpointing: Union[bool, float, str] = False,
    ):
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={architecture!r} is unknown; allowed: {list(ARCHITECTURES)}")
        if not (isinstance(compile, bool) or compile == "auto"):
            raise ValueError(f"compile={compile!r} is invalid: expected false, true or auto")
        fraction = isinstance(activation_checkpointing, float) and 0.0 <= activation_checkpointing <= 1.0
        if not (isinstance(activation_checkpointing, bool) or fraction or activation_checkpointing == "mlp"):
            raise ValueError(
                f"activation_checkpointing={activation_checkpointing!r} is invalid: expected true, false, the "
                "fraction of blocks to checkpoint (a number in [0.0, 1.0]) or mlp (every block's MLP sublayer only)"
            )
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={nonfinite!r} is unknown; allowed: {list(NONFINITE_POLICIES)}")
        self.save_hyperparameters()
        self.config = HydraConfig(**model)
        self.net = ARCHITECTURES[architecture](self.config)
        self.net.activation_checkpointing = activation_checkpointing
        # FSDP hands the optimizer flat shards; weight-decay groups come from these original ranks instead.
        self._param_ndims = {name: p.ndim for name, p in self.net.named_parameters()}
        self.depth_accuracy = nn.ModuleDict(
            {
                stage: nn.ModuleList(MeanMetric(nan_strategy="ignore") for _ in DEPTH_BUCKETS)
                for stage in ("val", "test")
            }
        )
        # val/routing_recall/layer{i}: per retrieval layer, answers whose chunk the routing read (local or picked);
        # val/routing_recall_far/layer{i}: the same among answers beyond the local two chunks.
        self.routing_recall = nn.ModuleDict(
            {
                f"{kind}{i}": MeanMetric(nan_strategy="ignore")
                for i in retrieval_layers(self.net)
                for kind in ("near_or_far", "far")
            }
        )
        self._routing_logs: Optional[dict] = None
        self._skipped_in_a_row = 0
        self._step_started: Optional[float] = None

    # -- forward / loss --------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Regional compile: each block's forward is compiled on its own (the same code for every block of a
        type, so compiles are reused; the embedding, head and loss stay eager). auto = on for CUDA."""
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        wanted = self.hparams.compile is True or (self.hparams.compile == "auto" and device.type == "cuda")
        if wanted and not self.net.blocks_compiled:
            self.net.compile_blocks()

    def forward(self, input_ids: torch.Tensor, **kwargs):
        return self.net(input_ids, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints written when compile wrapped the whole network hold every weight twice, the copy under
        # `_compiled_forward._orig_mod.`; the weights under `net.` are the same tensors.
        state = checkpoint.get("state_dict", {})
        for name in [n for n in state if n.startswith("_compiled_forward.")]:
            del state[name]

    def auxiliary_losses(self, out: dict) -> Dict[str, torch.Tensor]:
        """Extra loss terms, already weighted. The MTP loss is one; the compressive memory adds its own."""
        losses = {}
        if out.get("mtp_aux_loss") is not None:
            losses["mtp"] = out["mtp_aux_loss"]
        if out.get("memory_aux_loss") is not None:
            losses["memory"] = out["memory_aux_loss"]
        routing = self._routing_losses()
        if routing is not None:
            losses["routing"] = routing
        return losses

    def _routing_losses(self) -> Optional[torch.Tensor]:
        """The retrieval layers' answer-chunk routing losses of this forward, weighted and averaged (or None)."""
        weighted = []
        for layer in retrieval_layers(self.net).values():
            if layer.routing_loss is not None:
                weighted.append(layer.routing_loss_weight * layer.routing_loss)
                layer.routing_loss = None
        return torch.stack(weighted).mean() if weighted else None

    def _shared_step(self, batch: dict, stage: str):
        use_mtp = self.config.mtp_depth > 0 and stage == "train"
        # The loss comes without the (B, N, V) logits (chunked linear + CE); accuracy needs the query rows only.
        out = self(
            batch["input_ids"],
            compute_mtp=use_mtp,
            labels=batch["labels"],
            return_logits=False,
            logits_at=batch.get("query_positions"),
        )
        ce = out["loss"]
        aux = self.auxiliary_losses(out)
        loss = ce + sum(aux.values()) if aux else ce
        batch_size = batch["input_ids"].shape[0]
        # train/loss is the global batch's loss under DDP/FSDP (one scalar all-reduce per step), so runs on
        # different numbers of GPUs compare step by step; the other train metrics stay rank-local.
        self.log(
            f"{stage}/loss",
            ce,
            prog_bar=True,
            batch_size=batch_size,
            sync_dist=stage != "train" or (self._trainer is not None and self.trainer.world_size > 1),
        )
        self.log(
            f"{stage}/ppl", torch.exp(ce.detach().clamp(max=50)), batch_size=batch_size, sync_dist=stage != "train"
        )
        for name, value in aux.items():
            self.log(f"{stage}/{name}_loss", value, batch_size=batch_size, sync_dist=stage != "train")
        if "query_positions" in batch:
            self._log_answer_accuracy(out["logits_at"], batch, stage)
        return loss, ce

    def _log_answer_accuracy(self, query_logits: torch.Tensor, batch: dict, stage: str) -> None:
        """query_logits (B, Q, V): the logits at batch["query_positions"]."""
        positions = batch["query_positions"]  # (B, Q)
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]
        correct = (query_logits.argmax(-1) == batch["labels"][rows, positions]).float()
        n = correct.numel()
        self.log(f"{stage}/acc", correct.mean(), prog_bar=True, batch_size=n, sync_dist=stage != "train")
        if stage == "train" or "depths" not in batch:
            return
        # MeanMetric per bucket (weights = membership): every rank logs every bucket, so DDP never waits
        # on a key one rank skipped; an empty bucket reads NaN ("no queries there"), never 0.
        for (lo, hi), metric in zip(DEPTH_BUCKETS, self.depth_accuracy[stage]):
            in_bucket = ((batch["depths"] >= lo) & (batch["depths"] < hi)).float()
            metric.update(correct, in_bucket)
            self.log(
                f"{stage}/acc_depth_{int(lo * 100)}_{int(min(hi, 1.0) * 100)}", metric, on_step=False, on_epoch=True
            )

    # -- Lightning hooks -------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx):
        self._step_started = time.perf_counter()
        # the routing loss (HydraConfig.retrieval_routing_loss, from step retrieval_routing_loss_from) needs the
        # answers' positions of this batch
        routed = "source_positions" in batch and self.global_step >= self.config.retrieval_routing_loss_from
        targets = (batch["query_positions"], batch["source_positions"]) if routed else None
        for layer in retrieval_layers(self.net).values():
            layer.routing_targets = targets if layer.routing_loss_weight > 0 else None

    def training_step(self, batch: dict, batch_idx: int):
        loss, ce = self._shared_step(batch, "train")
        if not torch.isfinite(loss):
            return self._non_finite(f"loss is {loss.item()}")
        self._skipped_in_a_row = 0
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self._step_started is not None:
            elapsed = time.perf_counter() - self._step_started
            tokens = batch["input_ids"].numel() * self.trainer.world_size
            self.log("train/tokens_per_sec", tokens / max(elapsed, 1e-9), prog_bar=True, batch_size=1)
        if torch.cuda.is_available() and self.device.type == "cuda":
            self.log("train/peak_mem_gib", torch.cuda.max_memory_allocated(self.device) / 2**30, batch_size=1)

    def _fsdp_root(self) -> Optional[FullyShardedDataParallel]:
        root = self.trainer.strategy.model if self._trainer is not None else None
        return root if isinstance(root, FullyShardedDataParallel) else None

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None and p.grad.numel()]
        sharded = self._fsdp_root() is not None
        if not grads and not sharded:
            return
        squares = torch.zeros((), device=self.device)
        if grads:
            squares = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
        if sharded:  # each rank holds a shard of the gradients: every rank must see the same global norm
            torch.distributed.all_reduce(squares)
        norm = squares.sqrt()
        self.log("train/grad_norm", norm, batch_size=1)
        if not torch.isfinite(norm):
            # Dropping the gradients makes both optimizers skip every parameter: the weights stay finite.
            for p in self.parameters():
                p.grad = None
            self._non_finite(f"gradient norm is {norm.item()}")

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        root = self._fsdp_root()
        if root is not None and gradient_clip_val and gradient_clip_algorithm in (None, "norm"):
            # Lightning refuses norm clipping under FSDP (clipping each shard by its own norm would be wrong);
            # FSDP's root module computes the norm over all shards. Clipping by value is per element: Lightning's.
            root.clip_grad_norm_(gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def validation_step(self, batch: dict, batch_idx: int):
        self._shared_step(batch, "val")

    # -- routing recall (validation only; reads the retrieval layers' routing log, changes nothing) ------------
    def on_validation_batch_start(self, batch, batch_idx, dataloader_idx=0):
        if "source_positions" in batch and len(self.routing_recall):
            self._routing_logs = start_routing_log(self.net)

    def on_validation_batch_end(self, outputs, batch, batch_idx, dataloader_idx=0):
        if self._routing_logs is None:
            return
        logs, self._routing_logs = self._routing_logs, None
        stop_routing_log(self.net)
        n = batch["query_positions"].numel()
        for i, entries in logs.items():
            if not entries:  # e.g. a compiled forward that skipped the Python side effects
                continue
            hits = routing_hits(entries, batch["query_positions"], batch["source_positions"])
            read = (hits["local"] | hits["found"].any(1)).float()
            for kind, values, weights in (
                ("near_or_far", read, torch.ones_like(read)),
                ("far", read, (~hits["local"]).float()),
            ):
                metric = self.routing_recall[f"{kind}{i}"]
                metric.update(values, weights)
                name = "routing_recall" if kind == "near_or_far" else "routing_recall_far"
                self.log(f"val/{name}/layer{i}", metric, on_step=False, on_epoch=True, batch_size=n)

    def test_step(self, batch: dict, batch_idx: int):
        self._shared_step(batch, "test")

    def _non_finite(self, what: str):
        self._skipped_in_a_row += 1
        self.log("train/skipped_steps", float(self._skipped_in_a_row), batch_size=1)
        message = (
            f"non-finite training step at global step {self.global_step}: {what}. "
            "Lower optimizer.lr, raise optimizer.warmup_steps or check the data."
        )
        if self.hparams.nonfinite == "stop" or self._skipped_in_a_row > self.hparams.max_consecutive_skips:
            raise FloatingPointError(
                message + f" (policy nonfinite={self.hparams.nonfinite!r}, {self._skipped_in_a_row} in a row)"
            )
        return None  # Lightning skips backward and the optimizer step for this batch

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        bad = [n for n, p in self.named_parameters() if not torch.isfinite(p).all()]
        if bad:  # raising here aborts the save, so the last good checkpoint is never overwritten
            raise FloatingPointError(f"refusing to save a checkpoint with non-finite weights in {bad[:5]}")

    def configure_optimizers(self):
        opt = dict(self.hparams.optimizer)
        optimizer = build_optimizer(
            self.net,
            opt["name"],
            lr=opt["lr"],
            weight_decay=opt["weight_decay"],
            betas=opt.get("betas", (0.9, 0.95)),
            eps=opt.get("eps", 1e-8),
            fused=opt.get("fused"),
            sharded_ndims=self._param_ndims if self._fsdp_root() is not None else None,
        )
        total = self.trainer.max_steps if self.trainer.max_steps > 0 else self.trainer.estimated_stepping_batches
        if total is None or not math.isfinite(total):
            raise ValueError("set trainer.max_steps (or max_epochs with a sized dataset) so the lr schedule has an end")
        factor = warmup_cosine(opt.get("warmup_steps", 0) or 1, int(total), opt.get("min_lr_ratio", 0.1))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
