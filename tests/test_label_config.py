"""parse_label_config on the label configs Label Studio 1.23.2 really sent, and on broken ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from backend.errors import LabelConfigError
from backend.label_config import EXAMPLE_CONFIG, ControlTag, ImageTag, parse_label_config


def _body(fixtures_dir: Path, name: str) -> dict:
    return json.loads((fixtures_dir / name).read_text())["body"]


@pytest.mark.parametrize("fixture, key", [
    ("predict_interactive_keypoint_ui_click.json", "label_config"),
    ("predict_batch_two_tasks.json", "label_config"),
    ("setup.json", "schema"),
])
def test_fixture_configs(fixtures_dir: Path, fixture: str, key: str) -> None:
    config = parse_label_config(_body(fixtures_dir, fixture)[key])
    assert config.images == (ImageTag(name="image", value_key="image"),)
    assert config.image.name == "image"
    assert config.brush == ControlTag("BrushLabels", "brush", "image", ("Object",), smart=False)
    assert config.polygon is None
    assert config.smart_tools == (
        ControlTag("KeyPointLabels", "kp", "image", ("Object",), smart=True),
        ControlTag("RectangleLabels", "rect", "image", ("Object",), smart=True),
    )
    assert config.output_tag() is config.brush and config.output_tag("brush") is config.brush
    assert config.brush.result_type == "brushlabels"
    assert config.smart_tool("kp").kind == "KeyPointLabels" and config.smart_tool("nope") is None


def test_polygon_output_nested_labels_and_case() -> None:
    config = parse_label_config("""
    <View>
      <Header value="Cells"/>
      <View style="display:flex">
        <Image name="img" value="$picture" rotateControl="true"/>
      </View>
      <PolygonLabels name="poly" toName="img" strokeWidth="2">
        <View><Label value="Red Cell"/><Label value="white cell" background="blue"/></View>
      </PolygonLabels>
      <KeyPointLabels name="kp" toname="img" smart="true"><Label value="red cell"/></KeyPointLabels>
      <RectangleLabels name="det" toName="img"><Label value="Red Cell"/></RectangleLabels>
    </View>""")
    assert config.images == (ImageTag("img", "picture"),)
    assert config.brush is None and config.output_tag() is config.polygon
    assert config.polygon.labels == ("Red Cell", "white cell")
    # only smart tools are prompts; toname is read case-insensitively
    assert [(t.name, t.to_name, t.labels) for t in config.smart_tools] == [("kp", "img", ("red cell",))]
    with pytest.raises(LabelConfigError, match="SAM_OUTPUT=brush needs a <BrushLabels>"):
        config.output_tag("brush")


def test_brush_preferred_over_polygon_and_explicit_choice() -> None:
    config = parse_label_config("""<View><Image name="a" value="$x"/><Image name="b" value="$y"/>
      <PolygonLabels name="p" toName="b"><Label value="A"/></PolygonLabels>
      <BrushLabels name="m" toName="b"><Label value="A"/></BrushLabels></View>""")
    assert config.output_tag().name == "m" and config.output_tag("polygon").name == "p"
    assert config.image == ImageTag("b", "y")  # the image the output points at, not the first one


def test_smart_only_counts_as_smart() -> None:
    config = parse_label_config(EXAMPLE_CONFIG.replace('smart="true"', 'smartOnly="true"'))
    assert [t.name for t in config.smart_tools] == ["kp", "rect"]


@pytest.mark.parametrize("xml, message", [
    (None, "no label config"),
    ("   ", "no label config"),
    ("<View><Image name='i' value='$i'/>", "not valid XML"),
    ("<View><BrushLabels name='b' toName='i'><Label value='A'/></BrushLabels></View>", "no <Image>"),
    ("<View><Image name='i' value='$i'/><KeyPointLabels name='k' toName='i' smart='true'/></View>",
     "no <BrushLabels>, <BitmaskLabels> or <PolygonLabels>"),
    ("<View><Image name='i' value='http://x/a.png'/><BrushLabels name='b' toName='i'/></View>", r"\$image"),
    ("<View><Image value='$i'/><BrushLabels name='b' toName='i'/></View>", "no name"),
    ("<View><Image name='i' value='$i'/><BrushLabels name='b'/></View>", "name or toName"),
    ('<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaa">]><View>&a;</View>', "DOCTYPE or ENTITY"),
])
def test_bad_configs(xml: str | None, message: str) -> None:
    with pytest.raises(LabelConfigError, match=message) as caught:
        parse_label_config(xml)
    assert caught.value.status == 422


def test_missing_output_shows_a_working_snippet() -> None:
    with pytest.raises(LabelConfigError) as caught:
        parse_label_config("<View><Image name='i' value='$i'/></View>")
    assert EXAMPLE_CONFIG in caught.value.message
    parse_label_config(EXAMPLE_CONFIG)  # and the snippet itself is accepted
