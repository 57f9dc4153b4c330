"""The params file `tune` writes and `probe --params` / `normalise --params` read: the chosen
method and its parameters, the validation data they were tuned on, checked as it is read."""

from __future__ import annotations

import json
from pathlib import Path

from qbnorm_cli import methods as registry
from qbnorm_cli.errors import DataError, RuntimeFailure, UsageError, param
from qbnorm_cli.version import FORMAT_VERSION

PARAMS_KIND = "params"
TUNED_ROLES = ("queries", "gallery", "sims")  # banks are meant to be shared between splits
# The banks tune records ("banks": role → the option it was given as, path, dataset, identity): what
# probe --params needs again. Scores against the validation gallery do not carry over to the test
# gallery; the bank × gallery-bank scores do.
BANK_OPTIONS = {"bank": ("bank", "bank_sims"), "gallery_bank": ("gallery_bank", "gallery_bank_sims"),
                "bank_gallery_bank": ("bank_gallery_bank_sims",)}
GALLERY_SPECIFIC = ("bank_sims", "gallery_bank_sims")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def load_params(path) -> dict:
    """The settings of a params file from `tune`: {"method", every parameter (None where unused),
    "validation", "path"}. The file is checked as tune writes it: a qbnorm params file of a known
    method, every parameter of that method present and valid, numbers finite, the validation
    record well formed; anything else is a DataError naming the file and the key."""
    p = Path(path)
    where = f"{param('params')} {path}"
    if not p.is_file():
        raise UsageError(f"{where}: no such file")

    def damaged(problem: str) -> DataError:
        return DataError(f"{where}: {problem}; write it again with tune")

    try:
        text = p.read_text(encoding="utf-8")
    except PermissionError:
        raise RuntimeFailure(f"{where}: permission denied") from None
    except OSError as exc:
        raise RuntimeFailure(f"{where}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{where}: not a JSON file ({exc})") from None
    try:
        doc = json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{where}: not a JSON file ({' '.join(str(exc).split())})") from None
    if not isinstance(doc, dict) or doc.get("qbnorm_kind") != PARAMS_KIND:
        raise DataError(f"{where}: not a qbnorm params file (write one with tune)")
    version = doc.get("qbnorm_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise damaged(f"qbnorm_version {version!r} is not a format version")
    if version > FORMAT_VERSION:
        raise DataError(f"{where}: qbnorm_version {version} is newer than this qbnorm supports")
    method = doc.get("method")
    if method is None:
        raise damaged("method is missing")
    if not isinstance(method, str) or method not in registry.METHODS:
        raise damaged(f"unknown method {method!r} (choose one of {', '.join(registry.METHODS)})")
    spec_method = registry.METHODS[method]
    used = spec_method.parameters
    out = {"method": method, "path": str(path)}
    for name, spec in registry.PARAMETERS.items():
        value = doc.get(name)
        if value is None:
            # a parameter with a default may be absent: files written before the method took it
            if name in used and spec_method.default(name) is None:
                raise damaged(f"{name} is missing ({method} uses it)")
            out[name] = spec_method.default(name) if name in used else None
            continue
        if spec.choices and not isinstance(value, str):
            raise damaged(f"{name} {value!r} is not one of {', '.join(spec.choices)}")
        if not spec.choices and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise damaged(f"{name} {value!r} is not a number")
        try:
            out[name] = spec.check(value)
        except UsageError as exc:
            raise damaged(exc.render()) from None
    validation = doc.get("validation", {})
    if not isinstance(validation, dict):
        raise damaged(f"validation {_shown(validation)} is not an object")
    for role, record in validation.items():
        if not _is_record(record):
            raise damaged(f"validation {role} {_shown(record)} is not a record of path, dataset and identity")
    out["validation"] = validation
    banks = doc.get("banks", {})  # absent in files written before tune recorded its banks
    if not isinstance(banks, dict):
        raise damaged(f"banks {_shown(banks)} is not an object")
    for role, record in banks.items():
        if role not in BANK_OPTIONS or not _is_record(record) or record.get("option") not in BANK_OPTIONS[role]:
            raise damaged(f"banks {role} {_shown(record)} is not a record of option, path, dataset and identity")
    out["banks"] = banks
    return out


def _is_record(record) -> bool:
    return isinstance(record, dict) and all(isinstance(record.get(key), (str, type(None)))
                                            for key in ("path", "dataset", "identity"))


def missing_bank(params: dict, method: str, options: tuple[str, ...]) -> str:
    """What to add when `method` of a params file needs one of `options` and none was given: the
    bank it was tuned with, as the file records it (files written before tune recorded its banks
    say so)."""
    where = f"{param('params')} {params['path']}"
    needs = " or ".join(param(o) for o in options)
    recorded = [r for r in params.get("banks", {}).values() if r.get("option") in options]
    recorded.sort(key=lambda r: r["option"] in GALLERY_SPECIFIC)  # a reusable input first
    if not recorded:
        return (f"{where}: {method} needs {needs}, and the file does not record the bank it was tuned with "
                f"(written before qbnorm recorded banks): add {param(options[0])} with it")
    record = recorded[0]
    option, shown = record["option"], _input_label(record)
    tuned_with = f"{where} ({method}) was tuned with {param(option)} {shown} (identity {record.get('identity')})"
    if option in GALLERY_SPECIFIC:
        return (f"{tuned_with}, scores against the validation gallery: add {param(option)} with that bank's scores "
                f"against this gallery, or {param(options[0])} with its embeddings")
    return f"{tuned_with}: add {param(option)} {shown}"


def other_banks(params: dict, given: dict) -> list[str]:
    """Warnings for the banks in `given` (role → (option, describe() record)) that are not the ones
    the params file was tuned with (identity differs; scores against a gallery always differ)."""
    found = []
    for role, (option, record) in given.items():
        tuned = params.get("banks", {}).get(role)
        if (tuned is None or tuned.get("option") != option or option in GALLERY_SPECIFIC
                or not tuned.get("identity") or not record.get("identity") or tuned["identity"] == record["identity"]):
            continue
        found.append(f"{_input_label(record)}: not the {role.replace('_', ' ')} {params['path']} was tuned with "
                     f"({_input_label(tuned)}, identity differs); the tuned setting may not carry over")
    return found


def _input_label(record: dict) -> str:
    path = record.get("path") or "?"
    try:  # relative to the working directory when below it: the way it was most likely typed
        relative = Path(path).resolve().relative_to(Path.cwd().resolve())
        path = str(relative)
    except (ValueError, OSError):
        pass
    return f"{path}::{record['dataset']}" if record.get("dataset") else path


def _shown(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def tuned_on(params: dict, inputs: list[dict]) -> list[str]:
    """Labels of `inputs` (describe() records) that are the validation inputs the params were
    tuned on (same data identity, or the same file and dataset)."""
    validation = params.get("validation", {})
    recorded = [validation[role] for role in TUNED_ROLES if isinstance(validation.get(role), dict)]
    hits = []
    for item in inputs:
        for rec in recorded:
            same_id = rec.get("identity") and rec.get("identity") == item.get("identity")
            same_path = (rec.get("path") and item.get("path") and _resolved(rec["path"]) == _resolved(item["path"])
                         and (rec.get("dataset") or None) == (item.get("dataset") or None))
            if same_id or same_path:
                label = f"{item['path']}::{item['dataset']}" if item.get("dataset") else item.get("path")
                hits.append(label)
                break
    return hits


def tuned_on_warning(params_path, params: dict, inputs: list[dict]) -> str | None:
    hits = tuned_on(params, inputs)
    if not hits:
        return None
    return (f"{', '.join(hits)}: the validation data {params_path} was tuned on; figures measured on it are "
            "optimistic: apply the settings to a held-out test split")


def _resolved(path: str) -> str:
    try:
        return str(Path(path).resolve())
    except OSError:
        return path
