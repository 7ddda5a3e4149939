"""`harness.yaml`: the configuration the production run uses, per profile, written back from
measurements (phase 5 of the roadmap).

```yaml
profiles:
  embedded:
    MAX_CONTEXT_TOKENS: 8192        # largest context that fits the memory budget
    CONTEXT_TRIM_THRESHOLD: 6553    # 80% of it
    TRIM_INTERVAL: 50               # exchanges per conversation before a restart
    MODEL_VRAM_GB: 0.41             # model memory without KV (GB = 1e9 bytes; RAM on a CPU)
    KV_CACHE_PER_TOKEN_MB: 0.0031   # KV bytes per token of context (MB = 1e6 bytes)
    n_ctx: 8192
    parallel: 1
    provenance:
      MAX_CONTEXT_TOKENS: {report: ..., date: ..., backend: ..., model: ...}
```

`jobs` holds the jobs `harness validate` validated, one per input file (keyed by its absolute
path; validating a second input adds a second entry, validating the same input again replaces
its entry). `harness run INPUT` runs the recorded job of INPUT when its command line leaves a
setting out, and its banner says whether the job it runs is the one validated:

```yaml
jobs:
  /home/me/cands.csv:
    prompt: /home/me/rubric.yaml
    prompt_sha256: 9f2c...
    id_column: candidate_id
    profile: embedded
    backend: embedded
    report_dir: /home/me/reports
    validated_at: '2026-12-07T16:40:00+00:00'
```

Write-back is a round trip (ruamel.yaml): comments, other profiles and unknown keys stay as
they were, and a value that did not change is not touched (nor is its provenance), so a second
run with the same measurements changes nothing. The engine reads these values as the defaults
of its trim policy.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.errors import ConfigError
from harness.fileio import atomic_write_text
from harness.lock import hold, lock_path_for

__all__ = [
    "CONFIG_KEYS",
    "DEFAULT_CONFIG_PATH",
    "JobRecord",
    "ProfileConfig",
    "find_job",
    "load_profile",
    "measured_values",
    "record_job",
    "write_back",
]

DEFAULT_CONFIG_PATH = Path("harness.yaml")
CONFIG_KEYS: dict[str, type] = {
    "MAX_CONTEXT_TOKENS": int,
    "CONTEXT_TRIM_THRESHOLD": int,
    "TRIM_INTERVAL": int,
    "MODEL_VRAM_GB": float,
    "KV_CACHE_PER_TOKEN_MB": float,
    "n_ctx": int,
    "parallel": int,
    "CONCURRENCY": int,
    "STRATEGY": str,
    "REQUEST_PATH": str,
    "SERVER_FLAGS": str,
    "SCORE_MODE": str,
}
_HEADER = """\
# Configuration of the production run, per profile (see harness/config.py).
# Values are written back from measurements by `pytest suites/context_limits` and
# `pytest suites/performance` with `--harness-write-config`, only from a phase that passed; each
# carries its provenance. Edit by hand if you like: a later write-back only replaces values whose
# measurement changed. `jobs`: the jobs `harness validate` validated, one per input file
# (`harness run INPUT` runs its job when no option says otherwise).
"""


@dataclass(frozen=True, slots=True)
class ProfileConfig:
    """The values of one profile; None where not set."""

    name: str
    values: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def get(self, key: str) -> Any:
        return self.values.get(key)


def _yaml() -> Any:
    from ruamel.yaml import YAML

    y = YAML(typ="rt")
    y.indent(mapping=2, sequence=4, offset=2)
    y.width = 100
    return y


def _load_doc(path: Path) -> Any:
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.error import YAMLError

    if not path.exists():
        return CommentedMap()
    try:
        doc = _yaml().load(path.read_text(encoding="utf-8"))
    except YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{at}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if doc is None:
        return CommentedMap()
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{path}: must be a mapping with a `profiles` key")
    unknown = set(doc) - {"profiles", "jobs"}
    if unknown:
        raise ConfigError(
            f"{path}: unknown top-level key(s): {', '.join(sorted(map(str, unknown)))}"
        )
    return doc


def load_profile(path: str | Path, profile: str) -> ProfileConfig:
    """The values of `profile` in the config file (empty when the file or profile is absent)."""
    p = Path(path)
    doc = _load_doc(p)
    prof = (doc.get("profiles") or {}).get(profile) or {}
    if not isinstance(prof, Mapping):
        raise ConfigError(f"{p}: profiles.{profile} must be a mapping")
    values: dict[str, Any] = {}
    for key, value in prof.items():
        if key == "provenance":
            continue
        if key not in CONFIG_KEYS:
            raise ConfigError(
                f"{p}: profiles.{profile}.{key}: unknown setting; known: {', '.join(CONFIG_KEYS)}"
            )
        want = CONFIG_KEYS[key]
        if value is not None and want is str and not isinstance(value, str):
            raise ConfigError(f"{p}: profiles.{profile}.{key}: {value!r} is not a word")
        if (
            value is not None
            and want is not str
            and (isinstance(value, bool) or not isinstance(value, want | int))
        ):
            raise ConfigError(f"{p}: profiles.{profile}.{key}: {value!r} is not a number")
        values[str(key)] = value
    return ProfileConfig(profile, values, dict(prof.get("provenance") or {}))


@dataclass(frozen=True, slots=True)
class JobRecord:
    """A job `harness validate` validated (harness.yaml's `jobs.<input>`)."""

    input: Path
    prompt: Path | None
    """None: the packaged rubric (no --prompt)."""
    prompt_sha256: str
    id_column: str
    profile: str
    backend: str | None = None
    model: str | None = None
    base_url: str | None = None
    report_dir: Path = Path("reports")
    validated_at: str = ""

    def to_yaml(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt": str(self.prompt) if self.prompt is not None else None,
            "prompt_sha256": self.prompt_sha256,
            "id_column": self.id_column,
            "profile": self.profile,
            "backend": self.backend,
            "model": self.model,
            "base_url": self.base_url,
            "report_dir": str(self.report_dir),
            "validated_at": self.validated_at,
        }
        return {k: v for k, v in out.items() if v is not None}


JOB_FIELDS = {
    "prompt": str,
    "prompt_sha256": str,
    "id_column": str,
    "profile": str,
    "backend": str,
    "model": str,
    "base_url": str,
    "report_dir": str,
    "validated_at": str,
}
"""The keys of a `jobs.<input>` entry, each a word."""


def _job_key(input: Path) -> str:
    return str(input.resolve())


def find_job(path: str | Path, input: Path) -> JobRecord | None:
    """The validated job of `input` in the config file (None when none is recorded)."""
    p = Path(path)
    jobs = _load_doc(p).get("jobs") or {}
    if not isinstance(jobs, Mapping):
        raise ConfigError(f"{p}: jobs must be a mapping of input files to their jobs")
    key = _job_key(input)
    entry = jobs.get(key)
    if entry is None:
        return None
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{p}: jobs.{key} must be a mapping")
    for k, v in entry.items():
        if k not in JOB_FIELDS:
            raise ConfigError(f"{p}: jobs.{key}.{k}: unknown key; known: {', '.join(JOB_FIELDS)}")
        if v is not None and not isinstance(v, str):
            raise ConfigError(f"{p}: jobs.{key}.{k}: {v!r} is not a word")
    for k in ("prompt_sha256", "id_column", "profile"):
        if not entry.get(k):
            raise ConfigError(f"{p}: jobs.{key}: {k} is missing (run harness validate again)")
    return JobRecord(
        input=Path(key),
        prompt=Path(entry["prompt"]) if entry.get("prompt") else None,
        prompt_sha256=str(entry["prompt_sha256"]),
        id_column=str(entry["id_column"]),
        profile=str(entry["profile"]),
        backend=entry.get("backend"),
        model=entry.get("model"),
        base_url=entry.get("base_url"),
        report_dir=Path(entry.get("report_dir") or "reports"),
        validated_at=str(entry.get("validated_at") or ""),
    )


def record_job(path: str | Path, job: JobRecord) -> None:
    """Record `job` as its input's validated job (replacing an earlier one of that input),
    under the file's lock; the rest of the file is left as it was."""
    from ruamel.yaml.comments import CommentedMap

    p = Path(path)
    with hold(lock_path_for(p), what=f"the config file {p}", wait_s=WRITE_BACK_WAIT_S):
        doc = _load_doc(p)
        fresh = not p.exists()
        jobs = doc.setdefault("jobs", CommentedMap())
        jobs[_job_key(job.input)] = CommentedMap(job.to_yaml())
        buf = io.StringIO()
        _yaml().dump(doc, buf)
        atomic_write_text(p, (_HEADER if fresh else "") + buf.getvalue())


def measured_values(
    config: ProfileConfig, backend: str, model: str | None
) -> tuple[dict[str, Any], list[str]]:
    """harness.yaml values measured on this backend and model (or set by hand: no
    provenance); values measured on another backend or model are ignored, and listed."""
    use: dict[str, Any] = {}
    ignored: list[str] = []
    for key, value in config.values.items():
        if value is None:
            continue
        prov = config.provenance.get(key)
        on = prov.get("backend") if isinstance(prov, Mapping) else None
        of = prov.get("model") if isinstance(prov, Mapping) else None
        if on and on != backend:
            ignored.append(f"{key} = {value} (measured on {on}, this run is {backend})")
            continue
        if of and model and of != model:
            ignored.append(f"{key} = {value} (measured with {of}, this run uses {model})")
            continue
        use[key] = value
    return use, ignored


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(b)))
        except (TypeError, ValueError):
            return False
    return bool(a == b)


def write_back(
    path: str | Path,
    profile: str,
    values: Mapping[str, Any],
    provenance: Mapping[str, Any],
) -> list[str]:
    """Set `values` in `profile` of the config file; returns the keys that changed.

    Only changed values (and their provenance) are written; other profiles, comments and
    keys are left alone. Nothing is written when nothing changed.
    """
    p = Path(path)
    for key in values:
        if key not in CONFIG_KEYS:
            raise ConfigError(f"cannot write unknown setting {key!r} to {p}")
    # Read, change and replace under the file's lock: two sessions writing back at once would
    # each replace the file with their own copy, and one's values would be lost.
    with hold(lock_path_for(p), what=f"the config file {p}", wait_s=WRITE_BACK_WAIT_S):
        return _write_back(p, profile, values, provenance)


WRITE_BACK_WAIT_S = 60.0
"""How long a write-back waits for another one to finish with the config file."""


def _write_back(
    p: Path, profile: str, values: Mapping[str, Any], provenance: Mapping[str, Any]
) -> list[str]:
    from ruamel.yaml.comments import CommentedMap

    doc = _load_doc(p)
    fresh = not p.exists()
    profiles = doc.setdefault("profiles", CommentedMap())
    prof = profiles.setdefault(profile, CommentedMap())
    changed: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        value = CONFIG_KEYS[key](value)
        if key in prof and _same(prof[key], value):
            continue
        prof[key] = value
        prov = prof.setdefault("provenance", CommentedMap())
        prov[key] = CommentedMap(provenance)
        changed.append(key)
    if "provenance" in prof:  # keep provenance last, after the values
        prov = prof.pop("provenance")
        prof["provenance"] = prov
    if changed:
        buf = io.StringIO()
        _yaml().dump(doc, buf)
        atomic_write_text(p, (_HEADER if fresh else "") + buf.getvalue())
    return changed
