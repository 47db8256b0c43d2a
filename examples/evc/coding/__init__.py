"""Coding: the ``.evc`` container, entropy coding, rate control and the coding loop (compress / decompress)."""
