"""Publishing a folder whole: build it beside its target, then swap it in with one rename."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


@contextmanager
def staged_dir(target: Path) -> Iterator[Path]:
    """Yield an empty folder beside `target`. When the block ends without an error the folder replaces `target`
    (which readers then see complete or not at all); on an error it is removed and `target` is left as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_stages(target: Path) -> list[Path]:
    """Remove the staging folders a killed `staged_dir(target)` left beside `target`. Only call this while holding
    the lock that serialises writers of `target`: a live writer's folder would be removed too."""
    removed = []
    for tmp in Path(target).parent.glob(Path(target).name + ".tmp-*"):
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed
