"""Compressors with exact byte accounting: identity, top-k, rand-k, QSGD, scaled sign.

Each is a small object with one contract (:class:`~fedsparse.compress.base.Compressor`):
``compress(flat vector) -> payload`` (named numpy arrays, what crosses the wire),
``decompress(payload, d) -> vector`` (validating the payload), ``payload_bytes(payload)``.
A scenario names one in a ``[... .compressor]`` section; :data:`CompressorConfig` is the
union of their parameter models, told apart by ``name``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from pydantic import Field

from fedsparse.compress.base import Compressor, CompressorSpec, Payload, payload_bytes
from fedsparse.compress.identity import Identity, IdentitySpec
from fedsparse.compress.qsgd import QSGD, QSGDSpec
from fedsparse.compress.randk import RandK, RandKSpec
from fedsparse.compress.sign import ScaledSign, ScaledSignSpec
from fedsparse.compress.topk import TopK, TopKSpec

CompressorConfig = Annotated[IdentitySpec | TopKSpec | RandKSpec | QSGDSpec | ScaledSignSpec,
                             Field(discriminator="name")]

__all__ = ["CONTRACTIVE", "UNBIASED", "Compressor", "CompressorConfig", "CompressorSpec",
           "Payload", "build_compressor", "of_kind", "payload_bytes"]

# E[C(v)] = v (rescaled by d/k or ||v||/s, so E||C(v) - v||^2 = omega ||v||^2 with omega
# up to d/k - 1): the compressors SCALLION needs.
UNBIASED = ("identity", "randk", "qsgd")
# ||C(v) - v||^2 <= (1 - delta) ||v||^2 for some delta > 0: the compressors an error-feedback
# scheme needs (SCAFCOM, the compressed downlink); a rescaled one makes it diverge.
CONTRACTIVE = ("identity", "topk", "sign")


def of_kind(spec: CompressorSpec, kind: tuple[str, ...], who: str, adjective: str,
            why: str) -> CompressorSpec:
    """``spec`` if its compressor is one of ``kind`` (UNBIASED or CONTRACTIVE), else a
    ValueError: ``<who> needs <adjective> compressor (<kind>), not '<name>'<why>``."""
    if spec.name not in kind:
        raise ValueError(f"{who} needs {adjective} compressor ({', '.join(kind)}), not "
                         f"{spec.name!r}{why}")
    return spec


def build_compressor(spec: CompressorSpec, segments: Sequence[int] = ()) -> Compressor:
    """The compressor a spec describes; ``segments`` are the tensor sizes (per-tensor top-k)."""
    if isinstance(spec, TopKSpec):
        return TopK(spec, segments)
    classes = {IdentitySpec: Identity, RandKSpec: RandK, QSGDSpec: QSGD,
               ScaledSignSpec: ScaledSign}
    return classes[type(spec)](spec)
