"""hubplugin.hub against the fake Hub, driven by the real huggingface_hub client.

Private repos: the real Hub answers an anonymous request for a private repo exactly like one for a missing repo
(401/404 with X-Error-Code RepoNotFound, hub-protocol.md §1.1), and the client raises RepositoryNotFoundError for
both. hubc cannot tell them apart either, so it reports ModelNotFoundError whose hint mentions HF_TOKEN. Gated repos
are different: the Hub admits they exist (X-Error-Code GatedRepo), so hubc reports AuthRequiredError.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hubplugin.errors import AuthRequiredError, HubcError, ModelNotFoundError, NotAModelError, PushError
from hubplugin.hub import HubSnapshot, PushResult, download, push_folder

MODEL_FILES = {
    "config.json": b'{"model_type": "llama"}',
    "model.safetensors": b"\x00" * 64,
    "tokenizer.json": b"{}",
    "pytorch_model.bin": b"pickle",
    "sub/notes.txt": b"hello",
}


def _folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _writes(hub) -> list:
    return [r for r in hub.requests if r.method in ("POST", "PUT", "DELETE")]


def test_download_pins_sha_and_fetches_model_files(fake_hub):
    sha = fake_hub.add_repo("org/base", MODEL_FILES)

    snap = download("org/base")

    assert isinstance(snap, HubSnapshot)
    assert (snap.repo_id, snap.revision) == ("org/base", sha)
    assert snap.path.name == sha  # the HF cache keeps one folder per commit
    got = _folder_files(snap.path)
    # safetensors present, so the pickle checkpoint is not downloaded
    assert got == {k: v for k, v in MODEL_FILES.items() if k != "pytorch_model.bin"}
    # every file request used the sha, never the moving branch name
    resolves = [r.path for r in fake_hub.requests if "/resolve/" in r.path]
    assert resolves and all(f"/resolve/{sha}/" in p for p in resolves)


def test_download_older_revision_gets_that_commits_files(fake_hub):
    old = fake_hub.add_repo("org/base", MODEL_FILES)
    new = fake_hub.add_commit("org/base", {"config.json": b'{"model_type": "llama", "v": 2}'})
    assert old != new

    snap = download("org/base", revision=old)

    assert snap.revision == old
    assert (snap.path / "config.json").read_bytes() == MODEL_FILES["config.json"]
    assert download("org/base").revision == new


def test_download_falls_back_to_bin_without_safetensors(fake_hub):
    files = {k: v for k, v in MODEL_FILES.items() if k != "model.safetensors"}
    fake_hub.add_repo("org/old", files)

    snap = download("org/old")

    assert (snap.path / "pytorch_model.bin").read_bytes() == b"pickle"


def test_download_unknown_repo(fake_hub):
    with pytest.raises(ModelNotFoundError, match="no model repo 'org/nope'") as err:
        download("org/nope")
    assert fake_hub.url in err.value.message
    assert "HF_TOKEN" in err.value.hint


def test_download_unknown_revision(fake_hub):
    fake_hub.add_repo("org/base", MODEL_FILES)
    with pytest.raises(ModelNotFoundError, match="no revision 'v9'"):
        download("org/base", revision="v9")


def test_download_repo_without_config(fake_hub):
    fake_hub.add_repo("org/data", {"data.txt": b"x"})
    with pytest.raises(NotAModelError, match="config.json"):
        download("org/data")


def test_private_repo_without_token_looks_missing(fake_hub):
    fake_hub.add_repo("org/secret", MODEL_FILES, private=True)

    with pytest.raises(ModelNotFoundError) as err:
        download("org/secret")

    assert "HF_TOKEN" in err.value.hint
    assert fake_hub.requests[-1].status == 401  # anonymous: 401 RepoNotFound, as the real Hub answers


def test_private_repo_with_token(fake_hub, monkeypatch):
    sha = fake_hub.add_repo("org/secret", MODEL_FILES, private=True)

    assert download("org/secret", token=fake_hub.token).revision == sha
    monkeypatch.setenv("HF_TOKEN", fake_hub.token)  # the usual way: huggingface_hub picks it up
    assert download("org/secret").revision == sha


def test_private_repo_of_someone_else_with_valid_token(fake_hub):
    fake_hub.add_repo("other/secret", MODEL_FILES, private=True)
    with pytest.raises(ModelNotFoundError):
        download("other/secret", token=fake_hub.token)


def test_invalid_token(fake_hub):
    fake_hub.add_repo("org/base", MODEL_FILES)
    with pytest.raises(AuthRequiredError, match="refused"):
        download("org/base", token="hf_wrong")


def test_gated_repo(fake_hub):
    fake_hub.add_repo("other/gated", MODEL_FILES, gated=True)

    with pytest.raises(AuthRequiredError, match="gated") as err:
        download("other/gated")
    assert "HF_TOKEN" in err.value.hint
    with pytest.raises(AuthRequiredError, match="gated"):  # logged in, terms not accepted: 403
        download("other/gated", token=fake_hub.token)

    fake_hub.grant("other/gated", "tester")
    assert download("other/gated", token=fake_hub.token).path.joinpath("config.json").exists()


def test_unreachable_hub():
    # no fake_hub: conftest points the client at a port that refuses connections
    with pytest.raises(HubcError, match="cannot reach the Hub at http://127.0.0.1:9"):
        download("org/base")


def test_push_creates_repo_with_one_commit(fake_hub, tiny_llama_dir):
    result = push_folder(
        tiny_llama_dir, "org/tiny-int8", token=fake_hub.token, commit_message="Add int8 variant"
    )

    assert isinstance(result, PushResult)
    assert result.created_repo
    assert result.url == f"{fake_hub.url}/org/tiny-int8"
    assert re.fullmatch(r"[0-9a-f]{40}", result.commit_sha)
    commits = fake_hub.commits("org/tiny-int8")
    # the Hub's own "initial commit" (.gitattributes) plus exactly one commit of ours
    assert [c.message for c in commits] == ["initial commit", "Add int8 variant"]
    assert commits[-1].sha == result.commit_sha
    files = fake_hub.files("org/tiny-int8")
    assert files.pop(".gitattributes")
    assert files == _folder_files(tiny_llama_dir)
    assert len([r for r in fake_hub.requests if r.method == "POST" and "/commit/" in r.path]) == 1


def test_push_round_trips_through_download(fake_hub, tiny_llama_dir):
    result = push_folder(tiny_llama_dir, "org/tiny", token=fake_hub.token, commit_message="Add model")

    snap = download("org/tiny")

    assert snap.revision == result.commit_sha
    assert _folder_files(snap.path) == _folder_files(tiny_llama_dir)


def test_push_private_and_user_namespace(fake_hub, tmp_path):
    (tmp_path / "config.json").write_text("{}")

    result = push_folder(tmp_path, "mine", token=fake_hub.token, private=True, commit_message="Add")

    assert result.repo_id == "tester/mine"
    assert fake_hub.repos["tester/mine"].private


def test_push_to_existing_repo_adds_one_commit(fake_hub, tmp_path):
    before = fake_hub.add_repo("org/variant", {"config.json": b"{}", "old.txt": b"old"})
    (tmp_path / "config.json").write_text('{"v": 2}')
    (tmp_path / "README.md").write_text(
        "---\nbase_model: org/base\nbase_model_relation: quantized\n---\n# v2\n"
    )

    result = push_folder(tmp_path, "org/variant", token=fake_hub.token, commit_message="Update variant")

    assert not result.created_repo
    commits = fake_hub.commits("org/variant")
    assert [c.sha for c in commits] == [before, result.commit_sha]
    assert fake_hub.files("org/variant") == {
        "config.json": b'{"v": 2}',
        "old.txt": b"old",  # a push adds and replaces, it never deletes
        "README.md": (tmp_path / "README.md").read_bytes(),
    }


def test_failed_commit_removes_the_repo_it_created(fake_hub, tiny_llama_dir):
    fake_hub.fail_next_commit = True

    with pytest.raises(PushError, match="push to 'org/tiny-int8' failed: 500") as err:
        push_folder(tiny_llama_dir, "org/tiny-int8", token=fake_hub.token, commit_message="Add int8 variant")

    assert "removed again" in err.value.message
    assert "\n" not in err.value.message
    assert "org/tiny-int8" not in fake_hub.repos
    assert [r.method for r in fake_hub.requests if "/api/repos/" in r.path] == ["POST", "DELETE"]


def test_failed_commit_leaves_existing_repo_unchanged(fake_hub, tiny_llama_dir):
    fake_hub.add_repo("org/variant", {"config.json": b"{}"})
    before_files, before_commits = fake_hub.files("org/variant"), fake_hub.commits("org/variant")
    fake_hub.fail_next_commit = True

    with pytest.raises(PushError, match="failed: 500"):
        push_folder(tiny_llama_dir, "org/variant", token=fake_hub.token, commit_message="Add")

    assert fake_hub.files("org/variant") == before_files
    assert fake_hub.commits("org/variant") == before_commits
    assert not any(r.method == "DELETE" for r in fake_hub.requests)


def test_push_without_token_writes_nothing(fake_hub, tiny_llama_dir):
    with pytest.raises(AuthRequiredError, match="needs a token") as err:
        push_folder(tiny_llama_dir, "org/tiny-int8", commit_message="Add")

    assert "hf auth login" in err.value.hint
    assert fake_hub.requests == []  # not even whoami: the missing token is known locally


@pytest.mark.parametrize(("token", "match"), [("hf_wrong", "rejected"), ("read", "read-only")])
def test_push_with_bad_token_writes_nothing(fake_hub, tiny_llama_dir, token, match):
    token = fake_hub.read_token if token == "read" else token

    with pytest.raises(AuthRequiredError, match=match):
        push_folder(tiny_llama_dir, "org/tiny-int8", token=token, commit_message="Add")

    assert _writes(fake_hub) == []
    assert [r.path for r in fake_hub.requests] == ["/api/whoami-v2"]


def test_push_to_foreign_namespace(fake_hub, tiny_llama_dir):
    with pytest.raises(AuthRequiredError, match="may not write to 'other/x'"):
        push_folder(tiny_llama_dir, "other/x", token=fake_hub.token, commit_message="Add")
    assert "other/x" not in fake_hub.repos


def test_push_with_broken_card_writes_nothing(fake_hub, tmp_path):
    (tmp_path / "README.md").write_text("---\nbase_model: [unclosed\n---\n")

    with pytest.raises(PushError, match="README.md has invalid metadata"):
        push_folder(tmp_path, "org/x", token=fake_hub.token, commit_message="Add")

    assert fake_hub.requests == []


def test_push_empty_folder(fake_hub, tmp_path):
    with pytest.raises(PushError, match="empty"):
        push_folder(tmp_path, "org/x", token=fake_hub.token, commit_message="Add")
    assert fake_hub.requests == []


def test_push_to_branch(fake_hub, tmp_path):
    main = fake_hub.add_repo("org/variant", {"config.json": b"{}"})
    (tmp_path / "config.json").write_text('{"v": 2}')

    result = push_folder(tmp_path, "org/variant", token=fake_hub.token, commit_message="Try", revision="exp")

    assert fake_hub.repos["org/variant"].refs == {"main": main, "exp": result.commit_sha}
    assert fake_hub.files("org/variant", "exp")["config.json"] == b'{"v": 2}'
