"""Where the checkout and the real brain MRI are."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The real brain MRI lives beside the checkout (CI has it there too); it is never copied in.
MR_BRAIN = Path(os.environ.get("DICOMNODE_TEST_DATA", REPO.parent / "shared" / "data" / "mr-brain"))
