"""The notebooks' cells: rendering the templated ones from templates/ and notebooks.toml, and cleaning an
executed notebook before it is stored (injected parameters baked in, run-to-run noise and the machine's
paths dropped)."""
import ast
import json
import re
from pathlib import Path

from . import HOW_RUN, NOTEBOOKS, ROOT

_SLOT = re.compile(r"\{\{(\w+)\}\}")  # a template's markdown slot, filled from the registry's `text`


def _with_values(source, values):
    """A parameters cell's source with the literals of `values` (name -> Python source) put in place,
    comments kept; names it lacks are appended."""
    source, values = source.encode(), dict(values)  # ast's column offsets count bytes
    starts = [0] + [k + 1 for k, byte in enumerate(source) if byte == ord("\n")]
    spans = [(starts[node.value.lineno - 1] + node.value.col_offset,
              starts[node.value.end_lineno - 1] + node.value.end_col_offset, values.pop(node.targets[0].id))
             for node in ast.parse(source).body
             if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id in values]
    for start, end, value in reversed(spans):
        source = source[:start] + value.encode() + source[end:]
    return source.decode() + "".join(f"\n{name} = {value}" for name, value in values.items())


def _tagged(notebook, tag):
    return [cell for cell in notebook.cells if tag in cell.metadata.get("tags", [])]


def bake_parameters(notebook):
    """Write papermill's injected values into the parameters cell, and drop the injected cell.

    Stored, the injected cell would silently override whatever a reader edits in the parameters
    cell; baked in, the parameters cell shows what the stored outputs were computed with.
    """
    injected, parameters = _tagged(notebook, "injected-parameters"), _tagged(notebook, "parameters")
    if not injected or not parameters:
        return
    values = {node.targets[0].id: ast.get_source_segment(cell.source, node.value)
              for cell in injected for node in ast.parse(cell.source).body
              if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)
              and node.targets[0].id not in HOW_RUN}
    parameters[0].source = _with_values(parameters[0].source, values)
    notebook.cells = [cell for cell in notebook.cells if "injected-parameters" not in cell.metadata.get("tags", [])]


def render(name, baked=None):
    """The notebook `name` as its template renders it, without outputs; `baked` (name -> value) are the
    values a run baked into its parameters cell, as its metadata records them."""
    import nbformat
    from papermill.translators import PythonTranslator
    entry = NOTEBOOKS[name]
    notebook = nbformat.read(ROOT / entry["template"], as_version=4)
    text = entry.get("text", {})
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            cell.source = _SLOT.sub(lambda slot: text.get(slot.group(1), "").strip("\n"), cell.source)
    notebook.cells = [cell for cell in notebook.cells if cell.source.strip()]
    values = {**entry.get("parameters", {}), "results_dir": f"results/{entry['results']}", **(baked or {})}
    cell = _tagged(notebook, "parameters")[0]
    cell.source = _with_values(cell.source, {key: PythonTranslator.translate(value) for key, value in values.items()})
    return notebook


def sources(notebook):
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


def render_stored():
    """Rewrite, without outputs, each templated notebook whose cells are not what its template renders;
    returns their names. One left as it was keeps its outputs."""
    import nbformat
    changed = []
    for name, entry in NOTEBOOKS.items():
        if "template" in entry:
            stored = nbformat.read(ROOT / entry["path"], as_version=4)
            if sources(stored) != sources(render(name, stored.metadata.get("papermill", {}).get("parameters"))):
                nbformat.write(render(name), ROOT / entry["path"])
                changed.append(name)
    return changed


def clean(path, staged, final):
    """Drop what changes on every run (timings, execution counts, the machine's paths) so a rerun gives
    a small diff, and bake papermill's injected parameters into the parameters cell.

    The staging folder's path (`staged`), wherever papermill recorded it, becomes the stored
    results folder's (`final`), so that stored notebooks never name a staging folder.
    """
    import nbformat
    text = Path(path).read_text().replace(json.dumps(staged)[1:-1], json.dumps(final)[1:-1])
    notebook = nbformat.reads(text, as_version=4)
    bake_parameters(notebook)
    parameters = notebook.metadata.pop("papermill", {}).get("parameters")
    notebook.metadata.pop("widgets", None)
    if parameters is not None:
        notebook.metadata["papermill"] = {"parameters": {k: v for k, v in parameters.items() if k not in HOW_RUN}}
    for cell in notebook.cells:
        cell.metadata.pop("papermill", None)
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            cell.execution_count = None
            for output in cell.outputs:
                if "execution_count" in output:
                    output["execution_count"] = None
                scrub_output(output)
    nbformat.write(notebook, path)


# An absolute path into an environment's packages, as warnings print it: shown from site-packages on.
_PACKAGES_PATH = re.compile(r"(?<![\w.~-])/[^\s'\"<>:]*?/((?:site|dist)-packages)/")
_ROOT_PATH = re.compile(re.escape(str(ROOT)) + r"(/|(?![\w.-]))")


def _scrub(text):
    """text without the absolute paths of the machine that ran it: the repository's become relative."""
    text = _PACKAGES_PATH.sub(r"\1/", text)
    return _ROOT_PATH.sub(lambda match: "" if match.group(1) else ".", text)


def scrub_output(output):
    """_scrub() on every text an output holds (streams, text/* data, tracebacks), not on images."""
    for key in ("text", "evalue"):
        if key in output:
            output[key] = _scrub("".join(output[key]) if isinstance(output[key], list) else output[key])
    if "traceback" in output:
        output["traceback"] = [_scrub(line) for line in output["traceback"]]
    for mime, value in output.get("data", {}).items():
        if mime.startswith("text/"):
            output["data"][mime] = _scrub("".join(value) if isinstance(value, list) else value)
