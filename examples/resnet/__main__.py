"""The ResNet/CIFAR-10 pruning example's command line:
``python -m maskdecay_examples.resnet {train,prune,study,study-report,report,speedup}``."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from .config import Config, ConfigError, load


def _config(args: argparse.Namespace) -> Config:
    cfg = load(args.config, args.set)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return cfg


# each command imports its modules when it runs: `--help` and config errors stay fast (no Torch-Pruning, no data code)
def _cmd_train(args: argparse.Namespace) -> None:
    from .pipeline import load_data
    from .training import teacher

    cfg = _config(args)
    train, test = load_data(cfg)
    _, info = teacher(cfg, train, test)
    print(f"teacher {cfg.model.arch}: {info['accuracy']:.2f} % test accuracy -> {info['checkpoint']}")


def _cmd_prune(args: argparse.Namespace) -> None:
    from .report import table
    from .pipeline import prune

    cfg = _config(args)
    results, plots = prune(cfg)
    print(table(results))
    print(f"\nresults: {cfg.out_dir / 'results.json'} (wall time {results['wall_seconds']:.0f} s)")
    print("plots:\n  " + "\n  ".join(plots))
    bad = [r["dir"] for r in results["runs"] if not r["reload_exact"]]
    if bad:
        raise ValueError(f"reloaded students did not reproduce their accuracy: {', '.join(bad)}")
    print("every saved student reloads (maskdecay.load_pruned / TP history replay) with exactly its accuracy")


def _cmd_study(args: argparse.Namespace) -> None:
    from . import study

    cfg = study.load_config(args.config, args.set)
    summary = study.run(cfg, args.stage)
    out = cfg.out_dir
    if summary is None:
        print(f"teacher: {out / 'teacher.pt'} (learning curve in {out / 'teacher.json'})")
        return
    print(f"{len(summary['finals'])} final runs in {out / 'summary.json'}; "
          f"tables and plots: python -m maskdecay_examples.resnet study-report {out}")


def _cmd_study_report(args: argparse.Namespace) -> None:
    from .study_report import main as report

    for name in ("batch", "rounds", "runs", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(report(Path(args.out), measure=not args.no_latency, batch=args.batch, rounds=args.rounds,
                 runs=args.runs, docs=Path(args.docs) if args.docs else None))


def _cmd_report(args: argparse.Namespace) -> None:
    from .report import redraw

    text, plots = redraw(Path(args.run_dir), as_markdown=args.markdown)
    print(text)
    print("plots:\n  " + "\n  ".join(plots))


def _cmd_speedup(args: argparse.Namespace) -> None:
    from .speedup import main

    main(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m maskdecay_examples.resnet", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name, fn, text in (("train", _cmd_train, "train (or reuse) the teacher of a config"),
                           ("prune", _cmd_prune, "teacher + every method at every budget: table, plots, JSON")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", required=True, help="YAML config (see examples/resnet/configs/)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set prune.decay_steps=500 (repeatable)")
        p.set_defaults(func=fn)
    st = sub.add_parser("study", help="the converged study: teacher, strength sweeps, finals, seeds (resumable)")
    st.add_argument("--config", required=True, help="YAML config (examples/resnet/configs/study.yaml)")
    st.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    st.add_argument("--stage", choices=("teacher", "all"), default="all", help="stop after the teacher, or run all")
    st.set_defaults(func=_cmd_study)
    sr = sub.add_parser("study-report", help="tables and plots of a study folder (writes OUT/report.md, OUT/plots/)")
    sr.add_argument("out", help="the study folder (out: of the study config)")
    sr.add_argument("--no-latency", action="store_true", help="skip the CPU latency measurement")
    sr.add_argument("--batch", type=int, default=64, help="images per timed forward pass")
    sr.add_argument("--rounds", type=int, default=7, help="latency rounds (every model once per round, in a "
                    "shuffled order); the median over the rounds is reported")
    sr.add_argument("--runs", type=int, default=3, help="timed forward passes per model and round")
    sr.add_argument("--threads", type=int, help="torch threads for the latency measurement (default: torch's)")
    sr.add_argument("--docs", metavar="PAGE", help="also put the tables and plots into this Markdown page, between "
                    "its '<!-- study-report:begin -->' and '<!-- study-report:end -->' lines")
    sr.set_defaults(func=_cmd_study_report)
    r = sub.add_parser("report", help="redraw the table and plots of a prune run folder")
    r.add_argument("run_dir")
    r.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    r.set_defaults(func=_cmd_report)
    from .speedup import add_arguments

    s = sub.add_parser("speedup", help="real CPU speed-up vs MAC reduction of a pruned ResNet")
    add_arguments(s)
    s.set_defaults(func=_cmd_speedup)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("maskdecay").setLevel(logging.WARNING)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"python -m maskdecay_examples.resnet: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
