"""docs/ARCHITECTURE.md and the README against the code, so the contract tables cannot silently rot: flags,
routes, request parameters, error codes, metrics, the import rules of the rooms, and references that leave
the repository."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "ARCHITECTURE.md"


def section(heading: str, text: str | None = None) -> str:
    """The body of the markdown section titled `heading` (any level), up to the next heading."""
    text = DOC.read_text() if text is None else text
    m = re.search(rf"^#+ {re.escape(heading)}\n(.*?)(?=^#+ |\Z)", text, re.S | re.M)
    assert m, f"no section {heading!r}"
    return m.group(1)


def table(body: str) -> list[list[str]]:
    """The rows (without the header and rule) of the first markdown table in `body`, as lists of cells."""
    lines = [line for line in body.splitlines() if line.startswith("|")]
    assert len(lines) >= 3 and set(lines[1].replace("|", "")) <= set("-: "), lines[:2]
    rows = [re.split(r"(?<!\\)\|", line.strip()[1:-1]) for line in lines[2:]]
    return [[cell.strip() for cell in row] for row in rows]


def ticks(cell: str) -> list[str]:
    """The `code` spans of a cell."""
    return re.findall(r"`([^`]+)`", cell)


def long_flags(cells: list[str]) -> set[str]:
    return {f for cell in cells for f in re.findall(r"--[a-z][a-z-]*", cell) if not f.startswith("--no-")}


def parser_flags() -> set[str]:
    from service.settings import build_parser

    options = {o for action in build_parser()._actions for o in action.option_strings}
    return {o for o in options if o.startswith("--") and not o.startswith("--no-")} - {"--help"}


def test_flag_tables_are_the_parser_flags():
    readme = section("Flags", (ROOT / "README.md").read_text())
    for where, body in (("docs/ARCHITECTURE.md", section("Flags and environment variables")), ("README", readme)):
        assert long_flags([row[0] for row in table(body)]) == parser_flags(), where


def test_every_environment_variable_the_code_reads_is_documented():
    doc = DOC.read_text()
    pattern = re.compile(r"""(?:environ\.get|environ\[|getenv)\(?\s*["']([A-Z][A-Z0-9_]+)["']""")
    for path in sorted((ROOT / "model").rglob("*.py")) + sorted((ROOT / "service").rglob("*.py")):
        for name in pattern.findall(path.read_text()):
            assert f"`{name}`" in doc, f"{path.relative_to(ROOT)} reads {name}"


def test_endpoint_table_is_the_apps_routes(fake_model_dir):
    from service.api.app import build_app
    from service.settings import Settings
    from tests.service_fixtures import FakeAsyncEngine

    app = build_app(Settings(model=fake_model_dir), FakeAsyncEngine(fake_model_dir), fake_model_dir, "m")
    served = {(method.upper(), path) for path, ops in app.openapi()["paths"].items() for method in ops}
    served.add(("GET", app.openapi_url))
    documented = {(row[0], ticks(row[1])[0]) for row in table(section("Endpoints"))}
    assert documented == served


def test_parameter_table_is_the_request_models():
    from service.api.protocol import ChatCompletionRequest, CompletionRequest

    rows = table(section("Request parameters"))
    for column, model in ((1, ChatCompletionRequest), (2, CompletionRequest)):
        documented = {name for row in rows if row[column] == "✓" for name in ticks(row[0])}
        assert documented == set(model.model_fields), model.__name__


def test_messages_parameter_table_is_the_request_model():
    from service.api.anthropic_protocol import CountTokensRequest, MessagesRequest

    documented = {name for row in table(section("The Messages API (Anthropic)")) for name in ticks(row[0])}
    assert documented == set(MessagesRequest.model_fields)
    assert set(CountTokensRequest.model_fields) < documented


def test_anthropic_error_types_are_documented():
    from service.api.errors import _ANTHROPIC_TYPES, anthropic_error

    rows = table(section("Errors on the Messages API"))
    documented = {int(status): ticks(row[1])[0] for row in rows for status in row[0].split(", ")}
    for status, kind in documented.items():
        assert anthropic_error(status, "x")["error"]["type"] == kind, status
    assert set(_ANTHROPIC_TYPES.values()) - {"permission_error", "rate_limit_error"} <= set(documented.values())
def test_responses_field_table_is_the_request_model():
    from service.api.responses_protocol import ResponsesRequest

    documented = {name for row in table(section("Responses API fields")) for name in ticks(row[0])}
    assert documented == set(ResponsesRequest.model_fields)


def _error_codes_in_code() -> set[str]:
    pattern = re.compile(r"""code["']?\s*[:=]\s*["']([a-z_]+)["']|AdmissionRejected\(\s*["']([a-z_]+)["']""")
    codes = set()
    for path in (ROOT / "service").rglob("*.py"):
        codes |= {a or b for a, b in pattern.findall(path.read_text())}
    return codes


def test_error_table_names_every_code_the_server_sends():
    rows = table(section("Errors"))
    documented = {code for row in rows for code in ticks(row[1])}
    assert documented == _error_codes_in_code()
    from service.api.errors import _TYPES

    assert {int(row[0]) for row in rows} <= set(_TYPES) | {415}  # 415's type is the 4xx default


def test_metric_table_is_what_the_server_exports():
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from service.engine.outputs import EngineStats
    from service.metrics import ServiceMetrics

    stats = EngineStats(spec_accepted_per_pos=[1])
    metrics = ServiceMetrics("m", 4096, stats=lambda: stats)
    metrics.http_request("GET", "/health", 200)  # a labelled counter shows its labels once it has a sample
    exported = {}
    for family in text_string_to_metric_families(generate_latest(metrics.registry).decode()):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for s in family.samples for k in s.labels if k not in ("model_name", "le")}
        exported[name] = (family.type, labels)
    documented = {ticks(row[0])[0]: (row[1], set(ticks(row[2]))) for row in table(section("Metrics"))}
    assert documented == exported


def _imports(path: Path, package: str) -> set[str]:
    """Modules a file imports (relative imports resolved against its package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join(base + ([node.module] if node.module else [])))
            else:
                found.add(node.module or "")
    return found


ROOM_FILES = {"model/": "model/**/*.py", "service/engine/": "service/engine/*.py", "service/api/": "service/api/*.py",
              "service/ (top level)": "service/*.py"}


def test_rooms_never_import_what_the_doc_forbids():
    rows = table(section("Rooms and what each may import"))
    checked = set()
    for room, holds, never in rows:
        allowed = re.findall(r"\(but `([^`]+)`\)", never)  # an exception inside a forbidden room
        forbidden = [m for m in ticks(never) if m not in allowed]
        room = ticks(room)[0] + room.split("`")[-1]
        if not forbidden:
            continue
        checked.add(room)
        files = sorted(ROOT.glob(ROOM_FILES[room]))
        assert files, room
        for name in ticks(holds):  # the files a row names exist in that room
            if name.endswith(".py"):
                assert any(f.name == Path(name).name for f in files), (room, name)
        for path in files:
            package = ".".join(path.relative_to(ROOT).parent.parts)
            for module in _imports(path, package):
                within = [a for a in allowed if module == a or module.startswith(a + ".")]
                bad = [f for f in forbidden if (module == f or module.startswith(f + ".")) and not within]
                assert not bad, f"{path.relative_to(ROOT)} imports {module}"
    assert checked == set(ROOM_FILES)


def test_the_readme_sends_newcomers_to_the_architecture_doc():
    readme = (ROOT / "README.md").read_text()
    assert "docs/ARCHITECTURE.md" in readme


def test_nothing_cites_a_document_outside_the_repository():
    try:
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    outside = ["DESIGN" + ".md", "../" + "shared"]
    for name in filter(None, files.decode().split("\0")):
        path = ROOT / name
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for ref in outside:
            assert ref not in text, f"{name} cites {ref}"
