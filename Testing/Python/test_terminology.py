"""Every coded structure resolves in the terminology context its tag names, with its side.

The truth is Slicer's own terminology files (``Testing/Data/terminology``, taken from Slicer
v5.10.0, see LICENSE-NOTE.md there) plus DICOM CID 7140 for the three codes Slicer's lists lack,
and the module's own context file that Slicer loads at start-up.  The strings checked are the ones
the product writes: ``msdseg.outputs.writers.terminology_string`` (the ``.seg.nrrd``) and
``MultiscaleDiffSegLib.mrml.terminology_entry`` (the segment tags in Slicer).

Two readers check them: a minimal reader written here from the file format (unit tier), and
Slicer's own ``vtkSlicerTerminologiesModuleLogic`` from slicer-core (integration tier).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from shared import TREE

from msdseg.core.labels import Node
from msdseg.outputs.writers import terminology_string
from MultiscaleDiffSegLib import terminology

pytestmark = pytest.mark.unit

DATA = Path(__file__).resolve().parents[1] / "Data" / "terminology"
SLICER_CONTEXT_FILES = ("SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.json",
                        "SegmentationCategoryTypeModifier-DICOM-Master.json")
SLICER_ANATOMY_FILE = "AnatomicRegionAndModifier-DICOM-Master.json"
CID_7140_FILE = "dicom-cid-7140.json"

LEFT = ("SCT", "7771000", "Left")
RIGHT = ("SCT", "24028007", "Right")
NO_CODE = ("", "", "")
SIDES = {"left_hemisphere": LEFT, "right_hemisphere": RIGHT, "midline": NO_CODE}

Triplet = tuple[str, str, str]


# ----------------------------------------------------------------------------- a minimal reader
def triplet(item: dict) -> Triplet:
    return (item["CodingSchemeDesignator"], item["CodeValue"], item["CodeMeaning"])


@dataclass
class TypeEntry:
    code: Triplet
    modifiers: set[Triplet] = field(default_factory=set)
    item: dict = field(default_factory=dict)


@dataclass
class Context:
    """One segmentation category/type context file: category code -> type code -> entry."""

    name: str
    categories: dict[Triplet, dict[Triplet, TypeEntry]]


def read_context(path: Path) -> Context:
    document = json.loads(path.read_text(encoding="utf-8"))
    categories = {}
    for category in document["SegmentationCodes"]["Category"]:
        types = {}
        for item in category.get("Type", []):
            types[triplet(item)] = TypeEntry(triplet(item), {triplet(m) for m in item.get("Modifier", [])}, item)
        categories[triplet(category)] = types
    return Context(document["SegmentationCategoryTypeContextName"], categories)


def parse_code(text: str) -> Triplet:
    parts = text.split("^")
    assert len(parts) == 3, f"not a scheme^value^meaning code: {text!r}"
    return parts[0], parts[1], parts[2]


@dataclass
class Entry:
    """A ``TerminologyEntry`` tag: context~category~type~modifier~anatomicContext~region~regionModifier."""

    context: str
    category: Triplet
    type: Triplet
    modifier: Triplet
    anatomic_context: str
    region: Triplet
    region_modifier: Triplet


def parse_entry(text: str) -> Entry:
    fields = text.split("~")
    assert len(fields) == 7, f"a terminology entry has 7 fields, got {len(fields)}: {text!r}"
    return Entry(fields[0], parse_code(fields[1]), parse_code(fields[2]), parse_code(fields[3]), fields[4],
                 parse_code(fields[5]), parse_code(fields[6]))


MODULE_CONTEXT = read_context(terminology.terminology_file())
SLICER_CONTEXTS = {c.name: c for c in (read_context(DATA / f) for f in SLICER_CONTEXT_FILES)}
CONTEXTS = {**SLICER_CONTEXTS, MODULE_CONTEXT.name: MODULE_CONTEXT}
ANATOMIC_CONTEXT_NAME = json.loads((DATA / SLICER_ANATOMY_FILE).read_text(encoding="utf-8"))["AnatomicContextName"]
CODED = [node for node in TREE.nodes if node.code is not None]


def side_of(node: Node) -> Triplet:
    """Left/Right for nodes inside a hemisphere, no code for the midline and the whole brain."""
    for ancestor in [node, *TREE.ancestors(node.id)]:
        if ancestor.id in SIDES:
            return SIDES[ancestor.id]
    return NO_CODE


def resolve(entry: Entry) -> list[str]:
    """What does not resolve in the context the entry names (empty when everything does)."""
    context = CONTEXTS.get(entry.context)
    if context is None:
        return [f"context '{entry.context}' is neither Slicer's nor the module's"]
    types = context.categories.get(entry.category)
    if types is None:
        return [f"category {entry.category} is not in '{entry.context}'"]
    found = types.get(entry.type)
    if found is None:
        return [f"type {entry.type} is not in category {entry.category[2]} of '{entry.context}'"]
    problems = []
    if entry.modifier != NO_CODE and entry.modifier not in found.modifiers:
        problems.append(f"modifier {entry.modifier} is not offered for {entry.type[2]} in '{entry.context}' "
                        f"(offered: {sorted(found.modifiers)})")
    if entry.anatomic_context != ANATOMIC_CONTEXT_NAME:
        problems.append(f"anatomic context '{entry.anatomic_context}' is not Slicer's '{ANATOMIC_CONTEXT_NAME}'")
    if entry.region != NO_CODE or entry.region_modifier != NO_CODE:
        problems.append("an anatomic region is set, but none is defined for these structures")
    return problems


# ----------------------------------------------------------------------------- the tree's codes
def test_all_32_leaves_carry_a_code():
    assert len(TREE.leaves) == 32
    assert [leaf.id for leaf in TREE.leaves if leaf.code is None] == []


def test_no_private_coding_scheme():
    """DICOM's private schemes start with 99; every structure has a real SNOMED CT or DICOM code."""
    private = {node.id: node.code.scheme for node in CODED if node.code.scheme.startswith("99")}
    assert private == {}


@pytest.mark.parametrize("node", CODED, ids=lambda node: node.id)
def test_seg_nrrd_entry_resolves_in_the_context_it_names(node):
    entry = parse_entry(terminology_string(node))
    assert resolve(entry) == []
    assert entry.modifier == side_of(node), "a lateral structure needs its side, a midline one none"


def test_every_lateral_leaf_has_its_sides_modifier():
    lateral = [leaf for leaf in TREE.leaves if side_of(leaf) != NO_CODE]
    assert len(lateral) == 28
    for leaf in lateral:
        assert leaf.laterality is not None, leaf.id
        assert (leaf.laterality.scheme, leaf.laterality.value, leaf.laterality.meaning) == side_of(leaf), leaf.id


def test_slicers_general_anatomy_list_alone_would_not_do():
    """Why the module ships a context: leaves that Slicer's General Anatomy list cannot name."""
    general = "Segmentation category and type - 3D Slicer General Anatomy list"
    unresolved = {leaf.id for leaf in TREE.leaves
                  if resolve(dataclasses.replace(parse_entry(terminology_string(leaf)), context=general))}
    assert {"left_hippocampus", "right_accumbens", "brainstem", "third_ventricle", "csf",
            "left_cerebral_cortex", "right_cerebellum_cortex"} <= unresolved


# ----------------------------------------------------------------------------- the module's file
def test_module_context_does_not_replace_one_of_slicers():
    """Loading a file whose name equals a loaded context replaces that context in Slicer."""
    assert MODULE_CONTEXT.name not in SLICER_CONTEXTS
    assert terminology.context_name() == MODULE_CONTEXT.name


def test_module_file_lists_exactly_the_trees_coded_nodes_with_their_names_and_colours():
    types = MODULE_CONTEXT.categories[("SCT", "123037004", "Anatomical Structure")]
    assert len(MODULE_CONTEXT.categories) == 1
    expected: dict[Triplet, dict[Triplet, Node]] = {}
    for node in CODED:
        code = (node.code.scheme, node.code.value, node.code.meaning)
        expected.setdefault(code, {})[side_of(node)] = node
    assert set(types) == set(expected)
    for code, by_side in expected.items():
        item = types[code].item
        modifiers = {triplet(m): m for m in item.get("Modifier", [])}
        assert set(modifiers) == set(by_side) - {NO_CODE}, code
        for side, node in by_side.items():
            shown = item if side == NO_CODE else modifiers[side]
            assert shown["3dSlicerLabel"] == node.name  # Slicer matches segment names to it exactly
            assert shown["recommendedDisplayRGBValue"] == list(node.color)


def known_codes() -> dict[tuple[str, str], set[str]]:
    """(scheme, value) -> meanings, from Slicer's three lists and DICOM CID 7140."""
    codes: dict[tuple[str, str], set[str]] = {}
    for context in SLICER_CONTEXTS.values():
        for category, types in context.categories.items():
            for entry in [category, *types, *(m for t in types.values() for m in t.modifiers)]:
                codes.setdefault(entry[:2], set()).add(entry[2])
    regions = json.loads((DATA / SLICER_ANATOMY_FILE).read_text(encoding="utf-8"))["AnatomicCodes"]["AnatomicRegion"]
    for region in regions:
        codes.setdefault(triplet(region)[:2], set()).add(region["CodeMeaning"])
    for concept in json.loads((DATA / CID_7140_FILE).read_text(encoding="utf-8"))["concepts"]:
        codes.setdefault(triplet(concept)[:2], set()).add(concept["CodeMeaning"])
    return codes


def test_every_code_in_the_module_file_is_a_real_one_with_its_real_meaning():
    codes = known_codes()
    used = []
    for category, types in MODULE_CONTEXT.categories.items():
        used += [category, *types, *(m for t in types.values() for m in t.modifiers)]
    for scheme, value, meaning in used:
        assert (scheme, value) in codes, f"{scheme} {value} ({meaning}) is in none of Slicer's lists nor in CID 7140"
        assert meaning in codes[(scheme, value)], f"{scheme} {value}: '{meaning}' not among {codes[(scheme, value)]}"


def test_cid_7140_fixture_is_what_pydicom_ships():
    """The CID 7140 fixture was extracted from pydicom's tables; compare when pydicom is installed."""
    cid_dict = pytest.importorskip("pydicom.sr._cid_dict")
    concepts_dict = pytest.importorskip("pydicom.sr._concepts_dict")
    real = {(scheme, code, meaning)
            for scheme, keywords in cid_dict.cid_concepts[7140].items() for keyword in keywords
            for code, (meaning, _) in concepts_dict.concepts[scheme][keyword].items()}
    stored = {triplet(c) for c in json.loads((DATA / CID_7140_FILE).read_text(encoding="utf-8"))["concepts"]}
    assert stored == real


# ----------------------------------------------------------------------------- Slicer's own logic
@pytest.fixture
def slicer_logic():
    slicer = pytest.importorskip("slicer")
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    for name in SLICER_CONTEXT_FILES:
        assert logic.LoadTerminologyFromFile(str(DATA / name))
    return logic


@pytest.mark.integration
def test_slicer_loads_the_module_file_and_finds_every_segment_in_the_named_context(slicer_logic):
    import slicer

    from MultiscaleDiffSegLib import mrml

    assert terminology.load_module_terminology(slicer_logic) == MODULE_CONTEXT.name
    for node in CODED:
        text = mrml.terminology_entry(node)
        assert text == terminology_string(node)
        entry = slicer.vtkSlicerTerminologyEntry()
        assert slicer_logic.DeserializeTerminologyEntry(text, entry), node.id
        category, kind, modifier = (entry.GetCategoryObject(), entry.GetTypeObject(), entry.GetTypeModifierObject())
        found = slicer_logic.FindTerminologyNames(
            category.GetCodingSchemeDesignator(), category.GetCodeValue(), kind.GetCodingSchemeDesignator(),
            kind.GetCodeValue(), modifier.GetCodingSchemeDesignator() or "", modifier.GetCodeValue() or "", [])
        assert entry.GetTerminologyContextName() in found, f"{node.id}: found only in {found}"
        # Slicer's lookup stays in the named context and reads the colour the module recommends
        assert slicer_logic.UpdateEntryFromLoadedTerminologies(entry, [], [])
        assert entry.GetTerminologyContextName() == MODULE_CONTEXT.name
        shown = entry.GetTypeModifierObject() if node.laterality is not None else entry.GetTypeObject()
        assert tuple(shown.GetRecommendedDisplayRGBValue()) == tuple(node.color), node.id


@pytest.mark.integration
def test_loading_refuses_a_file_slicer_does_not_accept(slicer_logic, tmp_path):
    document = json.loads(terminology.terminology_file().read_text(encoding="utf-8"))
    del document["@schema"]  # Slicer refuses a context file without its schema reference
    broken = tmp_path / terminology.TERMINOLOGY_FILE
    broken.write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(RuntimeError, match="did not load"):
        terminology.load_module_terminology(slicer_logic, broken)
    with pytest.raises(FileNotFoundError, match="not readable"):
        terminology.load_module_terminology(slicer_logic, tmp_path / "missing.term.json")
