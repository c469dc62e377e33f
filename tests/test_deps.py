"""dvc.yaml names everything a stage runs, so that a cached result never outlives the code or params that made it.

For every stage of dvc.yaml, compare/dvc.yaml and pretrained/dvc.yaml: its code deps are exactly the project modules
its script imports, transitively (a missing one leaves stale results cached; an extra one re-runs the stage for
nothing), and its params are exactly the params.yaml sections and keys the script reads.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from sdlib.config import SECTIONS, TOP_LEVEL

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("sdlib", "stages")
PIPELINES = ("dvc.yaml", "compare/dvc.yaml", "pretrained/dvc.yaml")


def module_file(name: str) -> Path | None:
    """The file of project module `name` (a package's __init__.py), or None when it is not a project module."""
    if name.split(".")[0] not in PACKAGES:
        return None
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(path: Path) -> set[str]:
    """Project modules that `path` imports anywhere (function-level imports run too), `from pkg import mod` included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if module_file(name) is not None}


def import_closure(module: str) -> set[Path]:
    """Every project file that running `python -m module` executes, package __init__ files left out."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += imported_modules(module_file(name))
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b first
    return {module_file(name) for name in seen if module_file(name).name != "__init__.py"}


def stages() -> list[tuple[str, str, dict]]:
    """(pipeline file, stage name, stage) of every stage."""
    out = []
    for pipeline in PIPELINES:
        for name, stage in yaml.safe_load((REPO / pipeline).read_text())["stages"].items():
            out.append((pipeline, name, stage))
    return out


def script_of(stage: dict) -> str:
    words = stage["cmd"].split()
    assert words[:2] == ["python", "-m"] and words[2].startswith("stages."), f"cmd is not `python -m stages.X`: {words}"
    return words[2]


STAGES = stages()
IDS = [f"{pipeline}:{name}" for pipeline, name, _ in STAGES]


def test_package_inits_hold_no_code():
    """__init__ files are left out of the deps, so they must hold nothing that runs but a docstring."""
    for init in (REPO / "sdlib").rglob("__init__.py"):
        body = ast.parse(init.read_text()).body
        assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body), init


@pytest.mark.parametrize("pipeline, name, stage", STAGES, ids=IDS)
def test_code_deps_are_the_import_closure(pipeline, name, stage):
    script = script_of(stage)
    assert script == f"stages.{name}", f"{pipeline}: stage {name} runs {script}; a stage's script has its name"
    needed = {p.relative_to(REPO).as_posix() for p in import_closure(script)}
    declared = {d for d in stage.get("deps", []) if d.split("/")[0] in PACKAGES}
    missing, unused = sorted(needed - declared), sorted(declared - needed)
    assert not missing, f"{pipeline}: stage {name} runs {', '.join(missing)} but does not list it in deps"
    assert not unused, f"{pipeline}: stage {name} lists {', '.join(unused)} in deps but never imports it"


class ParamsRead(ast.NodeVisitor):
    """The params.yaml sections and keys a stage script reads through sdlib.config.

    A section bound to a variable whose only uses are `var.key` reads those keys; one passed on whole (to a library
    function, `flatten`, `model_dump()`) reads all of it. `load_all` reads the whole file.
    """

    def __init__(self, tree: ast.Module):
        self.whole_file = False
        self.keys: set[str] = set()
        self.sections: dict[str, set[str] | None] = {}  # section -> keys read, or None for all of it
        self.bound: dict[str, str] = {}  # variable -> section
        self.tree = tree
        self.visit(tree)
        self._uses()

    @staticmethod
    def _call(node: ast.AST, names: tuple[str, ...]) -> ast.Call | None:
        if isinstance(node, ast.Call):
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr in names) or (isinstance(f, ast.Name) and f.id in names):
                return node
        return None

    def _section_of(self, node: ast.AST) -> str | None:
        call = self._call(node, ("load_section", "parse_section"))
        if call is not None and call.args and isinstance(call.args[0], ast.Constant):
            return call.args[0].value
        return None

    def visit_Call(self, node: ast.Call) -> None:
        if self._call(node, ("load_all",)) is not None:
            self.whole_file = True
        top = self._call(node, ("top_level",))
        if top is not None and len(top.args) == 2 and isinstance(top.args[1], ast.Constant):
            self.keys.add(top.args[1].value)
        section = self._section_of(node)
        if section is not None:
            self.sections.setdefault(section, set())
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        targets, values = node.targets[0], node.value
        pairs = (zip(targets.elts, values.elts) if isinstance(targets, ast.Tuple) and isinstance(values, ast.Tuple)
                 else [(targets, values)])
        for target, value in pairs:
            section = self._section_of(value)
            if section is not None and isinstance(target, ast.Name):
                self.bound[target.id] = section
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        section = self._section_of(node.value)  # e.g. load_section("sample", params).prompts
        if section is not None and self.sections.get(section, set()) is not None:
            self.sections.setdefault(section, set()).add(node.attr)
        self.generic_visit(node)

    def _uses(self) -> None:
        """Attribute reads of bound variables; any other use of one reads its whole section."""
        parents = {child: parent for parent in ast.walk(self.tree) for child in ast.iter_child_nodes(parent)}
        for node in ast.walk(self.tree):
            if not (isinstance(node, ast.Name) and node.id in self.bound and isinstance(node.ctx, ast.Load)):
                continue
            section, parent = self.bound[node.id], parents.get(node)
            if isinstance(parent, ast.Attribute) and parent.attr != "model_dump":
                if self.sections.get(section, set()) is not None:
                    self.sections.setdefault(section, set()).add(parent.attr)
            else:
                self.sections[section] = None

    def declared_form(self) -> set[str] | None:
        """What dvc.yaml should list: None for the whole file, else sections and dotted keys."""
        if self.whole_file:
            return None
        out = set(self.keys)
        for section, keys in self.sections.items():
            out |= {section} if keys is None or keys >= set(SECTIONS[section].model_fields) else {
                f"{section}.{k}" for k in keys}
        return out


@pytest.mark.parametrize("pipeline, name, stage", STAGES, ids=IDS)
def test_params_are_what_the_stage_reads(pipeline, name, stage):
    script = module_file(script_of(stage))
    read = ParamsRead(ast.parse(script.read_text())).declared_form()
    declared_raw = stage.get("params", [])
    whole_file = any(isinstance(p, dict) and "params.yaml" in p and not p["params.yaml"] for p in declared_raw)
    if read is None:
        assert whole_file, f"{pipeline}: stage {name} reads all of params.yaml; declare `- params.yaml:`"
        return
    assert not whole_file, f"{pipeline}: stage {name} declares all of params.yaml but reads only {sorted(read)}"
    declared = set(declared_raw)
    missing, unused = sorted(read - declared), sorted(declared - read)
    assert not missing, f"{pipeline}: stage {name} reads params {', '.join(missing)} but does not declare them"
    assert not unused, f"{pipeline}: stage {name} declares params {', '.join(unused)} but never reads them"


def test_every_params_key_is_known():
    """A key of params.yaml that no section model knows would be a typo that nothing reads."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for key, value in params.items():
        assert key in SECTIONS or key in TOP_LEVEL, key
        if key in SECTIONS:
            unknown = set(value) - set(SECTIONS[key].model_fields)
            assert not unknown, f"params.yaml: unknown keys {unknown} in section {key}"


def test_the_checker_sees_a_planted_gap(tmp_path):
    """The closure follows imports through the library: sample reaches the schedules via sdlib.generate."""
    closure = {p.relative_to(REPO).as_posix() for p in import_closure("stages.sample")}
    assert {"sdlib/diffusion/schedules.py", "sdlib/generate.py", "sdlib/config.py", "sdlib/cli.py",
            "sdlib/diffusion/img2img.py", "sdlib/models/text.py"} <= closure
    assert "sdlib/training/loop.py" not in closure  # sampling runs no training code
    tree = ast.parse("cfg = config.load_section('sample', p)\nprint(cfg.steps, cfg.seed)\n")
    assert ParamsRead(tree).declared_form() == {"sample.steps", "sample.seed"}
    tree = ast.parse("cfg = config.load_section('sample', p)\nrun(cfg)\n")
    assert ParamsRead(tree).declared_form() == {"sample"}
