"""The README's ready-to-paste label config is one the backend serves: smart tools found, labels matched."""

from __future__ import annotations

import re

from backend.label_config import parse_label_config
from backend.prompts import resolve_output_label
from testsupport.paths import REPO_ROOT


def readme_config() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    return re.search(r"```xml\n(.*?)```", text, re.S).group(1)  # type: ignore[union-attr]


def test_the_readme_config_parses_with_both_smart_tools_and_a_brush_output() -> None:
    config = parse_label_config(readme_config())
    assert config.output_tag().kind == "BrushLabels" and config.output_tag().labels == ("Object",)
    assert {tool.kind for tool in config.smart_tools} == {"KeyPointLabels", "RectangleLabels"}
    for tool in config.smart_tools:  # the buttons show other text, the stored label is the brush label
        assert tool.labels == ("Object",)
        assert resolve_output_label(tool.labels[0], config.output_tag().labels) == "Object"
