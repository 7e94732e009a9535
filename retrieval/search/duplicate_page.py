"""A static page of duplicate groups (``retrieval duplicates --html DIR``): ``DIR/index.html``
and a thumbnail of every member under ``DIR/thumbs/``, no script and nothing fetched from
elsewhere. Groups come in the order given (the most space freed first); in each, the keeper is
marked and every copy shows its kind, score, pixel size and file size."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from retrieval.data.images import ImageLoadError, open_rgb
from retrieval.infra.io import atomic_write
from retrieval.search.duplicates import DuplicateGroup, Member, readable_size

__all__ = ["write_page"]

THUMB = 200
_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 24px; color: #1d2327; background: #f6f7f7; }
h1 { font-size: 20px; margin: 0 0 4px; }
.summary { color: #50575e; margin-bottom: 20px; }
section { background: #fff; border: 1px solid #dcdcde; border-radius: 8px; padding: 12px 16px;
  margin-bottom: 16px; }
section h2 { font-size: 15px; margin: 0 0 10px; }
.members { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 208px; border: 2px solid #dcdcde; border-radius: 6px; padding: 4px;
  background: #fff; }
figure.keep { border-color: #00a32a; }
figure img { width: 200px; height: 200px; object-fit: contain; background: #f0f0f1;
  display: block; }
figcaption { font-size: 12px; line-height: 1.4; margin-top: 4px; word-break: break-all; }
.badge { display: inline-block; border-radius: 4px; padding: 0 6px; font-weight: 600;
  color: #fff; background: #8c8f94; }
.keep .badge { background: #00a32a; }
.exact .badge { background: #2271b1; }
"""


def _thumbnail(path: str, target: Path) -> bool:
    try:
        image = open_rgb(path)
    except ImageLoadError:
        return False
    image.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
    with atomic_write(target, "wb") as handle:
        image.save(handle, format="JPEG", quality=85)
    return True


def _figure(member: Member, kind: str, thumb: str | None) -> str:
    label = "keep" if member.keep and member.kind == "keeper" else "kept" if member.keep else kind
    classes = " ".join(c for c in ("keep" if member.keep else "", kind) if c)
    pixels = f"{member.width}x{member.height}" if member.width else "?"
    image = f'<img src="{html.escape(thumb)}" alt="">' if thumb else "<p>(unreadable)</p>"
    return (
        f'<figure class="{classes}">{image}<figcaption><span class="badge">{label}</span> '
        f"{member.score:.3f} &middot; {pixels} &middot; {readable_size(member.bytes)}<br>"
        f"{html.escape(member.path)}</figcaption></figure>"
    )


def write_page(groups: Sequence[DuplicateGroup], folder: str | Path, threshold: float) -> Path:
    """Write the page of ``groups`` into ``folder`` (created; an ``index.html`` there is
    replaced); returns the page's path."""
    root = Path(folder)
    (root / "thumbs").mkdir(parents=True, exist_ok=True)
    freed = sum(g.freed_bytes for g in groups)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>Duplicates</title><style>{_STYLE}</style></head><body>",
        "<h1>Duplicates</h1>",
        f"<p class='summary'>{len(groups)} groups at similarity threshold {threshold:.3f}; "
        f"removing the copies not kept would free {readable_size(freed)}.</p>",
    ]
    for number, group in enumerate(groups, start=1):
        figures = []
        shown = group.to_list()
        for position, member in enumerate(group.members):
            name = f"thumbs/{number:05d}-{position:02d}.jpg"
            ok = _thumbnail(member.path, root / name)
            figures.append(_figure(member, shown[position]["kind"], name if ok else None))
        parts.append(
            f"<section id='group-{number}'><h2>Group {number} &middot; {group.kind} &middot; "
            f"frees {readable_size(group.freed_bytes)}</h2><div class='members'>{''.join(figures)}"
            "</div></section>"
        )
    parts.append("</body></html>")
    page = root / "index.html"
    with atomic_write(page, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))
    return page
