"""The peers, measured in the same process as our figures so every ratio compares one card at one moment.

    python -m benchmarks.peers [kernel] [layer] [model]     (default: all three; CUDA + flash-linear-attention)

kernel  fla's `chunk_gated_delta_rule` vs our fused GDN kernels, fwd+bwd, bf16, at B8 T4096 H16 K128 and
        B16 T2048 H12 K64 (BENCH_KERNEL_HEAD_DIMS=64 runs the second only: fla autotunes for minutes at K128);
        BENCH_KERNEL_DOT16=1 also times ours with HYDRALM_DELTANET_DOT16=1 (16-bit dot operands)
                                                              -> kernel_ms/{fla-gdn,gdn-fused,gdn-fused-dot16}/B..
layer   one Gated DeltaNet layer + its MLP, fwd+bwd, bf16 autocast, d 768 H 12 D 64, 64k tokens per step at 16k
        and 64k context: fla's GatedDeltaNet block and ours, each as (2-layer model) - (1-layer model) with the
        same embedding, head and loss                          -> layer_ms/{fla-GatedDeltaNet,deltanet}/<T>
model   training step of fla's GatedDeltaNet 163M (d 768, 12 layers, 6 heads x 128) at 4k / 16k / 64k, 64k
        tokens per step, bf16 autocast, fused AdamW            -> train_ktok_s/fla-GDN-163M/<T>

fla 0.6 refuses its GDN backward on Hopper with triton < 3.7.1 (fla#640); for timing only, the guard is lifted
here, as fla's own benchmarks would run on a newer triton. Its gradients are not used for anything.
Figures go to the benchmark record (benchmarks/record.py).
"""

import os
import sys
from unittest import mock

import torch
import torch.nn.functional as F

from benchmarks import record
from benchmarks.speed import bench

TOKENS_PER_STEP = 65536


def _lift_fla_hopper_guard() -> None:
    import fla.ops.common.chunk_o as chunk_o

    chunk_o.TRITON_ABOVE_3_7_1 = True


def _gdn_inputs(B: int, T: int, H: int, K: int, heads_first: bool):
    shape = (B, H, T, K) if heads_first else (B, T, H, K)
    gate_shape = shape[:-1]
    q = F.normalize(torch.randn(shape, device="cuda"), dim=-1).bfloat16()
    k = F.normalize(torch.randn(shape, device="cuda"), dim=-1).bfloat16()
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    g = F.logsigmoid(torch.randn(gate_shape, device="cuda") + 4)
    beta = torch.rand(gate_shape, device="cuda", dtype=torch.bfloat16)
    return [t.requires_grad_() for t in (q, k, v, g, beta)]


def kernel() -> None:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    from hydralm.kernels.delta_rule.chunk import delta_rule_chunkwise

    _lift_fla_hopper_guard()
    head_dims = [int(d) for d in os.environ.get("BENCH_KERNEL_HEAD_DIMS", "128,64").split(",") if d]
    for B, T, H, K in [shape for shape in [(8, 4096, 16, 128), (16, 2048, 12, 64)] if shape[3] in head_dims]:
        shape = f"B{B}-T{T}-H{H}-K{K}"
        fla_in = _gdn_inputs(B, T, H, K, heads_first=False)
        ours_in = _gdn_inputs(B, T, H, K, heads_first=True)

        def fla_step():
            chunk_gated_delta_rule(*fla_in)[0].float().sum().backward()

        def ours_step():
            delta_rule_chunkwise(*ours_in, chunk_size=64, backend="fused")[0].float().sum().backward()

        fla_ms, ours_ms = bench(fla_step, 50), bench(ours_step, 50)
        record.record(f"kernel_ms/fla-gdn/{shape}", fla_ms, "ms")
        record.record(f"kernel_ms/gdn-fused/{shape}", ours_ms, "ms", peer=f"kernel_ms/fla-gdn/{shape}")
        print(f"GDN kernel {shape}: fused {ours_ms:.2f} ms, fla {fla_ms:.2f} ms ({ours_ms / fla_ms:.2f}x)", flush=True)
        if os.environ.get("BENCH_KERNEL_DOT16") == "1":
            default_out = delta_rule_chunkwise(*ours_in, chunk_size=64, backend="fused")[0].float()
            with mock.patch.dict(os.environ, {"HYDRALM_DELTANET_DOT16": "1"}):
                dot16_ms = bench(ours_step, 50)
                dot16_out = delta_rule_chunkwise(*ours_in, chunk_size=64, backend="fused")[0].float()
            differ = float((dot16_out - default_out).norm() / default_out.norm())
            record.record(f"kernel_ms/gdn-fused-dot16/{shape}", dot16_ms, "ms", peer=f"kernel_ms/fla-gdn/{shape}")
            print(f"GDN kernel {shape}: fused with 16-bit dots {dot16_ms:.2f} ms ({dot16_ms / fla_ms:.2f}x fla); "
                  f"output vs the default's: rel diff {differ:.1e}", flush=True)  # fmt: skip
        record.write()


def _fla_model(layers: int, heads: int, head_dim: int, expand_v: float):
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    cfg = GatedDeltaNetConfig(
        hidden_size=768,
        num_hidden_layers=layers,
        num_heads=heads,
        head_dim=head_dim,
        expand_v=expand_v,
        vocab_size=32000,
        fuse_cross_entropy=False,
    )
    return GatedDeltaNetForCausalLM(cfg).cuda()


def _fla_step(model, ids: torch.Tensor, opt=None):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def _hydra_step(model, ids: torch.Tensor):
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids, return_logits=False)["loss"]
        loss.backward()

    return step


def layer() -> None:
    from hydralm import HydraConfig, HydraLM

    _lift_fla_hopper_guard()
    cfg = HydraConfig.from_preset("160m")
    for T in (16384, 65536):
        ids = torch.randint(0, 32000, (TOKENS_PER_STEP // T, T), device="cuda")
        times = {}
        for layers in (1, 2):
            fla = _fla_model(layers, heads=12, head_dim=64, expand_v=1.0)
            # a layer's cost is the difference of two ~50 ms steps: 300 ms of repetitions each (median of ~6),
            # where a 10 ms budget timed one call and left the difference to noise
            times[("fla", layers)] = bench(_fla_step(fla, ids), 300)
            del fla
            ours = HydraLM(cfg.replace(n_layers=layers, layer_types=["deltanet"] * layers)).cuda()
            times[("ours", layers)] = bench(_hydra_step(ours, ids), 300)
            del ours
            torch.cuda.empty_cache()
        fla_ms = times[("fla", 2)] - times[("fla", 1)]
        ours_ms = times[("ours", 2)] - times[("ours", 1)]
        record.record(f"layer_ms/fla-GatedDeltaNet/{T}", fla_ms, "ms")
        record.record(f"layer_ms/deltanet/{T}", ours_ms, "ms", peer=f"layer_ms/fla-GatedDeltaNet/{T}")
        print(f"GDN layer + MLP @{T}: ours {ours_ms:.2f} ms, fla {fla_ms:.2f} ms ({ours_ms / fla_ms:.2f}x)", flush=True)
        record.write()


def model() -> None:
    _lift_fla_hopper_guard()
    fla = _fla_model(12, heads=6, head_dim=128, expand_v=2.0)
    opt = torch.optim.AdamW(fla.parameters(), lr=1e-4, fused=True)
    print(f"fla GatedDeltaNet built: {sum(p.numel() for p in fla.parameters()) / 1e6:.1f} M parameters", flush=True)
    for T in [int(t) for t in os.environ.get("BENCH_CONTEXTS", "4096,16384,65536").split(",") if t]:
        # the first step at a new shape autotunes fla's kernels (minutes at head dim 128 on an H200)
        print(f"fla GatedDeltaNet 163M @{T}: timing", flush=True)
        ids = torch.randint(0, 32000, (TOKENS_PER_STEP // T, T), device="cuda")
        ms = bench(_fla_step(fla, ids, opt), 10)
        record.record(f"train_ktok_s/fla-GDN-163M/{T}", TOKENS_PER_STEP / ms, "ktok/s")
        print(f"fla GatedDeltaNet 163M @{T}: {TOKENS_PER_STEP / ms:.1f} ktok/s", flush=True)
        record.write()


SECTIONS = {"kernel": kernel, "layer": layer, "model": model}

if __name__ == "__main__":
    torch.set_float32_matmul_precision("high")
    names = sys.argv[1:] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    for name in names:
        SECTIONS[name]()
