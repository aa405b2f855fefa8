"""Every import points down: the rooms of the package in the order docs/architecture.md
lists them, each importing only rooms before it, no two modules importing each
other, and no import circle in the package or among the benchmarks/ scripts."""

import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).parents[1]
PACKAGE = ROOT / 'big_pretrain'


def _room_order() -> list[str]:
  """The rooms, lowest first, as docs/architecture.md's 'Import order' lists them
  ('a < b < ...')."""
  page = (ROOT / 'docs' / 'architecture.md').read_text(encoding='utf-8')
  section = page.split('## Import order', 1)[1]
  order = re.search(r'```\n(.*?)```', section, re.S).group(1)  # the first block after it
  return [room.strip() for room in order.replace('\n', ' ').split('<')]


def _modules() -> dict[str, pathlib.Path]:
  """'big_pretrain.data.sources.synthetic' -> its file, for every module of the package."""
  modules = {}
  for path in PACKAGE.rglob('*.py'):
    parts = path.relative_to(ROOT).with_suffix('').parts
    modules['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return modules


def _imports(path: pathlib.Path, modules) -> set[str]:
  """The package's modules that `path` imports (anywhere in it): `from a.b import c` is an
  import of a.b.c when that is a module, else of a.b."""
  imported = set()
  for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
        'big_pretrain'):
      for alias in node.names:
        child = f'{node.module}.{alias.name}'
        imported.add(child if child in modules else node.module)
    elif isinstance(node, ast.Import):
      imported |= {alias.name for alias in node.names if alias.name.startswith('big_pretrain')}
  return {name for name in imported if name in modules}


def _room(module: str) -> str:
  parts = module.split('.')
  return parts[1] if len(parts) > 1 else 'big_pretrain'


def test_every_import_points_down_the_readmes_order_of_rooms():
  order = _room_order()
  modules = _modules()
  rooms = {_room(module) for module in modules} - {'big_pretrain'}
  assert rooms == set(order) - {'main.py'}, 'docs/architecture.md lists other rooms than the package has'
  upward = []
  for module, path in modules.items():
    for imported in _imports(path, modules):
      if order.index(_room(imported)) > order.index(_room(module)):
        upward.append(f'{module} imports {imported}')
  for imported in _imports(ROOT / 'main.py', modules):  # main.py sits on top of every room
    assert order.index(_room(imported)) < order.index('main.py')
  assert not upward, '\n'.join(sorted(upward))


def test_no_two_modules_import_each_other():
  modules = _modules()
  graph = {module: _imports(path, modules) for module, path in modules.items()}
  mutual = sorted(f'{a} <-> {b}' for a, targets in graph.items() for b in targets
                  if a < b and a in graph.get(b, ()))
  assert not mutual, mutual


def _cycle(graph: dict[str, set[str]]) -> list[str]:
  """One import circle of `graph` (module -> the modules it imports), or [] when none."""
  state, path = {}, []

  def visit(module):
    state[module] = 'open'
    path.append(module)
    for imported in sorted(graph.get(module, ())):
      if state.get(imported) == 'open':
        return path[path.index(imported):] + [imported]
      if imported not in state and (found := visit(imported)):
        return found
    state[module] = 'done'
    path.pop()
    return []

  for module in sorted(graph):
    if module not in state and (found := visit(module)):
      return found
  return []


def _benchmark_imports() -> dict[str, set[str]]:
  """benchmarks/ scripts -> the scripts beside them they import (their folder is on
  sys.path: `import step_speed`, `from step_tables import Row`), anywhere in them."""
  scripts = {path.stem: path for path in (ROOT / 'benchmarks').glob('*.py')}
  graph = {}
  for name, path in scripts.items():
    imported = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
      if isinstance(node, ast.ImportFrom) and node.module:
        imported.add(node.module.split('.')[0])
      elif isinstance(node, ast.Import):
        imported |= {alias.name.split('.')[0] for alias in node.names}
    graph[name] = imported & set(scripts)
  return graph


def test_no_import_circle_in_the_package_or_the_benchmarks():
  modules = _modules()
  package = {module: _imports(path, modules) for module, path in modules.items()}
  # A package imports its __init__ on the way to any of its modules: not a circle of ours.
  package = {module: {imported for imported in targets
                      if not module.startswith(imported + '.')}
             for module, targets in package.items()}
  assert _cycle(package) == []
  benchmarks = _benchmark_imports()
  assert benchmarks['step_speed'] >= {'step_tables', 'step_profile'}  # the graph is read
  assert _cycle(benchmarks) == []
