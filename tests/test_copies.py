"""The single-file scripts share code by copying it: every top-level definition that appears in more
than one script must be the same text in all of them, so that a fix made in one is not lost in another."""
import ast

import pytest

from conftest import ROOT

# Definitions that are each script's own by design: its flags and their domains, its run, its algorithm's or
# method's name, and how an interrupted run of it continues.
SCRIPT_OWN = {"Args", "FLAG_DOMAINS", "main", "ALGORITHM", "Agent", "METHOD", "stop_on_interrupt"}


def script_paths():
    return sorted([*ROOT.glob("*.py"), *(ROOT / "benchmark" / "baselines").glob("*.py")])


def top_level_definitions(source: str) -> dict:
    """{name: source text} of a module's top-level functions, classes and assignments, decorators included."""
    lines, definitions = source.splitlines(keepends=True), {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
        definitions[name] = "".join(lines[start:node.end_lineno])
    return definitions


def copy_mismatches(sources: dict) -> list:
    """One message per shared definition whose text differs between scripts, naming them."""
    by_name = {}
    for path, source in sources.items():
        for name, text in top_level_definitions(source).items():
            if name not in SCRIPT_OWN:
                by_name.setdefault(name, {})[path] = text
    messages = []
    for name, texts in sorted(by_name.items()):
        variants = {}
        for path, text in texts.items():
            variants.setdefault(text, []).append(path)
        if len(variants) > 1:
            groups = "; ".join(", ".join(sorted(paths)) for paths in variants.values())
            messages.append(f"{name} differs between the scripts (identical within each group: {groups})")
    return messages


def test_shared_definitions_are_identical_text():
    sources = {str(path.relative_to(ROOT)): path.read_text() for path in script_paths()}
    assert len(sources) >= 4
    assert copy_mismatches(sources) == []


def unused_definitions(source: str) -> list:
    """Top-level definitions and methods that no name or attribute of the source refers to (a definition is not a
    reference, so two unused methods of one name do not count as each other's use)."""
    tree = ast.parse(source)
    referenced = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    referenced |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    methods = [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
               for node in node.body if isinstance(node, ast.FunctionDef) and not node.name.startswith("__")]
    return [name for name in [*top_level_definitions(source), *methods]
            if name not in ("main", "Agent", "forward") and name not in referenced]


@pytest.mark.parametrize("path", script_paths(), ids=lambda path: path.name)
def test_no_script_carries_a_definition_it_never_uses(path):
    """A copy-paste reference carries no dead weight: every definition and method is used in its own script."""
    assert unused_definitions(path.read_text()) == []


def test_the_unused_check_sees_methods_that_share_a_name():
    source = ("class A:\n    def start(self):\n        pass\n\n\nclass B:\n    def start(self):\n        pass\n\n\n"
              "def main():\n    return A(), B()\n")
    assert unused_definitions(source) == ["start", "start"]
    assert unused_definitions(source + "\n\nmain()[0].start()\n") == []


def test_the_check_fails_on_a_definition_edited_in_one_script_only():
    sources = {name: (ROOT / name).read_text() for name in ("baq_iql.py", "baq_cql.py", "offline_pretrain.py")}
    edited = dict(sources)
    edited["baq_cql.py"] = sources["baq_cql.py"].replace("return torch.exp(-divergence / kq)",
                                                         "return torch.exp(-divergence / (2 * kq))")
    assert edited["baq_cql.py"] != sources["baq_cql.py"]
    messages = copy_mismatches(edited)
    assert len(messages) == 1 and messages[0].startswith("behavior_weight differs")
    assert "baq_cql.py" in messages[0] and "baq_iql.py" in messages[0]


@pytest.mark.parametrize("name", ["baq_iql.py", "baq_cql.py"])
def test_the_algorithm_comes_before_the_plumbing(name):
    """A reader meets Args, the BAQ terms, the algorithm, the evaluation and the loop before one banner, then
    plumbing."""
    source = (ROOT / name).read_text()
    lines = source.splitlines()
    order = ["class Args", "def behavior_weight", "def losses", "class ReplayBuffer", "def evaluate", "def main",
             "# ===== PLUMBING", "def fail", "def load_offline_data", "def save_checkpoint"]
    positions = [next(i for i, line in enumerate(lines) if line.lstrip().startswith(marker)) for marker in order]
    split = order.index("# ===== PLUMBING")
    assert positions[:split + 1] == sorted(positions[:split + 1])
    assert all(p > positions[split] for p in positions[split + 1:])
    # right after Args (about 125 lines of documented flags in baq_cql.py), where the old layout had it at 320
    assert positions[1] < 170, "the first BAQ definition should sit near the top"
    assert max(len(line) for line in lines) <= 120


def test_script_sizes_read_as_one_file():
    """The IQL-CQL diff stays about the algorithm (the guide: only what is algorithm-specific)."""
    import difflib

    iql, cql = ((ROOT / name).read_text().splitlines() for name in ("baq_iql.py", "baq_cql.py"))
    changed = [line for line in difflib.unified_diff(iql, cql, lineterm="", n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(changed) < 260
