"""Backbones shipped as TorchScript files, such as Meta's SSCD copy-detection models
(``backbone=sscd_resnet50``: ``sscd_disc_mixup``, MIT licence), which map normalised images to
descriptors directly.

A TorchScript archive is a zip file holding the model's code (``code/``), its constants and
its tensors; ``torch.jit.load`` reads them with TorchScript's own restricted unpickler, which
builds TorchScript values only and runs no Python. A file that is not such an archive (a
``torch.save`` pickle, a truncated download, anything else) is refused before it is opened
by torch, so no Python pickle is ever unpickled.
"""

from __future__ import annotations

import os
import tempfile
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from retrieval.data.preprocessing import Preprocessing
from retrieval.infra import io

if TYPE_CHECKING:
    from retrieval.models.backbone import Backbone

__all__ = [
    "TorchScriptError",
    "check_archive",
    "fetch",
    "load_torchscript",
    "probe_dim",
    "torchscript_backbone",
]


#: where downloaded TorchScript files are kept (``RETRIEVAL_CACHE`` overrides the folder)
CACHE = Path(os.environ.get("RETRIEVAL_CACHE", Path.home() / ".cache" / "retrieval"))


class TorchScriptError(ValueError):
    """A TorchScript backbone file that is missing, not a TorchScript archive or not the model
    it should be; the message names the file."""


def check_archive(path: Path) -> None:
    """Raise TorchScriptError unless ``path`` is a complete TorchScript archive: a readable zip
    whose one top folder holds ``code/`` (the compiled model), ``constants.pkl`` and
    ``data.pkl``. A ``torch.save`` checkpoint has no ``code/`` and is refused; so is a zip
    with a damaged directory (a truncated download)."""
    if not path.is_file():
        raise TorchScriptError(f"{path}: no such file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as err:
        raise TorchScriptError(
            f"{path} is not a TorchScript archive (not a complete zip file: {err}); download it "
            "again"
        ) from None
    tops = {name.split("/", 1)[0] for name in names}
    top = next(iter(tops)) if len(tops) == 1 else None
    needed = [f"{top}/constants.pkl", f"{top}/data.pkl"]
    has_code = any(name.startswith(f"{top}/code/") for name in names)
    if top is None or not has_code or any(n not in names for n in needed):
        raise TorchScriptError(
            f"{path} is not a TorchScript archive (no code/, constants.pkl and data.pkl in one "
            "folder; a torch.save checkpoint is refused): pass a file written by "
            "torch.jit.save"
        )
    if bad is not None:
        raise TorchScriptError(f"{path}: the archive's member {bad} is damaged; download it again")


def probe_dim(module: nn.Module, side: int = 64) -> int:
    """The width of the vectors ``module`` gives for a (2, 3, side, side) batch; raises
    TorchScriptError when it gives anything but a (2, D) tensor."""
    with torch.no_grad():
        out = module(torch.zeros(2, 3, side, side))
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TorchScriptError(
            f"the model maps (2, 3, {side}, {side}) images to {shape}, not (2, D)"
        )
    return int(out.shape[1])


def load_torchscript(path: str | Path, expected_dim: int | None = None) -> nn.Module:
    """The TorchScript module at ``path``, in eval mode, checked to be an archive
    (:func:`check_archive`) and, with ``expected_dim``, to give vectors of that width.

    Raises:
        TorchScriptError: naming the file: missing, not an archive, unreadable by
            ``torch.jit.load``, or vectors of another width.
    """
    file = Path(path)
    check_archive(file)
    try:
        with warnings.catch_warnings():  # torch's notice that TorchScript is deprecated
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
            module = torch.jit.load(str(file), map_location="cpu")
    except Exception as err:  # torch raises RuntimeError and others for bad archives
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TorchScriptError(f"{file} cannot be loaded by torch.jit.load ({first})") from None
    module.eval()
    if expected_dim is not None:
        try:
            dim = probe_dim(module)
        except TorchScriptError as err:
            raise TorchScriptError(f"{file}: {err}") from None
        if dim != expected_dim:
            raise TorchScriptError(
                f"{file} gives {dim}-d vectors, not the {expected_dim}-d this backbone has: it "
                "is another model, or a damaged file; download it again"
            )
    return module


def fetch(url: str) -> Path:
    """The file at ``url``, downloaded once into :data:`CACHE` (``RETRIEVAL_CACHE``), written
    to a temporary name and renamed when complete.

    Raises:
        TorchScriptError: the network is unreachable or the download fails (the message says
            where to put the file by hand).
    """
    target = CACHE / "torchscript" / url.rsplit("/", 1)[-1]
    if target.is_file():
        return target
    hint = f"download {url} yourself and pass backbone.weights=PATH"
    if not io.network_reachable(urllib.parse.urlparse(url).hostname or ""):
        raise TorchScriptError(f"{target} is not cached and the network is unreachable: {hint}")
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as out, urllib.request.urlopen(url, timeout=60) as answer:
            while chunk := answer.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, target)
    except OSError as err:
        raise TorchScriptError(f"downloading {url} failed ({err}): {hint}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def torchscript_backbone(
    name: str,
    weights: str | None = None,
    url: str | None = None,
    expected_dim: int | None = None,
    input_size: int = 224,
    resize_mode: str = "short",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    interpolation: str = "bilinear",
) -> Backbone:
    """A :class:`~retrieval.models.backbone.Backbone` around the TorchScript file ``weights``
    (a local path), else the one at ``url`` (downloaded once, see :func:`fetch`); it maps
    normalised images to ``expected_dim``-d vectors itself (``pooled``: the Embedder adds no
    pooling). ``input_size``, ``resize_mode``, ``mean``, ``std`` and ``interpolation`` are the
    model's own preprocessing (SSCD: short side 288, aspect kept, ImageNet statistics).

    Raises:
        TorchScriptError: neither ``weights`` nor ``url``, or the file is refused (see
            :func:`load_torchscript`).
    """
    from retrieval.models.backbone import Backbone

    if weights is None and url is None:
        raise TorchScriptError(
            f"backbone {name}: pass backbone.weights=PATH of a TorchScript file, or a url"
        )
    path = Path(weights).expanduser() if weights is not None else fetch(str(url))
    module = load_torchscript(path, expected_dim)
    dim = expected_dim if expected_dim is not None else probe_dim(module)
    pre = Preprocessing(
        input_size=int(input_size),
        mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in std),  # type: ignore[arg-type]
        interpolation=interpolation,
        crop_pct=1.0,
        resize_mode=resize_mode,
    )
    return Backbone(module, dim, pre, name, pooled=True)
