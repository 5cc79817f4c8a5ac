"""The package's structure, read from its source with ast (every import, function-local ones included):
no import cycles, no module importing another's private names, no library module importing the CLI, and no
config YAML repeating a default that Python already holds."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

PKG = Path(__file__).resolve().parents[1] / "drift_policy"
CLI_MODULES = {"drift_policy.cli", "drift_policy.__main__"}     # the command line itself may import cli


def modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return out


def imports(mods: dict) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """(module -> drift_policy modules it imports anywhere in its body, [(importer, module, _private name)]).

    ``from a import b`` is an import of the module ``a.b`` when that is a module, else of ``a``; importing a
    submodule is not counted as importing its parent package (Python runs the parent's __init__ first, which
    never depends on the order)."""
    edges, private = {m: set() for m in mods}, []
    for m, (path, is_pkg) in mods.items():
        package = m if is_pkg else m.rsplit(".", 1)[0]
        aliases: dict[str, str] = {}                           # local name -> drift_policy module
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.split(".")[0] == "drift_policy":
                        edges[m].add(a.name)
                        aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "drift_policy"
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "drift_policy":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    if sub in mods:
                        edges[m].add(sub)
                        aliases[a.asname or a.name] = sub
                    else:
                        edges[m].add(target)
                        if a.name.startswith("_") and target != m:
                            private.append((m, target, a.name))
        for node in ast.walk(tree):                            # module._private through an imported module
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.attr.startswith("_")
                    and not node.attr.startswith("__") and node.value.id in aliases and aliases[node.value.id] != m):
                private.append((m, aliases[node.value.id], node.attr))
    return {m: {e for e in es if e in mods and e != m} for m, es in edges.items()}, private


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-loops."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
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
            if len(comp) > 1 or v in edges[v]:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    mods = modules()
    return mods, *imports(mods)


def test_the_checker_sees_the_package_and_finds_cycles(graph):
    mods, edges, _ = graph
    assert len(mods) > 40 and "drift_policy.tasks.pusht" in mods
    # function-local imports count: train imports evaluation only inside functions
    assert "drift_policy.evaluation" in edges["drift_policy.train"]
    assert "drift_policy.runs" in edges["drift_policy.train"] and "drift_policy.errors" in edges["drift_policy.config"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles(graph):
    _, edges, _ = graph
    assert cycles(edges) == []


def test_no_module_imports_another_modules_private_names(graph):
    _, _, private = graph
    assert private == []


def test_no_library_module_imports_the_cli(graph):
    _, edges, _ = graph
    assert [m for m, es in edges.items() if "drift_policy.cli" in es and m not in CLI_MODULES] == []


# ---- each default written once -------------------------------------------------------------------------------
def _schema(ref: str) -> dict:
    from hydra.core.config_store import ConfigStore

    from drift_policy.config import register_schemas

    register_schemas()
    group, name = ref.strip("/").rsplit("/", 1)
    return ConfigStore.instance().load(f"{group}/{name}.yaml").node


def _base_values(path: Path, config_dir: Path) -> dict:
    """What a robot YAML file builds on: its defaults list, resolved (schemas and task_base files)."""
    from omegaconf import OmegaConf

    out = {}
    for entry in yaml.safe_load(path.read_text()).get("defaults", []):
        if entry == "_self_" or not isinstance(entry, str):
            continue
        ref = entry.split("@")[0]
        if ref.startswith("/schema/"):
            out.update(OmegaConf.to_container(_schema(ref)))
        else:
            base = config_dir / (ref.lstrip("/") + ".yaml") if ref.startswith("/") else path.parent / (ref + ".yaml")
            out.update(_base_values(base, config_dir))
            out.update({k: v for k, v in yaml.safe_load(base.read_text()).items() if k != "defaults"})
    return out


def _repeats(values: dict, base: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in values.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            out += _repeats(v, base[k], f"{prefix}{k}.")
        elif k in base and base[k] == v:
            out.append(prefix + k)
    return out


def test_robot_yaml_files_hold_only_what_differs_from_their_defaults():
    from drift_policy.paths import CONFIG_DIR

    files = sorted(p for d in ("task", "task_base", "policy") for p in (CONFIG_DIR / d).glob("*.yaml"))
    assert len(files) > 15
    found = {}
    for f in files:
        values = {k: v for k, v in yaml.safe_load(f.read_text()).items() if k != "defaults"}
        if rep := _repeats(values, _base_values(f, CONFIG_DIR)):
            found[f.name] = rep
    assert found == {}
    # and the checker catches a repeated default
    assert _repeats({"max_steps": 300, "name": "x"}, {"max_steps": 300, "name": "y"}) == ["max_steps"]


def test_image_yaml_files_hold_only_what_differs_from_defaults():
    from drift_policy.image.config import DEFAULTS, load_config
    from drift_policy.paths import CONFIG_DIR

    found = {}
    for f in sorted((CONFIG_DIR / "image").glob("*.yaml")):
        values = yaml.safe_load(f.read_text())
        base = load_config(values.pop("base")) if "base" in values else DEFAULTS
        if rep := _repeats(values, base):
            found[f.name] = rep
    assert found == {}
