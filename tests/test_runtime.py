"""vitviz.runtime.tune_allocator: freed tensor memory stays in the process for reuse (glibc Linux)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vitviz.runtime import tune_allocator

# Capture a ViT-S/16's attention (12 layers x 0.9 MB kept alive, MB-sized MLP activations) 5 times after a
# warm-up; print the minor page faults the 5 captures cost together.
_PROBE = """
import resource, sys, torch, vitviz
from vitviz.explain import capture_attention
from vitviz.runtime import tune_allocator
tuned = tune_allocator() if sys.argv[1] == "tune" else False
torch.manual_seed(0)
model = vitviz.create_model("vit_small_patch16_224").eval()
x = torch.randn(1, 3, 224, 224)
faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
capture_attention(model, x), capture_attention(model, x)
costs = []
for _ in range(5):
    before = faults()
    capture_attention(model, x)
    costs.append(faults() - before)
print(int(tuned), sum(costs))
"""


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True).stdout
    tuned, faults = out.split()
    return tuned == "1", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings exist on Linux only")
def test_tuned_allocator_reuses_freed_tensor_memory_between_captures():
    tuned, faults_tuned = _faults("tune")
    _, faults_default = _faults("default")
    assert tuned
    # glibc's default: MB-sized blocks come from fresh mmaps (or a trimmed heap) and fault in again on
    # most calls, 1,700-10,000 pages per capture here; tuned, a capture reuses what the last one freed
    # (0-550 pages for all five)
    assert faults_default > 5000
    assert faults_tuned < faults_default / 5


def test_tune_allocator_is_idempotent_and_refuses_quietly_without_glibc():
    first = tune_allocator()
    assert tune_allocator() is first
    assert tune_allocator(libc_name="libdoes-not-exist.so.9") is False
