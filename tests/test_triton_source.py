"""Source rules for the Triton kernels, for the Triton versions we support (3.6 to 3.8): what one of
them compiles differently from the others is written the way that means the same everywhere."""
import ast
import pathlib

KERNELS = sorted((pathlib.Path(__file__).resolve().parents[1] / "triton_kernels").glob("*.py"))


def _jit_functions(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
            yield node


def test_kernels_are_found():
    assert len(KERNELS) >= 8
    assert sum(len(list(_jit_functions(ast.parse(p.read_text())))) for p in KERNELS) >= 30


def test_no_unary_minus_on_values_in_jit_code():
    """Triton 3.6 (unlike 3.8) lowers `-x` on floats to `0 - x`, which turns -0.0 into +0.0 (it broke the RoSTE
    rounding's signed zeros, so fake quantization was not bit-exact on triton 3.6). Negate a float with
    `x * -1.0` and an integer with `0 - x`; literals such as -1.0 or -float("inf") are fine."""
    found = []
    for path in KERNELS:
        src = path.read_text()
        for fn in _jit_functions(ast.parse(src)):
            for node in ast.walk(fn):
                if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
                    literal = isinstance(node.operand, ast.Constant) or (
                        isinstance(node.operand, ast.Call) and ast.unparse(node.operand.func) == "float")
                    if not literal:
                        found.append(f"{path.name}:{node.lineno} in {fn.name}: {ast.unparse(node)}")
    assert not found, "unary minus on a value in @triton.jit code:\n" + "\n".join(found)


def test_int8_dots_name_their_int32_accumulator():
    """Triton 3.6 asserts acc's dtype == out_dtype (default float32) in tl.dot: an int8 dot into an int32
    accumulator must say out_dtype=tl.int32 (int_linear_kernel did not compile there)."""
    src = (pathlib.Path(__file__).resolve().parents[1] / "triton_kernels" / "roste_int.py").read_text()
    dots = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call) and ast.unparse(n.func) == "tl.dot"]
    assert dots and all(any(k.arg == "out_dtype" and ast.unparse(k.value) == "tl.int32" for k in d.keywords)
                        for d in dots)
