"""Seeded fuzzing of the EVC decoder with corrupted streams, through the command line or through the API.

* :func:`run_fuzz` runs the real CLI entry point (in-process) on corrupted copies of a valid stream and checks: no
  exception escapes, the exit status is non-zero with exactly one line on stderr (or zero with a complete output
  image for corruptions that keep the stream valid), and no output or temporary file is left behind on failure.
* :func:`run_api_fuzz` calls :func:`~maskdecay_examples.evc.coding.codec.decompress` with its default limits on
  each corrupted stream and records, per case, the outcome (decoded, or the exception type and message class), the
  time (a case over ``timeout`` seconds is a hang, interrupted by a timer) and the process's peak resident memory
  during the case (Linux ``VmHWM``, reset before each case), which must stay under the decoder's default memory
  limit. :func:`main` runs it in worker processes (a worker that dies is a crash) and writes a JSON report.

Usage: ``python -m maskdecay_examples.evc.cli.fuzz --cases 20000 [--seed 0] [--workers 1] [--json report.json]``
(``--cli`` fuzzes the ``evc decode`` command instead of the API).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from ..coding.bitstream import BitstreamError
from ..coding.codec import MAX_DECODE_MEMORY, compress, decompress
from ..coding.rate import select_rate
from ..models.zoo import build_model, load_model, save_model
from ...hostinfo import cpu_features, cpu_name
from ..fileio import atomic_write_bytes
from .main import main as cli_main

__all__ = ["FuzzReport", "ApiFuzzReport", "make_fixture", "corrupt", "run_fuzz", "run_api_fuzz", "main"]


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
                       "payload_crcfixed", "payload_crcfixed", "size_crcfixed", "extend", "empty", "prefix",
                       "huge_header", "payload_words"])
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
    elif kind == "prefix":  # garbage before a stream
        b = bytearray(rng.randrange(256) for _ in range(rng.randint(1, 64))) + b
    elif kind == "huge_header":  # a valid header declaring a large image, a short payload, CRC recomputed
        side = rng.choice([(2048, 2048), (8192, 8192), (65536, 4096), (4096, 3000), (1, 65536)])
        keep = rng.choice([0, 4, 16, len(b) - 40])
        plen = keep - keep % 4
        b = b[:19] + struct.pack(">II", *side) + b[27:32] + struct.pack(">I", plen) + b[36:36 + plen] + bytes(4)
        b = _fix_crc(b)
    elif kind == "payload_words":  # the payload replaced by random or all-zero words, CRC recomputed
        n = (len(b) - 40) // 4
        words = bytes(4 * n) if rng.random() < 0.3 else bytes(rng.randrange(256) for _ in range(4 * n))
        b[36:36 + 4 * n] = words
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


@dataclass
class ApiFuzzReport:
    """Outcome of a :func:`run_api_fuzz` run: counts, the worst case per measure, and every unexpected case."""

    cases: int = 0
    seed: int = 0
    kinds: Counter = field(default_factory=Counter)
    outcomes: Counter = field(default_factory=Counter)
    exception_types: Counter = field(default_factory=Counter)
    non_bitstream_errors: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)
    max_case_seconds: float = 0.0
    max_case_peak_rss: int = 0
    peak_rss_method: str = "VmHWM reset per case"
    over_memory_limit: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def ok(self) -> bool:
        """No crash, no hang, only ``BitstreamError`` failures, every case under the memory limit."""
        return not (self.non_bitstream_errors or self.hangs or self.crashes or self.over_memory_limit)

    def merge(self, other: dict[str, Any]) -> None:
        """Add a worker's :meth:`to_dict` to this report."""
        self.cases += other["cases"]
        for name in ("kinds", "outcomes", "exception_types"):
            getattr(self, name).update(other[name])
        for name in ("non_bitstream_errors", "hangs", "crashes", "over_memory_limit"):
            getattr(self, name).extend(other[name])
        self.max_case_seconds = max(self.max_case_seconds, other["max_case_seconds"])
        self.max_case_peak_rss = max(self.max_case_peak_rss, other["max_case_peak_rss"])
        self.peak_rss_method = other["peak_rss_method"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (failure lists cut to 50 entries each)."""
        out: dict[str, Any] = {
            "cases": self.cases, "seed": self.seed, "kinds": dict(sorted(self.kinds.items())),
            "outcomes": dict(self.outcomes.most_common()), "exception_types": dict(self.exception_types),
            "max_case_seconds": self.max_case_seconds, "max_case_peak_rss": self.max_case_peak_rss,
            "peak_rss_method": self.peak_rss_method, "memory_limit": MAX_DECODE_MEMORY, "seconds": self.seconds}
        for name in ("non_bitstream_errors", "hangs", "crashes", "over_memory_limit"):
            out[name] = getattr(self, name)[:50]
            out[f"{name}_count"] = len(getattr(self, name))
        return out


class _Hang(Exception):
    """Raised by the per-case timer."""


def _on_alarm(signum: int, frame: object) -> None:
    raise _Hang()


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark of this process (Linux ``clear_refs``); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss() -> int:
    """This process's peak resident memory in bytes (``VmHWM``), 0 where unknown."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_api_fuzz(cases: int, seed: int = 0, start: int = 0, timeout: float = 10.0,
                 workdir: str | None = None) -> ApiFuzzReport:
    """Decode cases ``start .. start + cases - 1`` of the seeded sequence with :func:`decompress` and its default
    limits (case n's corruption depends only on ``seed`` and n, so runs can be split across processes)."""
    rep = ApiFuzzReport(seed=seed)
    with tempfile.TemporaryDirectory(prefix="evc_fuzz_") if workdir is None else contextlib.nullcontext(workdir) \
            as tmp:
        ck, other, _, data = make_fixture(tmp, seed)
        models = {"own": load_model(ck), "other": load_model(other)}
    old = signal.signal(signal.SIGALRM, _on_alarm)
    per_case_peak = _reset_peak()
    if not per_case_peak:
        rep.peak_rss_method = "process peak (VmHWM could not be reset)"
    t_start = time.perf_counter()
    try:
        for n in range(start, start + cases):
            rng = random.Random(f"{seed}:{n}")
            kind, bad = corrupt(data, rng)
            model = models["own"]
            if kind == "model" and rng.random() < 0.3:
                bad, model = data, models["other"]  # right stream, wrong checkpoint
            if per_case_peak:
                _reset_peak()
            t0 = time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, timeout)
            try:
                decompress(model, bad)
                outcome = "decoded"
            except _Hang:
                outcome = "hang"
                rep.hangs.append(f"case {n} ({kind}): over {timeout} s")
            except BitstreamError as e:
                outcome = _classify("evc: error: " + str(e))
                rep.exception_types["BitstreamError"] += 1
            except Exception as e:  # noqa: BLE001 - the finding the fuzzer looks for
                outcome = f"{type(e).__name__}"
                rep.exception_types[type(e).__name__] += 1
                rep.non_bitstream_errors.append(f"case {n} ({kind}): {type(e).__name__}: {str(e)[:200]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
            dt = time.perf_counter() - t0
            peak = _peak_rss()
            if peak > MAX_DECODE_MEMORY:
                rep.over_memory_limit.append(f"case {n} ({kind}): peak {peak / 2 ** 30:.2f} GiB")
            rep.max_case_seconds = max(rep.max_case_seconds, dt)
            rep.max_case_peak_rss = max(rep.max_case_peak_rss, peak)
            rep.outcomes[outcome] += 1
            rep.kinds[kind] += 1
            rep.cases += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    rep.seconds = time.perf_counter() - t_start
    return rep


def _run_workers(cases: int, seed: int, workers: int, chunk: int, timeout: float) -> ApiFuzzReport:
    """Split the cases into chunks, each run by a fresh worker process; a worker that dies is a crash."""
    rep = ApiFuzzReport(seed=seed)
    t0 = time.perf_counter()
    todo = [(s, min(chunk, cases - s)) for s in range(0, cases, chunk)]
    running: list[tuple[int, int, subprocess.Popen]] = []
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    bar = tqdm(total=cases, desc="fuzz", unit="case", file=sys.stderr)
    while todo or running:
        while todo and len(running) < workers:
            s, n = todo.pop(0)
            cmd = [sys.executable, "-m", f"{__package__}.fuzz", "--worker", "--cases", str(n), "--start", str(s),
                   "--seed", str(seed), "--timeout", str(timeout)]
            running.append((s, n, subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)))
        s, n, proc = running.pop(0)
        out, _ = proc.communicate()
        if proc.returncode != 0:
            rep.crashes.append(f"worker for cases {s}..{s + n - 1} died (exit status {proc.returncode})")
            rep.cases += n
        else:
            rep.merge(json.loads(out.strip().splitlines()[-1]))
        bar.update(n)
    bar.close()
    rep.seconds = time.perf_counter() - t0
    return rep


def _host() -> dict[str, Any]:
    return {"cpu": cpu_name(), "vector_extensions": cpu_features(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": 1}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: run the fuzzer, print a summary (and write ``--json``); exit 1 on any failure."""
    ap = argparse.ArgumentParser(prog="python -m maskdecay_examples.evc.cli.fuzz",
                                 description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--cases", type=int, default=20000, help="number of corrupted streams (default 20000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="worker processes (API mode; default 1)")
    ap.add_argument("--chunk", type=int, default=2000, help="cases per worker process (API mode)")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds after which a case counts as a hang")
    ap.add_argument("--json", dest="json_out", default=None, help="write the report to this JSON file")
    ap.add_argument("--cli", action="store_true", help="fuzz the 'evc decode' command instead of the API")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.cases < 1 or args.workers < 1 or args.chunk < 1 or not args.timeout > 0:
        ap.error("--cases, --workers, --chunk and --timeout must be positive")
    torch.set_num_threads(1)
    if args.worker:
        print(json.dumps(run_api_fuzz(args.cases, args.seed, args.start, args.timeout).to_dict()))
        return 0
    if args.cli:
        rep = run_fuzz(args.cases, args.seed, progress=True)
        print(f"{rep.cases} cases in {rep.seconds:.1f} s, {len(rep.failures)} failures")
        print("kinds:", dict(sorted(rep.kinds.items())))
        print("outcomes:", dict(rep.outcomes.most_common()))
        for f in rep.failures[:20]:
            print("FAIL", f)
        return 0 if rep.ok() else 1
    api = _run_workers(args.cases, args.seed, args.workers, args.chunk, args.timeout)
    doc = {"command": "python -m maskdecay_examples.evc.cli.fuzz " + " ".join(argv if argv is not None
                                                                              else sys.argv[1:]),
           "host": _host(), **api.to_dict(), "rate_cases_per_s": api.cases / max(api.seconds, 1e-9),
           "ok": api.ok()}
    if args.json_out:
        atomic_write_bytes(args.json_out, (json.dumps(doc, indent=1) + "\n").encode())
    print(f"{api.cases} cases in {api.seconds:.0f} s ({doc['rate_cases_per_s']:.1f}/s): {len(api.crashes)} crashes, "
          f"{len(api.hangs)} hangs, {len(api.non_bitstream_errors)} non-BitstreamError exceptions, "
          f"{len(api.over_memory_limit)} over the memory limit; slowest case {api.max_case_seconds:.2f} s, "
          f"peak memory {api.max_case_peak_rss / 2 ** 20:.0f} MiB (limit {MAX_DECODE_MEMORY / 2 ** 20:.0f} MiB)")
    print("outcomes:", json.dumps(dict(api.outcomes.most_common())))
    for f in (api.crashes + api.hangs + api.non_bitstream_errors + api.over_memory_limit)[:20]:
        print("FAIL", f)
    return 0 if api.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
