"""LoRA benchmark: latency of merged vs base, unmerged LoRA graph vs merged, swappable vs merged
(ort-cpu and openvino-cpu, interleaved in one run), adapter switch/load time, merge time.

    python benchmarks/lora.py [--config small] [--rounds 15] [--out benchmarks/results/lora.json]

Models: `llama <config>` exported once; a PEFT adapter (all 7 projections, r=16, α=32) made with
PEFT on the same module. "unmerged" is PEFT's LoRA-layer model exported as is (its branches left
in the graph: no fold). Merge time on `llama base` runs the merge pass on the base config's
projection weights (the pass touches only those initializers; exporting the 0.9 B-parameter model
is not needed to time it), with a PEFT-format adapter of random A/B (r=16).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import onnx_ir as ir
import torch

PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _sessions(paths: dict[str, Path]):
    from edgec.runtimes.openvino import OpenVINOSession
    from edgec.runtimes.ort import OrtSession
    from edgec.targets.openvino_cpu import OPENVINO_CPU

    out = {}
    for name, path in paths.items():
        out[("ort-cpu", name)] = OrtSession(path)
        out[("openvino-cpu", name)] = OpenVINOSession(path, "CPU", OPENVINO_CPU.runtime_config)
    return out


def _interleaved(sessions, feeds, rounds: int, per_round: int = 5) -> dict:
    times = {k: [] for k in sessions}
    for s in sessions.values():
        for _ in range(3):
            s._run(feeds[id(s)])
    for _ in range(rounds):
        for k, s in sessions.items():  # one block per variant per round: fair vs spinning threads
            f = feeds[id(s)]
            t0 = time.perf_counter()
            for _ in range(per_round):
                s._run(f)
            times[k].append((time.perf_counter() - t0) / per_round * 1e3)
    return {k: float(np.median(v)) for k, v in times.items()}


def _merge_time_base(tmp: Path) -> dict:
    """Merge pass on llama base's projection weights (exporter layout [in, out])."""
    from safetensors.numpy import save_file

    from edgec.graph_passes.lora.merge import LoraMergePass
    from edgec.lora import read_adapter
    from edgec.models.llama import CONFIGS

    cfg, r = CONFIGS["base"], 16
    rng = np.random.default_rng(0)
    shapes = {"q_proj": (cfg.dim, cfg.dim), "k_proj": (cfg.dim, cfg.kv_heads * cfg.head_dim),
              "v_proj": (cfg.dim, cfg.kv_heads * cfg.head_dim), "o_proj": (cfg.dim, cfg.dim),
              "gate_proj": (cfg.dim, cfg.ffn), "up_proj": (cfg.dim, cfg.ffn),
              "down_proj": (cfg.ffn, cfg.dim)}
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, cfg.dim]))
    nodes, inits, pmap, tensors = [], [], {}, {}
    for i in range(cfg.layers):
        for p, (fin, fout) in shapes.items():
            part = "self_attn" if p in PROJ[:4] else "mlp"
            mod = f"layers.{i}.{part}.{p}"
            w = ir.Value(name=f"w{len(inits)}", const_value=ir.tensor(
                rng.standard_normal((fin, fout), dtype=np.float32) / np.sqrt(fin)))
            inits.append(w)
            nodes.append(ir.node("MatMul", [x if fin == cfg.dim else nodes[-1].outputs[0], w]))
            pmap[f"{mod}.weight"] = {"initializer": w.name, "layout": "transposed"}
            tensors[f"base_model.model.{mod}.lora_A.weight"] = (
                rng.standard_normal((r, fin), dtype=np.float32) * 0.01)
            tensors[f"base_model.model.{mod}.lora_B.weight"] = (
                rng.standard_normal((fout, r), dtype=np.float32) * 0.01)
    graph = ir.Graph([x], [nodes[-1].outputs[0]], nodes=nodes, initializers=inits,
                     opset_imports={"": 20})
    model = ir.Model(graph, ir_version=10)
    adir = tmp / "base-adapter"
    adir.mkdir()
    save_file(tensors, str(adir / "adapter_model.safetensors"))
    (adir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": PROJ}))
    t0 = time.perf_counter()
    adapter = read_adapter(adir)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    stats = LoraMergePass([adapter], pmap)(model).stats
    t_merge = time.perf_counter() - t0
    params = sum(v.const_value.size for v in inits)
    return {"model": "llama base (projection weights)", "rank": r,
            "modules": stats["modules_merged"], "weight_parameters": int(params),
            "read_adapter_s": round(t_read, 3), "merge_s": round(t_merge, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import peft

    from edgec.exporters.sources import resolve_source
    from edgec.exporters.torch_export import export_module
    from edgec.graph_passes.lora.merge import LoraMergePass
    from edgec.graph_passes.lora.swappable import LoraSwappablePass, lora_sites
    from edgec.lora import read_adapter
    from edgec.lora.binding import site_feeds
    from edgec.models import registry
    from edgec.onnx_io import save_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    spec = registry.get("llama")
    result: dict = {"benchmark": "lora", "config": args.config, "machine": {
        "cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()}}
    with tempfile.TemporaryDirectory(prefix="edgec-bench-lora-") as tmpdir:
        tmp = Path(tmpdir)
        src = resolve_source("llama", args.config)
        proto = ir.to_proto(src.model)  # copies for each variant (the IR aliases torch memory)
        torch.manual_seed(0)
        cfgs = {"a": (16, 32, 0), "b": (8, 16, 1)}
        adapters = {}
        for name, (r, alpha, seed) in cfgs.items():
            torch.manual_seed(seed)
            pm = peft.get_peft_model(spec.build(args.config), peft.LoraConfig(
                target_modules=PROJ, r=r, lora_alpha=alpha, init_lora_weights=False))
            pm.save_pretrained(str(tmp / name))
            adapters[name] = read_adapter(tmp / name)
            if name == "a":  # PEFT's own unmerged LoRA model, branches left in the graph
                res = export_module(pm.get_base_model(), spec.example_inputs(args.config),
                                    spec.dynamic_shapes(args.config), ["logits"])
                save_model(res.model, tmp / "unmerged.onnx")
        save_model(ir.from_proto(proto), tmp / "base.onnx")
        merged = ir.from_proto(proto)
        t0 = time.perf_counter()
        stats = LoraMergePass([adapters["a"]], src.parameter_map)(merged).stats
        result["merge_small"] = {"merge_s": round(time.perf_counter() - t0, 3),
                                 "modules": stats["modules_merged"], "rank": 16}
        save_model(merged, tmp / "merged.onnx")
        swap = ir.from_proto(proto)
        LoraSwappablePass([adapters["a"], adapters["b"]], src.parameter_map)(swap)
        sites = lora_sites(swap)
        save_model(swap, tmp / "swappable.onnx")

        names = ["base", "merged", "unmerged", "swappable"]
        sessions = _sessions({n: tmp / f"{n}.onnx" for n in names})
        bound = {n: {**src.feeds, **site_feeds(sites, adapters[n])} for n in ("a", "b")}
        feeds = {id(s): (bound["a"] if k[1] == "swappable" else src.feeds)
                 for k, s in sessions.items()}
        p50 = _interleaved(sessions, feeds, args.rounds)
        lat = {}
        for target in ("ort-cpu", "openvino-cpu"):
            m = {n: p50[(target, n)] for n in names}
            lat[target] = {"p50_ms": {n: round(v, 3) for n, v in m.items()},
                           "merged_vs_base": round(m["merged"] / m["base"], 3),
                           "unmerged_vs_merged": round(m["unmerged"] / m["merged"], 3),
                           "swappable_vs_merged": round(m["swappable"] / m["merged"], 3)}
        result["latency"] = lat

        # adapter switch: alternate a/b every run vs keep one, on the swappable sessions
        switch = {}
        for target in ("ort-cpu", "openvino-cpu"):
            s = sessions[(target, "swappable")]
            same, alt = [], []
            for i in range(4 * args.rounds):
                t0 = time.perf_counter()
                s._run(bound["a"])
                same.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                s._run(bound["b" if i % 2 else "a"])
                alt.append(time.perf_counter() - t0)
            switch[target] = {"run_same_adapter_p50_ms": round(float(np.median(same)) * 1e3, 3),
                              "run_alternating_p50_ms": round(float(np.median(alt)) * 1e3, 3)}
        t0 = time.perf_counter()
        site_feeds(sites, read_adapter(tmp / "b"))
        switch["load_adapter_s"] = round(time.perf_counter() - t0, 4)
        result["adapter_switch"] = switch
        result["merge_base"] = _merge_time_base(tmp)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
