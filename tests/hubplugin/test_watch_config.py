"""watch.yaml as a user writes it: what it sets, and every mistake refused by `hubc watch` in one line, before the
endpoint listens."""

from __future__ import annotations

import json
import socket

import pytest
import yaml
from click.testing import CliRunner
from test_cli import assert_one_line_error

from hubplugin.cli import main
from hubplugin.watch import RetrySpec, load_config


def watch_with(tmp_path, config: dict | str, *args: str, env: dict | None = None):
    path = tmp_path / "watch.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    env = {"HUBC_WEBHOOK_SECRET": "x", **(env or {})}
    return CliRunner().invoke(main, ["watch", "--config", str(path), "--port", "0", *args], env=env,
                              catch_exceptions=False)


def test_a_full_config_sets_what_it_says(tmp_path):
    recipe = tmp_path / "recipes" / "cpu.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump({"scheme": "w8a8-int8", "target": "cpu", "method": "rtn"}))
    path = tmp_path / "watch.yaml"
    path.write_text(yaml.safe_dump({
        "watch": {"repos": ["acme/chat-7b"], "owners": ["acme-labs"]},
        "targets": ["a10g", {"target": "cpu", "recipe": "recipes/cpu.yaml", "serve": False},
                    {"target": "l4", "dense_budget": 0.04, "variant": "{name}-l4-dense4"}],
        "variants": {"name": "{name}-hubc-{target}", "owner": "acme-variants", "private": True},
        "retry": {"max_attempts": 5, "backoff_seconds": 10},
        "runner": {"kind": "ray", "address": "ray://head:10001", "num_gpus": 0.5, "forward_env": ["HF_TOKEN"]},
        "queue": "state/jobs.sqlite",
    }))
    config = load_config(path)
    assert config.watches("acme/chat-7b") and config.watches("acme-labs/anything")
    assert not config.watches("acme/other") and not config.watches("someone/chat-7b")
    a10g, cpu, l4 = config.targets
    assert config.variant_repo("acme/chat-7b", a10g) == "acme-variants/chat-7b-hubc-a10g"
    assert config.variant_repo("acme/chat-7b", l4) == "acme-variants/chat-7b-l4-dense4"
    assert "method: rtn" in cpu.recipe_yaml and cpu.serve is False and a10g.serve is True
    assert len({a10g.recipe_hash(), cpu.recipe_hash(), l4.recipe_hash()}) == 3
    assert config.private and config.retry == RetrySpec(5, 10.0, 3600.0)
    assert [config.retry.delay(n) for n in (1, 2, 3)] == [10.0, 20.0, 40.0]
    assert (config.runner.kind, config.runner.address, config.runner.num_gpus) == ("ray", "ray://head:10001", 0.5)
    assert config.queue == tmp_path / "state" / "jobs.sqlite"


@pytest.mark.parametrize("config, fragments", [
    ({"watch": {"owners": ["org"]}, "targets": ["cpu"], "retries": 3}, ["unknown key retries", "known keys:"]),
    ({"watch": {"owners": ["org"]}, "targets": [{"target": "cpu", "sheme": "w8a8-int8"}]},
     ["targets[0]: unknown key sheme", "scheme"]),
    ({"watch": {"owners": ["org"]}, "targets": ["tpu-v9"]}, ["targets[0]: unknown target 'tpu-v9'", "a10g"]),
    ({"watch": {"owners": ["org"]}, "targets": [{"target": "cpu", "scheme": "w8a16"}]}, ["targets[0]", "w8a16"]),
    ({"watch": {"owners": ["org"]}, "targets": [{"target": "cpu", "recipe": "missing.yaml"}]},
     ["targets[0].recipe: cannot read"]),
    ({"watch": {"owners": ["org"]}, "targets": ["cpu", "a10g"], "variants": {"name": "{name}-variant"}},
     ["would push to the same repo (owner/model-variant)", "`variant:`"]),
    ({"watch": {"owners": ["org"]}, "targets": ["cpu"], "variants": {"name": "{model}-{target}"}},
     ["unknown placeholder {model}", "{owner}, {name}, {target}"]),
    ({"watch": {}, "targets": ["cpu"]}, ["names no repos and no owners"]),
    ({"watch": {"repos": ["not a repo"]}, "targets": ["cpu"]}, ["'not a repo' is not a valid repo id"]),
    ({"watch": {"owners": ["org"]}, "targets": []}, ["targets: must be a list of at least one target"]),
    ({"watch": {"owners": ["org"]}, "targets": ["cpu"], "retry": {"max_attempts": 0}},
     ["retry.max_attempts: must be positive"]),
    ({"watch": {"owners": ["org"]}, "targets": ["cpu"], "runner": {"kind": "slurm"}}, ["unknown runner 'slurm'"]),
    ({"watch": {"owners": ["org"]}, "targets": ["cpu"], "runner": {"address": "auto"}},
     ["address only apply to `kind: ray`"]),
    ({"watch": {"owners": ["org"]}, "targets": [{"target": "cpu", "serve": "yes"}]},
     ["targets[0].serve: expected bool, got 'yes'"]),
    ("watch: [unclosed\n", ["is not valid YAML at line"]),
    ({"watch": {"owners": ["org"]}, "targets": [{"target": "cpu", "structure": {"parms": 0.2}}]},
     ["targets[0].structure: unknown structure key 'parms'", "params"]),
    ({"watch": {"owners": ["org"]}, "targets": [{"target": "cpu", "structure": {"params": 0.2, "mlp": 0.3}}]},
     ["does not combine with mlp"]),
    ({"watch": {"owners": ["org"]}, "targets": [{"target": "cpu", "heal_minutes": 5}]},
     ["targets[0].heal_minutes: heals a model after structure"]),
    ({"watch": {"owners": ["org"]}, "targets": [{"target": "cpu", "max_size": "big"}]},
     ["targets[0].max_size: cannot read size 'big'"]),
    ({"watch": {"owners": ["org"]}, "targets": [{"target": "cpu", "max_size": "90MB", "structure": {"speedup": 1.3}}]},
     ["`max_size` and a structure `speedup` each choose"]),
    ({"watch": {"owners": ["org"]}, "targets": [{"target": "cpu", "calibration_text": "mine.txt"}]},
     ["targets[0].calibration_text: no file"]),
    # YAML's .nan passes every bound: it would turn the quality gate or the healing budget off
    ({"watch": {"owners": ["org"]}, "targets": [{"target": "cpu", "max_ppl_increase": float("nan")}]},
     ["targets[0].max_ppl_increase: expected a finite number"]),
    ({"watch": {"owners": ["org"]}, "targets": [{"target": "cpu", "max_ppl_increase": -0.1}]},
     ["targets[0].max_ppl_increase: must be 0 or more"]),
    ({"watch": {"owners": ["org"]}, "targets": [{"target": "cpu", "structure": {"params": 0.2},
                                                 "heal_minutes": float("nan")}]},
     ["targets[0].heal_minutes: expected a finite number"]),
])
def test_mistakes_in_watch_yaml_are_one_line_errors(tmp_path, config, fragments):
    result = watch_with(tmp_path, config)
    assert_one_line_error(result, *fragments)
    assert "listening" not in result.output


def test_no_secret_no_token_or_a_busy_port_fail_before_listening(tmp_path, fake_hub):
    ok = {"watch": {"owners": ["org"]}, "targets": ["cpu"]}
    assert_one_line_error(watch_with(tmp_path, ok, env={"HUBC_WEBHOOK_SECRET": ""}),
                          "HUBC_WEBHOOK_SECRET is not set", "secret of the Hub webhook")
    assert_one_line_error(watch_with(tmp_path, {**ok, "secret_env": "MY_SECRET"}), "MY_SECRET is not set")
    assert_one_line_error(watch_with(tmp_path, ok), "pushing to the Hub needs a token")  # jobs push: no token
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = watch_with(tmp_path, ok, "--no-run", "--port", str(port))
        assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}", "choose another --port")


def test_structure_targets_build_what_hubc_optimize_would(tmp_path):
    """A target may ask for structure (a share, a speed-up or factorization), healing, a size budget and its own
    calibration text; each job's OptimizeConfig carries them as `hubc optimize` flags would, and each is its own
    variant (its own recipe hash)."""
    (tmp_path / "domain.txt").write_text("text of the kind the model serves\n" * 50)
    path = tmp_path / "watch.yaml"
    path.write_text(yaml.safe_dump({
        "watch": {"owners": ["acme"]},
        "targets": [{"target": "cpu", "structure": {"speedup": 1.3}, "heal_minutes": 5,
                     "calibration_text": ["domain.txt", "wikitext2-valid"], "variant": "{name}-fast"},
                    {"target": "cpu", "scheme": "w8a8-int8", "max_size": "90MB", "variant": "{name}-small"},
                    {"target": "a10g", "structure": {"params": 0.2}}],
    }))
    fast, small, pruned = load_config(path).targets
    config = fast.optimize_config(out=tmp_path / "o", push="acme/x-fast", private=False, revision="abc")
    assert config.choices.structure == {"speedup": 1.3} and config.choices.heal_minutes == 5.0
    assert config.choices.calibration_text == (str((tmp_path / "domain.txt").resolve()), "wikitext2-valid")
    assert type(fast).from_dict(json.loads(json.dumps(fast.to_dict()))) == fast  # as the job queue stores it
    assert small.optimize_config(out=tmp_path / "o", push="p/q", private=False, revision="abc").max_size == 90_000_000
    assert pruned.optimize_config(out=tmp_path / "o", push="p/q", private=False,
                                  revision="abc").choices.structure == {"params": 0.2}
    assert len({fast.recipe_hash(), small.recipe_hash(), pruned.recipe_hash()}) == 3
