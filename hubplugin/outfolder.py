"""The output folder of a run: its default name, the checks before any work, and the staging folder a checkpoint
is assembled in (moved into place only when complete, so a failed or killed run leaves nothing half-written)."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from hubplugin.errors import OutputExistsError


def default_out(source, scheme: str, target: str) -> Path:
    name = (source.hub_id or source.path.name).split("/")[-1]
    return Path.cwd() / f"{name}-{scheme}-{target}"


def weights_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def weights_size_in(path: Path, dtype: str) -> int:
    """Bytes of the safetensors weights in `path` with every floating-point tensor stored in `dtype` (read from the
    files' headers; integer tensors keep their size), plus the headers as they are."""
    from advisor.checkpoint_features import DTYPE_BYTES, stored_bytes

    return stored_bytes(path, DTYPE_BYTES[dtype])


def check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output folder {out} already exists", hint="pass --overwrite, or choose another --out")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder", hint="choose another --out")


def staging_prefix(out: Path) -> str:
    return f".{out.name}.partial-"


def host_name() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())


def remove_stale_staging(out: Path) -> None:
    """Remove the staging folders of runs for `out` that were killed outright (SIGKILL, out of memory: no `finally`
    ran). A staging folder's name carries its run's process id and host: only this host's, of processes gone, are
    removed (a run on another machine sharing the folder is left alone)."""
    import psutil

    for folder in out.parent.glob(staging_prefix(out) + "*"):
        pid, _, rest = folder.name[len(staging_prefix(out)):].partition("-")
        if pid.isdigit() and rest.startswith(host_name() + "-") and int(pid) != os.getpid() \
                and not psutil.pid_exists(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def staging_folder(out: Path) -> Path:
    """A fresh staging folder beside `out`, named for this process and host (so a later run can tell a killed run's
    leftovers from a live run's), after removing the leftovers of killed runs."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out)
    return Path(tempfile.mkdtemp(prefix=f"{staging_prefix(out)}{os.getpid()}-{host_name()}-", dir=out.parent))
