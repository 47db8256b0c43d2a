"""``evc encode``, ``evc decode`` and ``evc info``: one image to a ``.evc`` stream and back, and a stream's header."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from ..coding.bitstream import unpack
from ..coding.codec import check_enc_id, compress, decompress
from ..coding.rate import select_rate
from ..fileio import atomic_write_bytes
from ..models.architectures import ARCH_CODES
from .common import (add_decoder_args, add_engine_args, add_model_args, add_rate_args, check_out, decoder_limits,
                     engine_from_args, read_bytes, resolve_model, setup_torch)
from .imageio import load_image, save_image

__all__ = ["add_parsers", "cmd_encode", "cmd_decode", "cmd_info"]


def add_parsers(sub: Any) -> None:
    """Register ``evc encode``, ``evc decode`` and ``evc info``."""
    p = sub.add_parser("encode", help="compress an image to a .evc file")
    p.add_argument("input")
    p.add_argument("output")
    add_model_args(p)
    add_rate_args(p)
    add_engine_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    p.set_defaults(handler=cmd_encode)

    p = sub.add_parser("decode", help="decompress a .evc file to an image (PNG)")
    p.add_argument("input")
    p.add_argument("output")
    add_model_args(p)
    add_decoder_args(p)
    add_engine_args(p)
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of text")
    p.set_defaults(handler=cmd_decode)

    p = sub.add_parser("info", help="print the header of a .evc file")
    p.add_argument("input")
    p.set_defaults(handler=cmd_info)


def cmd_encode(args: argparse.Namespace) -> int:
    """``evc encode INPUT OUTPUT``."""
    setup_torch(args)
    check_out(args.output)
    x, flags, note = load_image(args.input)
    if note:
        print(f"note: {note}", file=sys.stderr)
    model = resolve_model(args.model, args.arch, args.device)
    check_enc_id(model, args.enc_id)
    rate = select_rate(model, q=args.q, q_scale=args.q_scale, rate_index=args.rate_index)
    res = compress(model, x.to(args.device), rate, enc_id=args.enc_id, flags=flags,
                   engine=engine_from_args(args, model))
    atomic_write_bytes(args.output, res.data)
    size = os.path.getsize(args.output)
    info = {
        "input": args.input, "output": args.output, "model": model.name, "width": res.width, "height": res.height,
        "q_scale": rate.q_scale, "rate_index": None if rate.rate_index == 255 else rate.rate_index,
        "bytes": size, "bpp": size * 8 / (res.width * res.height),
        "estimated_bpp": res.est_bits / (res.width * res.height),
        "encoding_time": res.times["total"], "enc_choice": res.enc_choice,
    }
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{args.output}: {res.width}x{res.height} {model.name} q_scale={rate.q_scale:.6g} "
              f"{size} bytes {info['bpp']:.4f} bpp (estimated {info['estimated_bpp']:.4f}) "
              f"{res.times['total'] * 1000:.0f} ms")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    """``evc decode INPUT OUTPUT``."""
    setup_torch(args)
    check_out(args.output)
    data = read_bytes(args.input)
    unpack(data)  # fail fast on a corrupt stream, before loading the model
    model = resolve_model(args.model, args.arch, args.device)
    out = decompress(model, data, engine=engine_from_args(args, model), **decoder_limits(args))
    save_image(args.output, out.x_hat)
    h = out.header
    info = {"input": args.input, "output": args.output, "width": h.width, "height": h.height, "q_scale": h.q_scale,
            "bpp": len(data) * 8 / (h.width * h.height), "decoding_time": out.times["total"]}
    if args.json:
        print(json.dumps(info))
    else:
        print(f"{args.output}: {h.width}x{h.height} from {len(data)} bytes ({info['bpp']:.4f} bpp) "
              f"{out.times['total'] * 1000:.0f} ms")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """``evc info INPUT``: the header as one JSON line."""
    data = read_bytes(args.input)
    h, payload = unpack(data)
    inv = {v: k for k, v in ARCH_CODES.items()}
    print(json.dumps({"version": h.version, "arch": inv.get(h.arch_code, f"code {h.arch_code}"),
                      "weights_hash": h.weights_hash.hex(), "tables_crc": f"{h.tables_crc:08x}",
                      "width": h.width, "height": h.height, "q_scale": h.q_scale,
                      "rate_index": None if h.rate_index == 255 else h.rate_index, "flags": h.flags,
                      "payload_bytes": len(payload), "bytes": len(data),
                      "bpp": len(data) * 8 / (h.width * h.height)}))
    return 0
