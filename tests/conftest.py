"""Session-wide test settings (loaded before any test module)."""

from __future__ import annotations

import os
import shutil

# Triton kernels run in Triton's interpreter when there is no GPU (tests/test_quant_triton.py). The flag
# must be set before anything imports triton (peft, bitsandbytes or torch may import it first), so here.
if not shutil.which("nvidia-smi") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
