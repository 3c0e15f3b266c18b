"""Write docs/api.md from the public API, so that the reference cannot drift from the code.

    .venv/bin/python docs/make_api.py           # rewrite docs/api.md
    .venv/bin/python docs/make_api.py --check   # exit 1 if docs/api.md is out of date

For every name in `rconv_core.__all__`: its signature (`inspect.signature`) and the first paragraph
of its docstring, grouped by the sub-package of `rconv` that defines it. tests/test_docs.py fails
when docs/api.md differs from what this script would write now.
"""

import ast
import inspect
import re
import textwrap
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
API = ROOT / "docs" / "api.md"
WIDTH = 100  # a signature longer than this is wrapped, its parameters packed onto indented lines
# The sub-packages in the order of their layers (see ARCHITECTURE.md); others follow alphabetically.
ORDER = ("common", "linalg", "cases", "split", "attack", "analysis", "studies", "cli")
ABOUT = {
    "common": "errors, paths",
    "linalg": "sparse factorisations, memory checks, least squares",
    "cases": "networks, images, what a client shares, ready-made cases",
    "split": "a mini-batch's Linear layer split into its images",
    "attack": "the constraints and the attack itself",
    "analysis": "metrics, reports, summaries of tables, figures",
    "studies": "the experiment loops, the baselines, executors",
    "cli": "the command line, `python -m rconv_core`",
}


def imported_from():
    """Each public name's module as the facade imports it (constants carry no __module__)."""
    tree = ast.parse((ROOT / "rconv_core.py").read_text())
    return {alias.asname or alias.name: node.module for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module for alias in node.names}


def group_of(module):
    """rconv.attack.reconstruct -> "attack"; rconv.cli -> "cli"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "rconv" else module


def first_paragraph(obj):
    doc = inspect.getdoc(obj) or ""
    return " ".join(doc.split("\n\n")[0].split())


def clean(text):
    """Keep a rendering stable across runs and readable: no addresses, no ForwardRef('...')."""
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", text)
    return re.sub(r"ForwardRef\('([^']*)'\)", r"\1", text)


def parameters_of(obj):
    """The signature's parameters as written, without annotations, with the bare * and / markers."""
    parameters = list(inspect.signature(obj).parameters.values())
    kinds = [p.kind for p in parameters]
    out = []
    for i, parameter in enumerate(parameters):
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and inspect.Parameter.VAR_POSITIONAL not in kinds \
                and (i == 0 or kinds[i - 1] is not inspect.Parameter.KEYWORD_ONLY):
            out.append("*")
        out.append(clean(str(parameter.replace(annotation=inspect.Parameter.empty))))
        if parameter.kind is inspect.Parameter.POSITIONAL_ONLY and \
                (i + 1 == len(parameters) or kinds[i + 1] is not inspect.Parameter.POSITIONAL_ONLY):
            out.append("/")
    return out


def wrap(head, parameters, brackets="()"):
    """head(p1, p2, ...) on one line, or packed onto 4-space-indented lines of at most WIDTH."""
    opening, closing = brackets
    line = f"{head}{opening}{', '.join(parameters)}{closing}"
    if len(line) <= WIDTH:
        return line
    lines, current = [f"{head}{opening}"], "   "
    for parameter in parameters:
        piece = f" {parameter},"
        if len(current) + len(piece) > WIDTH and current.strip():
            lines.append(current)
            current = "   "
        current += piece
    lines.append(current)
    return "\n".join(lines) + f"\n{closing}"


def declaration(name, obj):
    """The code line(s) naming obj: a function's signature, a class's constructor, a constant's type."""
    if inspect.isclass(obj):
        bases = [base.__name__ for base in obj.__bases__ if base is not object]
        head = f"class {name}({', '.join(bases)})" if bases else ""
        if issubclass(obj, BaseException) and "__init__" not in vars(obj):
            return head
        constructor = wrap(name if head else f"class {name}", parameters_of(obj))
        return f"{head}\n{constructor}" if head else constructor
    if callable(obj):
        return wrap(name, parameters_of(obj))
    if isinstance(obj, dict):  # the keys; the values are data (presets, loaders), not the API
        return wrap(f"{name} = ", [f"{key!r}: ..." for key in obj], brackets="{}")
    if isinstance(obj, (tuple, list)):
        return wrap(f"{name} = ", [repr(item) for item in obj], brackets="()" if isinstance(obj, tuple) else "[]")
    return f"{name} = {obj!r}"


def render():
    import rconv_core as rc
    facade = imported_from()
    groups = {}
    for name in rc.__all__:
        obj = getattr(rc, name)
        module = getattr(obj, "__module__", None) if (inspect.isclass(obj) or callable(obj)) else None
        module = module or facade.get(name, "rconv_core")
        groups.setdefault(group_of(module), []).append((name, obj, facade.get(name, module)))
    order = sorted(groups, key=lambda g: (ORDER.index(g) if g in ORDER else len(ORDER), g))
    out = ["# API reference", "",
           "Generated by `docs/make_api.py` from `rconv_core.__all__`; do not edit by hand. Run",
           "`.venv/bin/python docs/make_api.py` after changing a public signature or docstring",
           "(`tests/test_docs.py` fails until then). Everything below is reached as `rc.NAME` after",
           "`import rconv_core as rc`, grouped by the sub-package of [`rconv/`](../rconv/) that defines it.", "",
           textwrap.fill(" | ".join(f"[{g}](#{g})" for g in order), WIDTH), ""]
    for group in order:
        out += [f"## {group}", ""]
        if group in ABOUT:
            out += [f"`rconv.{group}`: {ABOUT[group]}." if group != "cli" else f"`rconv.cli`: {ABOUT[group]}.", ""]
        for name, obj, module in groups[group]:
            out += [f"### `{name}`", "", "```python", declaration(name, obj), "```", ""]
            doc = first_paragraph(obj) if (inspect.isclass(obj) or callable(obj)) else ""
            out += [textwrap.fill(f"{doc} From `{module}`." if doc else f"From `{module}`.", WIDTH,
                                  break_long_words=False, break_on_hyphens=False), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        current = API.read_text() if API.exists() else ""
        if current != text:
            print(f"{API.relative_to(ROOT)} is out of date: run .venv/bin/python docs/make_api.py")
            return 1
        return 0
    API.write_text(text)
    print(f"wrote {API.relative_to(ROOT)} ({text.count(chr(10))} lines)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
