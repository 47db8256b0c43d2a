"""Seeded fuzzing of ``evc decode`` with corrupted streams.

Every case runs the real CLI entry point (in-process) on a corrupted copy of a valid stream and checks: no
exception escapes, the exit status is non-zero with exactly one line on stderr (or zero with a complete output
image for corruptions that keep the stream valid), and no output or temporary file is left behind on failure.

Usage: ``python -m maskdecay_examples.evc.cli.fuzz --cases 20000 [--seed 0] [--workdir DIR]``
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import random
import re
import struct
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from ..coding.codec import compress
from ..coding.rate import select_rate
from ..models.zoo import build_model, save_model
from .main import main as cli_main

__all__ = ["FuzzReport", "make_fixture", "corrupt", "run_fuzz", "main"]


@dataclass
class FuzzReport:
    """Outcome counts of a fuzz run."""

    cases: int = 0
    kinds: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def ok(self) -> bool:
        return not self.failures


def make_fixture(workdir: str, seed: int = 0) -> tuple[str, str, str, bytes]:
    """Write a tiny random-weights checkpoint, a second (different) one and a valid stream; returns
    (ckpt, other_ckpt, stream_path, stream_bytes)."""
    torch.manual_seed(seed)
    m = build_model("mini_EVC_SS")
    ck = os.path.join(workdir, "mini.pt")
    save_model(m, ck)
    torch.manual_seed(seed + 1)
    other = os.path.join(workdir, "other.pt")
    save_model(build_model("mini_EVC_SS"), other)
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, 40, 72, generator=g)
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    res = compress(m, x, select_rate(m, rate_index=3))
    sp = os.path.join(workdir, "good.evc")
    with open(sp, "wb") as f:
        f.write(res.data)
    return ck, other, sp, res.data


def _fix_crc(b: bytearray) -> bytearray:
    body = bytes(b[:-4])
    b[-4:] = struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)
    return b


def corrupt(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """One seeded corruption of a valid stream: (kind, bytes)."""
    b = bytearray(data)
    kind = rng.choice(["bitflip", "bitflip", "truncate", "truncate", "bytes", "magic", "version", "model",
                       "payload_crcfixed", "payload_crcfixed", "size_crcfixed", "extend", "empty"])
    if kind == "bitflip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b) * 8)
            b[i // 8] ^= 1 << (i % 8)
    elif kind == "truncate":
        b = b[: rng.randrange(len(b))]
    elif kind == "bytes":
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == "magic":
        b[rng.randrange(4)] ^= rng.randint(1, 255)
    elif kind == "version":
        b[4] = rng.choice([0, 2, 3, 255])
        if rng.random() < 0.5:
            b = _fix_crc(b)
    elif kind == "model":
        i = rng.randrange(6, 19)  # arch code, weights hash, tables crc
        b[i] ^= rng.randint(1, 255)
        b = _fix_crc(b)
    elif kind == "payload_crcfixed":
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(36, len(b) - 4)
            b[i] ^= 1 << rng.randrange(8)
        b = _fix_crc(b)
    elif kind == "size_crcfixed":
        off = rng.choice([19, 23, 27, 32])  # height, width, q_scale, payload length
        b[off:off + 4] = struct.pack(">I", rng.choice([0, 1, 7, 65, 1 << 15, 1 << 16, 1 << 20, 0xFFFFFFFF,
                                                        rng.randrange(1 << 32)]))
        b = _fix_crc(b)
    elif kind == "extend":
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif kind == "empty":
        b = bytearray()
    return kind, bytes(b)


def _classify(msg: str) -> str:
    body = msg.split(":", 2)[2] if msg.count(":") >= 2 else msg
    body = body.split("(")[0]
    body = re.sub(r"\b[0-9a-f]{16}\b", "H", body)
    return "error: " + re.sub(r"[0-9][0-9x.e+-]*", "N", body).strip()[:50]


def run_fuzz(cases: int, seed: int = 0, workdir: str | None = None, progress: bool = False,
             time_limit_per_case: float = 10.0, max_pixels: int = 1 << 16) -> FuzzReport:
    """Run ``cases`` corrupted decodes through the ``evc`` command's :func:`~.main.main`; see the module docstring
    for the checks."""
    rep = FuzzReport()
    rng = random.Random(seed)
    own = workdir is None
    tmp = tempfile.mkdtemp(prefix="evc_fuzz_") if own else workdir
    assert tmp is not None
    try:
        ck, other, _, data = make_fixture(tmp, seed)
        t_start = time.perf_counter()
        bar = None
        if progress:
            bar = tqdm(total=cases, desc="fuzz", unit="case", file=sys.stderr)
        for n in range(cases):
            kind, bad = corrupt(data, rng)
            model = ck
            if kind == "model" and rng.random() < 0.3:
                bad, model = data, other  # right stream, wrong checkpoint
            inp = os.path.join(tmp, "in.evc")
            out = os.path.join(tmp, "out.png")
            with open(inp, "wb") as f:
                f.write(bad)
            if os.path.exists(out):
                os.unlink(out)
            err, so = io.StringIO(), io.StringIO()
            t0 = time.perf_counter()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(so):
                    rc = cli_main(["decode", inp, out, "--model", model, "--threads", "1",
                                   "--max-pixels", str(max_pixels)])
            except BaseException as e:  # noqa: BLE001
                rep.failures.append(f"case {n} ({kind}): exception escaped: {type(e).__name__}: {e}")
                rc = -1
            dt = time.perf_counter() - t0
            lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
            leftovers = [f for f in os.listdir(tmp) if f.endswith(".tmp")]
            if leftovers:
                rep.failures.append(f"case {n} ({kind}): temporary files left: {leftovers}")
                for f in leftovers:
                    os.unlink(os.path.join(tmp, f))
            if dt > time_limit_per_case:
                rep.failures.append(f"case {n} ({kind}): took {dt:.1f} s")
            if rc == 0:
                rep.outcomes["decoded"] += 1
                if not os.path.isfile(out):
                    rep.failures.append(f"case {n} ({kind}): rc 0 but no output")
            elif rc > 0:
                msg = lines[0] if lines else ""
                rep.outcomes[_classify(msg)] += 1
                if len(lines) != 1 or not lines[0].startswith("evc: error:"):
                    rep.failures.append(f"case {n} ({kind}): stderr not one 'evc: error:' line: {lines[:3]}")
                if os.path.exists(out):
                    rep.failures.append(f"case {n} ({kind}): partial output left after failure")
            rep.kinds[kind] += 1
            rep.cases += 1
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        rep.seconds = time.perf_counter() - t_start
    finally:
        if own:
            for f in os.listdir(tmp):
                os.unlink(os.path.join(tmp, f))
            os.rmdir(tmp)
    return rep


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: run the fuzzer and print a summary; exit 1 on any failure."""
    ap = argparse.ArgumentParser(prog="python -m maskdecay_examples.evc.cli.fuzz", description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rep = run_fuzz(args.cases, args.seed, progress=True)
    print(f"{rep.cases} cases in {rep.seconds:.1f} s, {len(rep.failures)} failures")
    print("kinds:", dict(sorted(rep.kinds.items())))
    print("outcomes:", dict(rep.outcomes.most_common()))
    for f in rep.failures[:20]:
        print("FAIL", f)
    return 0 if rep.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
