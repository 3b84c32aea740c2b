"""watch.yaml: which model repos to watch, which variants to build for each new commit of one, how variant repos are
named and published, how failed jobs are retried, and where jobs run.

    watch: {repos: [acme/chat-7b], owners: [acme]}
    targets:
      - a10g
      - {target: cpu, dense_budget: 0.04, serve: false}
      - {target: l4, recipe: recipes/l4.yaml}
    variants: {name: "{name}-{target}", owner: acme-variants, private: false}
    retry: {max_attempts: 3, backoff_seconds: 60}
    runner: {kind: ray, address: "ray://head:10001"}

Read with yaml.safe_load; a key hubc does not know is an error that names the known ones, so a typo never silently
falls back to a default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import string
from dataclasses import dataclass, field
from pathlib import Path

from hubplugin.watch.errors import WatchConfigError

__all__ = ["RetrySpec", "RunnerSpec", "TargetSpec", "WatchConfig", "default_queue_path", "load_config"]

NAME_FIELDS = ("owner", "name", "target")
"""Placeholders a variant repo name may use: the base repo's owner and name, and the target."""


@dataclass(frozen=True)
class TargetSpec:
    """One variant to build for every new commit: a target and, optionally, how to compress for it (the
    `hubc optimize` flags of the same names)."""

    target: str
    """Hardware target from `hubc targets` (cpu, t4, a10g, l4, h100, ...)."""
    recipe_yaml: str | None = None
    """A recipe (the `recipe.yaml` format), read from the file `recipe:` names; replaces scheme/method/budgets."""
    scheme: str | None = None
    method: str | None = None
    dense_budget: float | None = None
    budget_scheme: str | None = None
    activations: str | None = None
    group_size: int | None = None
    structure: dict | None = None
    """What to remove, hubc choosing where (the recipe's `structure` block: {params: 0.2}, {mlp: 0.3, heads: 0.25,
    layers: 4}, {factorize: 0.2}, {speedup: 1.3}), healed by distillation (`heal_minutes`, default 15)."""
    heal_minutes: float | None = None
    max_size: int | None = None
    """Largest weights in bytes (`max_size: 120MB`): hubc chooses the scheme, dense budget and pruning that fit."""
    calibration_text: str | tuple[str, ...] | None = None
    """The text calibration and healing read (a file, relative to watch.yaml, or a shipped text name; or a list)."""
    max_ppl_increase: float = 0.05
    """Quality gate: a variant over this perplexity rise is not pushed (the job fails with the gate's reason)."""
    accept_quality_loss: bool = False
    serve: bool = True
    """Serve base and variant with vLLM where this machine serves the target (cpu), as `hubc optimize` does."""
    eval_texts: tuple[str, ...] = ()
    eval_windows: int = 16
    seq_len: int = 512
    variant: str | None = None
    """Name template of this target's variant repo, instead of `variants.name`."""

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> TargetSpec:
        calibration = data.get("calibration_text")
        return cls(**{**data, "eval_texts": tuple(data.get("eval_texts") or ()),
                      "calibration_text": tuple(calibration) if isinstance(calibration, list) else calibration})

    def recipe_hash(self) -> str:
        """What the variant is built with (everything but its repo name), hashed: part of a job's identity."""
        options = {k: v for k, v in self.to_dict().items() if k != "variant"}
        return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]

    def optimize_config(self, *, out: Path, push: str, private: bool, revision: str):
        """The OptimizeConfig `hubc optimize REPO --revision SHA --target T --push VARIANT ...` would build."""
        from advisor.evaluate import EvalConfig
        from advisor.recipe import Recipe
        from advisor.recommend import Choices
        from hubplugin.optimize import OptimizeConfig

        return OptimizeConfig(
            recipe=Recipe.from_yaml(self.recipe_yaml) if self.recipe_yaml else None,
            choices=Choices(scheme=self.scheme, method=self.method, dense_budget=self.dense_budget,
                            budget_scheme=self.budget_scheme, activations=self.activations,
                            group_size=self.group_size, structure=dict(self.structure) if self.structure else None,
                            heal_minutes=self.heal_minutes, calibration_text=self.calibration_text),
            max_size=self.max_size,
            out=out, push=push, private=private, revision=revision, serve=self.serve,
            max_ppl_increase=self.max_ppl_increase, accept_quality_loss=self.accept_quality_loss,
            eval=EvalConfig(texts=self.eval_texts or EvalConfig().texts, seq_len=self.seq_len,
                            windows=self.eval_windows),
        )


@dataclass(frozen=True)
class RetrySpec:
    """A failed job is tried again after backoff_seconds × 2^(attempt-1) (at most max_backoff_seconds), until it has
    run max_attempts times; then it is marked failed with its reason."""

    max_attempts: int = 3
    backoff_seconds: float = 60.0
    max_backoff_seconds: float = 3600.0

    def delay(self, attempts: int) -> float:
        return min(self.max_backoff_seconds, self.backoff_seconds * 2 ** max(0, attempts - 1))


@dataclass(frozen=True)
class RunnerSpec:
    """Where jobs run: `local` (one worker process beside the endpoint, one job at a time) or `ray` (each job a Ray
    task on the cluster at `address`; `num_gpus` is requested for GPU targets, `num_cpus` for every job)."""

    kind: str = "local"
    address: str | None = None
    """Ray cluster address (`auto`, `HOST:6379`, `ray://HOST:10001`); none starts a Ray instance on this machine."""
    num_cpus: float = 1.0
    num_gpus: float = 1.0
    max_parallel: int = 4
    """Jobs in flight on the cluster at once; the rest stay queued in SQLite, where newer commits can supersede them."""
    forward_env: tuple[str, ...] = ("HF_ENDPOINT",)
    """Environment variables passed to the Ray tasks (e.g. HF_TOKEN when the cluster's nodes have none)."""


@dataclass(frozen=True)
class WatchConfig:
    """watch.yaml, validated."""

    targets: tuple[TargetSpec, ...]
    repos: tuple[str, ...] = ()
    owners: tuple[str, ...] = ()
    variant_name: str = "{name}-{target}"
    variant_owner: str | None = None
    """Namespace of the variant repos; default: the base repo's owner."""
    private: bool = False
    retry: RetrySpec = field(default_factory=RetrySpec)
    runner: RunnerSpec = field(default_factory=RunnerSpec)
    secret_env: str = "HUBC_WEBHOOK_SECRET"
    """Environment variable holding the webhook's secret (never the secret itself in the file)."""
    queue: Path | None = None
    """The SQLite job queue; default $HUBC_CACHE/watch/jobs.sqlite (~/.cache/hubc/watch/jobs.sqlite)."""
    lease_seconds: float = 60.0
    """A running job whose worker has not renewed its lease for this long is taken back and retried."""

    def watches(self, repo: str) -> bool:
        return repo in self.repos or repo.split("/")[0] in self.owners

    def variant_repo(self, base: str, spec: TargetSpec) -> str:
        owner, name = base.split("/", 1)
        values = {"owner": owner, "name": name, "target": spec.target}
        return f"{self.variant_owner or owner}/{(spec.variant or self.variant_name).format(**values)}"

    def queue_path(self) -> Path:
        return self.queue or default_queue_path()


def default_queue_path() -> Path:
    from hubplugin.source import cache_dir

    return cache_dir() / "watch" / "jobs.sqlite"


# ---------------------------------------------------------------------------------------------- loading

_TOP = ("version", "watch", "targets", "variants", "retry", "runner", "secret_env", "queue", "lease_seconds")
_TARGET_KEYS = ("target", "recipe", "scheme", "method", "dense_budget", "budget_scheme", "activations", "group_size",
                "structure", "heal_minutes", "max_size", "calibration_text", "max_ppl_increase", "accept_quality_loss", "serve", "eval_texts", "eval_windows", "seq_len", "variant")


def load_config(path: str | Path) -> WatchConfig:
    """Read and validate watch.yaml; raises WatchConfigError with one line naming the key and the fix."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise WatchConfigError(f"cannot read {path}: {exc.strerror}", hint="pass --config watch.yaml") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise WatchConfigError(f"{path} is not valid YAML{where}", hint="fix the YAML syntax") from None
    data = _mapping(data, path.name, _TOP)
    if data.get("version", 1) != 1:
        raise WatchConfigError(f"{path.name}: version {data['version']!r} is not one this hubc reads",
                               hint="use version: 1")
    watch = _mapping(data.get("watch"), "watch", ("repos", "owners"))
    repos, owners = _strings(watch, "repos", "watch"), _strings(watch, "owners", "watch")
    for repo in repos:
        _check_repo_id(repo, "watch.repos")
    if not repos and not owners:
        raise WatchConfigError("watch: names no repos and no owners", hint="add `repos: [org/model]` or `owners: [org]`")
    raw_targets = data.get("targets")
    if not isinstance(raw_targets, list) or not raw_targets:
        raise WatchConfigError("targets: must be a list of at least one target",
                               hint="e.g. `targets: [a10g, {target: cpu, serve: false}]`")
    targets = tuple(_target(t, f"targets[{i}]", path.parent) for i, t in enumerate(raw_targets))
    variants = _mapping(data.get("variants"), "variants", ("name", "owner", "private"))
    runner = _runner(_mapping(data.get("runner"), "runner", ("kind", "address", "num_cpus", "num_gpus",
                                                              "max_parallel", "forward_env")))
    retry = _mapping(data.get("retry"), "retry", ("max_attempts", "backoff_seconds", "max_backoff_seconds"))
    queue = _value(data, "queue", str, None, "")
    config = WatchConfig(
        targets=targets, repos=repos, owners=owners,
        variant_name=_value(variants, "name", str, "{name}-{target}", "variants"),
        variant_owner=_value(variants, "owner", str, None, "variants"),
        private=_value(variants, "private", bool, False, "variants"),
        retry=RetrySpec(max_attempts=_positive(retry, "max_attempts", int, 3, "retry"),
                        backoff_seconds=_positive(retry, "backoff_seconds", float, 60.0, "retry"),
                        max_backoff_seconds=_positive(retry, "max_backoff_seconds", float, 3600.0, "retry")),
        runner=runner,
        secret_env=_value(data, "secret_env", str, "HUBC_WEBHOOK_SECRET", ""),
        queue=(path.parent / queue).resolve() if queue else None,
        lease_seconds=_positive(data, "lease_seconds", float, 60.0, ""),
    )
    _check_names(config)
    return config


def _where(section: str, key: str) -> str:
    return f"{section}.{key}" if section else key


def _mapping(data, where: str, known: tuple[str, ...]) -> dict:
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WatchConfigError(f"{where}: must be a mapping, not {type(data).__name__}",
                               hint=f"known keys: {', '.join(known)}")
    unknown = sorted(str(k) for k in data if k not in known)
    if unknown:
        raise WatchConfigError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}",
                               hint=f"known keys: {', '.join(known)}")
    return data


def _value(data: dict, key: str, kind: type, default, section: str):
    if key not in data or (data[key] is None and default is None):
        return default
    value = data[key]
    ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise WatchConfigError(f"{_where(section, key)}: expected {kind.__name__}, got {value!r}")
    if kind is float and not math.isfinite(value):  # YAML's .nan passes every bound: a gate or budget turned off
        raise WatchConfigError(f"{_where(section, key)}: expected a finite number, got {value!r}")
    return value


def _positive(data: dict, key: str, kind: type, default, section: str):
    value = _value(data, key, kind, default, section)
    if value is not None and value <= 0:
        raise WatchConfigError(f"{_where(section, key)}: must be positive, got {value!r}")
    return value


def _at_least_zero(data: dict, key: str, default: float, section: str) -> float:
    value = _value(data, key, float, default, section)
    if value < 0:
        raise WatchConfigError(f"{_where(section, key)}: must be 0 or more, got {value!r}")
    return value


def _strings(data: dict, key: str, section: str) -> tuple[str, ...]:
    value = data.get(key) or []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise WatchConfigError(f"{_where(section, key)}: expected a list of names, got {value!r}")
    return tuple(value)


def _check_repo_id(repo: str, where: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError:
        raise WatchConfigError(f"{where}: '{repo}' is not a valid repo id", hint="use the form org/name") from None
    if "/" not in repo:
        raise WatchConfigError(f"{where}: '{repo}' has no owner", hint="use the form org/name")


def _target(raw, where: str, base_dir: Path) -> TargetSpec:
    from advisor.errors import AdvisorError
    from advisor.targets import get_target

    data = {"target": raw} if isinstance(raw, str) else _mapping(raw, where, _TARGET_KEYS)
    name = _value(data, "target", str, None, where)
    if not name:
        raise WatchConfigError(f"{where}: names no `target`", hint="e.g. `{target: a10g}` (see `hubc targets`)")
    recipe_yaml = None
    try:
        target = get_target(name)
        if data.get("scheme") is not None:
            target.require_scheme(_value(data, "scheme", str, None, where))
        if data.get("recipe") is not None:
            recipe_yaml = _recipe(_value(data, "recipe", str, None, where), base_dir, target.name, where)
    except AdvisorError as exc:
        raise WatchConfigError(f"{where}: {exc.message}", hint=exc.hint) from None
    from advisor.quantize import METHODS

    method = _value(data, "method", str, None, where)
    if method is not None and method not in METHODS:
        raise WatchConfigError(f"{where}.method: unknown method '{method}'", hint=f"use one of: {', '.join(METHODS)}")
    given = [k for k in ("scheme", "method", "dense_budget", "budget_scheme", "activations", "group_size",
                         "structure", "heal_minutes", "max_size", "calibration_text") if data.get(k) is not None]
    if recipe_yaml and given:
        raise WatchConfigError(f"{where}: `recipe` already says how to quantize; {', '.join(given)} would conflict",
                               hint="edit the recipe file, or drop `recipe`")
    budget = _value(data, "dense_budget", float, None, where)
    if budget is not None and not 0 <= budget < 1:
        raise WatchConfigError(f"{where}.dense_budget: must be in [0, 1), got {budget}")
    structure, heal_minutes, max_size, calibration = _structure_keys(data, where, base_dir)
    return TargetSpec(
        target=target.name, recipe_yaml=recipe_yaml, scheme=data.get("scheme"), method=method, dense_budget=budget,
        budget_scheme=_value(data, "budget_scheme", str, None, where),
        activations=_value(data, "activations", str, None, where),
        group_size=_positive(data, "group_size", int, None, where),
        structure=structure, heal_minutes=heal_minutes, max_size=max_size, calibration_text=calibration,
        max_ppl_increase=_at_least_zero(data, "max_ppl_increase", 0.05, where),
        accept_quality_loss=_value(data, "accept_quality_loss", bool, False, where),
        serve=_value(data, "serve", bool, True, where),
        eval_texts=_strings(data, "eval_texts", where),
        eval_windows=_positive(data, "eval_windows", int, 16, where),
        seq_len=_positive(data, "seq_len", int, 512, where),
        variant=_value(data, "variant", str, None, where),
    )


def _structure_keys(data: dict, where: str, base_dir: Path) -> tuple:
    """A target's `structure`, `heal_minutes`, `max_size` and `calibration_text`, checked as `hubc optimize` checks
    its flags (before any job is queued)."""
    from advisor.errors import AdvisorError
    from advisor.recipe import check_structure
    from advisor.size_budget import parse_size

    structure = data.get("structure")
    if structure is not None:
        try:
            check_structure(structure)
        except AdvisorError as exc:
            raise WatchConfigError(f"{where}.structure: {exc.message}", hint=exc.hint) from None
        if "latency" in structure:
            raise WatchConfigError(f"{where}.structure: `latency` is filled in by hubc from `speedup`",
                                   hint="give `speedup: X` alone")
    heal_minutes = _value(data, "heal_minutes", float, None, where)
    if heal_minutes is not None and heal_minutes < 0:
        raise WatchConfigError(f"{where}.heal_minutes: must be 0 or more, got {heal_minutes}")
    if heal_minutes and not structure:
        raise WatchConfigError(f"{where}.heal_minutes: heals a model after structure; this target removes nothing",
                               hint="add `structure: {params: 0.2}` (or another), or drop heal_minutes")
    max_size = None
    if data.get("max_size") is not None:
        try:
            max_size = parse_size(data["max_size"])
        except ValueError as exc:
            raise WatchConfigError(f"{where}.max_size: {exc}") from None
        if structure and "speedup" in structure:
            raise WatchConfigError(f"{where}: `max_size` and a structure `speedup` each choose what to remove",
                                   hint="give one of them")
    names = _strings(data, "calibration_text", where)
    from advisor.evaluate import SHIPPED_TEXTS

    resolved = []
    for name in names:
        if name not in SHIPPED_TEXTS:
            path = (base_dir / name).expanduser()
            if not path.is_file():
                raise WatchConfigError(f"{where}.calibration_text: no file {path}",
                                       hint=f"give UTF-8 text files (relative to watch.yaml) or "
                                            f"{', '.join(SHIPPED_TEXTS)}")
            name = str(path.resolve())
        resolved.append(name)
    calibration = None if not resolved else resolved[0] if len(resolved) == 1 else tuple(resolved)
    return structure, heal_minutes, max_size, calibration


def _recipe(file: str, base_dir: Path, target: str, where: str) -> str:
    from advisor.recipe import Recipe

    path = base_dir / file
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise WatchConfigError(f"{where}.recipe: cannot read {path}: {exc.strerror}") from None
    import yaml

    try:
        recipe = Recipe.from_yaml(text)
    except (yaml.YAMLError, TypeError) as exc:
        raise WatchConfigError(f"{where}.recipe: {path} is not a valid recipe ({str(exc).splitlines()[0]})") from None
    if recipe.target != target:
        raise WatchConfigError(f"{where}.recipe: {path} is a recipe for {recipe.target}, not {target}",
                               hint="name the recipe's target, or use a recipe made for this one")
    return text


def _runner(data: dict) -> RunnerSpec:
    kind = _value(data, "kind", str, "local", "runner")
    if kind not in ("local", "ray"):
        raise WatchConfigError(f"runner.kind: unknown runner '{kind}'", hint="use local or ray")
    if kind == "local" and set(data) - {"kind"}:
        raise WatchConfigError(f"runner: {', '.join(sorted(set(data) - {'kind'}))} only apply to `kind: ray`")
    return RunnerSpec(
        kind=kind, address=_value(data, "address", str, None, "runner"),
        num_cpus=_value(data, "num_cpus", float, 1.0, "runner"),
        num_gpus=_value(data, "num_gpus", float, 1.0, "runner"),
        max_parallel=_positive(data, "max_parallel", int, 4, "runner"),
        forward_env=_strings(data, "forward_env", "runner") if "forward_env" in data else ("HF_ENDPOINT",),
    )


def _check_names(config: WatchConfig) -> None:
    """Every template uses known placeholders and gives each target its own repo (two targets pushing to one repo
    would overwrite each other's variant)."""
    sample = "owner/model"
    seen: dict[str, str] = {}
    for i, spec in enumerate(config.targets):
        template = spec.variant or config.variant_name
        where = f"targets[{i}].variant" if spec.variant else "variants.name"
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        bad = [f for f in fields if f not in NAME_FIELDS]
        if bad:
            raise WatchConfigError(f"{where}: unknown placeholder {{{bad[0]}}} in '{template}'",
                                   hint=f"use {', '.join('{' + f + '}' for f in NAME_FIELDS)}")
        repo = config.variant_repo(sample, spec)
        _check_repo_id(repo, where)
        if repo in seen:
            raise WatchConfigError(f"targets {seen[repo]} and {spec.target} would push to the same repo ({repo})",
                                   hint="give one of them its own `variant:` name, e.g. '{name}-{target}-b'")
        if repo == sample:
            raise WatchConfigError(f"{where}: '{template}' names the base repo itself", hint="use '{name}-{target}'")
        seen[repo] = spec.target
