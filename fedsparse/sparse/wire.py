"""A sparse model on the wire: values at the mask's positions, positions coded compactly.

Down (server -> client), per masked weight ``name``: ``name`` holds the active values
(float32, row-major order) and ``name.idx.<scheme>`` the active positions, in the cheapest
of the index encodings of ``fedsparse/compress/indices.py`` (plain, LEB128 delta, bitmap);
every other tensor travels dense. Up (client -> server), the mask is the one the server
sent, so a masked weight is its values alone: no positions cross the wire twice.
Everything decoded is validated (keys, lengths, dtypes, finiteness, index coding) and a
bad payload raises ``PayloadError``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedsparse.compress import indices
from fedsparse.payload import PayloadError, check_dense


def _positions(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask.ravel())


def encode_model(state: Mapping[str, np.ndarray],
                 masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model with its masked weights as (values, coded positions)."""
    out = {}
    for name, value in state.items():
        if name in masks:
            idx = _positions(masks[name])
            out[name] = value.ravel()[idx].astype(np.float32)
            key, coded = indices.encode(idx, value.size)
            out[f"{name}.{key}"] = coded
        else:
            out[name] = value
    return out


def decode_model(arrays: Mapping[str, np.ndarray], template: Mapping[str, np.ndarray]
                 ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """``(dense state, masks)`` from :func:`encode_model`'s arrays."""
    masks = decode_positions(arrays, template)
    values = {k: v for k, v in arrays.items() if f".{indices.KEY}." not in k}
    return decode_values(values, template, masks), masks


def encode_positions(masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each mask as its coded active positions alone (``name.idx.<scheme>``)."""
    out = {}
    for name, mask in masks.items():
        key, coded = indices.encode(_positions(mask), mask.size)
        out[f"{name}.{key}"] = coded
    return out


def decode_positions(arrays: Mapping[str, np.ndarray],
                     template: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Boolean masks from :func:`encode_positions`'s arrays, for the names in ``template``."""
    unknown = sorted(k for k in arrays if f".{indices.KEY}." in k
                     and k.split(f".{indices.KEY}.")[0] not in template)
    if unknown:
        raise PayloadError(f"positions for unknown arrays {unknown}")
    masks = {}
    for name, ref in template.items():
        if not any(k.startswith(f"{name}.{indices.KEY}.") for k in arrays):
            continue
        scheme, coded = indices.find(dict(arrays), f"{name}.")
        mask = np.zeros(ref.size, bool)
        mask[indices.decode(scheme, coded, ref.size)] = True
        masks[name] = mask.reshape(ref.shape)
    return masks


def encode_values(state: Mapping[str, np.ndarray],
                  masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The model with masked weights reduced to their values at the (shared) mask."""
    return {name: value.ravel()[_positions(masks[name])] if name in masks else value
            for name, value in state.items()}


def scatter(values: np.ndarray | None, mask: np.ndarray, name: str) -> np.ndarray:
    """Dense tensor of ``mask``'s shape with ``values`` at its active positions, zero elsewhere."""
    active = int(mask.sum())
    if values is None:
        raise PayloadError(f"{name}: values missing")
    if values.ndim != 1 or values.size != active:
        raise PayloadError(f"{name}: {values.size} values in shape {values.shape}; "
                           f"the mask has {active} active positions")
    if values.dtype != np.float32:
        raise PayloadError(f"{name}: dtype {values.dtype}, expected float32")
    dense = np.zeros(mask.size, np.float32)
    dense[_positions(mask)] = values
    return dense.reshape(mask.shape)


def decode_values(arrays: Mapping[str, np.ndarray], template: Mapping[str, np.ndarray],
                  masks: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Dense state from :func:`encode_values`'s arrays, validated against ``template``."""
    extra = sorted(set(arrays) - set(template))
    if extra:
        raise PayloadError(f"unexpected arrays {extra}")
    state = {name: scatter(arrays.get(name), masks[name], name) if name in masks
             else arrays.get(name) for name in template}
    missing = [name for name, value in state.items() if value is None]
    if missing:
        raise PayloadError(f"model arrays missing: {missing}")
    check_dense(state, template)
    return state
