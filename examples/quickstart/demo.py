"""Quick-start demo: shrink a small CIFAR-10 CNN to 50 % of its MACs with mask decay.

What it does (``make demo`` runs it; about 6 minutes on 2 idle CPU cores, longer on a busy machine):

1. loads CIFAR-10 (the project's JPEG q75 re-encoding) from ``--data`` and caches the
   decoded arrays under ``--out``;
2. trains a small residual CNN briefly: the *teacher*;
3. for each regularizer (sparsity loss, L1, L2) copies the teacher, attaches channel masks,
   plans a 50 %-MACs student, decays the masks of the removed channels for ``--steps``
   steps while training, exports the physically smaller student (weights from the teacher,
   optimizer state carried over) and fine-tunes it briefly;
4. prints a table (MACs, params, test accuracy, CPU latency at batch 64) and writes mask
   trajectory plots, a regularizer comparison plot and ``results.json`` to ``--out``.

The mask-decay part is the ~15 lines in :func:`mask_decay`; everything else is an ordinary
PyTorch training script.

    python -m maskdecay_examples.quickstart.demo --data ../shared/data/cifar10 --out runs/demo
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import maskdecay as md
from maskdecay_examples.cifar import Split, augment, batches, load_cifar10, to_float

log = logging.getLogger("demo")

REGULARIZERS = ("sparsity", "l1", "l2")


# ----------------------------------------------------------------------------- model


def conv_bn(in_ch: int, out_ch: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """3x3 conv (no bias) + BatchNorm (+ ReLU)."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SmallCNN(nn.Module):
    """A small residual CNN for 32x32 images (about 18 M MACs at the default widths).

    ``stem`` (32x32) -> ``down1`` stride 2 (16x16) -> residual pair ``res_a``/``res_b`` with an
    identity add -> ``down2`` stride 2 (8x8) -> ``down3`` stride 2 (4x4) -> global average
    pool -> ``fc``. The residual add ties the channels of ``down1``, ``res_b`` into one group.
    """

    def __init__(self, num_classes: int = 10, widths: tuple[int, int, int] = (24, 48, 96)) -> None:
        super().__init__()
        a, b, c = widths
        self.stem = conv_bn(3, a)
        self.down1 = conv_bn(a, b, 2)
        self.res_a = conv_bn(b, b)
        self.res_b = conv_bn(b, b, relu=False)
        self.relu = nn.ReLU(inplace=True)
        self.down2 = conv_bn(b, c, 2)
        self.down3 = conv_bn(c, c, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down1(self.stem(x))
        x = self.relu(x + self.res_b(self.res_a(x)))
        x = self.down3(self.down2(x))
        return self.fc(torch.flatten(self.pool(x), 1))


# -------------------------------------------------------------------------- training


def train_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    data: Split,
    steps: int,
    batch_size: int,
    gen: torch.Generator,
    lr_at: Callable[[int], float],
    desc: str,
    extra_loss: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
    channels_last: bool = True,
) -> float:
    """Run ``steps`` SGD steps over reshuffled epochs of ``data``; returns the mean loss of the last 50.

    ``lr_at(i)`` is a multiplier applied to every param group's ``initial_lr``. ``extra_loss``
    is added to the cross-entropy (the mask-decay penalty); ``after_step`` runs after
    ``opt.step()`` (the mask-decay schedule step).
    """
    model.train()
    for g in opt.param_groups:
        g.setdefault("initial_lr", g["lr"])
    losses: list[float] = []
    it = iter(())
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False, dynamic_ncols=True,
               mininterval=1.0 if sys.stderr.isatty() else 30.0)  # fewer updates when logged to a file
    for i in bar:
        try:
            xb, yb = next(it)
        except StopIteration:
            it = batches(data, batch_size, shuffle=True, generator=gen, drop_last=True)
            xb, yb = next(it)
        xb = to_float(augment(xb, generator=gen), channels_last=channels_last)
        for g in opt.param_groups:
            g["lr"] = g["initial_lr"] * lr_at(i)
        loss = F.cross_entropy(model(xb), yb)
        total = loss + extra_loss() if extra_loss is not None else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if after_step is not None:
            after_step()
        losses.append(loss.item())
        if i % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    bar.close()
    tail = losses[-50:]
    return sum(tail) / max(1, len(tail))


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int = 500, channels_last: bool = True) -> float:
    """Top-1 accuracy (%) of ``model`` on ``data`` in eval mode."""
    model.eval()
    correct = 0
    for xb, yb in batches(data, batch_size):
        correct += int((model(to_float(xb, channels_last)).argmax(1) == yb).sum())
    return 100.0 * correct / len(data)


def cosine(total: int, warmup: int = 0, floor: float = 0.0) -> Callable[[int], float]:
    """LR multiplier: linear warm-up for ``warmup`` steps, then cosine from 1 to ``floor``."""

    def f(i: int) -> float:
        if i < warmup:
            return (i + 1) / warmup
        t = (i - warmup) / max(1, total - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def sgd(params: list[dict[str, Any]], lr: float) -> torch.optim.SGD:
    """SGD with Nesterov momentum 0.9 (weight decay set per param group)."""
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)


def train_teacher(args: argparse.Namespace, train: Split, out: Path) -> nn.Module:
    """Train the small CNN for ``args.epochs`` epochs with a warm-up + cosine LR.

    With ``--reuse-teacher``, a teacher saved by an earlier run with the same settings (``out/teacher.pt``, a plain
    state_dict) is loaded instead.
    """
    torch.manual_seed(args.seed)
    model = SmallCNN().to(memory_format=torch.channels_last)
    key = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "seed", "train_subset")}
    ckpt = out / "teacher.pt"
    if args.reuse_teacher and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=True)
        if saved.get("key") == key:
            model.load_state_dict(saved["state_dict"])
            log.info("teacher: reused %s", ckpt)
            return model
        log.info("teacher: %s was trained with other settings; training a new one", ckpt)
    steps = max(1, round(args.epochs * len(train) / args.batch_size))
    opt = sgd([{"params": list(model.parameters()), "weight_decay": 5e-4}], args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    loss = train_steps(model, opt, train, steps, args.batch_size, gen, cosine(steps, warmup=steps // 15), "teacher")
    log.info("teacher: %d steps (%.2f epochs), final train loss %.3f", steps, args.epochs, loss)
    torch.save({"key": key, "state_dict": model.state_dict()}, ckpt)
    return model


# ------------------------------------------------------------------------ mask decay


def make_regularizer(name: str, args: argparse.Namespace) -> Any:
    """The regularizer name itself (library defaults), or an instance when ``--strength NAME=VALUE`` was given."""
    if name not in args.strength:
        return name
    classes = {"sparsity": md.SparsityLoss, "l1": md.L1, "l2": md.L2, "bn": md.BNScaleL1, "group_lasso": md.GroupLasso}
    if name not in classes:
        raise SystemExit(f"--strength: regularizer {name!r} has no strength")
    return classes[name](strength=args.strength[name])


def _strength(text: str) -> tuple[str, float]:
    name, _, value = text.partition("=")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, e.g. l1=0.05, got {text!r}") from None


def mask_decay(
    teacher: nn.Module, regularizer: str, args: argparse.Namespace, train: Split, test: Split
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Decay a copy of ``teacher`` to ``args.macs`` of its MACs with ``regularizer``, export, fine-tune.

    Returns ``(student, decay.history, info)``.
    """
    model = copy.deepcopy(teacher)
    example = torch.randn(1, 3, 32, 32)

    # --- the mask-decay recipe -------------------------------------------------------
    masks = md.ChannelMasks(model, example, ignored_layers=[model.fc])
    plan = md.plan(masks, macs=args.macs, importance="l1")
    decay = md.MaskDecay(masks, plan, steps=args.steps, schedule="cosine", regularizer=make_regularizer(regularizer, args))
    # the masks are not in the optimizer: decay.step() updates them itself (mask_lr)
    opt = sgd([{"params": list(model.parameters()), "weight_decay": 5e-4}], args.decay_lr)
    gen = torch.Generator().manual_seed(args.seed + 1)  # same batches for every regularizer
    # constant LR while the masks decay: loss = task + decay.penalty(); opt.step(); decay.step()
    train_steps(model, opt, train, args.steps, args.decay_batch_size, gen, lambda i: 1.0,
                f"decay {regularizer:8s}", extra_loss=decay.penalty, after_step=decay.step)
    assert decay.done, "decay should be done after `steps` decay.step() calls"

    xcheck = to_float(test.x[:256])
    model.eval()
    with torch.no_grad():
        masked_out = model(xcheck)
    masked_acc = evaluate(model, test) if args.eval_masked else None
    student = md.export(model, masks, optimizer=opt)  # physically smaller; optimizer state remapped
    # ----------------------------------------------------------------------------------

    student.eval()
    with torch.no_grad():
        diff = (student(xcheck) - masked_out).abs().max().item() / masked_out.abs().max().item()
    log.info("%s: export vs masked model, max |diff| / max |out| = %.2e", regularizer, diff)
    export_acc = evaluate(student, test)

    # short fine-tune of the student with the same optimizer (its state survived export)
    if args.finetune_steps > 0:
        train_steps(student, opt, train, args.finetune_steps, args.batch_size, gen,
                    cosine(args.finetune_steps), f"tune  {regularizer:8s}")
    info = {
        "plan_ratio": plan.ratio,
        "plan_widths": plan.widths,
        "cut_jump": decay.history.get("cut_jump") or 0.0,
        "export_rel_max_abs_diff": diff,
        "masked_accuracy": masked_acc,
        "accuracy_after_export": export_acc,
    }
    return student, decay.history, info


# --------------------------------------------------------------------------- reporting


def measure(model: nn.Module, test: Split) -> dict[str, float]:
    """MACs and params per 1x3x32x32 image (``md.profile``) and test accuracy."""
    model = model.eval()
    rep = md.profile(model, torch.randn(1, 3, 32, 32), warmup=1, runs=1)
    return {"macs": float(rep.macs), "params": float(rep.params), "accuracy": evaluate(model, test)}


def latencies(models: dict[str, nn.Module], batch: int = 64, rounds: int = 5, runs: int = 5) -> dict[str, float]:
    """CPU latency (ms) of one eval forward pass at ``batch`` images, per model, with ``md.profile``.

    The models are timed in turns (``rounds`` x ``runs`` passes each) and the median is reported, so that a
    background load on a shared machine affects every model alike.
    """
    xb = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        for name, m in models.items():
            times[name].append(md.profile(m.eval(), xb, warmup=2 if r == 0 else 1, runs=runs).latency_ms)
    return {name: statistics.median(t) for name, t in times.items()}


def format_table(rows: dict[str, dict[str, Any]], teacher_macs: float) -> str:
    """Fixed-width text table of the result rows (teacher first)."""
    head = (f"{'method':<10} {'MACs':>8} {'rel':>5} {'params':>8} {'cut':>6} {'acc export':>10} {'acc final':>9} "
            f"{'latency b64':>11}")
    lines = [head, "-" * len(head)]
    for name, r in rows.items():
        after = r.get("accuracy_after_export")
        cut = r.get("cut_jump")
        lines.append(
            f"{name:<10} {r['macs'] / 1e6:>7.2f}M {r['macs'] / teacher_macs:>5.2f} {r['params'] / 1e3:>7.1f}k "
            f"{('-' if cut is None else f'{cut:.3f}'):>6} {('-' if after is None else f'{after:.2f}'):>10} "
            f"{r['accuracy']:>9.2f} {r['latency_ms_b64']:>8.1f} ms"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="../shared/data/cifar10", help="folder with train.tar and test.tar, or the official "
                   "python release (cifar-10-python.tar.gz or cifar-10-batches-py/, or a folder holding either)")
    p.add_argument("--out", default="runs/demo", help="output folder (plots, results.json, data cache)")
    p.add_argument("--epochs", type=float, default=1.5, help="teacher training epochs")
    p.add_argument("--steps", type=int, default=250, help="mask-decay steps per regularizer")
    p.add_argument("--finetune-steps", type=int, default=100, help="student fine-tune steps after export")
    p.add_argument("--batch-size", type=int, default=128, help="batch size of teacher training and fine-tune")
    p.add_argument("--decay-batch-size", type=int, default=64, help="batch size during mask decay")
    p.add_argument("--lr", type=float, default=0.1, help="teacher peak learning rate")
    p.add_argument("--decay-lr", type=float, default=0.02, help="learning rate during decay and fine-tune")
    p.add_argument("--macs", type=float, default=0.5, help="student MACs as a fraction of the teacher's")
    p.add_argument("--regularizers", nargs="+", default=list(REGULARIZERS), help="any of sparsity l1 l2 hard ...")
    p.add_argument("--strength", type=_strength, action="append", default=[], metavar="NAME=VALUE",
                   help="regularizer strength instead of the library default, e.g. --strength l1=0.05 (repeatable)")
    p.add_argument("--train-subset", type=int, default=None, help="use only this many training images")
    p.add_argument("--eval-masked", action="store_true", help="also evaluate the masked model before export")
    p.add_argument("--reuse-teacher", action="store_true", help="load OUT/teacher.pt if trained with the same settings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    args.strength = dict(args.strength)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    try:
        train, test = load_cifar10(args.data, cache_dir=out / "cache")
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"demo: error: {exc}") from None
    train = train.subset(args.train_subset, seed=args.seed)
    timings["data_s"] = time.perf_counter() - t_start
    log.info("data: %d train / %d test images (%s), torch %s, %d threads",
             len(train), len(test), test.note, torch.__version__, torch.get_num_threads())

    t0 = time.perf_counter()
    teacher = train_teacher(args, train, out)
    timings["teacher_s"] = time.perf_counter() - t0
    rows: dict[str, dict[str, Any]] = {"teacher": measure(teacher, test)}
    log.info("teacher: %.2f %% test accuracy", rows["teacher"]["accuracy"])

    histories: dict[str, Any] = {}
    models: dict[str, nn.Module] = {"teacher": teacher}
    for reg in args.regularizers:
        t0 = time.perf_counter()
        student, hist, info = mask_decay(teacher, reg, args, train, test)
        rows[reg] = {**measure(student, test), **info}
        models[reg] = student
        timings[f"{reg}_s"] = time.perf_counter() - t0
        histories[reg] = hist
        (out / reg).mkdir(exist_ok=True)
        (out / reg / "history.json").write_text(json.dumps(hist))  # `maskdecay plot runs/demo/<reg> ...` reads it
        log.info("%s: %.2f %% test accuracy after fine-tune (%.0f s)", reg, rows[reg]["accuracy"], timings[f"{reg}_s"])

    t0 = time.perf_counter()
    for name, ms in latencies(models).items():
        rows[name]["latency_ms_b64"] = ms
    timings["latency_s"] = time.perf_counter() - t0

    plots = []
    for reg, hist in histories.items():
        path = out / f"masks_{reg}.png"
        md.plots.mask_trajectories(hist, str(path))
        plots.append(path)
    if len(histories) > 1:
        path = out / "compare.png"
        md.plots.compare(histories, str(path))
        plots.append(path)
    timings["total_s"] = time.perf_counter() - t_start

    teacher_macs = rows["teacher"]["macs"]
    table = format_table(rows, teacher_macs)
    results = {
        "data": test.note,
        "args": vars(args),
        "rows": rows,
        "timings": timings,
        "histories": histories,
        "env": {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": platform.python_version(),
                "cpu_count": os.cpu_count()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    print()
    print(f"Mask decay to {args.macs:.0%} MACs on {test.note}; teacher {args.epochs:g} epochs, "
          f"{args.steps} decay + {args.finetune_steps} fine-tune steps per student.")
    print("MACs/params per 3x32x32 image. Top-1 accuracy (%) on the 10,000 test images: 'acc export' right "
          "after export, 'acc final' after the short fine-tune.")
    print("'cut' = largest removed mask set to 0 at the end of the decay (0 = the masks got there by themselves).")
    print(f"Latency: one eval forward pass, CPU, batch 64, {torch.get_num_threads()} threads, median of 25 "
          "(models timed in turns).")
    print(table)
    print("\nplots: " + ", ".join(str(p) for p in plots))
    print(f"results: {out / 'results.json'}; re-plot with: maskdecay plot "
          + " ".join(str(out / r) for r in histories) + f" -o {out / 'compare.png'}")
    print(f"total time: {timings['total_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
