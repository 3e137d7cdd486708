"""The demo job at paper size: parameter count and one forward pass."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO_ROOT


@pytest.mark.slow
def test_demo_runs_at_paper_size() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "scbert_platform.demo", "--cells", "1"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "encoder 5,004,000" in out  # the paper: about 5.0 M trainable encoder parameters
    assert "nb_features=266" in out
    assert "(1, 16907) -> logits (1, 10)" in out
