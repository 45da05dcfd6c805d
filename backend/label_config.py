"""The project's label config (the ``<View>`` XML) reduced to what the backend needs.

Label Studio sends the config with every /setup and /predict. From it we need: the Image tag (its name and
the task field holding the URL), the tag our masks go to (BrushLabels, else BitmaskLabels, else PolygonLabels)
with its labels,
and the smart KeyPointLabels / RectangleLabels whose clicks we turn into prompts.

Why so strict about the XML: the config comes over the network, so a DOCTYPE or entity declaration (the
"billion laughs" expansion, external entities) is rejected outright; Label Studio configs never use them.
Why the long error messages: a missing BrushLabels tag is the classic "smart tool silently does nothing"
setup mistake, so the error shows a minimal working config to copy.
"""

from __future__ import annotations

import functools
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from backend.errors import LabelConfigError
from backend.lru import SizedLRU

OUTPUT_KINDS = ("BrushLabels", "BitmaskLabels", "PolygonLabels")
SMART_KINDS = ("KeyPointLabels", "RectangleLabels")
_KNOWN = {kind.lower(): kind for kind in (*OUTPUT_KINDS, *SMART_KINDS, "Image", "Label")}
_FORBIDDEN = re.compile(r"<!\s*(DOCTYPE|ENTITY)", re.IGNORECASE)

EXAMPLE_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="brush" toName="image"><Label value="Object"/></BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>
  <RectangleLabels name="rect" toName="image" smart="true"><Label value="Object"/></RectangleLabels>
</View>"""


@dataclass(frozen=True)
class ImageTag:
    name: str
    value_key: str  # the task data field holding the image URL: value="$image" -> "image"


@dataclass(frozen=True)
class ControlTag:
    """A labels tag: BrushLabels, BitmaskLabels, PolygonLabels, KeyPointLabels or RectangleLabels."""

    kind: str  # the tag name as Label Studio spells it, e.g. "BrushLabels"
    name: str
    to_name: str
    labels: tuple[str, ...]  # <Label value=...> in document order, case as written
    smart: bool = False

    @property
    def result_type(self) -> str:
        """The ``type`` of the regions this tag produces: "brushlabels", "keypointlabels", ..."""
        return self.kind.lower()


@dataclass(frozen=True)
class LabelConfig:
    images: tuple[ImageTag, ...]
    brush: ControlTag | None
    polygon: ControlTag | None
    smart_tools: tuple[ControlTag, ...]  # KeyPointLabels / RectangleLabels with smart="true"
    bitmask: ControlTag | None = None  # BitmaskLabels: masks as PNG data URLs (backend.bitmask)

    @property
    def image(self) -> ImageTag:
        """The Image the output tag points at (its toName), else the first Image."""
        target = self.output_tag().to_name.split(",")[0].strip()
        return next((image for image in self.images if image.name == target), self.images[0])

    def output_tag(self, mode: str = "auto") -> ControlTag:
        """The tag masks are written to, following SAM_OUTPUT (auto | brush | bitmask | polygon).

        auto prefers the exact masks, BrushLabels then BitmaskLabels (a polygon is an approximation of a
        mask), and falls back to PolygonLabels. An explicit mode whose tag is missing is a LabelConfigError,
        not a silent switch.
        """
        if mode == "auto":
            tag = self.brush or self.bitmask or self.polygon
        elif mode == "brush":
            tag = self.brush
        elif mode == "bitmask":
            tag = self.bitmask
        elif mode == "polygon":
            tag = self.polygon
        else:
            raise ValueError(f"unknown output mode {mode!r}: expected auto, brush, bitmask or polygon")
        if tag is None:
            wanted = {"brush": "BrushLabels", "bitmask": "BitmaskLabels",
                      "polygon": "PolygonLabels"}.get(mode, "BrushLabels")
            raise LabelConfigError(
                f"SAM_OUTPUT={mode} needs a <{wanted}> tag in the label config, and there is none. "
                f"Add one, e.g. <{wanted} name=\"{wanted.lower()[:-6]}\" toName=\"{self.images[0].name}\">"
                "<Label value=\"Object\"/></" + wanted + ">, or set SAM_OUTPUT=auto."
            )
        return tag

    def smart_tool(self, name: str) -> ControlTag | None:
        return next((tool for tool in self.smart_tools if tool.name == name), None)


PARSED_CONFIGS = 32  # parsed label configs kept: every click of a project re-sends the same text
CACHED_CONFIG_CHARS = 64 * 1024  # larger configs (rare, huge taxonomies) are parsed each time, not kept


def parse_label_config(xml: str | None) -> LabelConfig:
    """Parse a ``<View>`` label config; raises LabelConfigError saying what is wrong and what to add.

    Every /predict carries its project's config, so the last ``PARSED_CONFIGS`` parses of configs up to
    ``CACHED_CONFIG_CHARS`` are kept (a LabelConfig is immutable), at most 2 MiB of config text; a config that
    fails is parsed again each time, which is the rare case.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("The request carries no label config; Label Studio sends it as "
                               "'label_config' in /predict and 'schema' in /setup.")
    return _parse_cached(xml) if len(xml) <= CACHED_CONFIG_CHARS else _parse(xml)


@functools.lru_cache(maxsize=PARSED_CONFIGS)
def _parse_cached(xml: str) -> LabelConfig:
    return _parse(xml)


def _parse(xml: str) -> LabelConfig:
    if _FORBIDDEN.search(xml):
        raise LabelConfigError("The label config contains a DOCTYPE or ENTITY declaration; "
                               "Label Studio configs never need one and the backend refuses to parse it.")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigError(f"The label config is not valid XML: {exc}.") from None

    images: list[ImageTag] = []
    controls: list[ControlTag] = []
    for element in root.iter():
        if not isinstance(element.tag, str):
            continue
        kind = _KNOWN.get(element.tag.lower())
        if kind == "Image":
            images.append(_image_tag(element))
        elif kind in OUTPUT_KINDS or kind in SMART_KINDS:
            controls.append(_control_tag(element, kind))

    if not images:
        raise LabelConfigError("The label config has no <Image> tag; the SAM backend segments images. "
                               "A minimal working config:\n" + EXAMPLE_CONFIG)
    brush = next((c for c in controls if c.kind == "BrushLabels"), None)
    polygon = next((c for c in controls if c.kind == "PolygonLabels"), None)
    bitmask = next((c for c in controls if c.kind == "BitmaskLabels"), None)
    if brush is None and polygon is None and bitmask is None:
        raise LabelConfigError("The label config has no <BrushLabels>, <BitmaskLabels> or <PolygonLabels> tag, so "
                               "the masks have nowhere to go. Add one for the Image, e.g.:\n" + EXAMPLE_CONFIG)
    smart = tuple(c for c in controls if c.kind in SMART_KINDS and c.smart)
    return LabelConfig(images=tuple(images), brush=brush, polygon=polygon, smart_tools=smart, bitmask=bitmask)


def _attribute(element: ET.Element, name: str, strip: bool = True) -> str:
    """An attribute by name, case-insensitively (Label Studio accepts toName and toname alike)."""
    for key, value in element.attrib.items():
        if key.lower() == name.lower():
            return value.strip() if strip else value
    return ""


def _image_tag(element: ET.Element) -> ImageTag:
    name, value = _attribute(element, "name"), _attribute(element, "value")
    if not name:
        raise LabelConfigError("An <Image> tag in the label config has no name attribute.")
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(f"<Image name=\"{name}\"> has value={value!r}; it must name the task field "
                               "holding the image URL, e.g. value=\"$image\".")
    return ImageTag(name=name, value_key=value[1:])


def _control_tag(element: ET.Element, kind: str) -> ControlTag:
    name, to_name = _attribute(element, "name"), _attribute(element, "toName")
    if not name or not to_name:
        raise LabelConfigError(f"A <{kind}> tag in the label config lacks its name or toName attribute.")
    labels: dict[str, None] = {}  # ordered and de-duplicated in linear time (taxonomies have thousands)
    for child in element.iter():
        if isinstance(child.tag, str) and child.tag.lower() == "label":
            value = _attribute(child, "value", strip=False)  # labels match exactly as written
            if value:
                labels.setdefault(value)
    smart = _attribute(element, "smart").lower() == "true" or _attribute(element, "smartOnly").lower() == "true"
    return ControlTag(kind=kind, name=name, to_name=to_name, labels=tuple(labels), smart=smart)


class ProjectConfigs:
    """The label configs /setup brought, by Label Studio's project key ("<id>.<created-ts>"), bounded.

    Webhooks may come without their project's config, so /setup's are kept for them. /setup needs no project
    to exist and may be called by anyone the Basic auth lets in, so the store is an LRU bounded both in entries
    and in characters: distinct project keys cannot grow it without end (observed before the bound: 400
    calls, +590 MB never freed).
    """

    def __init__(self, max_entries: int, max_chars: int) -> None:
        self.max_entries = max_entries
        self.max_chars = max_chars
        self._items: SizedLRU[str, str] = SizedLRU(max_chars, size=len, max_entries=max_entries)

    def put(self, project: str, schema: str) -> None:
        self._items.put(project, schema)

    def for_project_id(self, project_id: object) -> str | None:
        """The newest config of project ``project_id`` (the id part of the key), or None."""
        wanted = str(project_id)
        return self._items.newest(lambda key: key.split(".")[0] == wanted)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def chars(self) -> int:
        return self._items.total
