"""RNG capture/restore: the same numbers after a real torch.save / torch.load(weights_only=True)."""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from common.rng import capture_rng_state, restore_rng_state


def _draw() -> dict:
    return {
        "python": [random.random() for _ in range(5)] + [random.gauss(0, 1) for _ in range(3)],
        "numpy": np.random.rand(5).tolist() + np.random.standard_normal(3).tolist(),
        "torch": torch.rand(5).tolist() + torch.randn(3).tolist(),
        "dropout": torch.nn.functional.dropout(torch.ones(64), p=0.5, training=True).tolist(),
        "randint": torch.randint(0, 1000, (4,)).tolist(),
    }


def _seed_and_warm() -> None:
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234)
    # An odd number of Gaussian draws leaves a cached second value in python and numpy.
    random.gauss(0, 1)
    np.random.standard_normal()
    _draw()


def test_round_trip_through_weights_only_file(tmp_path: Path) -> None:
    _seed_and_warm()
    state = capture_rng_state()
    expected = _draw()
    torch.save({"rng": [state]}, tmp_path / "rng.pt")

    # Disturb every generator, then restore from the file.
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    _draw()
    loaded = torch.load(tmp_path / "rng.pt", map_location="cpu", weights_only=True)["rng"][0]
    restore_rng_state(loaded)
    assert _draw() == expected
    # Restoring again gives the same numbers again (the captured state was not consumed).
    restore_rng_state(loaded)
    assert _draw() == expected


def test_capture_is_a_copy() -> None:
    _seed_and_warm()
    state = capture_rng_state()
    before = state["torch"].clone()
    torch.rand(100)
    assert torch.equal(state["torch"], before)


def test_state_holds_only_weights_only_types() -> None:
    state = capture_rng_state()

    def check(obj: object) -> None:
        if isinstance(obj, dict):
            for key, value in obj.items():
                assert isinstance(key, str)
                check(value)
        elif isinstance(obj, list):
            for value in obj:
                check(value)
        else:
            assert obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)), type(obj)

    check(state)
    assert isinstance(state["cuda"], list)
