"""NSD instruction data: COCO instances through each image's cropBox, and LLaVA-format import/export."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.io import loadmat

from neurovision.data.instructions import INSTRUCTION_TYPES, NEEDS, check_types, concept_vocabulary
from neurovision.data.store import Store, StoreError
from neurovision.sources import coco, llava, nsd
from tests.fakes.nsd import CATEGORIES, make_fake_nsd
from tests.helpers import run_cli

TPS = 30
P = 4
# the first shared image is 640x480, cropped to its central 480x480 (x from 80 to 560): [x, y, w, h] in pixels
PLANTED = [
    ("dog", [96, 24, 144, 144], False),  # -> (16, 24, 160, 168)/480: top left, 0.09 of the square: medium
    ("bus", [100, 150, 420, 300], False),  # -> x 20..440, y 150..450: centre cell, 0.55: large
    ("person", [440, 330, 40, 100], False),  # two people in the bottom right, small
    ("person", [480, 320, 40, 100], False),
    ("kite", [0, 0, 60, 60], False),  # left of x = 80: cropped away
    ("cat", [20, 300, 100, 100], False),  # 40 % of it inside the crop (< MIN_VISIBLE): dropped
    ("bird", [300, 10, 10, 10], False),  # 0.04 % of the square (< MIN_AREA): dropped
]


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_fake_nsd(tmp_path_factory.mktemp("nsd"), subjects=(1, 2), n_sessions=2, trials_per_session=TPS,
                         planted=PLANTED)


@pytest.fixture(scope="module")
def store(fake: Path, tmp_path_factory: pytest.TempPathFactory) -> Store:
    out = tmp_path_factory.mktemp("store") / "nsd.h5"
    nsd.prepare(fake, out, subjects=[1, 2], patch_size=P)
    return Store(out)


def _planted_row(store: Store, root: Path) -> int:
    first_shared = int(loadmat(str(nsd.expdesign_path(root)))["sharedix"].ravel()[0]) - 1
    row = int(np.searchsorted(store.stimulus_ids, first_shared))
    assert store.stimulus_ids[row] == first_shared
    return row


def _without_instances(fake: Path, tmp_path: Path) -> Path:
    root = Path(shutil.copytree(fake, tmp_path / "nsd"))
    for p in nsd.instances_paths(root):
        p.unlink()
    return root


# --------------------------------------------------------------------------------------------- geometry
def test_a_planted_object_maps_through_the_crop_to_its_cell_and_size(store: Store, fake: Path) -> None:
    r = _planted_row(store, fake)
    boxes = {b["label"]: b for b in store.annotations("boxes", r)}
    np.testing.assert_allclose(boxes["dog"]["box"], [16 / 480, 24 / 480, 160 / 480, 168 / 480], atol=1e-4)
    assert coco.cell_of(boxes["dog"]["box"]) == 0 and coco.size_of(boxes["dog"]["box"]) == "medium"
    assert coco.cell_of(boxes["bus"]["box"]) == 4 and coco.size_of(boxes["bus"]["box"]) == "large"
    qa = {p["q"]: (p["a"], p["type"]) for p in store.annotations("qa", r)}
    assert qa["Where is the dog in the image?"] == ("top left", "position")
    assert qa["Is the dog small, medium or large in the image?"] == ("medium", "size")
    assert qa["Where is the bus in the image?"] == ("center", "position")
    assert qa["Which is further left, the bus or the dog?"] == ("the dog", "relation")
    assert qa["Is the bus above or below the dog?"] == ("below", "relation")
    assert qa["What is the largest object in the image?"] == ("bus", "category")


def test_objects_cropped_away_or_too_small_disappear_and_counts_are_right(store: Store, fake: Path) -> None:
    r = _planted_row(store, fake)
    labels = [b["label"] for b in store.annotations("boxes", r)]
    assert sorted(labels) == ["bus", "dog", "person", "person"]  # no kite, cat or bird
    assert store.annotations("concepts", r) == ["person", "bus", "dog"]  # COCO category order
    qa = {p["q"]: p["a"] for p in store.annotations("qa", r) if p["type"] == "count"}
    assert qa == {"How many people are in the image?": "two", "How many buses are in the image?": "one",
                  "How many dogs are in the image?": "one"}
    d = store.annotations("descriptions", r)
    assert "two people, a bus and a dog" in d and "kite" not in d and "cat" not in d
    assert store.annotations("descriptions", r).startswith("Image ")  # the first COCO caption leads
    assert "two people, a bus and a dog" in store.annotations("sd_prompts", r)


def test_every_qa_answer_follows_from_the_boxes(store: Store) -> None:
    """Over all stimuli: counts, presence, position and size answers are what the boxes say."""
    n_types: dict[str, int] = {}
    for boxes, pairs, words in zip(store.annotations("boxes"), store.annotations("qa"), store.annotations("concepts"),
                                   strict=True):
        assert words == [c for c in CATEGORIES.values() if c in {b["label"] for b in boxes}]
        for p in pairs:
            n_types[p["type"]] = n_types.get(p["type"], 0) + 1
            if p["type"] == "count":
                name = next(c for c in CATEGORIES.values() if coco.plural(c) in p["q"])
                assert p["a"] == coco.number(sum(b["label"] == name for b in boxes))
            elif p["type"] == "presence":
                name = p["q"].removeprefix("Is there ").removesuffix(" in the image?").split(" ", 1)[1]
                assert p["a"] == ("yes" if name in words else "no")
            elif p["type"] == "position":
                name = p["q"].removeprefix("Where is the ").removesuffix(" in the image?")
                (b,) = [b for b in boxes if b["label"] == name]
                assert p["a"] == nsd_position(b["box"])
    assert {"count", "presence", "position", "size", "category", "cooccurrence", "relation"} <= set(n_types)


def nsd_position(box: list[float]) -> str:
    from neurovision.data.instructions import POSITIONS

    return POSITIONS[coco.cell_of(box)]


def test_crop_geometry_for_portrait_images_and_partial_objects() -> None:
    portrait = (0.125, 0.125, 0.0, 0.0)  # 480x640 -> rows 80..560
    assert coco.crop_object([0, 80, 240, 240], 480, 640, portrait) == (0.0, 0.0, 0.5, 0.5)
    # 60 % visible: kept, clipped to the square
    box = coco.crop_object([100, 40, 100, 100], 480, 640, portrait)
    assert box == pytest.approx((100 / 480, 0.0, 200 / 480, 60 / 480), abs=1e-4)
    assert coco.crop_object([100, 0, 100, 100], 480, 640, portrait) is None  # 20 % visible
    assert coco.crop_object([0, 0, 0, 10], 640, 480, (0, 0, 0.125, 0.125)) is None  # degenerate box


def test_vocabulary_is_cocos_categories(store: Store) -> None:
    assert concept_vocabulary(store) == list(CATEGORIES.values())
    check_types(list(INSTRUCTION_TYPES), store.annotation_kinds, str(store.path))  # every type available


def test_a_bad_crop_box_names_the_file_and_field(fake: Path, tmp_path: Path) -> None:
    import pandas as pd

    root = Path(shutil.copytree(fake, tmp_path / "nsd"))
    info = pd.read_csv(nsd.stim_info_path(root), index_col=0)
    info.loc[:, "cropBox"] = "(0, 0, 0.6, 0.6)"
    info.to_csv(nsd.stim_info_path(root))
    with pytest.raises(StoreError, match=r"nsd_stim_info_merged.csv.*cropBox"):
        nsd.prepare(root, tmp_path / "s.h5", subjects=[1], patch_size=P, sessions=1)


def test_without_instances_the_converter_says_once_which_types_are_unavailable(fake: Path, tmp_path: Path) -> None:
    root = _without_instances(fake, tmp_path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        out = nsd.prepare(root, tmp_path / "s.h5", subjects=[1], patch_size=P, sessions=1)
    said = [str(x.message) for x in w if "unavailable" in str(x.message)]
    assert len(said) == 1
    for t in ("description", "reasoning", "dialogue", "sd_prompt", "concept"):
        assert repr(t) in said[0]
    assert "stage2_instruct_captions_only.yaml" in said[0]
    s = Store(out)
    assert s.annotation_kinds == ["captions"] and "concept_names" not in s.extras
    with pytest.raises(ValueError, match="annotations/descriptions.*stage2_instruct_captions_only"):
        check_types(list(INSTRUCTION_TYPES), s.annotation_kinds, str(out))
    check_types(["caption"], s.annotation_kinds, str(out))


def test_the_captions_only_preset_trains_captions_only() -> None:
    import yaml

    cfg = yaml.safe_load(Path("experiments/presets/stage2_instruct_captions_only.yaml").read_text())["data"]["init_args"]
    assert cfg["tasks"] == ["caption"] and cfg["eval_tasks"] == ["caption"]
    assert all(NEEDS[t] == ("captions",) for t in cfg["tasks"] + cfg["eval_tasks"])


# --------------------------------------------------------------------------------------------- LLaVA import
def test_llava_export_then_import_round_trips(store: Store, fake: Path, tmp_path: Path) -> None:
    f = llava.export_instructions(store, tmp_path / "instr.json")
    entries = json.loads(f.read_text())
    assert all(e["conversations"][0]["value"].startswith("<image>\n") for e in entries)
    root = _without_instances(fake, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = nsd.prepare(root, tmp_path / "imported.h5", subjects=[1, 2], patch_size=P, instructions=str(f))
    b = Store(out)
    for kind in ("descriptions", "qa", "dialogues", "sd_prompts"):
        assert b.annotations(kind) == store.annotations(kind), kind
    assert "boxes" not in b.annotation_kinds  # concept localisation needs the boxes: not imported


def test_inspect_prints_one_stimulus_and_exports_instructions(store: Store, fake: Path, tmp_path: Path,
                                                             capsys) -> None:
    r = _planted_row(store, fake)
    assert run_cli(["inspect", str(store.path), f"--stimulus={r}"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["stimulus_id"] == int(store.stimulus_ids[r]) and shown["concepts"] == ["person", "bus", "dog"]
    assert run_cli(["inspect", str(store.path), "--stimulus=100000"]) == 2
    assert "--stimulus 100000" in capsys.readouterr().err
    assert run_cli(["inspect", str(store.path), f"--export_instructions={tmp_path / 'x.json'}"]) == 0
    assert json.loads((tmp_path / "x.json").read_text()) == json.loads(
        llava.export_instructions(store, tmp_path / "y.json").read_text())


def _entry(ident: dict, *turns: tuple[str, str], **kw) -> dict:
    return {**ident, **kw, "conversations": [{"from": f, "value": v} for f, v in turns]}


def test_llava_ids_resolve_and_types_are_inferred(store: Store, fake: Path, tmp_path: Path) -> None:
    from neurovision.data.instructions import DETAILED_TEMPLATES

    row = 1
    nsd_id = int(store.stimulus_ids[row])
    coco_id = int(store.extra("coco_ids")[row])
    doc = [
        _entry({"image": f"COCO_train2014_{coco_id:012d}.jpg", "id": f"{coco_id:012d}"},
               ("human", f"<image>\n{DETAILED_TEMPLATES[3]}"), ("gpt", "A long description.")),
        _entry({"id": f"{coco_id:012d}"}, ("human", "What is odd here?<image>"), ("gpt", "Nothing."), qtype="odd"),
        _entry({"nsd_id": nsd_id}, ("human", "Q1?"), ("gpt", "A1."), ("human", "Q2?"), ("gpt", "A2.")),
        _entry({"coco_id": coco_id}, ("human", "Write a prompt."), ("gpt", "a photo"), type="sd_prompt"),
    ]
    f = tmp_path / "in.json"
    f.write_text(json.dumps(doc))
    out = nsd.prepare(fake, tmp_path / "s.h5", subjects=[1, 2], patch_size=P, instructions=str(f))
    s = Store(out)
    assert s.annotations("descriptions", row) == "A long description."
    assert s.annotations("qa", row)[-1] == {"type": "odd", "q": "What is odd here?", "a": "Nothing."}
    assert s.annotations("qa", row)[:-1] == store.annotations("qa", row)  # added to the derived pairs
    assert s.annotations("dialogues", row) == [{"from": "human", "value": "Q1?"}, {"from": "gpt", "value": "A1."},
                                               {"from": "human", "value": "Q2?"}, {"from": "gpt", "value": "A2."}]
    assert s.annotations("sd_prompts", row) == "a photo"
    assert s.annotations("descriptions", row + 1) == store.annotations("descriptions", row + 1)  # untouched


def test_llava_bad_entries_get_one_line_each(store: Store, fake: Path, tmp_path: Path, capsys) -> None:
    ok = _entry({"nsd_id": int(store.stimulus_ids[0])}, ("human", "Q?"), ("gpt", "A."))
    doc = [
        ok,
        _entry({"coco_id": 123}, ("human", "Q?"), ("gpt", "A.")),  # 1: not an NSD image
        {"conversations": ok["conversations"]},  # 2: no id
        _entry({"nsd_id": 0}, ("gpt", "A."), ("human", "Q?")),  # 3: wrong order
        _entry({"nsd_id": 0}, ("human", "Q?"), ("gpt", "A."), type="poem"),  # 4: unknown type
        "not an entry",  # 5
        _entry({"image": "cat.jpg"}, ("human", "Q?"), ("gpt", "A.")),  # 6: no id in the file name
        _entry({"nsd_id": 10**6}, ("human", "Q?"), ("gpt", "A.")),  # 7: no such nsdId
        _entry({"nsd_id": 0}, ("human", "Q?")),  # 8: no answer
    ]
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(llava.InstructionFileError) as e:
        nsd.prepare(fake, tmp_path / "s.h5", subjects=[1], patch_size=P, sessions=1, instructions=str(f))
    lines = str(e.value).splitlines()
    assert lines[0] == f"8 problem(s) in {f}:"
    expected = [(1, "coco_id", "not one of NSD's images"), (2, "id", "no image id"),
                (3, "conversations[0].from", "expected 'human'"), (4, "type", "'poem'"), (5, "<entry>", "object"),
                (6, "image", "cannot read an image id"), (7, "nsd_id", "not an NSD image"),
                (8, "conversations[0]", "ends with a human turn")]
    assert len(lines) == 1 + len(expected)
    for line, (i, fld, text) in zip(lines[1:], expected, strict=True):
        assert line.startswith(f"{f}: entry {i}: field '{fld}': ") and text in line, line
    assert not (tmp_path / "s.h5").exists()  # nothing half-written
    # the command line: the problems, no traceback
    code = run_cli(["prepare", "nsd", f"--root={fake}", f"--out={tmp_path / 's.h5'}", "--subjects=[1]",
                    "--sessions=1", f"--patch_size={P}", f"--instructions={f}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and f"{f}: entry 7: field 'nsd_id'" in err


def test_llava_unmatched_ids_can_be_skipped(store: Store, fake: Path, tmp_path: Path) -> None:
    doc = [_entry({"coco_id": 123}, ("human", "Q?"), ("gpt", "A.")),
           _entry({"nsd_id": int(store.stimulus_ids[0])}, ("human", "Q?"), ("gpt", "A."))]
    f = tmp_path / "in.json"
    f.write_text(json.dumps(doc))
    out = nsd.prepare(fake, tmp_path / "s.h5", subjects=[1, 2], patch_size=P, instructions=str(f),
                      instructions_unmatched="skip")
    assert Store(out).annotations("qa", 0)[-1] == {"type": "imported", "q": "Q?", "a": "A."}


def test_llava_not_json_or_not_a_list(fake: Path, tmp_path: Path) -> None:
    f = tmp_path / "x.json"
    f.write_text("{oops")
    with pytest.raises(llava.InstructionFileError, match=r"x.json: field '<file>': not a readable JSON"):
        nsd.prepare(fake, tmp_path / "s.h5", subjects=[1], patch_size=P, sessions=1, instructions=str(f))
    f.write_text('{"a": 1}')
    with pytest.raises(llava.InstructionFileError, match="expected a JSON list"):
        nsd.prepare(fake, tmp_path / "s.h5", subjects=[1], patch_size=P, sessions=1, instructions=str(f))
