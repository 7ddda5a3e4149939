"""Workloads: prompts, candidates in (CSV, OpenAI Batch JSONL), work items, scored replies.

Every reader here validates its input and raises `InputError` naming the file and line or row
and the problem; nothing is half-read. The synthetic candidate generator is seeded, so a
workload of any size is reproducible.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

from harness.csvfile import CsvFile, Rejected
from harness.errors import ConfigError, InputError
from harness.inputs import MAX_LINE_BYTES, Line, parse_line, request_lines

__all__ = [
    "BAD_ROWS_LISTED",
    "DEFAULT_PROMPT_PATH",
    "ON_BAD_ROW",
    "CandidateTable",
    "PromptSpec",
    "Rejected",
    "WorkItem",
    "bad_rows",
    "batch_line",
    "check_bad_rows",
    "generate_candidates",
    "item_maker",
    "items_from_batch",
    "items_from_table",
    "load_prompt",
    "parse_reply",
    "read_batch_jsonl",
    "read_batch_lines",
    "read_candidates_csv",
    "tight_grammar",
    "tokens_for_schema",
    "write_candidates_csv",
]

DEFAULT_PROMPT_PATH = (
    Path(__file__).resolve().parent.parent / "scenarios" / "prompts" / "recruiter.yaml"
)
STRUCTURED_MODES = ("grammar", "schema", "unconstrained", "none")
_PLACEHOLDER = re.compile(r"(?<!\{)\{([A-Za-z_][A-Za-z0-9_ .-]*)\}(?!\})")


# -- work items -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkItem:
    """One request of a batch: an id, its messages and its generation parameters."""

    custom_id: str
    messages: tuple[Mapping[str, str], ...]
    max_tokens: int | None = None
    temperature: float | None = None
    seed: int | None = None
    output_schema: Mapping[str, Any] | None = None
    grammar: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Other body parameters (from a batch line), passed through to the server."""
    constrain: bool = True
    """Whether the server is asked to enforce `output_schema`; when False the schema is only
    used to parse the free-text reply."""

    @property
    def prefix(self) -> tuple[Mapping[str, str], ...]:
        """The leading system messages: what requests of a batch share."""
        n = 0
        while n < len(self.messages) and self.messages[n]["role"] == "system":
            n += 1
        return self.messages[:n]

    @property
    def turn(self) -> tuple[Mapping[str, str], ...]:
        """The messages after the shared prefix (usually one user message)."""
        return self.messages[len(self.prefix) :]


# -- prompts ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PromptSpec:
    """A system prompt, a user template with `{column}` placeholders, and an output schema."""

    name: str
    system: str
    user_template: str
    output_schema: Mapping[str, Any] | None
    path: str = ""
    irrelevant_fields: tuple[str, ...] | None = None
    """Input columns the prompt says must never move a score (`irrelevant_fields:` in the
    prompt file): the quality phase's bias pairs vary only these. None: not declared. Not part
    of `sha256` (it shapes no request)."""

    def placeholders(self) -> list[str]:
        return _PLACEHOLDER.findall(self.user_template)

    @property
    def sha256(self) -> str:
        """Hash of what shapes the requests (system, template, schema): names the prompt in
        reports and results files, so a changed rubric is never taken for the old one."""
        import hashlib

        blob = json.dumps(
            [self.system, self.user_template, self.output_schema], sort_keys=True
        ).encode()
        return hashlib.sha256(blob).hexdigest()

    def check_columns(self, columns: Sequence[str], source: str) -> None:
        """Raise InputError if the template names a column `columns` lacks."""
        for name in self.placeholders():
            if name != "columns" and name not in columns:
                raise InputError(
                    f"the prompt template ({self.path or self.name}) uses {{{name}}} but the "
                    f"input has no column {name!r}; columns: {', '.join(columns)}",
                    path=source,
                )

    def render(self, row: Mapping[str, str], id_column: str | None = None) -> str:
        """The user message for one row."""
        listing = "\n".join(f"{k}: {v}" for k, v in row.items() if k != id_column)

        def sub(match: re.Match[str]) -> str:
            key = match.group(1)
            return listing if key == "columns" else str(row.get(key, ""))

        text = _PLACEHOLDER.sub(sub, self.user_template)
        return text.replace("{{", "{").replace("}}", "}").rstrip("\n")


def load_prompt(path: str | Path | None = None) -> PromptSpec:
    """Load a prompt file (YAML: `system`, `user_template`, optional `output_schema`, `name`)."""
    p = Path(path) if path else DEFAULT_PROMPT_PATH
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("prompt file not found", path=str(p)) from None
    except UnicodeDecodeError as exc:
        raise InputError(f"prompt file is not UTF-8 (byte {exc.start})", path=str(p)) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        # One line: PyYAML's own message spans several, with the source quoted.
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        where = f" at column {mark.column + 1}" if mark is not None else ""
        raise InputError(
            f"prompt file is not valid YAML: {problem}{where}", path=str(p), line=line
        ) from None
    if not isinstance(data, dict):
        raise InputError(
            "prompt file must be a mapping with `system` and `user_template`", path=str(p)
        )
    unknown = set(data) - {"name", "system", "user_template", "output_schema", "irrelevant_fields"}
    if unknown:
        raise InputError(
            f"unknown key(s) in prompt file: {', '.join(sorted(unknown))}", path=str(p)
        )
    for key in ("system", "user_template"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise InputError(f"prompt file needs a non-empty string `{key}`", path=str(p))
    schema = data.get("output_schema")
    if schema is not None and not isinstance(schema, dict):
        raise InputError("`output_schema` must be a JSON schema object", path=str(p))
    irrelevant = data.get("irrelevant_fields")
    if irrelevant is not None and (
        not isinstance(irrelevant, list) or not all(isinstance(f, str) for f in irrelevant)
    ):
        raise InputError("`irrelevant_fields` must be a list of column names", path=str(p))
    return PromptSpec(
        name=str(data.get("name") or p.stem),
        system=data["system"].rstrip("\n"),
        user_template=data["user_template"],
        output_schema=schema,
        path=str(p),
        irrelevant_fields=tuple(irrelevant) if irrelevant is not None else None,
    )


# -- structured output ------------------------------------------------------------------------


def _gbnf_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def tight_grammar(schema: Mapping[str, Any] | None) -> str | None:
    """A GBNF grammar with no free whitespace for simple flat object schemas, else None.

    A JSON-schema grammar leaves whitespace free, and small models then emit blanks until
    `max_tokens` (seen with Gemma 3 270M: 0% parsed). This grammar fixes the layout:
    `{"score": 7}` exactly. Supported property types: integer with minimum/maximum (at most
    100 values), string with enum, boolean.
    """
    if not schema or schema.get("type") != "object":
        return None
    props = schema.get("properties") or {}
    required = list(schema.get("required") or props)
    if not props or set(required) != set(props):
        return None
    parts: list[str] = []
    rules: list[str] = []
    for i, (key, spec) in enumerate(props.items()):
        sep = ", " if i else ""
        parts.append(_gbnf_literal(f'{sep}"{key}": '))
        rule = f"v{i}"
        kind = spec.get("type")
        if kind == "integer" and "minimum" in spec and "maximum" in spec:
            lo, hi = int(spec["minimum"]), int(spec["maximum"])
            if hi < lo or hi - lo > 100:
                return None
            # Longer literals first so "10" is preferred over its prefix "1".
            values = sorted((str(v) for v in range(lo, hi + 1)), key=lambda s: (-len(s), s))
            rules.append(f"{rule} ::= " + " | ".join(_gbnf_literal(v) for v in values))
        elif kind == "string" and isinstance(spec.get("enum"), list):
            rules.append(
                f"{rule} ::= " + " | ".join(_gbnf_literal(json.dumps(v)) for v in spec["enum"])
            )
        elif kind == "boolean":
            rules.append(f'{rule} ::= "true" | "false"')
        else:
            return None
        parts.append(rule)
    root = "root ::= " + _gbnf_literal("{") + " " + " ".join(parts) + " " + _gbnf_literal("}")
    return "\n".join([root, *rules]) + "\n"


_FENCE = re.compile(r"^```(?:json)?\s*|\s*```$")


@functools.lru_cache(maxsize=64)
def _validator(schema_json: str) -> Any:
    import fastjsonschema

    try:
        return fastjsonschema.compile(json.loads(schema_json))
    except fastjsonschema.JsonSchemaDefinitionException as exc:
        raise ConfigError(f"the output schema is not a valid JSON schema: {exc}") from None


_VALIDATORS: dict[int, tuple[Mapping[str, Any], Any]] = {}


def _validator_for(schema: Mapping[str, Any]) -> Any:
    # Keyed by identity (work items share one schema object); the entry keeps it alive.
    hit = _VALIDATORS.get(id(schema))
    if hit is None or hit[0] is not schema:
        hit = (schema, _validator(json.dumps(schema, sort_keys=True)))
        if len(_VALIDATORS) > 256:
            _VALIDATORS.clear()
        _VALIDATORS[id(schema)] = hit
    return hit[1]


def parse_reply(text: str, schema: Mapping[str, Any] | None) -> dict[str, Any]:
    """Parse a model reply as a JSON object valid under `schema`; ValueError says why not."""
    cleaned = text.strip()
    if not cleaned.startswith("{"):
        cleaned = _FENCE.sub("", cleaned)
    start, end = cleaned.find("{"), cleaned.rfind("}")
    if start < 0 or end < start:
        raise ValueError("reply holds no JSON object")
    try:
        value = orjson.loads(cleaned[start : end + 1])
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"reply is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError("reply is not a JSON object")
    if schema:
        import fastjsonschema

        try:
            _validator_for(schema)(value)
        except fastjsonschema.JsonSchemaValueException as exc:
            raise ValueError(f"reply does not match the output schema: {exc.message}") from None
    return value


# -- candidate tables (CSV) -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CandidateTable:
    """A validated candidates CSV: its columns, id column and rows (with their line numbers)."""

    path: str
    columns: tuple[str, ...]
    id_column: str
    rows: tuple[dict[str, str], ...]
    lines: tuple[int, ...]
    """Line number in the file where each row starts (1-based; line 1 is the header)."""
    rejected: tuple[Rejected, ...] = ()
    """Bad rows set aside (`on_bad="skip"`), in file order."""


ON_BAD_ROW = ("refuse", "skip")
"""What a bad row does: `refuse` the input (every bad row listed in one error) or `skip` it
(the good rows run; the bad ones are listed in the table's `rejected`)."""


def read_candidates_csv(
    path: str | Path, id_column: str = "id", *, on_bad: str = "refuse"
) -> CandidateTable:
    """Read and validate a candidates CSV, streamed (`harness.csvfile`: the file is never held
    whole). Raises InputError naming the file and line: for a bad row (wrong number of fields,
    empty or repeated id) every bad row in one error, unless `on_bad="skip"` sets them aside."""
    if on_bad not in ON_BAD_ROW:
        raise ConfigError(f"on bad row {on_bad!r} is not one of {', '.join(ON_BAD_ROW)}")
    p = Path(path)
    f = CsvFile(p, id_column)
    rows: list[dict[str, str]] = []
    lines: list[int] = []
    bad: list[Rejected] = []  # every bad row, in one pass: fixed (or set aside) at once
    for _, line, row in f.rows(bad):
        rows.append(row)
        lines.append(line)
    check_bad_rows(p, bad, len(rows), on_bad)
    return CandidateTable(str(p), f.columns, id_column, tuple(rows), tuple(lines), tuple(bad))


def check_bad_rows(
    path: Path,
    bad: Sequence[Rejected],
    good: int,
    on_bad: str,
    *,
    what: str = "row",
    empty: str = "input has a header but no rows",
) -> None:
    """Raise for bad rows (a batch file's: `what="line"`) unless they are skipped, and for an
    input without a good one (`empty` when there is no bad one either)."""
    if bad and on_bad != "skip":
        raise bad_rows(path, [(r.line, r.reason) for r in bad])
    if not good:
        if bad:
            raise InputError(
                f"every {what} is bad ({len(bad)}); the first: line {bad[0].line}: {bad[0].reason}",
                path=str(path),
            )
        raise InputError(empty, path=str(path))


BAD_ROWS_LISTED = 50
"""How many bad rows one error lists (the total is always given)."""


def bad_rows(path: Path, bad: Sequence[tuple[int, str]]) -> InputError:
    """One error for every bad row of a file: the first where the message starts (`file:line:`
    as any input error), then the others, one a line, up to `BAD_ROWS_LISTED`, and the total."""
    (line, why), rest = bad[0], bad[1:BAD_ROWS_LISTED]
    if len(bad) == 1:
        return InputError(why, path=str(path), line=line)
    listed = "".join(f"\n  {path}:{n}: {w}" for n, w in rest)
    more = len(bad) - 1 - len(rest)
    tail = f"\n  ... and {more} more not listed" if more else ""
    return InputError(
        f"{why}\n  {len(bad)} bad rows in all; the others:{listed}{tail}", path=str(path), line=line
    )


def items_from_table(
    table: CandidateTable,
    prompt: PromptSpec,
    *,
    max_tokens: int = 16,
    temperature: float = 0.0,
    seed: int | None = 42,
    structured: str = "grammar",
) -> list[WorkItem]:
    """One work item per row: the shared system prompt and the row's rendered user message.

    `structured` says how the output schema is enforced: `grammar` (a tight GBNF grammar,
    llama.cpp; falls back to the schema when no tight grammar exists), `schema` (JSON-schema
    structured output), `unconstrained` (free text, parsed against the schema afterwards), or
    `none` (free text, not parsed: pipeline and load tests).
    """
    make = item_maker(
        prompt,
        table.columns,
        table.id_column,
        source=table.path,
        max_tokens=max_tokens,
        temperature=temperature,
        seed=seed,
        structured=structured,
    )
    return [make(row) for row in table.rows]


def item_maker(
    prompt: PromptSpec,
    columns: Sequence[str],
    id_column: str,
    *,
    source: str,
    max_tokens: int = 16,
    temperature: float = 0.0,
    seed: int | None = 42,
    structured: str = "grammar",
) -> Callable[[Mapping[str, str]], WorkItem]:
    """The work item of one row (`items_from_table`'s), the prompt checked against the columns
    once."""
    if structured not in STRUCTURED_MODES:
        raise ConfigError(
            f"structured output {structured!r} is not one of {', '.join(STRUCTURED_MODES)}"
        )
    prompt.check_columns(columns, source)
    schema = prompt.output_schema if structured != "none" else None
    gbnf = tight_grammar(schema) if structured == "grammar" else None
    system = {"role": "system", "content": prompt.system}

    def make(row: Mapping[str, str]) -> WorkItem:
        return WorkItem(
            custom_id=row[id_column],
            messages=(system, {"role": "user", "content": prompt.render(row, id_column)}),
            max_tokens=max_tokens,
            temperature=temperature,
            seed=seed,
            output_schema=schema,
            grammar=gbnf,
            constrain=structured != "unconstrained",
        )

    return make


# -- OpenAI Batch JSONL -----------------------------------------------------------------------


def batch_line(custom_id: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """One OpenAI Batch input line."""
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": dict(body),
    }


_BODY_PARAMS = ("max_tokens", "temperature", "seed")


def _batch_lines(path: Path, max_line_bytes: int) -> Iterator[Line]:
    """`harness.inputs.request_lines`, with a missing, unreadable or empty file named as
    `_read_text` names it."""
    try:
        if path.is_dir():
            raise InputError("input path is a directory, not a file", path=str(path))
        any_line = False
        for line in request_lines(path, max_line_bytes=max_line_bytes):
            any_line = True
            yield line
    except FileNotFoundError:
        raise InputError("input file not found", path=str(path)) from None
    except PermissionError:
        raise InputError("input file cannot be read (permission denied)", path=str(path)) from None
    if not any_line:
        raise InputError("input file is empty", path=str(path))


def read_batch_jsonl(
    path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES, on_bad: str = "refuse"
) -> list[dict[str, Any]]:
    """Read and validate an OpenAI Batch input file, streamed line by line (`harness.inputs`:
    a line over `max_line_bytes`, bytes that are not UTF-8, a line nested too deep to parse
    are that line's error, never a traceback). Raises InputError naming the line: every bad
    line in one error, unless `on_bad="skip"` (then `batch_rejects` lists them)."""
    lines, bad = read_batch_lines(path, max_line_bytes=max_line_bytes)
    check_bad_rows(
        Path(path), bad, len(lines), on_bad, what="line", empty="input has no batch lines"
    )
    return lines


def read_batch_lines(
    path: str | Path, *, max_line_bytes: int = MAX_LINE_BYTES
) -> tuple[list[dict[str, Any]], list[Rejected]]:
    """The good lines of a batch input file and the bad ones (line, custom_id, why)."""
    p = Path(path)
    lines: list[dict[str, Any]] = []
    bad: list[Rejected] = []
    seen: dict[str, int] = {}
    for line in _batch_lines(p, max_line_bytes):
        if line.text is None:  # not text (NUL bytes, not UTF-8, too long): the file's problem
            raise InputError(str(line.problem), path=str(p), line=line.number)
        obj, problem = parse_line(line.text)
        if problem is None:
            problem = _batch_line_problem(obj, seen, line.number)
        if problem is not None:
            cid = obj.get("custom_id") if isinstance(obj, dict) else None
            bad.append(Rejected(line.number, cid if isinstance(cid, str) else "", problem))
            continue
        assert isinstance(obj, dict)
        seen[obj["custom_id"]] = line.number
        lines.append(obj)
    return lines, bad


def _batch_line_problem(obj: Any, seen: Mapping[str, int], n: int) -> str | None:
    if not isinstance(obj, dict):
        return "a batch line must be a JSON object"
    for key in ("custom_id", "body"):
        if key not in obj:
            return f"batch line is missing {key!r}"
    cid = obj["custom_id"]
    if not isinstance(cid, str) or not cid.strip():
        return "`custom_id` must be a non-empty string"
    if cid in seen:
        return f"duplicate custom_id {cid!r} (first on line {seen[cid]})"
    body = obj["body"]
    msgs = body.get("messages") if isinstance(body, dict) else None
    if (
        not isinstance(msgs, list)
        or not msgs
        or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in msgs
        )
    ):
        return "`body.messages` must be a non-empty list of {role, content} objects"
    url = obj.get("url", "/v1/chat/completions")
    if url != "/v1/chat/completions":
        return f"unsupported url {url!r} (only /v1/chat/completions)"
    return None


def items_from_batch(lines: Sequence[Mapping[str, Any]]) -> list[WorkItem]:
    """Work items that send each line's body as it says (as OpenAI's Batch API does)."""
    items: list[WorkItem] = []
    for obj in lines:
        body = dict(obj["body"])
        msgs = tuple({"role": m["role"], "content": m["content"]} for m in body.pop("messages"))
        params = {k: body.pop(k) for k in _BODY_PARAMS if k in body}
        if "max_completion_tokens" in body and "max_tokens" not in params:
            params["max_tokens"] = body.pop("max_completion_tokens")
        body.pop("model", None)
        schema = None
        rf = body.get("response_format")
        if isinstance(rf, dict) and rf.get("type") == "json_schema":
            schema = (rf.get("json_schema") or {}).get("schema")
        grammar = body.pop("grammar", None)
        if grammar is None and schema is not None:
            try:
                grammar = tight_grammar(schema)
            except Exception as exc:  # a malformed schema in a user's line: that line's error
                raise InputError(
                    f"custom_id {obj['custom_id']!r}: its response_format schema cannot be "
                    f"used ({type(exc).__name__}: {exc})"
                ) from None
            if grammar is not None:
                body.pop("response_format", None)
        items.append(
            WorkItem(
                custom_id=obj["custom_id"],
                messages=msgs,
                max_tokens=params.get("max_tokens"),
                temperature=params.get("temperature"),
                seed=params.get("seed"),
                output_schema=schema,
                grammar=grammar,
                extra=body,
            )
        )
    return items


def item_body(item: WorkItem) -> dict[str, Any]:
    """The chat body an item stands for (for `convert`): what `items_from_batch` reads back."""
    body: dict[str, Any] = {"messages": [dict(m) for m in item.messages]}
    for key in _BODY_PARAMS:
        value = getattr(item, key)
        if value is not None:
            body[key] = value
    if item.output_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": dict(item.output_schema)},
        }
    body.update(item.extra)
    return body


# -- synthetic candidates ---------------------------------------------------------------------

_FIRST = [
    "Ana",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Fatima",
    "Goran",
    "Hana",
    "Ivan",
    "Jia",
    "Kofi",
    "Lena",
    "Marek",
    "Nadia",
    "Omar",
    "Priya",
    "Quinn",
    "Rosa",
    "Sami",
    "Tomas",
    "Uma",
    "Viktor",
    "Wen",
    "Xavier",
    "Yara",
    "Zane",
    "Aiko",
    "Bruno",
    "Chidi",
    "Dmitri",
    "Esme",
    "Farid",
    "Greta",
    "Hugo",
    "Ines",
    "Jonas",
    "Kira",
    "Luis",
    "Maya",
    "Nils",
]
_LAST = [
    "Almeida",
    "Brandt",
    "Costa",
    "Dubois",
    "Eriksen",
    "Fischer",
    "Garcia",
    "Haddad",
    "Ibrahim",
    "Jansen",
    "Kowalski",
    "Larsen",
    "Moreau",
    "Nakamura",
    "Okafor",
    "Petrov",
    "Quist",
    "Rossi",
    "Schmidt",
    "Tanaka",
    "Urbina",
    "Varga",
    "Weber",
    "Xu",
    "Yilmaz",
    "Zhou",
]
_TITLES = (
    "Data Engineer", "Senior Data Engineer", "Backend Engineer", "Software Engineer",
    "Analytics Engineer", "Site Reliability Engineer", "Machine Learning Engineer",
    "Data Analyst", "Platform Engineer", "Staff Engineer", "Engineering Manager",
)  # fmt: skip
_SKILLS = (
    "Python", "Scala", "Java", "Go", "Rust", "SQL", "Spark", "Flink", "Beam", "Kafka", "Airflow",
    "Dagster", "dbt", "Iceberg", "Delta Lake", "Parquet", "AWS", "GCP", "Azure", "Terraform",
    "Kubernetes", "Snowflake", "BigQuery", "Postgres", "Trino", "Pandas", "Ray", "Docker",
)  # fmt: skip
_DOMAINS = (
    "logistics",
    "retail",
    "healthcare",
    "fintech",
    "media",
    "gaming",
    "insurance",
    "energy",
)
_EDU = (
    "BSc Computer Science", "MSc Data Science", "BEng Electrical Engineering", "PhD Physics",
    "BA Economics", "bootcamp certificate", "MSc Software Engineering", "BSc Mathematics",
)  # fmt: skip
_LOCATIONS = (
    "Rotterdam",
    "Austin",
    "Singapore",
    "Lisbon",
    "Toronto",
    "Nairobi",
    "Warsaw",
    "Manila",
)
_FEATS = (
    "on-call lead", "mentors two engineers", "wrote design docs", "cut cloud cost by {pct}%",
    "migrated Hive tables to Iceberg", "maintains an open-source connector",
)  # fmt: skip
_SCALES = ("40 GB", "300 GB", "2 TB", "8 TB", "25 TB", "1 PB")
CANDIDATE_COLUMNS = (
    "id", "name", "current_title", "years_experience", "data_infra_years", "skills",
    "education", "location", "summary",
)  # fmt: skip


def generate_candidates(n: int, seed: int = 0, start: int = 0) -> Iterator[dict[str, str]]:
    """`n` synthetic candidates (~100 tokens each), reproducible from `seed`; streamed."""
    for i in range(start, start + n):
        rng = random.Random(f"{seed}:{i}")
        years = rng.randint(0, 18)
        data_years = rng.randint(0, years) if years else 0
        skills = rng.sample(_SKILLS, rng.randint(3, 9))
        domain = rng.choice(_DOMAINS)
        scale = rng.choice(_SCALES)
        tool = rng.choice(skills)
        feat = rng.choice(_FEATS).format(pct=rng.randint(5, 60))
        summary = (
            f"{rng.choice(_TITLES)} in {domain} for {years} years. Built pipelines with {tool} "
            f"processing {scale} per day; {feat}."
        )
        yield {
            "id": f"C{i:06d}",
            "name": f"{rng.choice(_FIRST)} {rng.choice(_LAST)}",
            "current_title": rng.choice(_TITLES),
            "years_experience": str(years),
            "data_infra_years": str(data_years),
            "skills": ", ".join(skills),
            "education": rng.choice(_EDU),
            "location": rng.choice(_LOCATIONS),
            "summary": summary,
        }


def write_candidates_csv(path: str | Path, n: int, seed: int = 0) -> Path:
    """Write `n` synthetic candidates to a CSV with a header: whole or not at all (atomic
    replace), under `<path>.lock` (a second `harness generate` to the same file is refused,
    naming the first)."""
    from harness.fileio import atomic_write_text
    from harness.lock import hold, lock_path_for

    p = Path(path)
    buf = io.StringIO(newline="")
    writer = csv.DictWriter(buf, fieldnames=list(CANDIDATE_COLUMNS))
    writer.writeheader()
    writer.writerows(generate_candidates(n, seed))
    with hold(lock_path_for(p), what=f"the candidates file {p}"):
        atomic_write_text(p, buf.getvalue())
    return p


def sample_rows(rows: Sequence[Any], n: int | None, seed: int = 0) -> list[Any]:
    """A reproducible sample of `n` rows in their original order (all rows when n is None)."""
    if n is None or n >= len(rows):
        return list(rows)
    if n <= 0:
        raise ConfigError(f"--sample {n} must be positive")
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


def tokens_for_schema(schema: Mapping[str, Any] | None) -> int:
    """Reply tokens the output schema needs, with room to spare: its longest instance's
    characters (Gemma's tokenizer gives about one token per 1-3 characters of JSON) plus 8,
    when every field is bounded (integers with a maximum, enums, booleans); 256 when a field is
    free text; 16 without a schema."""
    if not schema:
        return 16
    longest = _longest_instance(schema)
    return 256 if longest is None else len(longest) + 8


def _longest_instance(schema: Mapping[str, Any]) -> str | None:
    kind = schema.get("type")
    if "enum" in schema:
        return max((json.dumps(v) for v in schema["enum"]), key=len, default="null")
    if kind == "integer":
        lo, hi = schema.get("minimum"), schema.get("maximum")
        if lo is None or hi is None:
            return None
        return max(str(int(lo)), str(int(hi)), key=len)
    if kind == "boolean":
        return "false"
    if kind == "object":
        parts = []
        for name, sub in (schema.get("properties") or {}).items():
            value = _longest_instance(sub) if isinstance(sub, Mapping) else None
            if value is None:
                return None
            parts.append(f'"{name}": {value}')
        return "{" + ", ".join(parts) + "}"
    return None
