"""What `hubc bench`, `pick` and `predict` are given (local folders, Hub repo ids, .gguf files, `demo`) as local
checkpoints with their provenance (serving.store.CheckpointInfo)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from advisor.measurement import CheckpointInfo

__all__ = ["local_checkpoints"]


def local_checkpoints(
    refs: Sequence[str], revision: str | None = None, warn: Callable[[str], None] | None = None
) -> list[CheckpointInfo]:
    """Each reference as a local checkpoint with its provenance; repo ids are pulled through the Hub client
    (hubplugin.source -> hubplugin.hub.download). `warn` hears about a report.json that cannot be read."""
    from hubplugin.source import resolve
    from serving.store import describe

    out = []
    for ref in refs:
        source = resolve(ref, revision=revision)
        # A Hub snapshot folder is named after its sha, a converted GGUF after its file: show what it stands for.
        name = ref if source.kind in ("hub", "demo") else source.hub_id
        out.append(describe(source.path, model_id=source.hub_id, revision=source.revision, name=name, warn=warn))
    return out
