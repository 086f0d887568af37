"""The module file and its .ui, checked without Qt by parsing them.

1. The .ui -> parameter node binding that Slicer's ``parameterNodeWrapper`` makes in
   ``connectGui``: every widget with a ``SlicerParameterName`` names a field of the parameter node
   class, every field is bound (or listed below as not shown), and the widget class is one that
   Slicer's GUI connectors accept for the field's type, with the annotations they require.
2. The module file holds the module, parameter node, widget and self-test classes only: no
   stand-in base classes, no "is there an application" branches, the logic in MultiscaleDiffSegLib.

The parameter node's fields are read from the class's annotations with ``ast``: importing the
module file needs Qt (slicer.ScriptedLoadableModule imports qt and ctk).
"""
from __future__ import annotations

import ast
import enum
import importlib
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

MODULE_DIR = Path(__file__).resolve().parents[2] / "MultiscaleDiffSeg"
MODULE_FILE = MODULE_DIR / "MultiscaleDiffSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "MultiscaleDiffSeg.ui"
LIB_DIR = MODULE_DIR / "MultiscaleDiffSegLib"

#: Parameter node fields that have no widget on purpose (name -> why).  Empty today.
NOT_SHOWN: dict[str, str] = {}

# ----------------------------------------------------------------------------- Slicer's connectors
#: Which widget classes Slicer's parameterNodeWrapper binds to which field types: the
#: ``canRepresent`` rules of the GUI connectors in Slicer v5.10.0,
#: Base/Python/slicer/parameterNodeWrapper/guiConnectors.py (Slicer licence, BSD-style).  The
#: connectors compare the widget's class exactly (``type(widget) in (...)``), so a subclass of an
#: accepted class does not bind.  Each row: field kinds, widget classes, what the field's
#: annotations must provide or the connector raises ("bounded": WithinRange, or Minimum and
#: Maximum; "Choice"; "RangeBounds").
CONNECTORS: list[tuple[frozenset[str], frozenset[str], str | None]] = [
    (frozenset({"bool"}), frozenset({"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"}), None),
    (frozenset({"int"}), frozenset({"QSpinBox"}), None),
    (frozenset({"int"}), frozenset({"QSlider"}), "bounded"),
    (frozenset({"int", "float"}), frozenset({"QDoubleSpinBox", "ctkDoubleSpinBox", "qMRMLSpinBox", "ctkDoubleSlider"}),
     None),
    (frozenset({"int", "float"}), frozenset({"ctkSliderWidget", "qMRMLSliderWidget"}), "bounded"),
    (frozenset({"int", "float", "str", "bool"}), frozenset({"QComboBox", "ctkComboBox"}), "Choice"),
    (frozenset({"enum"}), frozenset({"QComboBox", "ctkComboBox"}), None),
    (frozenset({"str"}), frozenset({"QLineEdit", "QLabel", "QTextEdit"}), None),
    (frozenset({"FloatRange"}), frozenset({"ctkRangeWidget", "ctkDoubleRangeSlider", "qMRMLRangeWidget"}),
     "RangeBounds"),
    (frozenset({"path"}), frozenset({"ctkPathLineEdit", "ctkDirectoryButton"}), None),
    (frozenset({"node"}), frozenset({"qMRMLNodeComboBox"}), None),
    (frozenset({"QColor"}), frozenset({"ctkColorPickerButton"}), None),
]
PATH_TYPES = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}
SCALARS = {"bool", "int", "float", "str"}


def connector_accepts(kind: str, widget_class: str, validators: dict) -> tuple[bool, str]:
    """(accepted, why not) for one field kind and widget class, by the table above."""
    rows = [row for row in CONNECTORS if kind in row[0] and widget_class in row[1]]
    if not rows:
        return False, f"no connector binds a {kind} field to a {widget_class}"
    for _, _, needs in rows:
        if needs is None or (needs == "bounded" and is_bounded(validators)) or needs in validators:
            return True, ""
    return False, f"a {widget_class} bound to a {kind} field needs the {rows[0][2]} annotation"


def is_bounded(validators: dict) -> bool:
    return "WithinRange" in validators or {"Minimum", "Maximum"} <= set(validators)


def test_the_connector_table_refuses_what_slicer_refuses():
    assert connector_accepts("int", "QSpinBox", {})[0]
    assert not connector_accepts("int", "ctkSliderWidget", {})[0]  # unbounded slider raises
    assert connector_accepts("float", "ctkSliderWidget", {"WithinRange": (0, 1)})[0]
    assert not connector_accepts("str", "QComboBox", {})[0]  # a str combo box needs Choice
    assert connector_accepts("enum", "QComboBox", {})[0]
    assert not connector_accepts("bool", "QRadioButton", {})[0]
    assert not connector_accepts("node", "qMRMLSubjectHierarchyComboBox", {})[0]


# ----------------------------------------------------------------------------- the .ui
@dataclass
class UiWidget:
    name: str
    cls: str
    properties: dict[str, ET.Element] = field(default_factory=dict)

    def number(self, prop: str) -> float | None:
        element = self.properties.get(prop)
        if element is None:
            return None
        value = element.find("number")
        value = element.find("double") if value is None else value
        return None if value is None else float(value.text)

    def strings(self, prop: str) -> list[str]:
        element = self.properties.get(prop)
        return [] if element is None else [s.text or "" for s in element.iter("string")]


def ui_widgets() -> dict[str, UiWidget]:
    root = ET.parse(UI_FILE).getroot()
    return {w.get("name"): UiWidget(w.get("name"), w.get("class"),
                                    {p.get("name"): p for p in w.findall("property")})
            for w in root.iter("widget")}


def ui_bindings() -> dict[str, UiWidget]:
    """Parameter name -> the widget whose ``SlicerParameterName`` dynamic property names it."""
    bound: dict[str, UiWidget] = {}
    for widget in ui_widgets().values():
        names = widget.strings("SlicerParameterName")
        if names:
            assert names[0] not in bound, f"two widgets bind '{names[0]}'"
            bound[names[0]] = widget
    return bound


# ----------------------------------------------------------------------------- the parameter node class
@dataclass
class Field:
    name: str
    kind: str  # bool int float str enum path node FloatRange QColor
    node_classes: tuple[str, ...] = ()
    validators: dict[str, tuple] = field(default_factory=dict)


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(), filename=str(MODULE_FILE))


def imported_names(tree: ast.Module) -> dict[str, str]:
    """Name -> module it is imported from (``from X import Name``)."""
    return {alias.asname or alias.name: node.module for node in tree.body if isinstance(node, ast.ImportFrom)
            for alias in node.names}


def parameter_node_class(tree: ast.Module) -> ast.ClassDef:
    wrapped = [n for n in tree.body if isinstance(n, ast.ClassDef)
               and any(ast.unparse(d) == "parameterNodeWrapper" for d in n.decorator_list)]
    assert len(wrapped) == 1, "exactly one @parameterNodeWrapper class in the module file"
    return wrapped[0]


def literal(node: ast.expr):
    return ast.literal_eval(node)


def field_type(annotation: ast.expr, imports: dict[str, str]) -> Field:
    """Kind, node classes and validators of one annotation (as the wrapper's ``get_type_hints``)."""
    validators: dict[str, tuple] = {}
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) in ("Annotated", "typing.Annotated"):
        elements = annotation.slice.elts  # type: ignore[attr-defined]
        annotation = elements[0]
        for extra in elements[1:]:
            if isinstance(extra, ast.Call):
                validators[ast.unparse(extra.func)] = tuple(literal(a) for a in extra.args)
    members = _union_members(annotation)
    names = [ast.unparse(m) for m in members if ast.unparse(m) != "None"]
    if names and all(re.fullmatch(r"vtkMRML\w+Node", n) and imports.get(n) == "slicer" for n in names):
        return Field("", "node", tuple(names), validators)
    if len(names) != 1:
        return Field("", "unknown: " + ast.unparse(annotation), (), validators)
    name = names[0]
    if name in SCALARS:
        return Field("", name, (), validators)
    if name in PATH_TYPES or name in ("pathlib.Path",):
        return Field("", "path", (), validators)
    if name in ("FloatRange", "QColor", "qt.QColor"):
        return Field("", name.split(".")[-1], (), validators)
    if name in imports:
        value = getattr(importlib.import_module(imports[name]), name)
        if isinstance(value, type) and issubclass(value, enum.Enum):
            return Field("", "enum", (), validators)
    return Field("", "unknown: " + name, (), validators)


def _union_members(annotation: ast.expr) -> list[ast.expr]:
    if isinstance(annotation, ast.BinOp) and isinstance(annotation.op, ast.BitOr):
        return _union_members(annotation.left) + _union_members(annotation.right)
    if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) in ("Union", "typing.Union",
                                                                                     "Optional", "typing.Optional"):
        inner = annotation.slice
        return list(inner.elts) if isinstance(inner, ast.Tuple) else [inner]
    return [annotation]


def parameter_fields() -> dict[str, Field]:
    tree = module_tree()
    imports = imported_names(tree)
    fields = {}
    for statement in parameter_node_class(tree).body:
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            parsed = field_type(statement.annotation, imports)
            parsed.name = statement.target.id
            fields[parsed.name] = parsed
    return fields


# ----------------------------------------------------------------------------- the binding
def test_the_parameter_node_fields_have_types_slicer_can_bind():
    fields = parameter_fields()
    assert {"inputVolume", "outputSegmentation", "preset", "device"} <= set(fields)
    unknown = {n: f.kind for n, f in fields.items() if f.kind.startswith("unknown")}
    assert not unknown, unknown


def test_every_ui_parameter_name_is_a_field_and_every_field_is_bound():
    """connectGui raises for a SlicerParameterName that is not a field; a field without a widget
    is silently never shown, so each such field must be listed in NOT_SHOWN with the reason."""
    fields, bound = parameter_fields(), ui_bindings()
    assert not [n for n in bound if "." in n], "parameter packs (dotted names) are not used by this module"
    assert set(bound) <= set(fields), f"not fields of the parameter node: {sorted(set(bound) - set(fields))}"
    unbound = set(fields) - set(bound) - set(NOT_SHOWN)
    assert not unbound, f"fields without a widget (bind them or list them in NOT_SHOWN): {sorted(unbound)}"
    assert not set(NOT_SHOWN) & set(bound), "a field listed as not shown has a widget"


def test_each_widget_class_suits_its_fields_type():
    fields = parameter_fields()
    problems = []
    for name, widget in ui_bindings().items():
        accepted, why = connector_accepts(fields[name].kind, widget.cls, fields[name].validators)
        if not accepted:
            problems.append(f"{name} ({widget.name}): {why}")
    assert not problems, problems


def test_node_selectors_offer_the_fields_node_classes():
    """The node connector sets ``nodeTypes`` from the field's type; the .ui says the same, so the
    widget does not change between Designer and Slicer."""
    fields = parameter_fields()
    for name, widget in ui_bindings().items():
        if fields[name].kind == "node":
            assert widget.strings("nodeTypes") == list(fields[name].node_classes), name


def test_numeric_widget_ranges_are_the_validators_ranges():
    """The int/float connectors set the widget's range from WithinRange / Minimum / Maximum: the
    .ui range (and a special value text at its minimum) must be the same numbers."""
    fields = parameter_fields()
    checked = 0
    for name, widget in ui_bindings().items():
        validators = fields[name].validators
        if fields[name].kind not in ("int", "float"):
            continue
        low, high = validators.get("WithinRange") or (validators.get("Minimum", (None,))[0],
                                                       validators.get("Maximum", (None,))[0])
        assert (widget.number("minimum"), widget.number("maximum")) == (low, high), name
        checked += 1
    assert checked == 3  # steps, samples, seed


def test_preset_default_values_are_the_spin_boxes_special_values():
    from MultiscaleDiffSegLib import settings as st

    widgets = ui_widgets()
    assert widgets["stepsSpinBox"].number("minimum") == st.STEPS_PRESET_DEFAULT
    assert widgets["samplesSpinBox"].number("minimum") == st.SAMPLES_PRESET_DEFAULT
    assert widgets["stepsSpinBox"].strings("specialValueText") == ["preset default"]


@pytest.mark.integration
def test_node_field_types_are_real_mrml_node_classes():
    """What the node connector computes (``type().GetClassName()``) on real MRML classes."""
    slicer = pytest.importorskip("slicer", reason="slicer-core (real MRML) is not installed")
    for f in parameter_fields().values():
        for name in f.node_classes:
            instance = getattr(slicer, name)()
            assert instance.IsA("vtkMRMLNode") and instance.GetClassName() == name


def test_custom_widget_classes_are_declared_in_the_ui():
    root = ET.parse(UI_FILE).getroot()
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used = {w.cls for w in ui_widgets().values() if not w.cls.startswith("Q")}
    assert used <= declared, used - declared


def test_widget_code_uses_only_widgets_that_exist_in_the_ui():
    source = MODULE_FILE.read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    widget_class = next(n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name.endswith("Widget"))
    for statement in widget_class.body:
        if isinstance(statement, ast.Assign) and ast.unparse(statement.targets[0]) == "GROUP_CHECKBOXES":
            used |= set(literal(statement.value))
    assert "leftHemisphereCheckBox" in used
    assert used <= set(ui_widgets()), used - set(ui_widgets())


# ----------------------------------------------------------------------------- the module file
def test_the_module_file_holds_module_parameter_node_widget_and_test_only():
    tree = module_tree()
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes == {
        "MultiscaleDiffSeg": ["ScriptedLoadableModule"],
        "MultiscaleDiffSegParameterNode": [],
        "MultiscaleDiffSegWidget": ["ScriptedLoadableModuleWidget", "VTKObservationMixin"],
        "MultiscaleDiffSegTest": ["ScriptedLoadableModuleTest"],
    }
    imports = imported_names(tree)
    for base in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        assert imports[base] == "slicer.ScriptedLoadableModule", base
    assert imports["MultiscaleDiffSegLogic"] == "MultiscaleDiffSegLib.logic"
    assert not [n for n in tree.body if isinstance(n, ast.Try)], "no guarded imports with stand-ins"


def test_no_application_switch_anywhere_in_the_module_or_its_lib():
    for path in [MODULE_FILE, *sorted(LIB_DIR.glob("*.py"))]:
        source = path.read_text()
        assert "HAVE_APPLICATION" not in source, path.name
    for path in sorted(LIB_DIR.glob("*.py")):
        uses = [n.lineno for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute)
                and n.attr == "app" and ast.unparse(n.value) == "slicer"]
        assert not uses, f"{path.name}:{uses[0]}: slicer.app in the Lib; the application comes in through the Host"


def _function(tree: ast.AST, name: str) -> ast.FunctionDef:
    return next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == name)


def _calls(function: ast.FunctionDef) -> set[str]:
    return {ast.unparse(n.func) for n in ast.walk(function) if isinstance(n, ast.Call)}


def test_the_scene_is_watched_from_startup_and_cleanup_stops_everything():
    """Item 5 in the Qt file: the eye icons work before the module is opened (the module class
    watches Slicer's scene once the application has started), and the widget's cleanup (reload,
    exit) stops the logic's worker, probe and timer and the scene watcher."""
    tree = module_tree()
    module_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "MultiscaleDiffSeg")
    connects = [n for n in ast.walk(module_class) if isinstance(n, ast.Call) and ast.unparse(n.func) == "slicer.app.connect"]
    slots = {literal(c.args[0]): ast.unparse(c.args[1]) for c in connects}
    assert "startupCompleted()" in slots
    assert "visibility.watch_scene" in _calls(_function(tree, slots["startupCompleted()"]))
    cleanup = _calls(_function(tree, "cleanup"))
    assert {"self.logic.shutdown", "visibility.unwatch_scene", "self.removeObservers"} <= cleanup
    assert "self.cleanup" in _calls(_function(tree, "onReload"))  # before the Lib is re-imported
