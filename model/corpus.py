"""Build the embedded model's training corpus, offline and deterministically.

    python -m model.corpus --out runs/data [--stdlib DIR] [--heldout-permille 50]

Sources and licences
- The Python standard library sources of the running interpreter (`sysconfig.get_paths()["stdlib"]`),
  © Python Software Foundation, under the PSF License Agreement (version 2); the interpreter's
  `LICENSE.txt` is copied next to the output as `LICENSE-PSF.txt`. Left out: test suites (`test/`, `tests/`,
  `idle_test/`), `site-packages` (third-party code under other licences), GUI and demo packages (`idlelib`,
  `tkinter`, `turtledemo`), generated tables and data (`encodings`, `pydoc_data`, `_sysconfigdata*`),
  `ensurepip`, build configuration, jokes (`this.py`, `antigravity.py`) and files over 400 kB.
- Chat pairs derived from those same files with `ast` (so under the same licence): the user asks for a
  function or method in words (its docstring's first line, or its signature when it has none; for half of
  the module-level functions whose docstring starts with a common imperative, without naming it: "Write a
  function that returns ...") and the assistant answers with the function's source in a ```python fence, its
  docstring cut to the first paragraph.
  Pairs are deduplicated by source.
- Tool-use conversations (model/tool_data.py), whose tool aliases are mostly the public function names of the
  training files (`identifier_pool`).
- No prose: Debian's python3.11-doc is not on a fresh machine, and nothing is downloaded.

Output (the contract the trainer reads), in `--out`:
- `train.jsonl`, `heldout.jsonl`: one JSON object per line, in a fixed order (files sorted by path; a file's
  code document, then its chat pairs). Keys: `text` (the exact string to train on: it already starts with
  `[gMASK]<sop>` and ends with `<|endoftext|>`; encode it with special tokens parsed and without adding
  more, then concatenate documents), `kind` (`"code"` or `"chat"`), `source` (the path relative to the
  stdlib, plus `:Qualified.name` for chat pairs) and, for chat pairs, `prompt_chars` (the length of the
  prefix of `text` up to and including the final `<|assistant|>\\n`; mask the loss before it if you like).
- `stats.json`: counts and sizes per split and kind, the interpreter version, the split rule.
- `LICENSE-PSF.txt`.
The split is by file: a file and every pair derived from it are held out when the SHA-256 of
`"glm-serve-corpus:" + relative path` taken mod 1000 is below `heldout_permille`, so it depends on nothing
but the path and is identical on every machine with the same Python.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import platform
import re
import shutil
import sys
import sysconfig
import textwrap
import time
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from random import Random

from model.build_tokenizer import ENDOFTEXT, GLM_CHAT_TEMPLATE, SPECIAL_TOKENS
from model.tokenizer import ChatTemplate
from model.tool_data import ToolDocs, code_plan, eval_prompts

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "idlelib", "tkinter", "turtledemo",
             "encodings", "pydoc_data", "ensurepip", "__pycache__", "lib-dynload"}
SKIP_FILES = {"this.py", "antigravity.py"}
MAX_FILE_BYTES = 400_000
MAX_PAIR_CODE_CHARS = 2000  # a pair must fit a short training window with room for the request
MIN_PAIR_CODE_LINES = 3
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are an expert Python programmer.",
                  "You write clear, correct Python code."]


def split_of(relpath: str, heldout_permille: int = 50) -> str:
    digest = hashlib.sha256(f"glm-serve-corpus:{relpath}".encode()).digest()
    return "heldout" if int.from_bytes(digest[:8], "big") % 1000 < heldout_permille else "train"


def _pick(key: str, n: int) -> int:
    """A deterministic choice among n options (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % n


def iter_sources(root: Path) -> Iterator[tuple[str, Path]]:
    """(relative posix path, file) for the stdlib .py files we keep, sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith("config-")]
        for name in filenames:
            if name.endswith(".py") and name not in SKIP_FILES and not name.startswith("_sysconfigdata"):
                path = Path(dirpath) / name
                found.append((path.relative_to(root).as_posix(), path))
    yield from sorted(found)


def read_source(path: Path) -> str | None:
    """The file as text (PEP 263 encoding), with \\n newlines; None when unreadable or too big."""
    data = path.read_bytes()
    if len(data) > MAX_FILE_BYTES:
        return None
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        text = data.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _signature(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    sig = f"{fn.name}({ast.unparse(fn.args)})"
    return f"{sig} -> {ast.unparse(fn.returns)}" if fn.returns is not None else sig


# A docstring's leading imperative and its third person, for requests that say what a function does, not its
# name ("Return the number of lines." -> "Write a function that returns the number of lines."): the most common
# first words of the stdlib's module-level docstrings.
DOC_VERBS = {"Return": "returns", "Returns": "returns", "Get": "gets", "Convert": "converts", "Parse": "parses",
             "Create": "creates", "Find": "finds", "Decode": "decodes", "Encode": "encodes", "Read": "reads",
             "Copy": "copies", "Generate": "generates", "Open": "opens", "Remove": "removes", "Split": "splits",
             "Add": "adds", "Print": "prints", "Check": "checks", "Format": "formats", "Calculate": "calculates",
             "Write": "writes", "Clear": "clears", "Wrap": "wraps"}


def _request(fn: ast.FunctionDef | ast.AsyncFunctionDef, cls: str | None, key: str) -> str:
    """The user's words for a function: its docstring's summary line, else its signature."""
    what = f"method `{fn.name}` of a `{cls}` class" if cls else f"function `{fn.name}`"
    doc = (ast.get_docstring(fn) or "").strip().split("\n")[0].strip()
    sig = _signature(fn)
    if len(doc) >= 12:
        doc = doc if doc[-1] in ".!?:" else doc + "."
        forms = [f"Write a Python {what}. {doc}", f"{doc} Implement it as the Python {what}.",
                 f"Can you write `{sig}` in Python? {doc}", f'Implement the Python {what}: "{doc}"']
        verb, _, rest = doc.partition(" ")
        if cls is None and verb in DOC_VERBS and rest:  # as users ask: no name, so the model must choose one
            # Half of these functions (a third in runs4): runs3 met such a request with an empty plan.
            forms += [f"Write a function that {DOC_VERBS[verb]} {rest}"] * 4
    else:
        where = f" as a method of a `{cls}` class" if cls else " as a Python function"
        forms = [f"Write the Python {what} with the signature `{sig}`.", f"Implement `{sig}`{where}.",
                 f"Please write `{sig}`{where}."]
    return forms[_pick(key, len(forms))]


def _function_code(lines: list[str], fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The function with its decorators, dedented; None when it does not stand alone as valid code."""
    start = min([d.lineno for d in fn.decorator_list] + [fn.lineno])
    code = textwrap.dedent("\n".join(lines[start - 1:fn.end_lineno])).rstrip()
    try:
        ast.parse(code)
    except SyntaxError:  # e.g. a docstring line less indented than the method
        return None
    return code


_OPEN_QUOTES = re.compile(r"^\s*[rRuU]?(\"\"\"|\'\'\')")


def summary_docstring(code: str) -> str:
    """`code` (one function) with its docstring cut to the first paragraph: a chat answer writes a short
    docstring and then the code. runs2 and runs3 met "Write a function that ..." by copying the request into a
    docstring and never closing it (the stdlib's docstrings run to many paragraphs); the raw code documents keep
    them whole. Unchanged when the docstring is one paragraph or not triple-quoted."""
    fn = ast.parse(code).body[0]
    first = fn.body[0]
    if not (isinstance(first, ast.Expr) and isinstance(getattr(first.value, "value", None), str)):
        return code
    lines = code.split("\n")
    start, end = first.lineno - 1, first.end_lineno  # the docstring's lines: [start, end)
    quote = _OPEN_QUOTES.match(lines[start])
    if quote is None or "" not in (ln.strip() for ln in lines[start:end]):
        return code
    para = []
    for ln in lines[start:end]:
        if not ln.strip():
            break
        para.append(ln)
    para[-1] = para[-1].rstrip() + quote.group(1)
    short = "\n".join(lines[:start] + para + lines[end:])
    try:
        ast.parse(short)
    except SyntaxError:  # e.g. a backslash or a quote left open at the cut
        return code
    return short


def iter_functions(tree: ast.Module) -> Iterator[tuple[ast.FunctionDef | ast.AsyncFunctionDef, str | None]]:
    """Module-level functions and methods of module-level classes (nested helpers lack context)."""
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, funcs):
            yield node, None
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, funcs):
                    yield item, node.name


_DEF = re.compile(r"^[ \t]*(?:async[ \t]+)?def[ \t]+([a-z][a-z0-9_]{2,23})[ \t]*\(", re.M)


def identifier_pool(root: Path, heldout_permille: int = 50) -> tuple[str, ...]:
    """The public function names defined in the training files, sorted: what tool aliases are drawn from
    (model/tool_data.py, `alias_names`), so a call's name is any identifier and can only be copied."""
    names: set[str] = set()
    for relpath, path in iter_sources(root):
        source = read_source(path) if split_of(relpath, heldout_permille) == "train" else None
        names.update(_DEF.findall(source or ""))
    return tuple(sorted(names))


@dataclass
class Corpus:
    template: ChatTemplate = field(default_factory=lambda: ChatTemplate(GLM_CHAT_TEMPLATE, "GLM_CHAT_TEMPLATE"))
    seen_code: set[str] = field(default_factory=set)
    seed: int = 0
    alias_pool: tuple[str, ...] = ()

    @property
    def tools(self) -> ToolDocs:
        return ToolDocs(self.template, ENDOFTEXT, self.seed, self.alias_pool)

    def code_doc(self, relpath: str, source: str) -> dict:
        return {"text": f"[gMASK]<sop>{source}{ENDOFTEXT}", "kind": "code", "source": relpath}

    def chat_docs(self, relpath: str, source: str, tree: ast.Module) -> Iterator[dict]:
        lines = source.split("\n")
        for fn, cls in iter_functions(tree):
            code = _function_code(lines, fn)
            if code is None or code.count("\n") + 1 < MIN_PAIR_CODE_LINES or len(code) > MAX_PAIR_CODE_CHARS:
                continue
            digest = hashlib.sha256(code.encode()).hexdigest()
            if digest in self.seen_code:
                continue
            self.seen_code.add(digest)
            qualname = f"{cls}.{fn.name}" if cls else fn.name
            key = f"{relpath}:{qualname}"
            messages = [{"role": "user", "content": _request(fn, cls, key)},
                        {"role": "assistant", "content": f"```python\n{summary_docstring(code)}\n```"}]
            thinking = _pick("think:" + key, 5) < 2  # 40% with a plan, the rest with thinking off
            if thinking:
                doc = (ast.get_docstring(fn) or "").strip().split("\n")[0].strip()
                messages[-1]["reasoning_content"] = code_plan(f"`{_signature(fn)}`", doc)
            if _pick("system:" + key, 4) == 0:
                messages.insert(0, {"role": "system", "content": SYSTEM_PROMPTS[_pick("prompt:" + key, 3)]})
            if _pick("tools:" + key, 4) == 0:  # tools offered, none needed: the answer must not call one
                yield self.tools.with_tools_offered(messages, Random(key), key, thinking)
            else:
                yield self.tools._doc(messages, None, "chat", key, thinking)


def build(root: Path, out: Path, heldout_permille: int = 50, tool_docs: int = 16000, eval_no_tool: int = 60,
          seed: int = 0) -> dict:
    """Write train.jsonl, heldout.jsonl, tool_eval.jsonl, stats.json and the licence into `out`; return the
    stats."""
    t0 = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    corpus = Corpus(seed=seed, alias_pool=identifier_pool(root, heldout_permille))
    kinds = ("code", "chat", "no_tool", "tool")
    no_tool_requests: list[str] = []
    stats: dict = {"files_kept": 0, "files_skipped": {}, "python": platform.python_version(),
                   "stdlib": str(root), "split_rule": f"sha256('glm-serve-corpus:'+path) mod 1000 < {heldout_permille}",
                   "splits": {s: {k: {"docs": 0, "bytes": 0} for k in kinds} for s in ("train", "heldout")}}
    skipped = stats["files_skipped"]
    files = {s: (out / f"{s}.jsonl").open("w", encoding="utf-8") for s in ("train", "heldout")}

    def write(split: str, doc: dict) -> None:
        files[split].write(json.dumps(doc, ensure_ascii=False) + "\n")
        entry = stats["splits"][split][doc["kind"]]
        entry["docs"] += 1
        entry["bytes"] += len(doc["text"].encode("utf-8"))

    try:
        for relpath, path in iter_sources(root):
            source = read_source(path)
            reason = "unreadable_or_large" if source is None else None
            if source is not None and any(t in source for t in SPECIAL_TOKENS):  # would parse as special tokens
                reason = "special_token_text"
            tree = None
            if reason is None:
                try:
                    tree = ast.parse(source)
                except (SyntaxError, ValueError):  # e.g. lib2to3's Python 2 test data
                    reason = "syntax_error"
            if reason is not None or not source.strip():
                skipped[reason or "empty"] = skipped.get(reason or "empty", 0) + 1
                continue
            stats["files_kept"] += 1
            split = split_of(relpath, heldout_permille)
            for doc in [corpus.code_doc(relpath, source), *corpus.chat_docs(relpath, source, tree)]:
                write(split, doc)
                if split == "heldout" and doc["kind"] == "chat" and len(no_tool_requests) < eval_no_tool:
                    no_tool_requests.append(doc["request"])
        # Tool conversations after the code: the trainer draws windows at random, so order does not matter.
        for doc in corpus.tools.tool_docs(tool_docs):
            write("train", doc)
        for doc in corpus.tools.tool_docs(max(1, tool_docs // 40), heldout=True):
            write("heldout", doc)
        with (out / "tool_eval.jsonl").open("w", encoding="utf-8") as f:
            for rec in eval_prompts(no_tool_requests, seed=seed + 1):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    finally:
        for f in files.values():
            f.close()
    licence = root / "LICENSE.txt"
    if licence.is_file():
        shutil.copyfile(licence, out / "LICENSE-PSF.txt")
    stats["seconds"] = round(time.monotonic() - t0, 1)
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Build the training corpus from the Python standard library.")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    ap.add_argument("--heldout-permille", type=int, default=50)
    ap.add_argument("--tool-docs", type=int, default=16000, help="tool-use conversations in the training split")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    stats = build(args.stdlib, args.out, args.heldout_permille, args.tool_docs, seed=args.seed)
    json.dump(stats, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
