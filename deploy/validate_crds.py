"""Validate rendered custom resources against their CRDs' OpenAPI schemas, strictly.

    python3 deploy/validate_crds.py RENDERED.yaml CRD.yaml [CRD.yaml ...]

kubernetes-validate knows only built-in kinds. For every object whose apiVersion and kind a given CRD defines, this
checks it against that version's `openAPIV3Schema` with jsonschema, and, like the API server's strict field
validation, rejects fields the schema does not declare (unless it preserves unknown fields). An object of a CRD's
group that no served version of it defines is a problem too; objects of other groups are left to
kubernetes-validate. Exits 1 listing every problem. Needs jsonschema and pyyaml (check.sh's venv).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import jsonschema
import yaml


def strict(schema: Any) -> Any:
    """The schema with `additionalProperties: false` on every object that lists its properties."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_schemas(paths: list[Path]) -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> strict schema, for every served version of every CRD."""
    out = {}
    for path in paths:
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served", True):
                    out[(f"{group}/{version['name']}", kind)] = strict(version["schema"]["openAPIV3Schema"])
    return out


def problems(objects: list[dict], schemas: dict[tuple[str, str], dict]) -> tuple[int, list[str]]:
    checked, found = 0, []
    for obj in objects:
        schema = schemas.get((obj.get("apiVersion"), obj.get("kind")))
        if schema is None:
            if str(obj.get("apiVersion")).split("/")[0] in {api.split("/")[0] for api, _ in schemas}:
                found.append(f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}: apiVersion "
                             f"{obj.get('apiVersion')} kind {obj.get('kind')} is not served by its CRD")
            continue
        checked += 1
        # metadata is the API server's ObjectMeta, which a CRD's schema does not spell out.
        body = {k: v for k, v in obj.items() if k != "metadata"}
        schema = {**schema, "properties": {k: v for k, v in schema.get("properties", {}).items() if k != "metadata"}}
        name = f"{obj['kind']}/{obj.get('metadata', {}).get('name')}"
        for err in sorted(jsonschema.Draft7Validator(schema).iter_errors(body), key=lambda e: list(e.path)):
            found.append(f"{name}: {'.'.join(map(str, err.path)) or '(root)'}: {err.message}")
    return checked, found


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    objects = [o for o in yaml.safe_load_all(Path(argv[0]).read_text()) if o]
    checked, found = problems(objects, crd_schemas([Path(p) for p in argv[1:]]))
    for line in found:
        print(line, file=sys.stderr)
    print(f"{checked} custom resource(s) checked against their CRD schema, {len(found)} problem(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
