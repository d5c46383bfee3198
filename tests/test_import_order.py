"""Reading order is import order: the module a chapter exports, and the chapter's notebook cells, import only
llama2_edu modules of the same chapter or earlier ones, and no two modules import each other.

Methods belong in their class: no module attaches a function to a class after defining it
(`Llama.generate = _generate`); a later chapter that adds methods subclasses instead.

Everything is derived from the files: a module's chapter is the `NN` of the notebook `notebooks/NN_*.ipynb`
that exports it (`#| default_exp NAME`, `#| export NAME`, `#| exports NAME`), and imports are read with `ast`
(top level and inside functions; relative, absolute, and names taken from the package root through
`__init__.py`'s `_EXPORTS`). Nothing is imported."""
import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "llama2_edu"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
# hand-written front door, `python -m llama2_edu` (it imports only chapter 13's program), nbdev's index
NOT_EXPORTED = {"__init__.py", "__main__.py", "_modidx.py"}
# nbdev's cell directives that name a module: `#| default_exp model`, `#|export model`, `#| exports model`
DIRECTIVE = re.compile(r"^#\|[ \t]*(default_exp|export|exports|exporti)[ \t]+([\w.]+)[ \t]*$", re.M)


def code_cells(path: Path) -> list:
    "(index, source) of each code cell of a notebook."
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return [(i, "".join(c["source"])) for i, c in enumerate(cells) if c["cell_type"] == "code"]


def chapter_of(path: Path) -> int:
    return int(path.name[:2])


def module_sources(notebooks=NOTEBOOKS) -> dict:
    "module name -> {notebook: 'default_exp' or 'export'} for every module a notebook exports into."
    sources = {}
    for nb in notebooks:
        for _, src in code_cells(nb):
            for kind, name in DIRECTIVE.findall(src):
                seen = sources.setdefault(name, {})
                if seen.get(nb) != "default_exp":
                    seen[nb] = "default_exp" if kind == "default_exp" else "export"
    return sources


def module_chapters(sources: dict) -> dict:
    """module name -> chapter: that of the notebook whose `default_exp` creates it (nbdev's `#| export NAME` only
    appends to a module that exists), else the earliest notebook that exports into it."""
    chapters = {}
    for name, notebooks in sources.items():
        creators = [nb for nb, kind in notebooks.items() if kind == "default_exp"] or list(notebooks)
        chapters[name] = min(chapter_of(nb) for nb in creators)
    return chapters


def root_exports(init: Path = ROOT / PACKAGE / "__init__.py") -> dict:
    "`_EXPORTS` of the package's `__init__.py` (name -> module), read from its syntax tree."
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def imported_modules(tree: ast.AST, modules, exports: dict, package: str = None) -> list:
    """(module, line) for each llama2_edu module that `tree` imports, anywhere in it. `modules`: the package's
    module names; `exports`: `_EXPORTS`; `package`: the dotted package of the importing module (for relative
    imports), None for a notebook cell."""
    found = []

    def add_dotted(dotted, line, names=()):
        "`dotted` is an absolute module path; `names` what is taken from it with `from dotted import ...`."
        parts = dotted.split(".")
        if parts[0] != PACKAGE:
            return
        if len(parts) > 1:
            found.append((".".join(parts[1:]), line))
            return
        for name in names:  # from llama2_edu import X: a name of _EXPORTS, or a module
            if name in exports:
                found.append((exports[name], line))
            elif name in modules:
                found.append((name, line))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add_dotted(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            names = [a.name for a in node.names]
            if node.level == 0:
                add_dotted(node.module or "", node.lineno, names)
            elif package is not None:
                base = package.split(".")
                if node.level - 1 >= len(base):
                    continue  # above the top package: not ours
                base = base[: len(base) - (node.level - 1)]
                dotted = ".".join(base + ([node.module] if node.module else []))
                add_dotted(dotted, node.lineno, names)
    return found


def order_violations(importer: str, chapter: int, imports: list, chapters: dict, where: str = "") -> list:
    "One line for each import of a module of a later chapter, or of a module no notebook exports."
    problems = []
    for module, line in imports:
        if module not in chapters:
            problems.append(f"{importer} (chapter {chapter}) imports {PACKAGE}.{module}{where}, which no notebook exports")
        elif chapters[module] > chapter:
            problems.append(f"{importer} (chapter {chapter}) imports {PACKAGE}.{module} (chapter {chapters[module]}){where}")
    return sorted(set(problems), key=problems.index)


def package_modules(pkg: Path = ROOT / PACKAGE) -> dict:
    "module name -> path, for every generated module of the package."
    return {p.relative_to(pkg).with_suffix("").as_posix().replace("/", "."): p
            for p in sorted(pkg.rglob("*.py")) if p.name not in NOT_EXPORTED and "__pycache__" not in p.parts}


def module_imports(modules: dict, exports: dict) -> dict:
    "module name -> [(imported module, line)] for every module of the package."
    graph = {}
    for name, path in modules.items():
        package = ".".join([PACKAGE] + name.split(".")[:-1])
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        graph[name] = imported_modules(tree, set(modules), exports, package)
    return graph


def find_cycles(graph: dict) -> list:
    "Each cycle of the import graph (module -> imported modules), as 'a -> b -> a'; a module importing itself is not one."
    edges = {a: sorted({b for b, _ in imports if b != a and b in graph}) for a, imports in graph.items()}
    cycles, seen = [], set()
    state = {}  # module -> 1 while on the DFS stack, 2 when done

    def visit(node, stack):
        state[node] = 1
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    cycles.append(" -> ".join(cycle + [nxt]))
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    return cycles


def notebook_violations(nb: Path, chapters: dict, modules, exports: dict) -> list:
    problems = []
    for i, src in code_cells(nb):
        code = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        try:
            tree = ast.parse(code)
        except SyntaxError:
            continue
        imports = imported_modules(tree, modules, exports)
        problems += order_violations(f"notebooks/{nb.name}", chapter_of(nb), imports, chapters, f" in cell {i}")
    return problems


def attached_methods(tree: ast.AST, where: str) -> list:
    """Module-level statements that set an attribute of a class of the module, or of one it imports:
    `Cls.name = ...`, `Cls.name += ...`, `setattr(Cls, ...)`, also inside `if`/`try` blocks."""
    classes = {n.name for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            classes |= {(a.asname or a.name).split(".")[0] for a in node.names if a.name[:1].isupper()}
    problems = []

    def statements(body):
        for stmt in body:
            if isinstance(stmt, (ast.If, ast.Try, ast.With)):
                for block in ("body", "orelse", "finalbody", "handlers"):
                    for part in getattr(stmt, block, []):
                        yield from statements(part.body if isinstance(part, ast.ExceptHandler) else [part])
            else:
                yield stmt

    for stmt in statements(tree.body):
        targets = (stmt.targets if isinstance(stmt, ast.Assign)
                   else [stmt.target] if isinstance(stmt, (ast.AugAssign, ast.AnnAssign)) else [])
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) \
                and getattr(stmt.value.func, "id", None) == "setattr" and stmt.value.args:
            targets = [ast.Attribute(value=stmt.value.args[0], attr="?")]
        for t in targets:
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id in classes:
                problems.append(f"{where}:{stmt.lineno} attaches {t.value.id}.{t.attr} after the class")
    return problems


def method_names(trees) -> set:
    "The names of the methods the package's classes define (`forward`, `generate`, ...; not properties)."
    return {f.name for tree in trees for c in ast.walk(tree) if isinstance(c, ast.ClassDef)
            for f in c.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
            and not any("property" in ast.unparse(d) or "setter" in ast.unparse(d) for d in f.decorator_list)}


def patched_methods(tree: ast.AST, where: str, methods: set) -> list:
    """Statements anywhere (inside functions too) that replace a method on an object: `obj.forward = ...`,
    `layer.generate = partial(...)`, `setattr(obj, "forward", ...)`, where the name is a method of a package
    class. A lever that speeds something up wraps or replaces the object, or hands the loop a function."""
    problems = []
    for node in ast.walk(tree):
        targets = node.targets if isinstance(node, ast.Assign) else []
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setattr" and len(node.args) > 1 \
                and isinstance(node.args[1], ast.Constant):
            targets = [ast.Attribute(value=node.args[0], attr=node.args[1].value)]
        for t in targets:
            own = isinstance(t, ast.Attribute) and getattr(t.value, "id", None) == "self"  # its own attributes
            if isinstance(t, ast.Attribute) and t.attr in methods and not own:
                problems.append(f"{where}:{node.lineno} replaces the method {ast.unparse(t)} on an object")
    return problems


def report(what: str, problems: list) -> str:
    return f"{len(problems)} {what}:\n" + "\n".join(problems)


# --- the rule, on the book ----------------------------------------------------------------------------------------

SOURCES = module_sources()
CHAPTERS = module_chapters(SOURCES)
EXPORTS = root_exports()
MODULES = package_modules()


def test_the_notebooks_export_the_package():
    assert NOTEBOOKS and CHAPTERS, "no notebook exports a module"
    missing = [f"{PACKAGE}/{MODULES[m].relative_to(ROOT / PACKAGE)}: no notebook exports it"
               for m in MODULES if m not in CHAPTERS]
    assert not missing, report("modules without a chapter", missing)


def test_each_module_comes_from_exactly_one_notebook():
    problems = [f"{PACKAGE}/{name.replace('.', '/')}.py is exported by "
                + " and ".join(f"notebooks/{nb.name} ({kind})" for nb, kind in sorted(notebooks.items()))
                for name, notebooks in sorted(SOURCES.items()) if len(notebooks) > 1]
    assert not problems, report("modules exported by several notebooks", problems)


def test_root_exports_name_modules_of_the_package():
    bad = [f"_EXPORTS[{name!r}] = {module!r}: no such module" for name, module in EXPORTS.items() if module not in MODULES]
    assert not bad, report("bad entries in llama2_edu/__init__.py", bad)


def test_modules_import_only_their_own_or_earlier_chapters():
    problems = []
    for name, imports in module_imports(MODULES, EXPORTS).items():
        if name in CHAPTERS:
            path = MODULES[name].relative_to(ROOT).as_posix()
            problems += order_violations(path, CHAPTERS[name], imports, CHAPTERS)
    assert not problems, report("imports of a later chapter", problems)


def test_no_import_cycles_between_modules():
    cycles = find_cycles(module_imports(MODULES, EXPORTS))
    assert not cycles, report("import cycles", cycles)


def test_notebooks_import_only_their_own_or_earlier_chapters():
    problems = []
    for nb in NOTEBOOKS:
        problems += notebook_violations(nb, CHAPTERS, set(MODULES), EXPORTS)
    assert not problems, report("notebook imports of a later chapter", problems)


def test_methods_are_defined_in_their_class():
    problems = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        problems += attached_methods(tree, path.relative_to(ROOT).as_posix())
    assert not problems, report("methods attached to a class after its definition", problems)


def test_no_method_is_replaced_on_an_instance():
    trees = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in MODULES.items()}
    methods = method_names(trees.values()) | {"forward", "__call__"}
    problems = []
    for name, tree in trees.items():
        problems += patched_methods(tree, MODULES[name].relative_to(ROOT).as_posix(), methods)
    assert not problems, report("methods replaced on an instance", problems)


# --- the checker itself -------------------------------------------------------------------------------------------

def test_the_checker_finds_every_kind_of_violation(tmp_path):
    "A fake book: chapter 2's module imports chapter 5's four ways; chapter 5's module imports chapter 2's, fine."
    nbs = tmp_path / "notebooks"
    nbs.mkdir()

    def notebook(name, *sources):
        cells = [{"cell_type": "code", "source": s, "metadata": {}, "outputs": []} for s in sources]
        (nbs / name).write_text(json.dumps({"cells": cells}))
        return nbs / name

    early = notebook("02_early.ipynb", "#| default_exp early", "#|export\nx = 1",
                     "%time y = 1\nfrom llama2_edu.late import z")
    late = notebook("05_late.ipynb", "#| default_exp late", "#| export\nfrom .early import x",
                    "#| exports extra\nw = 2")
    sources = module_sources([early, late])
    chapters = module_chapters(sources)
    assert chapters == {"early": 2, "late": 5, "extra": 5}
    modules, exports = set(chapters), {"LateThing": "late"}

    early_py = ast.parse("import llama2_edu.late\n"
                         "from . import late\n"
                         "from llama2_edu import LateThing, __version__\n"
                         "def f():\n    from .late import z\n    from .early import x  # itself: fine\n"
                         "import numpy\n")
    imports = imported_modules(early_py, modules, exports, package=PACKAGE)
    assert sorted(imports) == [("early", 6), ("late", 1), ("late", 2), ("late", 3), ("late", 5)]
    assert order_violations("llama2_edu/early.py", 2, imports, chapters) == [
        "llama2_edu/early.py (chapter 2) imports llama2_edu.late (chapter 5)"]

    late_py = ast.parse("from .early import x\nfrom llama2_edu.extra import w\n")
    assert order_violations("llama2_edu/late.py", 5, imported_modules(late_py, modules, exports, PACKAGE),
                            chapters) == []
    assert order_violations("llama2_edu/late.py", 5, [("gone", 1)], chapters) == [
        "llama2_edu/late.py (chapter 5) imports llama2_edu.gone, which no notebook exports"]

    assert notebook_violations(early, chapters, modules, exports) == [
        "notebooks/02_early.ipynb (chapter 2) imports llama2_edu.late (chapter 5) in cell 2"]
    assert notebook_violations(late, chapters, modules, exports) == []

    graph = {"early": [("late", 5), ("early", 6)], "late": [("early", 1)], "extra": []}
    assert find_cycles(graph) == ["early -> late -> early"]
    assert find_cycles({"early": [("early", 6)], "late": [("early", 1)]}) == []

    twice = notebook("07_twice.ipynb", "#| default_exp twice", "#| export early\nv = 3")
    assert {m: len(n) for m, n in module_sources([early, late, twice]).items() if len(n) > 1} == {"early": 2}


def test_the_method_checker_finds_attached_methods():
    tree = ast.parse("from .generation import Llama\n"
                     "class Cache:\n    def update(self):\n        self.x = 1\n"
                     "def _generate(self):\n    pass\n"
                     "Llama.generate = _generate\n"
                     "if True:\n    Cache.copy_row = lambda self: None\n"
                     "setattr(Cache, 'allocate', None)\n"
                     "options = object()\noptions.verbose = True\n")
    methods = method_names([tree]) | {"forward"}
    assert patched_methods(ast.parse("def compile(model):\n    model.forward = torch.compile(model.forward)\n"
                                     "    for layer in model.layers:\n        layer.update = partial(f, layer)\n"
                                     "    setattr(model, 'forward', None)\n    model.step = f\n"), "m.py", methods) == [
        "m.py:2 replaces the method model.forward on an object",
        "m.py:4 replaces the method layer.update on an object",
        "m.py:5 replaces the method model.forward on an object"]
    assert attached_methods(tree, "m.py") == ["m.py:7 attaches Llama.generate after the class",
                                              "m.py:9 attaches Cache.copy_row after the class",
                                              "m.py:10 attaches Cache.? after the class"]
