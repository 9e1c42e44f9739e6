"""Where the installed blockbroker-block lives (tests exercise the installed copy)."""

from __future__ import annotations

import os
from pathlib import Path

VENV = Path(os.environ.get("BLOCKBROKER_VENV", "/opt/blockbroker/venv"))
BLOCK_SCRIPT = VENV / "bin" / "blockbroker-block"
