"""setup.py's module-level functions, for tests (setup.py itself calls setup() when imported)."""
import ast
import os
import re

SETUP_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")


def function(name: str):
    tree = ast.parse(open(SETUP_PY).read())
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    scope = {"re": re, "os": os}
    exec(compile(ast.Module(body=[node], type_ignores=[]), SETUP_PY, "exec"), scope)
    return scope[name]
