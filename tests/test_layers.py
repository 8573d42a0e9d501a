"""The package's imports run one way, with the data: socket -> connections
-> http (router) or nbd.server -> handlers -> tickets -> backends -> ops ->
_io.

Walks every module's imports (ast, function-level imports included) and
fails on any import cycle, and on any import from a lower layer into a
higher one.  The layers are written here, top (nearest the socket and the
user) first; a module not listed fails the test, so a new module must be
placed in the house."""

import ast
import os
import textwrap

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Top first.  A module may import modules of its own layer (without a
# cycle) or of any layer below.
LAYERS = [
    ["services", "daemon", "admin", "admin.ctl", "client", "client.*"],
    ["connections"],
    ["http", "nbd", "nbd.server"],
    ["handlers", "handlers.*"],
    ["tickets", "metrics"],
    ["backends", "backends.*", "httpclient"],
    ["ops", "checksum", "compression"],
    ["streams", "buffers", "tls", "served", "nbd.pipeline"],
    ["errors", "redact", "ratelog", "extents", "urls", "httpparse",
     "transport", "workers", "accounting", "config", "", "_io", "_io.*",
     "nbd.protocol"],
]


def modules(root, package):
    """{module name: path} of a package's .py files (and its .pyx
    extensions, which import nothing of ours)."""
    out = {}
    base = os.path.join(root, package)
    for d, _, files in os.walk(base):
        for f in files:
            path = os.path.join(d, f)
            rel = os.path.relpath(path, root)
            if f.endswith(".py"):
                name = rel[:-3].replace(os.sep, ".")
                if name.endswith(".__init__"):
                    name = name[:-len(".__init__")]
                out[name] = path
            elif f.endswith(".pyx"):
                out[rel[:-4].replace(os.sep, ".")] = None
    return out


def imports(name, path, known):
    """The modules of ``known`` that module ``name`` imports."""
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    with open(path) as f:
        tree = ast.parse(f.read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                mod = base + ("." + mod if mod else "")
            for a in node.names:
                full = mod + "." + a.name
                found.add(full if full in known else mod)
    return {m for m in found if m in known and m != name}


def graph(root, package):
    known = modules(root, package)
    return {n: imports(n, p, known) for n, p in known.items() if p}


def cycles(g):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def layer_of(name, package, layers):
    short = name[len(package) + 1:] if name != package else ""
    for i, layer in enumerate(layers):
        for pattern in layer:
            if pattern == short or (pattern.endswith(".*") and
                                    short.startswith(pattern[:-1])):
                return len(layers) - i
    return None


def violations(g, package, layers):
    """Imports from a lower layer into a higher one, and modules placed in
    no layer."""
    out = []
    for name, deps in sorted(g.items()):
        mine = layer_of(name, package, layers)
        if mine is None:
            out.append("{} is in no layer".format(name))
            continue
        for dep in sorted(deps):
            theirs = layer_of(dep, package, layers)
            if theirs is None or theirs > mine:
                out.append("{} imports {} (a higher layer)".format(name, dep))
    return out


def test_imageio_has_no_import_cycle():
    assert cycles(graph(TOP, "imageio")) == []


def test_imageio_imports_run_one_way():
    assert violations(graph(TOP, "imageio"), "imageio", LAYERS) == []


def test_tickets_import_neither_backends_nor_cython():
    g = graph(TOP, "imageio")
    reach, todo = set(), ["imageio.tickets"]
    while todo:
        for dep in g.get(todo.pop(), ()):
            if dep not in reach:
                reach.add(dep)
                todo.append(dep)
    assert not [m for m in reach if m.startswith(("imageio.backends",
                                                  "imageio._io"))]


# The checker itself, on planted packages: it must fail where it should.

def plant(tmp_path, files):
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return str(tmp_path)


def test_checker_finds_a_planted_cycle(tmp_path):
    root = plant(tmp_path, {
        "__init__.py": "",
        "a.py": "from . import b\n",
        "b.py": "def f():\n    from pkg import c\n",
        "c.py": "import pkg.a\n",
    })
    assert cycles(graph(root, "pkg")) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_checker_finds_an_upward_import(tmp_path):
    root = plant(tmp_path, {
        "__init__.py": "",
        "top.py": "from . import low\n",
        "low.py": "from .top import something\n",
        "stray.py": "",
    })
    layers = [["top"], ["low", ""]]
    assert violations(graph(root, "pkg"), "pkg", layers) == [
        "pkg.low imports pkg.top (a higher layer)",
        "pkg.stray is in no layer"]
