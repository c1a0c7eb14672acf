"""No import circle anywhere in the project: the graph of which project module imports which (imports inside
functions included, as a lazy import only hides a circle) has no cycle. Checked on the source with ast, so nothing
is imported to check it."""
import ast
import os

from conftest import REPO

# folders whose scripts run with their own folder on sys.path (`from experiment import ...`, `from conftest import`)
SCRIPT_FOLDERS = ('scripts', 'tests')


def project_modules(root):
    """{dotted module name: path} of every .py file under root (hidden folders and out/ skipped). A script folder's
    files are also reachable by their bare name."""
    modules = {}
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(('.', '__')) and d != 'out')
        for f in files:
            if f.endswith('.py'):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, root)[:-3].replace(os.sep, '.')
                modules[name.removesuffix('.__init__')] = path
    return modules


def import_graph(root):
    """{module: set of project modules it imports}, with the parent packages an import runs first."""
    modules = project_modules(root)
    graph = {}
    for name, path in modules.items():
        local = os.path.relpath(os.path.dirname(path), root).replace(os.sep, '.')
        targets = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]  # `from pkg import mod`
            else:
                continue
            for imported in names:
                candidates = [imported] + ([f'{local}.{imported}'] if local in SCRIPT_FOLDERS else [])
                for c in candidates:
                    parts = c.split('.')
                    targets |= {'.'.join(parts[:i]) for i in range(1, len(parts) + 1)} & set(modules)
        graph[name] = targets - {name}
    return graph


def cycles(graph):
    """The strongly connected components of more than one module (each holds an import circle), sorted."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
    return sorted(found)


def test_no_import_circle_in_the_project():
    graph = import_graph(REPO)
    assert 'data.shapes.canvas' in graph['data.shapes.plan_world']      # the graph sees real imports ...
    assert 'data.shapes.plan_world' in graph['data.shapes.worlds'] and 'data.shapes.world' in graph['data.shapes.worlds']
    assert 'data.shapes.plan_world' not in graph['data.shapes.world']  # a world does not import its variant
    assert 'experiment' not in graph and 'scripts.experiment' in graph['scripts.sample_sweep']  # ... script folders
    assert cycles(graph) == []


def test_the_check_finds_a_circle_hidden_in_a_function(tmp_path):
    """A circle closed by an import inside a function (as world.py once imported its plan variant) is found."""
    pkg = tmp_path / 'pkg'
    pkg.mkdir()
    (pkg / '__init__.py').write_text('')
    (pkg / 'a.py').write_text('from pkg.b import helper\n')
    (pkg / 'b.py').write_text('def helper():\n    from pkg import a\n    return a\n')
    (pkg / 'c.py').write_text('import pkg.a\n')
    assert cycles(import_graph(str(tmp_path))) == [['pkg.a', 'pkg.b']]
    (pkg / 'b.py').write_text('def helper():\n    return 1\n')
    assert cycles(import_graph(str(tmp_path))) == []
