"""The project's documents as tests read them: the README and the guides under docs/."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def bash_lines(documents: list[Path] = DOCUMENTS) -> list[str]:
    """Every line of the documents' ```bash blocks, a trailing ``  # comment`` cut off."""
    text = "\n".join(path.read_text(encoding="utf-8") for path in documents)
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    lines = [re.sub(r"\s+#.*$", "", line).strip() for b in blocks for line in b.splitlines()]
    return [line for line in lines if line]
