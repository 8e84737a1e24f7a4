"""The C files of bertqa._C call each other in layers, never in a circle (issue 16).

File A depends on file B when A uses a function or variable that B defines with external linkage. The layers
(csrc/cpu.h says why):

    entry points (gelu.c, layernorm.c, adamw.c, rng.c, ...) -> cpu.c (the ISA tables) -> variants (*_avx2.c,
    *_avx512.c; an AVX-512 variant may hand its tail to the AVX2 one) -> leaves (philox.c, threads.c, ...)

The graph comes from the sources, with a small C tokenizer written for this codebase: comments, strings and
preprocessor conditionals are stripped (every #if branch counts; a pragma in a function body counts as code),
a file's references are its identifiers that are not member names (after `.` or `->`), plus, transitively, those
in the bodies of the headers' static inline functions and macros that it names. When an in-place build's objects exist (`setup.py build_ext --inplace`), the
same graph is read from `nm` as well, and the source parser must have found every definition and every edge that
the linker sees: that keeps the parser honest.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

TOKEN = re.compile(r"[A-Za-z_]\w*|\d[\w.]*|->|\S")
COMMENT_OR_LITERAL = re.compile(r"/\*.*?\*/|//[^\n]*|\"(?:\\.|[^\"\\\n])*\"|'(?:\\.|[^'\\\n])*'", re.S)
KEYWORDS = {"static", "extern", "typedef"}


def tokens_of(text):
    """(code tokens, {macro name: body tokens}) of a C file: comments and literals removed, preprocessor lines
    dropped except #define bodies (an #if's every branch stays in the code)."""
    # a comment becomes its newlines (a preprocessor line ends where it did), a literal an empty one
    text = COMMENT_OR_LITERAL.sub(lambda m: ("\n" * m.group(0).count("\n") or " ") if m.group(0)[0] == "/" else '""',
                                  text)
    text = text.replace("\\\n", " ")
    code, macros, depth = [], {}, 0
    for line in text.split("\n"):
        s = line.strip()
        if s.startswith("#"):
            m = re.match(r"#\s*define\s+(\w+)(\([^)]*\))?(.*)", s)
            if m:
                macros[m.group(1)] = TOKEN.findall(m.group(3))
            elif depth and re.match(r"#\s*pragma\b", s):   # in a body: num_threads(bq_num_threads()) calls
                code += TOKEN.findall(s[1:])
            continue
        toks = TOKEN.findall(line)
        depth += toks.count("{") - toks.count("}")
        code += toks
    return code, macros


def identifiers(toks):
    """Identifiers that are not struct members (the token before is neither `.` nor `->`)."""
    return {t for i, t in enumerate(toks)
            if (t[0].isalpha() or t[0] == "_") and (i == 0 or toks[i - 1] not in (".", "->"))}


def top_level(toks):
    """Yield (kind, name, is_static, body tokens) for each top-level function definition ("function") and
    variable definition ("variable"); declarations, typedefs and aggregates yield nothing."""
    stmt, i = [], 0
    while i < len(toks):
        t = toks[i]
        if t == "{" and stmt and stmt[-1] == ")" and "=" not in stmt:
            depth, j = 0, i   # a function body: to its matching brace
            while True:
                depth += {"{": 1, "}": -1}.get(toks[j], 0)
                if depth == 0:
                    break
                j += 1
            paren = stmt.index("(")
            while paren > 0 and not re.match(r"[A-Za-z_]", stmt[paren - 1]):
                paren = stmt.index("(", paren + 1)
            yield "function", stmt[paren - 1], "static" in stmt, toks[i:j + 1]
            stmt, i = [], j + 1
            continue
        if t == "{":   # an aggregate or an initializer: its tokens belong to the statement
            depth, j = 0, i
            while True:
                depth += {"{": 1, "}": -1}.get(toks[j], 0)
                if depth == 0:
                    break
                j += 1
            stmt += toks[i:j + 1]
            i = j + 1
            continue
        if t == ";":
            if stmt and not KEYWORDS & set(stmt) and stmt[0] not in ("struct", "union", "enum"):
                name, nxt, depth = None, None, 0
                for k, s in enumerate(stmt):
                    if depth == 0 and s in ("=", "[", ","):
                        break
                    depth += {"(": 1, ")": -1}.get(s, 0)
                    if depth == 0 and re.match(r"[A-Za-z_]", s):
                        name, nxt = s, stmt[k + 1] if k + 1 < len(stmt) else ";"
                if name and nxt != "(":
                    yield "variable", name, False, stmt
            elif stmt and "static" in stmt and "typedef" not in stmt:
                depth = 0
                for k, s in enumerate(stmt):   # a static variable: a file-local name
                    if depth == 0 and s in ("=", "[", ";"):
                        break
                    depth += {"(": 1, ")": -1}.get(s, 0)
                    if depth == 0 and re.match(r"[A-Za-z_]", s):
                        name = s
                yield "static", name, True, stmt
            stmt, i = [], i + 1
            continue
        stmt.append(t)
        i += 1


def header_expansions():
    """{name: identifiers its body uses} for the static inline functions and the macros of csrc's headers."""
    out = {}
    for h in sorted(CSRC.glob("*.h")):
        toks, macros = tokens_of(h.read_text())
        for name, body in macros.items():
            out.setdefault(name, set()).update(identifiers(body))
        for kind, name, _, body in top_level(toks):
            if kind == "function":
                out.setdefault(name, set()).update(identifiers(body))
    return out


def source_graph():
    """(defs {file: names defined with external linkage}, graph {file: files it depends on}) from csrc/*.c,
    the sources setup.py compiles into bertqa._C."""
    expand = header_expansions()
    defs, locals_, refs = {}, {}, {}
    for c in sorted(CSRC.glob("*.c")):
        toks, macros = tokens_of(c.read_text())
        name = c.stem
        defs[name], locals_[name] = set(), set()
        for kind, n, is_static, _ in top_level(toks):
            (locals_ if is_static else defs)[name].add(n)
        used = identifiers(toks) | {i for body in macros.values() for i in identifiers(body)}
        todo = list(used)
        while todo:   # through the headers' inline functions and macros
            for i in expand.get(todo.pop(), ()):
                if i not in used:
                    used.add(i)
                    todo.append(i)
        refs[name] = used - defs[name] - locals_[name]
    owner = {}
    for f, names in defs.items():
        for n in names:
            assert n not in owner, f"{n} defined in both csrc/{owner[n]}.c and csrc/{f}.c"
            owner[n] = f
    graph = {f: {owner[r] for r in refs[f] if r in owner} for f in defs}
    return defs, graph


def cycles(graph):
    """Every back edge's cycle, as a list of files (empty: the graph is a DAG)."""
    color, found = {}, []

    def visit(u, path):
        color[u] = 1
        path.append(u)
        for v in sorted(graph[u]):
            if color.get(v) == 1:
                found.append(path[path.index(v):] + [v])
            elif not color.get(v):
                visit(v, path)
        path.pop()
        color[u] = 2

    for n in sorted(graph):
        if not color.get(n):
            visit(n, [])
    return found


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_parser_on_the_shapes_this_codebase_uses():
    src = """
    #define TWICE(x) helper(x) + helper(x)
    static const tbl t = { .gelu_forward = gelu_forward_avx2, .name = "x(y)" };
    _Atomic(const tbl *) active = &t;   /* a global variable */
    int counts[4];
    void declared(int a);
    extern int elsewhere;
    static inline int local_fn(int a) { return a; }
    BQ_AVX512_BEGIN
    double exported(const float *g, long n) {
    #pragma omp parallel for num_threads(bq_num_threads())
        for (long i = 0; i < n; i++) k->sum_squares(g, n);
        return other(g) + TWICE(n);
    }
    """
    toks, macros = tokens_of(src)
    found = {(kind, name, st) for kind, name, st, _ in top_level(toks)}
    assert found == {("static", "t", True), ("variable", "active", False), ("variable", "counts", False),
                     ("function", "local_fn", True), ("function", "exported", False)}
    used = identifiers(toks)
    assert {"gelu_forward_avx2", "other", "TWICE", "bq_num_threads"} <= used
    assert not {"gelu_forward", "sum_squares", "name", "y"} & used   # members and strings are not references
    assert identifiers(macros["TWICE"]) >= {"helper"}


def test_c_files_of_the_cpu_extension_have_no_cycle():
    defs, graph = source_graph()
    assert len(defs) > 20 and all(defs.values()), "the parser found no definitions in some csrc/*.c"
    # the layering this test exists for: the tables sit between the entry points and the variants
    assert {"gelu_avx2", "gelu_avx512", "rng_avx2", "rng_avx512"} <= graph["cpu"]
    assert "cpu" in graph["gelu"] and "cpu" in graph["rng"]
    found = cycles(graph)
    assert not found, "csrc files depend on each other in a circle: " + "; ".join(" -> ".join(c) for c in found)


def objects_of_inplace_build():
    """{file stem: object} of the newest in-place build, or a reason to skip."""
    if not shutil.which("nm"):
        return "nm is not installed"
    dirs = sorted((ROOT / "build").glob("temp*/csrc"), key=lambda d: d.stat().st_mtime)
    if not dirs:
        return "no in-place build (setup.py build_ext --inplace) to read objects from"
    objs = {o.stem: o for o in dirs[-1].glob("*.o") if (CSRC / (o.stem + ".c")).is_file()}
    sources = {c.stem for c in CSRC.glob("*.c")}
    stale = sorted(s for s in sources if s not in objs or objs[s].stat().st_mtime < (CSRC / (s + ".c")).stat().st_mtime)
    if stale:
        return f"the in-place build is older than csrc/{stale[0]}.c (rebuild to check against the linker)"
    return objs


def test_source_graph_has_every_definition_and_edge_the_linker_sees():
    objs = objects_of_inplace_build()
    if isinstance(objs, str):
        pytest.skip(objs)
    nm_defs, nm_undefs = {}, {}
    for name, o in objs.items():
        lines = [l.split() for l in subprocess.run(["nm", str(o)], capture_output=True, text=True,
                                                   check=True).stdout.splitlines()]
        nm_defs[name] = {l[2] for l in lines if len(l) == 3 and l[1] in "TDBRC"}
        nm_undefs[name] = {l[1] for l in lines if len(l) == 2 and l[0] == "U"}
    # NumPy's C API table (pyargs.h's PY_ARRAY_UNIQUE_SYMBOL) is defined and used by NumPy's own header macros,
    # which the parser does not read: left out (the files that use it call pyargs.c's functions anyway)
    table = tokens_of((CSRC / "pyargs.h").read_text())[1]["BQ_ARRAY_API"][0]
    nm_defs = {f: {s for s in ss if not s.startswith(table)} for f, ss in nm_defs.items()}
    owner = {s: n for n, ss in nm_defs.items() for s in ss}
    nm_graph = {n: {owner[s] for s in nm_undefs[n] if s in owner and owner[s] != n} for n in nm_defs}
    defs, graph = source_graph()
    for f in nm_defs:
        assert nm_defs[f] <= defs[f], f"csrc/{f}.c defines {sorted(nm_defs[f] - defs[f])} (nm), the parser missed them"
        assert nm_graph[f] <= graph[f], f"csrc/{f}.c uses {sorted(nm_graph[f] - graph[f])} (nm), the parser missed it"
    assert not cycles(nm_graph)
