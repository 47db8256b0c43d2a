"""What the ``evc`` commands share: the one-line error type and parser, argument types, the common argument groups,
and model and engine resolution with small in-process caches."""
from __future__ import annotations

import argparse
import math
import os
from typing import Any

import numpy as np
import torch

from ..coding.bitstream import q_scale_error
from ..coding.codec import MAX_DECODE_MEMORY, MAX_DECODE_PIXELS
from ..engines.base import Engine, state_key
from ..engines.fast import DTYPES, FastEngine
from ..models.architectures import ARCHS, EVC
from ..models.zoo import build_model, load_model

__all__ = ["CLIError", "Parser", "parse_size", "unit_float", "pos_float", "resolve_model", "check_cuda_graphs",
           "setup_torch", "engine_from_args", "read_bytes", "check_out", "add_model_args", "add_engine_args",
           "add_rate_args", "add_decoder_args", "decoder_limits"]


class CLIError(Exception):
    """A user-facing error (one line)."""


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line (``evc: error: ...``), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"evc: error: {message} (see '{self.prog} --help')\n")


def parse_size(s: str) -> tuple[int, int]:
    """``WxH`` (e.g. ``768x512``) as (width, height), both positive."""
    try:
        w, h = s.lower().split("x")
        w, h = int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 768x512, got {s!r}") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return w, h


def unit_float(s: str) -> float:
    """A number in [0, 1] (``--q``)."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"--q must be in [0, 1], got {v}")
    return v


def _positive(s: str, option: str) -> float:
    """``s`` as a finite positive number, or an argparse error naming ``option``."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {s!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise argparse.ArgumentTypeError(f"{option} must be a positive number, got {s}")
    return v


def pos_float(s: str) -> float:
    """A finite positive number in the shared q_scale range (``--q-scale``)."""
    v = _positive(s, "--q-scale")
    err = q_scale_error(float(np.float32(v)))
    if err is not None:
        raise argparse.ArgumentTypeError(f"--q-scale: {err}")
    return v


#: in-process cache of loaded checkpoints (matters only when main() is called repeatedly, e.g. by the fuzzer)
_MODEL_CACHE: dict[tuple, EVC] = {}


def resolve_model(spec: str, arch: str | None, device: str) -> EVC:
    """Load ``spec`` (a checkpoint path, or ``random:ARCH[:SEED]`` for random weights)."""
    if spec.startswith("random:"):
        parts = spec.split(":")
        name = parts[1] if len(parts) > 1 and parts[1] else (arch or "EVC_SS")
        seed = int(parts[2]) if len(parts) > 2 else 0
        torch.manual_seed(seed)
        return build_model(name).to(device).eval()
    key = None
    try:
        st = os.stat(spec)
        key = (os.path.abspath(spec), st.st_mtime_ns, st.st_size, arch, device)
    except OSError:
        pass
    if key is not None and key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    if key is None:  # no such file: say what --model accepts instead
        base = os.path.basename(spec).split(".")[0].removesuffix("_MD").removesuffix("_MDRRL")
        guess = base if base in ARCHS or base.removeprefix("mini_") in ARCHS else "EVC_SS"
        raise CLIError(f"{spec}: no such checkpoint file; for random weights use --model random:{guess}; the official "
                       "checkpoints (e.g. EVC_SS_MD.pth.tar) are linked from checkpoints/download.py of the official "
                       "code (github.com/microsoft/DCVC, DCVC-family/EVC), see docs/evc_codec.md")
    model = load_model(spec, arch=arch, device=device)
    if key is not None:
        if len(_MODEL_CACHE) >= 2:
            _MODEL_CACHE.pop(next(iter(_MODEL_CACHE)))
        _MODEL_CACHE[key] = model
    return model


def setup_torch(args: argparse.Namespace) -> None:
    """Apply ``--threads`` and check that a requested CUDA device exists."""
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            raise CLIError("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    dev = getattr(args, "device", "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"device {dev} requested but CUDA is not available")


def check_cuda_graphs(cuda_graphs: bool, device: Any) -> None:
    """``--cuda-graphs`` only with a CUDA device (shared by the codec commands and ``evc bench``)."""
    if cuda_graphs and not str(device).startswith("cuda"):
        raise CLIError("--cuda-graphs needs --device cuda")


#: in-process cache of fast engines (building one quantises all exact weights; matters for repeated main() calls)
_ENGINE_CACHE: dict[tuple, FastEngine] = {}


def engine_from_args(args: argparse.Namespace, model: EVC) -> Engine | None:
    """The inference engine asked for on the command line: a :class:`FastEngine` unless ``--reference`` (None: the
    codec's default reference engine)."""
    if args.reference:
        if args.dtype != "fp32" or args.cuda_graphs:
            raise CLIError("--dtype and --cuda-graphs apply to the fast path, not to --reference")
        return None
    check_cuda_graphs(args.cuda_graphs, getattr(args, "device", "cpu"))
    key = (id(model), args.dtype, args.cuda_graphs)
    eng = _ENGINE_CACHE.get(key)
    if eng is None or eng.model is not model or eng.key != state_key(model):
        if len(_ENGINE_CACHE) >= 2:
            _ENGINE_CACHE.pop(next(iter(_ENGINE_CACHE)))
        eng = _ENGINE_CACHE[key] = FastEngine(model, dtype=DTYPES[args.dtype], cuda_graphs=args.cuda_graphs)
    return eng


def read_bytes(path: str) -> bytes:
    """The contents of ``path``, or a one-line :class:`CLIError`."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CLIError(f"{path}: cannot read ({e.strerror or e})") from None


def check_out(path: str) -> None:
    """Fail early, before any work, when the folder of an output file does not exist."""
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise CLIError(f"{path}: output folder {d} does not exist")


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--model``, ``--arch``, ``--device``, ``--threads``."""
    p.add_argument("--model", required=required,
                   help="checkpoint path (official or ours), or random:ARCH[:SEED] for random weights")
    p.add_argument("--arch", default=None, help="architecture name (default: inferred from the checkpoint)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """``--reference``, ``--dtype``, ``--cuda-graphs``, ``--low-memory``."""
    p.add_argument("--reference", action="store_true",
                   help="plain path (eager float32 modules, exact float64 twins) instead of the fast path (same "
                        "entropy parameters; see docs/performance.md)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="fast path: precision of the float transforms (entropy parameters stay exact): fp16/bf16 on "
                        "GPUs, bf16 also on CPUs with AVX512_BF16 or AMX (elsewhere emulated and slower; a warning says "
                        "so)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="fast path on CUDA: capture every network once per image size and replay it (pays off "
                        "from a few images of one size on, e.g. in eval)")
    p.add_argument("--low-memory", action="store_true",
                   help="let the C heap return freed memory instead of keeping it for reuse: lower peak memory for "
                        "large images, slower on the CPU")


def add_rate_args(p: argparse.ArgumentParser) -> None:
    """``--q`` | ``--q-scale`` | ``--rate-index``, and ``--enc-id``."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--q", type=unit_float, help="rate in [0,1]: 0 = lowest-rate anchor, 1 = highest (default 1)")
    g.add_argument("--q-scale", type=pos_float, help="explicit q_scale in [2^-20, 2^20]")
    g.add_argument("--rate-index", type=int, help="anchor index 0..3")
    p.add_argument("--enc-id", type=int, default=None,
                   help="scalable models: use encoders 0..ENC_ID only (default: all, RD choice)")


def gib(s: str) -> float:
    """A positive number of GiB (``--max-memory``)."""
    return _positive(s, "--max-memory (GiB)")


def pos_int(s: str) -> int:
    """A positive integer (``--max-pixels``, ``--limit``)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def add_decoder_args(p: argparse.ArgumentParser) -> None:
    """``--exact-synthesis`` (``--fast-synthesis``, the default, stays accepted), ``--max-pixels``,
    ``--max-memory``."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--exact-synthesis", action="store_true",
                   help="draw the picture with the exact float64 synthesis: the image is then identical bit for bit "
                        "on every machine, thread count and engine (conformance; about 2x slower decode on CPU). "
                        "Default: the float32 synthesis (the decoded latents are exact either way; the image may "
                        "differ in the last bit between machines)")
    g.add_argument("--fast-synthesis", action="store_true",
                   help="the float32 synthesis (the default; accepted for older scripts)")
    p.add_argument("--max-pixels", type=pos_int, default=MAX_DECODE_PIXELS,
                   help=f"refuse streams declaring more pixels than this (default {MAX_DECODE_PIXELS})")
    p.add_argument("--max-memory", type=gib, default=MAX_DECODE_MEMORY / 2 ** 30, metavar="GIB",
                   help="refuse streams whose estimated decoding memory exceeds this many GiB "
                        f"(default {MAX_DECODE_MEMORY / 2 ** 30:g})")


def decoder_limits(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`decompress` that :func:`add_decoder_args` sets."""
    return {"max_pixels": args.max_pixels, "max_memory": int(args.max_memory * 2 ** 30),
            "exact_synthesis": bool(args.exact_synthesis)}
