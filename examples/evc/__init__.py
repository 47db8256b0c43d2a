"""EVC neural image codec (ICLR 2023 "EVC: Towards Real-Time Neural Image Compression with Mask Decay").

Our own implementation, state-dict compatible with the official inference code. Quick use::

    import evc
    model = evc.load_model("EVC_SS_MD.pth.tar")          # or evc.build_model("EVC_SS") for random weights
    x, _, _ = evc.load_image("kodim01.png")
    res = evc.compress(model, x, evc.select_rate(model, q=0.5))
    out = evc.decompress(model, res.data).x_hat
"""
from .bitstream import BitstreamError, Header
from .codec import (
    DecodeResult,
    EncodeResult,
    RateSpec,
    compress,
    decompress,
    load_image,
    reconstruct,
    save_image,
    select_rate,
    weights_hash,
)
from .models import (
    ARCHS,
    EVC,
    WIDTHS,
    CheckpointError,
    ScalableEVC,
    build_model,
    infer_config,
    load_model,
    save_model,
)

__all__ = [
    "ARCHS",
    "WIDTHS",
    "EVC",
    "ScalableEVC",
    "build_model",
    "load_model",
    "save_model",
    "infer_config",
    "CheckpointError",
    "BitstreamError",
    "Header",
    "RateSpec",
    "select_rate",
    "compress",
    "decompress",
    "reconstruct",
    "EncodeResult",
    "DecodeResult",
    "load_image",
    "save_image",
    "weights_hash",
]
