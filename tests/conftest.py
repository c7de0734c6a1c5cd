"""Fixtures shared by several test modules."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# One intra-op thread (torch, and OpenMP for scikit-learn): the tests run tiny models, thousands of small
# ops, and on a small shared machine a multi-threaded op waits for its slowest thread to be scheduled (the
# dashboard does the same, see dashboard.state.cpu_threads). Subprocesses the tests start inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `dashboard` is not an installed package: import it from the checkout
    sys.path.insert(0, str(ROOT))

from dashboard_fixtures import DemoCheckpoints, shipped_or_demo  # noqa: E402


@pytest.fixture
def fused_attention_calls(monkeypatch) -> list[bool]:
    """Count calls of PyTorch's fused attention kernel: one entry per call, True when grad was enabled
    (a training forward), False otherwise (evaluation). The kernel itself still runs."""
    kernel = torch.nn.functional.scaled_dot_product_attention
    calls: list[bool] = []

    def counted(*args, **kwargs) -> torch.Tensor:
        calls.append(torch.is_grad_enabled())
        return kernel(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    return calls


@pytest.fixture(scope="session")
def demo_checkpoints(tmp_path_factory) -> DemoCheckpoints:
    """Writes the tiny demo checkpoints (tests/demo_checkpoints.py) once per dataset, copies them after that."""
    return DemoCheckpoints(tmp_path_factory.mktemp("demo_store"))


@pytest.fixture(scope="module")
def demo_folder(demo_checkpoints, tmp_path_factory) -> Path:
    """A checkpoint folder of the module's own with the three shapes demo checkpoints."""
    folder = tmp_path_factory.mktemp("ckpts")
    demo_checkpoints.write(folder)
    return folder


@pytest.fixture(scope="module")
def shipped_or_demo_folder(demo_checkpoints, tmp_path_factory) -> Path:
    """The shipped checkpoints when they load (read, never written), else the demo ones in a tmp folder."""
    return shipped_or_demo(demo_checkpoints, tmp_path_factory.mktemp("demo_ckpts"))
