"""Coverage of maskdecay and of Torch-Pruning on the torchvision and timm model zoos (docs/zoo_coverage.md).

    python benchmarks/zoo_coverage.py [--models NAME ...] [--size 224] [--seg-size 256] [--json out.json]
                                      [--max-params 1000] [--max-memory 14] [--no-tp]

Needs torchvision and timm next to maskdecay (a separate environment: see docs/zoo_coverage.md). For every
torchvision classification and segmentation model and the common timm CNN families, randomly initialised (seed 0),
one thread, the classifier (the layers with one output per class) ignored:

* maskdecay: ``ChannelMasks`` (with its exactness check), ``plan(macs=0.5)`` (or the lowest budget the groups allow),
  hard decay in one step, ``export`` (which checks the student against the masked teacher); recorded: groups, the
  conv/linear layers left whole and why, the student's MACs and the largest |student - masked teacher| on the
  example input;
* Torch-Pruning: ``MagnitudePruner`` (L1, uniform ratio ``1 - sqrt(0.5)``, which gives about half the MACs), one
  step; recorded: its groups, the pruned model's MACs, and whether it still runs and gives the output shape.

Models run in the order of :func:`zoo`; those above ``--max-params`` million parameters are skipped, and each library
gets ``--timeout`` seconds per model; the process's address space is capped at ``--max-memory`` GB, so a library
that runs out of memory on a model is recorded as such instead of ending the run. The JSON is rewritten after every
model, and the models already in it are not run again (those skipped for their size are), so an interrupted run
resumes.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import math
import os
import resource
import signal
import time
import traceback
import warnings
from typing import Any, Callable

import torch
import torch.nn as nn

import maskdecay as md

TIMM = ["resnet50", "resnext50_32x4d", "regnetx_004", "regnety_004", "densenet121", "cspresnet50",
        "res2net50_26w_4s", "efficientnet_b0", "mobilenetv3_large_100", "convnext_tiny", "vit_tiny_patch16_224"]


def zoo() -> dict[str, tuple[Callable[[], nn.Module], bool]]:
    """``{label: (factory, is_segmentation)}`` for every model of the run: the timm families, then torchvision's
    classification and segmentation models by increasing GFLOPs (as torchvision's weight metadata gives them)."""
    import timm
    from torchvision import models
    out: dict[str, tuple[Callable[[], nn.Module], bool]] = {}
    for name in TIMM:
        out[f"timm/{name}"] = (lambda n=name: timm.create_model(n, pretrained=False), False)
    tv = [(n, False) for n in models.list_models(module=models)]
    tv += [(n, True) for n in models.list_models(module=models.segmentation)]
    for name, seg in sorted(tv, key=lambda ns: models.get_model_weights(ns[0]).DEFAULT.meta["_ops"]):
        kw = {"weights_backbone": None} if seg else {}
        out[f"tv/{name}"] = (lambda n=name, kw=kw: models.get_model(n, weights=None, **kw), seg)
    return out


def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, dict):
        out = list(out.values())
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in _tensors(o)]


def _forward(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return _tensors(model(x))


def _classifier(model: nn.Module, n_out: int) -> list[nn.Module]:
    """The layers with one output channel per class (classifier heads, auxiliary heads included)."""
    return [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
            and (m.out_features if isinstance(m, nn.Linear) else m.out_channels) == n_out]


def _timed_out(signum: int, frame: Any) -> None:
    raise TimeoutError("no result within --timeout")


def run_maskdecay(model: nn.Module, x: torch.Tensor, ignored: list[nn.Module]) -> dict[str, Any]:
    masks = md.ChannelMasks(model, x, ignored_layers=ignored)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    whole = {n: why for n, why in masks.unpruned.items() if why != "ignored"}
    floor = masks.macs({g.name: list(range(max(1, math.ceil(g.size * 0.1)))) for g in masks.groups})
    target = max(0.5, floor / masks.teacher_macs + 0.01)
    plan = md.plan(masks, macs=target)
    md.MaskDecay(masks, plan, steps=1, regularizer="hard").step()
    masked = _forward(model, x)
    student = md.export(model, masks)
    out = _forward(student, x)
    diff = max(float((a - b).abs().max()) for a, b in zip(masked, out))
    scale = max(float(a.abs().max()) for a in masked)
    return {"groups": len(masks.groups), "units": masks.n_units, "layers": len(layers), "whole": len(whole),
            "whole_layers": whole, "target": target, "macs_ratio": md.count_macs(student, x) / masks.teacher_macs,
            "max_abs_diff": diff, "rel_diff": diff / scale if scale else 0.0}


def run_tp(model: nn.Module, x: torch.Tensor, ignored: list[nn.Module]) -> dict[str, Any]:
    import torch_pruning as tp
    base, _ = tp.utils.count_ops_and_params(model, x)
    shapes = [t.shape for t in _forward(model, x)]
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=1 - math.sqrt(0.5), ignored_layers=ignored)
    groups = len(list(pruner.DG.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear])))
    pruner.step()
    macs, _ = tp.utils.count_ops_and_params(model, x)
    try:
        ok = [t.shape for t in _forward(model, x)] == shapes
        result = "ok" if ok else "wrong output shape"
    except Exception as e:  # noqa: BLE001 -- a broken pruned model is the result being measured
        result = f"pruned model fails: {type(e).__name__}"
    return {"groups": groups, "macs_ratio": macs / base, "result": result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", help="labels such as tv/resnet18 or timm/densenet121 (default: all)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--seg-size", type=int, default=256)
    ap.add_argument("--max-params", type=float, default=1000.0, help="skip models above this many million params")
    ap.add_argument("--json", default="runs/zoo_coverage.json")
    ap.add_argument("--no-tp", action="store_true")
    ap.add_argument("--timeout", type=int, default=600, help="seconds each library may take per model")
    ap.add_argument("--max-memory", type=float, default=14.0, help="GB of address space the run may use")
    ap.add_argument("--markdown", action="store_true", help="print the table of --json as markdown and exit")
    args = ap.parse_args()
    if args.markdown:
        with open(args.json) as f:
            print(markdown(json.load(f)))
        return
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    signal.signal(signal.SIGALRM, _timed_out)
    logging.basicConfig(level=logging.WARNING)
    import timm
    import torchvision
    from maskdecay_examples.hostinfo import cpu_label
    limit = int(args.max_memory * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    models = zoo()
    chosen = args.models or list(models)
    record: dict[str, Any] = {"torch": torch.__version__, "torchvision": torchvision.__version__,
                              "timm": timm.__version__, "torch_pruning": importlib.metadata.version("torch-pruning"),
                              "cpu": cpu_label(),
                              "threads": 1, "max_memory_gb": args.max_memory, "size": args.size, "seg_size": args.seg_size, "models": {}}
    if os.path.exists(args.json):
        with open(args.json) as f:
            record["models"] = json.load(f)["models"]
    for label in chosen:
        if label in record["models"] and "skipped" not in record["models"][label]:
            continue  # done (a skipped model is tried again: --max-params may have changed)
        factory, seg = models[label]
        torch.manual_seed(0)
        model = factory().eval()
        row: dict[str, Any] = {"params_m": sum(p.numel() for p in model.parameters()) / 1e6}
        if row["params_m"] > args.max_params:
            row["skipped"] = f"{row['params_m']:.0f} M parameters > --max-params"
        else:
            x = torch.randn(1, 3, *(2 * [args.seg_size if seg else args.size]), generator=torch.Generator().manual_seed(0))
            for key, fn in (("maskdecay", run_maskdecay), ("tp", run_tp))[:1 if args.no_tp else 2]:
                if key == "tp":
                    torch.manual_seed(0)
                    model = factory().eval()
                t0 = time.perf_counter()
                signal.alarm(args.timeout)
                try:
                    row[key] = fn(model, x, _classifier(model, 21 if seg else 1000))
                except Exception as e:  # noqa: BLE001 -- recorded per model
                    row[key] = {"error": f"{type(e).__name__}: {e}"[:300], "trace": traceback.format_exc()[-1500:]}
                finally:
                    signal.alarm(0)
                row[key]["seconds"] = round(time.perf_counter() - t0, 1)
        record["models"][label] = row
        record["models"] = {k: record["models"][k] for k in models if k in record["models"]}  # in zoo() order
        print(_line(label, row), flush=True)
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


def _line(label: str, row: dict[str, Any]) -> str:
    if "skipped" in row:
        return f"{label:34s} skipped: {row['skipped']}"
    m, t = row["maskdecay"], row.get("tp", {})
    ours = (f"groups {m['groups']:4d}  whole {m['whole']:3d}/{m['layers']:<4d} MACs {m['macs_ratio']:.3f}  "
            f"max|d| {m['max_abs_diff']:.2e}" if "error" not in m else f"ERROR {m['error'][:60]}")
    theirs = (f"TP groups {t['groups']:4d} MACs {t['macs_ratio']:.3f} {t['result']}" if "groups" in t
              else f"TP ERROR {t.get('error', '')[:50]}")
    return f"{label:34s} {ours} | {theirs}"


def _reasons(whole: dict[str, str]) -> str:
    """Layers left whole, counted by the kind of reason."""
    kinds = {"reaches the model output": "output", "LayerNorm": "LayerNorm", "crosses": "layout",
             "exactness check": "check", "bare nn.Parameter": "parameter", "not called": "unused", "holds": "layer"}
    counts: dict[str, int] = {}
    for why in whole.values():
        kind = next((k for frag, k in kinds.items() if frag in why), "other")
        counts[kind] = counts.get(kind, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def markdown(record: dict[str, Any]) -> str:
    """The coverage table of a JSON record, as markdown."""
    lines = ["| model | params (M) | groups | conv/linear left whole (why) | student MACs | max \\|student - masked\\| "
             "(relative) | TP groups | TP MACs | TP result |", "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for label, row in record["models"].items():
        if "skipped" in row:
            lines.append(f"| {label} | {row['params_m']:.1f} | | skipped | | | | | |")
            continue
        m, t = row["maskdecay"], row.get("tp", {})
        why = f" ({_reasons(m['whole_layers'])})" if m["whole"] else ""
        ours = (f"{m['groups']} | {m['whole']} of {m['layers']}{why} | "
                f"{m['macs_ratio']:.3f} | {m['max_abs_diff']:.1e} ({m['rel_diff']:.0e})" if "error" not in m
                else f"error | {m['error'][:80]} | | ")
        theirs = (f"{t['groups']} | {t['macs_ratio']:.3f} | {t['result']}" if "groups" in t
                  else f" | | error: {t.get('error', '').split(':')[0]}")
        lines.append(f"| {label} | {row['params_m']:.1f} | {ours} | {theirs} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
