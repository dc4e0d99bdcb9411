"""Every backend and launcher module satisfies its declared interface (finetune/interfaces.py), and the driver
calls nothing else: no probing with hasattr in finetune/run.py. In-process, no runs."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from finetune import interfaces
from finetune.backends import BACKENDS, get_backend
from finetune.launchers import LAUNCHERS, get_launcher

REPO = Path(__file__).resolve().parents[1]


def _verbs(protocol) -> dict:
    return {
        name: inspect.signature(fn)
        for name, fn in vars(protocol).items()
        if inspect.isfunction(fn) and not name.startswith("_")
    }


def _matches(module, protocol) -> None:
    assert isinstance(module, protocol), f"{module.__name__} lacks part of {protocol.__name__}"
    for name, sig in _verbs(protocol).items():
        want = [p for p in sig.parameters if p != "self"]
        got = list(inspect.signature(getattr(module, name)).parameters)
        assert got[: len(want)] == want or len(got) == len(want), (module.__name__, name, got, want)


@pytest.mark.parametrize("name", BACKENDS)
def test_every_backend_is_a_backend(name):
    backend = get_backend(name)
    _matches(backend, interfaces.Backend)
    assert isinstance(backend.NOT_USED, dict)


@pytest.mark.parametrize("name", LAUNCHERS)
def test_every_launcher_is_a_launcher(name):
    _matches(get_launcher(name), interfaces.Launcher)


def test_the_driver_does_not_probe():
    text = (REPO / "finetune" / "run.py").read_text(encoding="utf-8")
    assert "hasattr(" not in text and "getattr(backend" not in text and "getattr(launcher" not in text


def test_plan_context_goes_to_the_workers_as_json():
    ctx = interfaces.PlanContext(data={"format": "alpaca", "rows": 3}, world_size=1, run_dir="/r")
    assert ctx.as_json() == {"data": {"format": "alpaca", "rows": 3}, "world_size": 1, "run_dir": "/r"}
    ctx.auto_choice = {"backend": "alpacalora"}
    assert ctx.as_json()["auto_choice"] == {"backend": "alpacalora"}
