"""bertqa's modules import each other without a circle (issue 21): every import counts, the ones inside functions
too, so a module that imports another only when a command runs is still a dependency."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bertqa"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the bertqa modules it imports (`from . import x` names module x; `from .m import f`, module m)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                deps.update(f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "bertqa.training_job" in graph["bertqa.cli"]   # imported inside build_parser
    assert "bertqa.errors" in graph["bertqa.training_job"]   # imported inside an except clause


def test_cli_and_training_job_do_not_import_each_other():
    graph = import_graph()
    assert "bertqa.cli" not in graph["bertqa.training_job"]
    assert "bertqa.cli" not in graph["bertqa.errors"]


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_one_exit_status_for_user_errors():
    from bertqa import cli, errors, training_job

    assert cli.EXIT_USER_ERROR == training_job.EXIT_USER_ERROR == errors.EXIT_USER_ERROR == 2
