"""Corpus builder: deterministic, split by file, chat pairs well formed, unwanted sources left out."""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path

import pytest

from model.build_tokenizer import ENDOFTEXT
from model.corpus import MAX_PAIR_CODE_CHARS, build, identifier_pool, iter_sources, split_of

FUNC = '''\
def {name}(a, b=2):
    """Return a and b combined into something useful for {name}.

    A second paragraph, which chat answers leave out.
    """
    total = a + b
    return total * {k}
'''
CLASS = '''\
class Box{k}:
    """A box."""

    def __init__(self, item):
        self.item = item
        self.opened = {k}

    def open_box(self) -> object:
        self.opened = True
        return self.item, {k}

    def tiny(self): return 1
'''


def fake_stdlib(root: Path, n_files: int = 40) -> Path:
    for i in range(n_files):
        sub = root / ("pkg" if i % 3 == 0 else "") / f"mod{i}.py"
        sub.parent.mkdir(parents=True, exist_ok=True)
        sub.write_text(FUNC.format(name=f"f{i}", k=i) + "\n\n" + CLASS.format(k=i))
    for skipped in ("test/test_x.py", "site-packages/thirdparty/m.py", "idlelib/shell.py", "pkg/tests/t.py",
                    "encodings/cp999.py", "__pycache__/x.py"):
        (root / skipped).parent.mkdir(parents=True, exist_ok=True)
        (root / skipped).write_text(FUNC.format(name="leaked", k=0))
    (root / "dup.py").write_text(FUNC.format(name="f1", k=1))  # the same function as mod1.py
    (root / "py2.py").write_text("print 'python 2'\n")
    (root / "special.py").write_text("X = '<|user|>'\n")
    (root / "long.py").write_text("def long_one():\n" + "    x = 1\n" * (MAX_PAIR_CODE_CHARS // 8))
    (root / "empty.py").write_text("")
    (root / "LICENSE.txt").write_text("PSF LICENSE AGREEMENT")
    return root


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = fake_stdlib(tmp_path_factory.mktemp("stdlib"))
    out = tmp_path_factory.mktemp("data")
    return out, build(root, out, heldout_permille=250, tool_docs=120, eval_no_tool=5)


def test_deterministic(built: tuple[Path, dict], tmp_path: Path) -> None:
    out, stats = built
    again = build(Path(stats["stdlib"]), tmp_path, heldout_permille=250, tool_docs=120, eval_no_tool=5)
    for name in ("train.jsonl", "heldout.jsonl", "tool_eval.jsonl"):
        assert (out / name).read_bytes() == (tmp_path / name).read_bytes()
    assert again["splits"] == stats["splits"]
    assert (tmp_path / "LICENSE-PSF.txt").read_text() == "PSF LICENSE AGREEMENT"


def test_split_by_file_and_disjoint(built: tuple[Path, dict]) -> None:
    out, stats = built
    files = {s: {d["source"].split(":")[0] for d in read(out / f"{s}.jsonl") if d["kind"] != "tool"}
             for s in ("train", "heldout")}
    assert files["train"] and files["heldout"] and not files["train"] & files["heldout"]
    for split, paths in files.items():
        assert all(split_of(p, 250) == split for p in paths)
    for split in ("train", "heldout"):
        docs = read(out / f"{split}.jsonl")
        for kind in ("code", "chat", "no_tool", "tool"):
            mine = [d for d in docs if d["kind"] == kind]
            assert stats["splits"][split][kind]["docs"] == len(mine)
            assert stats["splits"][split][kind]["bytes"] == sum(len(d["text"].encode()) for d in mine)
    assert split_of("json/decoder.py") == "train" and split_of("locale.py") == "heldout"  # pinned: keep held-out stable


def test_sources_left_out(built: tuple[Path, dict]) -> None:
    out, stats = built
    docs = [d for s in ("train", "heldout") for d in read(out / f"{s}.jsonl") if d["kind"] != "tool"]
    sources = {d["source"].split(":")[0] for d in docs}
    assert not any("leaked" in d["text"] for d in docs)
    assert not sources & {"py2.py", "special.py", "empty.py"}
    assert stats["files_skipped"] == {"syntax_error": 1, "special_token_text": 1, "empty": 1}
    assert stats["files_kept"] == 42  # 40 modules + dup.py + long.py


def test_chat_pairs_well_formed(built: tuple[Path, dict]) -> None:
    out, _ = built
    chats = [d for s in ("train", "heldout") for d in read(out / f"{s}.jsonl") if d["kind"] in ("chat", "no_tool")]
    names, plans = set(), 0
    for d in chats:
        text, n = d["text"], d["prompt_chars"]
        prompt, answer = text[:n], text[n:]
        assert prompt.startswith("[gMASK]<sop>") and prompt.count("<|assistant|>") == 1
        assert f"<|user|>{d['request']}<|assistant|><think>" in prompt
        if prompt.endswith("<think>"):  # thinking on: a plan from the signature and docstring, then the code
            plan, _, answer = answer.partition("</think>")
            assert plan.startswith("I need to write `") and "`" in plan[len("I need to write `"):]
            plans += 1
        else:
            assert prompt.endswith("<think></think>")
        # Tools offered in a quarter of them; none is ever called for a code request.
        assert ("# Tools" in prompt) == (d["kind"] == "no_tool") and "<tool_call>" not in answer
        assert answer.startswith("```python\n") and answer.endswith(f"\n```{ENDOFTEXT}")
        code = answer[len("```python\n"):-len(f"\n```{ENDOFTEXT}")]
        fn = ast.parse(code).body[0]
        qualname = d["source"].split(":")[1]
        assert isinstance(fn, ast.FunctionDef) and fn.name == qualname.split(".")[-1]
        assert "\n\n" not in (ast.get_docstring(fn) or "")  # the docstring's first paragraph only
        # The request names what it asks for, or (as users ask) says only what it returns.
        assert f"`{fn.name}" in prompt or d["request"].startswith("Write a function that returns a and b combined")
        names.add(qualname)
    # 40 functions (dup.py's copy is dropped), 2 methods per class; one-liners and over-long functions skipped
    assert len(chats) == 40 * 3
    assert "Box3.open_box" in names and "Box3.tiny" not in names and "long_one" not in names
    docstring_requests = [d for d in chats if "a and b combined" in d["text"][:d["prompt_chars"]]]
    assert len(docstring_requests) == 40
    nameless = [d for d in chats if d["request"].startswith("Write a function that returns ")]
    assert 0 < len(nameless) < 40 and all(":" in d["source"] and "." not in d["source"].split(":")[1]
                                          for d in nameless)  # module-level functions only
    assert any("<|system|>You " in d["text"] for d in chats) and any("<|system|>" not in d["text"] for d in chats)
    assert 0 < plans < len(chats) and 0 < sum(d["kind"] == "no_tool" for d in chats) < len(chats) / 2


def test_code_docs_are_the_files(built: tuple[Path, dict]) -> None:
    out, stats = built
    root = Path(stats["stdlib"])
    for d in read(out / "heldout.jsonl"):
        if d["kind"] == "code":
            assert d["text"] == f"[gMASK]<sop>{(root / d['source']).read_text()}{ENDOFTEXT}"


def test_real_stdlib_walk_skips_tests_and_third_party() -> None:
    paths = [p for p, _ in iter_sources(Path(sysconfig.get_paths()["stdlib"]))]
    assert "json/decoder.py" in paths and "asyncio/tasks.py" in paths and paths == sorted(paths)
    assert not [p for p in paths if p.split("/")[0] in {"test", "site-packages", "idlelib", "tkinter"}]
    assert not [p for p in paths if "/tests/" in p or "/test/" in p]


def test_a_request_may_say_what_a_function_does_instead_of_its_name() -> None:
    from model.corpus import _request

    fn = ast.parse('def dup(x):\n    """Copy the list x."""\n    return list(x)\n').body[0]
    asked = {_request(fn, None, f"k{i}") for i in range(60)}
    assert "Write a function that copies the list x." in asked
    assert any("`dup`" in a for a in asked)
    assert not any(a.startswith("Write a function that") for a in (_request(fn, "C", f"k{i}") for i in range(60)))


def test_tool_aliases_are_the_training_files_function_names(built: tuple[Path, dict]) -> None:
    """Most aliases are public function names of the training files (model/tool_data.py, `alias_names`): never
    a held-out file's, a private one, a skipped file's, or a real tool's name."""
    out, stats = built
    pool = identifier_pool(Path(stats["stdlib"]), 250)
    assert {"open_box", "tiny", "long_one"} <= set(pool) and "leaked" not in pool and pool == tuple(sorted(pool))
    assert not any(n.startswith("_") for n in pool)
    for relpath, _ in iter_sources(Path(stats["stdlib"])):
        name = f"f{Path(relpath).stem.removeprefix('mod')}"
        if relpath.startswith(("mod", "pkg/mod")) and len(name) >= 3:
            assert (name in pool) == (split_of(relpath, 250) == "train"), relpath
    tool_docs = [d for d in read(out / "train.jsonl") if d["kind"] == "tool"]
    called = [d["called"] for d in tool_docs if d["called"] != d["source"].split(":")[1]]  # aliased calls
    assert 0.65 < sum(c in pool for c in called) / len(called) < 0.95  # POOL_ALIAS_SHARE = 0.8


def test_a_chat_answer_keeps_the_docstrings_first_paragraph() -> None:
    """Chat answers write a short docstring, then the code (runs2/3 copied the request into a docstring and never
    closed it); one-paragraph and single-quoted docstrings stay as they are, and the code still parses."""
    from model.corpus import summary_docstring

    long_doc = 'def f(a):\n    """Return the thing\n    of a.\n\n    More text.\n    """\n    return a\n'
    assert summary_docstring(long_doc) == 'def f(a):\n    """Return the thing\n    of a."""\n    return a\n'
    raw = "@cache\ndef g(a):\n    r'''Split a.\n\n    Details.'''\n    return a"
    assert summary_docstring(raw) == "@cache\ndef g(a):\n    r'''Split a.'''\n    return a"
    for same in ('def h():\n    """One line."""\n    return 1', "def k():\n    'Short.'\n    return 1",
                 "def m():\n    return 1", 'def n():\n    """One\n    paragraph only.\n    """\n    pass'):
        assert summary_docstring(same) == same
