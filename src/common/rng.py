"""Capture and restore every random number generator a training step touches.

Exact resume needs the same random numbers after a restart as without one: dropout masks,
sampling, anything drawn from Python's `random`, NumPy's global generator, the torch CPU
generator and each CUDA (or MPS) device generator.

The captured state is made of plain lists, ints, floats, strings and tensors so that a
checkpoint holding it loads with `torch.load(weights_only=True)` (no pickled NumPy arrays or
arbitrary objects). Each rank captures its own state; the trainer gathers them to rank 0.
"""
from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

RNG_STATE_VERSION = 1


def _capture_python() -> dict[str, Any]:
    version, internal, gauss_next = random.getstate()
    return {"version": int(version), "state": list(internal), "gauss_next": gauss_next}


def _restore_python(state: dict[str, Any]) -> None:
    random.setstate((int(state["version"]), tuple(int(x) for x in state["state"]), state["gauss_next"]))


def _capture_numpy() -> dict[str, Any]:
    # The legacy global generator (np.random.*): ('MT19937', keys uint32[624], pos, has_gauss,
    # cached_gaussian). The uint32 keys become Python ints so no ndarray is pickled.
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return {
        "kind": str(kind),
        "keys": [int(k) for k in keys.tolist()],
        "pos": int(pos),
        "has_gauss": int(has_gauss),
        "cached_gaussian": float(cached),
    }


def _restore_numpy(state: dict[str, Any]) -> None:
    keys = np.asarray(state["keys"], dtype=np.uint32)
    np.random.set_state(
        (state["kind"], keys, int(state["pos"]), int(state["has_gauss"]), float(state["cached_gaussian"]))
    )


def _capture_cuda() -> list[torch.Tensor]:
    if not torch.cuda.is_available():
        return []
    # One ByteTensor per visible device (the Philox seed and offset, held on the host).
    return [s.clone() for s in torch.cuda.get_rng_state_all()]


def _restore_cuda(states: list[torch.Tensor]) -> None:
    if not states:
        return
    if not torch.cuda.is_available():
        logger.warning("checkpoint holds CUDA RNG states but CUDA is not available here; skipping them")
        return
    count = torch.cuda.device_count()
    if len(states) != count:
        # Resuming with a different number of visible GPUs per process: restore what matches.
        logger.warning(
            "checkpoint holds CUDA RNG states for %d devices, this process sees %d; restoring the first %d",
            len(states), count, min(len(states), count),
        )
    for index, state in enumerate(states[:count]):
        torch.cuda.set_rng_state(state.to(torch.uint8).cpu(), device=index)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def _capture_mps() -> torch.Tensor | None:
    if not _mps_available():
        return None
    return torch.mps.get_rng_state().clone()


def _restore_mps(state: torch.Tensor | None) -> None:
    if state is None:
        return
    if not _mps_available():
        logger.warning("checkpoint holds an MPS RNG state but MPS is not available here; skipping it")
        return
    torch.mps.set_rng_state(state.to(torch.uint8).cpu())


def capture_rng_state() -> dict[str, Any]:
    """Return this process's RNG states as a `weights_only`-loadable dict."""
    return {
        "version": RNG_STATE_VERSION,
        "python": _capture_python(),
        "numpy": _capture_numpy(),
        "torch": torch.get_rng_state().clone(),
        "cuda": _capture_cuda(),
        "mps": _capture_mps(),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore the states captured by `capture_rng_state` (missing parts are left alone)."""
    version = state.get("version", RNG_STATE_VERSION)
    if version != RNG_STATE_VERSION:
        raise ValueError(f"unsupported RNG state version {version!r} (expected {RNG_STATE_VERSION})")
    if "python" in state:
        _restore_python(state["python"])
    if "numpy" in state:
        _restore_numpy(state["numpy"])
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"].to(torch.uint8).cpu())
    _restore_cuda(list(state.get("cuda") or []))
    _restore_mps(state.get("mps"))
