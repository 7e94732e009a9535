"""The R1M distractor images of Revisited Oxford / Paris (Radenović et al., CVPR 2018), in the
layout revisitop distributes them::

    revisitop1m/                 <- root
    ├── revisitop1m.txt          the images, one a line: a path under jpg/
    └── jpg/                     the revisitop1m.1.tar.gz ... revisitop1m.100.tar.gz archives,
        └── ...                  extracted

A line without an extension names ``<line>.jpg``, as revisitop's own scripts read it. The list
fixes the set and the order of the distractors; without it (``list_file=None``) every image
under ``jpg/`` is one, in sorted order.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from retrieval.data.images import list_images
from retrieval.data.manifest import ManifestError

__all__ = ["R1M_LIST", "distractor_images"]

#: The list file of the R1M release.
R1M_LIST = "revisitop1m.txt"
_LAYOUT = "root/revisitop1m.txt and root/jpg/... (see data/README.md)"


def _listed(images: Path, list_file: Path) -> list[tuple[int, Path]]:
    """The listed images with their 1-based line numbers; a line must be a relative path that
    stays under ``jpg/``."""
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ManifestError(f"{list_file}: not UTF-8 text ({err})") from None
    out = []
    for number, line in enumerate(lines, start=1):
        name = line.strip()
        if not name:
            continue
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise ManifestError(
                f"{list_file}, line {number}: {name!r} is not a path under {images}; use the "
                "list of the R1M release"
            )
        if not relative.suffix:
            relative = relative.with_name(relative.name + ".jpg")
        out.append((number, images / relative))
    return out


def distractor_images(
    root: str | Path, list_file: str | None = R1M_LIST, check_files: bool = True
) -> list[Path]:
    """The distractor images under ``root``, in the list's order.

    Args:
        root: the folder holding ``jpg/`` and the list file.
        list_file: the list, relative to ``root`` (or absolute); None: every image under
            ``jpg/``, sorted.
        check_files: whether every listed image must exist (one ``stat`` each).

    Raises:
        ManifestError: one line naming the file and the fix: ``root``, ``jpg/`` or the list
            missing, a list line that is no path under ``jpg/``, listed images missing (the
            count and the first one), or no image at all.
    """
    base = Path(os.path.abspath(Path(root).expanduser()))
    images = base / "jpg"
    if not images.is_dir():
        what = "is not an existing folder" if not base.is_dir() else "has no jpg/ folder"
        raise ManifestError(
            f"distractors: {base} {what}; layout: {_LAYOUT}; extract the R1M archives there"
        )
    if list_file is None:
        paths = list_images(images)
    else:
        listing = base / list_file
        if not listing.is_file():
            raise ManifestError(
                f"distractors: {listing} is missing; put the release's {R1M_LIST} there "
                f"(layout: {_LAYOUT}), or set distractors.list_file=null to take every image "
                "under jpg/"
            )
        numbered = _listed(images, listing)
        if check_files:
            missing = [(n, p) for n, p in numbered if not p.is_file()]
            if missing:
                line, path = missing[0]
                raise ManifestError(
                    f"{listing}, line {line}: {path} is missing ({len(missing)} of "
                    f"{len(numbered)} listed images are); extract every revisitop1m.N.tar.gz "
                    f"archive into {images}"
                )
        paths = [p for _, p in numbered]
    if not paths:
        raise ManifestError(f"distractors: no image listed under {base}; layout: {_LAYOUT}")
    return paths
