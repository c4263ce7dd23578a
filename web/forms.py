"""The submit form, generated from a kind's params JSON schema: fields from the schema,
typed params back from the posted strings, and files posted in upload fields.

A new job kind gets its form from its spec; there is no template per kind.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from shared import uploads
from shared.auth import owner_id_of
from shared.errors import SpecError
from shared.specs import KINDS, params_schema
from web import limits
from web.auth import current_user

# What a file input offers for each upload kind (the server still inspects the bytes).
ACCEPT = {"dataset": ".zip", "image": "image/*", "prompts": ".txt,.csv"}
FILE_SUFFIX = "__file"  # the file input beside an upload field is named `<field>__file`
# Stands in for a chosen file while the other params are checked, before anything is stored.
PENDING_UPLOAD = uploads.upload_ref("0" * 32)


def form_fields(schema: dict) -> list[dict]:
    """Flatten a pydantic JSON schema into form field descriptions."""
    fields = []
    required = set(schema.get("required", []))
    # A preset comes first: choosing it fills in the fields below.
    for name, prop in sorted(schema["properties"].items(), key=lambda item: item[0] != "preset"):
        options = prop.get("anyOf", [prop])
        types = {o.get("type") for o in options}
        enum = next((o["enum"] for o in options if "enum" in o), None)
        if "const" in prop:
            enum = [prop["const"]]
        # Objects and lists of objects (ddpm.sample's guidance, ddpm.schedule_plot's schedules) are typed as JSON.
        nested = any("$ref" in o or "$ref" in o.get("items", {}) for o in options)
        item_type = next((o.get("items", {}).get("type") for o in options if o.get("type") == "array"), None)
        # Lists of numbers are typed comma-separated; lists of strings (prompts) one a line.
        nullable = "null" in types
        if "boolean" in types and nullable:
            enum = [True, False]  # a checkbox cannot say "unset" (auto): a select with an empty choice can
        widget = "json" if nested else "select" if enum else "checkbox" if "boolean" in types else (
            "lines" if item_type == "string" else "list" if "array" in types
            else "number" if types & {"integer", "number"} else "text")
        upload_kind = prop.get("upload_kind")
        fields.append({
            "name": name,
            "label": prop.get("title", name),
            "help": prop.get("description", ""),
            "widget": widget,
            "options": enum or [],
            # A select whose field may be empty offers an empty choice ("the default").
            "nullable": nullable,
            "default": prop.get("default"),
            "required": name in required,
            "step": "any" if "number" in types else "1",
            "item_type": item_type,
            "also_string": "string" in types,
            "upload_kind": upload_kind,
            "accept": ACCEPT.get(upload_kind, ""),
        })
    return fields


def parse_form(kind: str, form, max_json_depth: int) -> dict:
    """Form strings to JSON params, typed by the schema; empty fields take defaults.
    JSON with NaN or nested deeper than `max_json_depth` is a SpecError on its field."""
    schema = params_schema(KINDS[kind].spec)
    params = {}
    for f in form_fields(schema):
        raw = form.get(f["name"], "").strip()
        if f["widget"] == "checkbox":
            params[f["name"]] = f["name"] in form
            continue
        if raw == "":
            continue
        if f["widget"] == "json":
            try:
                params[f["name"]] = limits.loads(raw, f["name"], max_json_depth)
            except ValueError:
                params[f["name"]] = raw  # the spec names the field and the expected type
        elif f["widget"] == "lines":
            lines = [line.strip() for line in raw.splitlines() if line.strip()]
            # One line in a field that also takes a plain string (negative_prompt) is that string.
            params[f["name"]] = lines[0] if f["also_string"] and len(lines) == 1 else lines
        elif f["widget"] == "list" or (f["widget"] == "number" and "," in raw):
            to_number = float if f["item_type"] == "number" else int
            try:
                params[f["name"]] = [to_number(x) for x in raw.replace(",", " ").split()]
            except ValueError:
                params[f["name"]] = raw
        elif f["widget"] == "select" and isinstance(f["options"][0], bool):
            params[f["name"]] = {"True": True, "False": False}.get(raw, raw)
        elif f["widget"] == "select" and isinstance(f["options"][0], int):
            params[f["name"]] = int(raw) if raw.lstrip("-").isdigit() else raw  # Literal[1, 3]
        elif f["widget"] == "number":
            try:
                params[f["name"]] = float(raw) if f["step"] == "any" else int(raw)
            except ValueError:
                params[f["name"]] = raw  # the spec names the field and the expected type
        else:
            params[f["name"]] = raw
    return params


def chosen_files(kind: str, files) -> dict:
    """The upload fields of `kind` that came with a file: {field name: FileStorage}."""
    schema = params_schema(KINDS[kind].spec)
    chosen = {}
    for f in form_fields(schema):
        file = files.get(f["name"] + FILE_SUFFIX) if f["upload_kind"] else None
        if file is not None and file.filename:
            chosen[f["name"]] = file
    return chosen


def save_files(svc, kind: str, chosen: dict) -> dict[str, str]:
    """Store each chosen file as an upload of its field's kind; {field: upload ref}.
    A refused file is a SpecError on its own field, and is not stored."""
    spec_fields = KINDS[kind].spec.model_fields
    refs = {}
    for name, file in chosen.items():
        expected = uploads.field_upload_kinds(spec_fields[name])
        with tempfile.TemporaryDirectory(prefix="diffqueue-form-") as tmp:
            path = Path(tmp) / "upload"
            try:
                uploads.copy_capped(file.stream, path, svc.settings.upload_max_bytes)
                upload = uploads.save_upload(svc.sessions, svc.storage, svc.settings, file.filename, path, expected,
                                             owner_id=owner_id_of(current_user()))
            except SpecError as exc:
                reason = exc.fields.get("file", str(exc)) if exc.fields else str(exc)
                raise SpecError(f"{name}: {reason}", {name: reason}) from None
        refs[name] = uploads.upload_ref(upload.id)
    return refs
