"""A real headless Chromium driving Label Studio's labeling UI, for the browser e2e test and bench/browser.py.

Why a browser at all: the API-level e2e tests post the regions the smart tools would send, so they cannot see
what the editor itself does: which requests a click really makes, that a suggestion is drawn at all (the
browser decodes our RLE into a canvas), that Alt turns a click negative, what "accept" keeps, and how long
the annotator waits from the click to the mask on screen.

Chromium is Debian's package (``/usr/bin/chromium``, installed by scripts/test), driven by the Python
``playwright`` package through ``executable_path``: ``playwright install`` downloads a browser, and this
machine has no outside network. The launch flags keep Chromium from opening connections of its own (without
``--disable-background-networking`` and friends it tries, is refused, and retries many at a time).

Waiting is on the editor's real state, never on sleeps: the editor's MobX store (``window.Htx``) says when a
suggestion arrived, and a hook on Konva's ``Layer.drawScene`` (``window.Konva`` is the editor's own Konva)
records when a suggestion's mask was first painted into its canvas layer, timed with ``performance.now()``
against the click's own event time stamp.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)
VIEWPORT = {"width": 1400, "height": 900}
ACTION_TIMEOUT_MS = 60_000  # a click or a wait on the UI's state (Playwright's own default, 30 s, is tight under load)
EDITOR_TIMEOUT_MS = 120_000  # the first editor load compiles a few MB of JavaScript on a busy 2-core machine
SUGGESTION_TIMEOUT_MS = 120_000  # a cold click encodes the image first

# Installed once per page (before the editor exists, so it is there for every task the page opens):
#  * the time stamp of every mouse press on the page, in performance.now() time (the event's own timeStamp,
#    taken when the browser created the event, before any editor code ran);
#  * a wrapper around Konva's Layer.drawScene that notes, for each suggestion of the selected annotation,
#    the first draw of its layer that holds its mask image (the brush region's layer is a Konva.Layer whose
#    first Image node gets the decoded RLE once it has loaded).
PROBES_JS = """
(() => {
  if (window.__sam) return;
  const sam = window.__sam = {presses: [], drawn: {}, hooked: false};
  performance.setResourceTimingBufferSize(100000);
  document.addEventListener('mousedown', (event) => sam.presses.push(event.timeStamp), true);
  const hook = () => {
    if (sam.hooked || !window.Konva || !window.Konva.Layer) return;
    const original = window.Konva.Layer.prototype.drawScene;
    window.Konva.Layer.prototype.drawScene = function (...args) {
      const result = original.apply(this, args);
      try {
        const annotation = window.Htx && window.Htx.annotationStore.selected;
        if (annotation) {
          for (const area of annotation.suggestions.values()) {
            if (area.layerRef !== this || sam.drawn[area.id] !== undefined) continue;
            const painted = this.findOne((node) => node.getClassName() === 'Image'
                                                   && node.name() !== 'highlight' && node.image());
            if (painted) sam.drawn[area.id] = performance.now();
          }
        }
      } catch (error) { /* a probe must never break the editor */ }
      return result;
    };
    sam.hooked = true;
  };
  hook();
  const timer = setInterval(() => { hook(); if (sam.hooked) clearInterval(timer); }, 20);
})();
"""

# The suggestions of the selected annotation: id, type, and when (if yet) its mask was painted.
SUGGESTIONS_JS = """
() => {
  const annotation = window.Htx && window.Htx.annotationStore.selected;
  if (!annotation) return [];
  return Array.from(annotation.suggestions.values()).map((area) => ({
    id: area.id, type: area.type, drawn: window.__sam.drawn[area.id] ?? null}));
}
"""

REGIONS_JS = """
() => {
  const annotation = window.Htx && window.Htx.annotationStore.selected;
  return annotation ? annotation.regions.map((region) => region.type) : [];
}
"""


class BrowserError(AssertionError):
    """The UI did not reach the state a step waits for; the message says which and where the artifacts are."""


@dataclass(frozen=True)
class Suggestion:
    """One click's answer as the UI got it: what the editor sent and received, and when the mask was drawn."""

    request: dict[str, Any]   # the body of POST /api/ml/<id>/interactive-annotating
    response: dict[str, Any]  # Label Studio's answer: {"data": {"result": [...]}} or {"errors": [...]}
    click_to_drawn_ms: float  # from the mouse press to the first paint of the suggestion's mask layer
    # The same click in parts, in ms after the press (the browser's resource timing of the request):
    # request_start_ms (the editor's work before it asks), response_end_ms (Label Studio + backend round
    # trip done), and the response body's size on the wire and decoded, in bytes.
    request_start_ms: float
    response_end_ms: float
    response_bytes: int
    response_decoded_bytes: int


def launch(playwright: Any, user_data_dir: Path) -> Any:
    """A persistent Chromium context on a fresh profile directory (no state from any earlier run)."""
    if not CHROMIUM.exists():
        raise BrowserError(f"{CHROMIUM} is missing: scripts/test installs Debian's chromium package "
                           "(apt-get install -y chromium)")
    return playwright.chromium.launch_persistent_context(
        str(user_data_dir), executable_path=str(CHROMIUM), args=list(LAUNCH_ARGS), headless=True,
        viewport=VIEWPORT)


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    """Playwright + a fresh headless Chromium context, both closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright, tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        context = launch(playwright, Path(profile))
        context.set_default_timeout(ACTION_TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


class LabelingPage:
    """One browser tab on Label Studio's labeling UI, with the steps an annotator takes.

    ``config_controls`` lists the label config's control tags in the order they appear (their label
    buttons are drawn in that order under the image): selecting a control's label clicks its own button.
    """

    def __init__(self, context: Any, label_studio_url: str, config_controls: list[str],
                 artifacts: Path) -> None:
        self.url = label_studio_url.rstrip("/")
        self.controls = config_controls
        self.artifacts = artifacts
        self.page = context.new_page()
        self.console: list[str] = []
        self.page.on("console", lambda message: self.console.append(f"{message.type}: {message.text}"))
        self.page.on("pageerror", lambda error: self.console.append(f"pageerror: {error}"))
        self.page.add_init_script(PROBES_JS)

    # -- navigation

    def login(self, email: str, password: str) -> None:
        self.page.goto(f"{self.url}/user/login/")
        if "/user/login" not in self.page.url:
            return  # the profile already holds a session: Label Studio sent us on
        self.page.fill("input[name=email]", email)
        self.page.fill("input[name=password]", password)
        with self.page.expect_navigation():
            self.page.click("button[type=submit]")
        if "/user/login" in self.page.url:
            raise BrowserError(f"Label Studio refused the login of {email} (still on {self.page.url})")

    def open_task(self, project: int, task: int) -> None:
        """The Data Manager with the task open in the editor, its image loaded."""
        self.page.goto(f"{self.url}/projects/{project}/data?task={task}")
        self.page.wait_for_selector("[data-testid=bottombar-auto-annotation-toggle]", state="attached",
                                    timeout=EDITOR_TIMEOUT_MS)
        self.page.wait_for_function(
            "() => { const a = window.Htx && window.Htx.annotationStore.selected;"
            " const image = a && a.names.get('image');"
            " return !!(image && image.naturalWidth > 1 && window.__sam && window.__sam.hooked); }",
            timeout=EDITOR_TIMEOUT_MS)

    # -- toolbar, labels

    def enable_auto_annotation(self) -> None:
        """The bottom bar's Auto-Annotation toggle: without it the smart tools are hidden and send nothing."""
        toggle = self.page.locator("[data-testid=bottombar-auto-annotation-toggle]")
        if not toggle.is_checked():
            self.page.get_by_text("Auto-Annotation", exact=True).click()
        self.page.wait_for_function("() => window.Htx.autoAnnotation === true")
        self.page.locator(".lsf-toolbar__smart").wait_for(state="attached")

    def choose_smart_tool(self, tool: str) -> None:
        """``key-point-tool`` or ``rectangle-tool`` from the "Auto-Detect" flyout of the toolbar."""
        self.page.locator(".lsf-tool_smart:not([aria-label])").first.hover()
        button = self.page.locator(f".lsf-toolbar__smart [aria-label={tool}]")
        button.click()
        self.page.wait_for_function(
            "(tool) => !!document.querySelector(`.lsf-toolbar__smart [aria-label=${tool}].lsf-tool_active`)",
            arg=tool)

    def select_label(self, control: str, label: str) -> None:
        """Click the label button of one control. The editor unselects it after every smart click, so each
        click needs this first (as an annotator would see: the button goes back to unselected)."""
        index = self.controls.index(control)
        self.page.locator(".lsf-labels").nth(index).locator(".lsf-label", has_text=label).click()
        self.page.wait_for_function(
            "([control, label]) => window.Htx.annotationStore.selected.names.get(control)"
            ".selectedLabels.some((l) => l.value === label)", arg=[control, label])

    # -- geometry

    def stage_box(self) -> dict[str, float]:
        """The image canvas's on-screen box (the Konva stage)."""
        box = self.page.locator(".konvajs-content").first.bounding_box()
        if box is None:
            raise BrowserError("the image canvas is not on screen")
        return box

    def image_box(self) -> dict[str, float]:
        """Where the image itself is on screen. Not the stage: the editor opens the image zoomed a little past
        the stage (1.23.2 showed a 320x240 image at 1.055x the stage's fit, its edges cut off), so a point at
        a fraction of the stage is not that fraction of the image."""
        stage = self.stage_box()
        zoom = self.page.evaluate(
            "() => { const i = window.Htx.annotationStore.selected.names.get('image');"
            " return {x: i.zoomingPositionX + (i.alignmentOffset ? i.alignmentOffset.x : 0),"
            " y: i.zoomingPositionY + (i.alignmentOffset ? i.alignmentOffset.y : 0),"
            " width: i.stageWidth * i.zoomScale, height: i.stageHeight * i.zoomScale}; }")
        return {"x": stage["x"] + zoom["x"], "y": stage["y"] + zoom["y"], "width": zoom["width"],
                "height": zoom["height"]}

    def screen_point(self, fx: float, fy: float) -> tuple[float, float]:
        """The screen position of a point at fractions of the image's width and height; it must be on the
        visible part of the stage (the editor's zoom can leave the image's edges off screen)."""
        image, stage = self.image_box(), self.stage_box()
        x, y = image["x"] + fx * image["width"], image["y"] + fy * image["height"]
        if not (stage["x"] < x < stage["x"] + stage["width"] and stage["y"] < y < stage["y"] + stage["height"]):
            raise BrowserError(f"({fx}, {fy}) of the image is off screen at the editor's zoom: image {image}, "
                               f"stage {stage}")
        return x, y

    # -- smart prompts

    def _expect_suggestion(self, action: Any, before: set[str]) -> Suggestion:
        """Run ``action`` (a click or a drag) and wait for its interactive-annotating round trip and for the
        new suggestion's mask to be painted."""
        with self.page.expect_response(lambda r: "/interactive-annotating" in r.url,
                                       timeout=SUGGESTION_TIMEOUT_MS) as answer:
            presses = self.page.evaluate("() => (performance.clearResourceTimings(), window.__sam.presses.length)")
            action()
        response = answer.value
        request = json.loads(response.request.post_data or "{}")
        body = response.json()
        if response.status != 200 or "errors" in body:
            raise BrowserError(f"Label Studio answered the smart tool with {response.status}: {body}")
        handle = self.page.wait_for_function(
            "([before, presses]) => { const fresh = (" + SUGGESTIONS_JS + ")().filter((s) =>"
            " !before.includes(s.id) && s.drawn !== null);"
            " return fresh.length ? [fresh[0].drawn, window.__sam.presses[presses]] : null; }",
            arg=[sorted(before), presses], timeout=SUGGESTION_TIMEOUT_MS, polling="raf")
        drawn, pressed = (float(v) for v in handle.json_value())
        entry = self.page.evaluate(
            "() => { const e = performance.getEntriesByType('resource')"
            ".filter((e) => e.name.includes('/interactive-annotating')).pop();"
            " return e ? [e.startTime, e.responseEnd, e.encodedBodySize, e.decodedBodySize] : null; }")
        if entry is None:
            raise BrowserError("the browser kept no resource timing of the interactive-annotating request")
        start, end, size, decoded = entry
        return Suggestion(request, body, drawn - pressed, float(start) - pressed, float(end) - pressed,
                          int(size), int(decoded))

    def suggestion_alpha(self, pixels: list[tuple[int, int]]) -> list[int | None]:
        """What the screen shows of the current suggestion: the alpha of its mask layer's canvas at the centres
        of the given image pixels (x, y), through the layer's own transform (the editor's zoom and offset);
        None for a pixel off the canvas (the editor's zoom can leave the image's edges off screen)."""
        return list(self.page.evaluate(
            """(pixels) => {
              const annotation = window.Htx.annotationStore.selected;
              const area = Array.from(annotation.suggestions.values()).pop();
              const image = annotation.names.get('image');
              const layer = area.layerRef;
              const canvas = layer.getCanvas();
              const context = canvas.getContext()._context;
              const ratio = canvas.getPixelRatio();
              const transform = layer.getAbsoluteTransform();
              return pixels.map(([x, y]) => {
                const at = transform.point({x: (x + 0.5) / image.naturalWidth * image.stageWidth,
                                            y: (y + 0.5) / image.naturalHeight * image.stageHeight});
                const px = Math.floor(at.x * ratio), py = Math.floor(at.y * ratio);
                if (px < 0 || py < 0 || px >= canvas._canvas.width || py >= canvas._canvas.height) return null;
                return context.getImageData(px, py, 1, 1).data[3];
              });
            }""", [list(p) for p in pixels]))

    def suggestion_ids(self) -> set[str]:
        return {s["id"] for s in self.page.evaluate(SUGGESTIONS_JS)}

    def click_point(self, fx: float, fy: float, control: str, label: str, negative: bool = False) -> Suggestion:
        """A smart keypoint at a fraction of the image's width and height; Alt held for a negative one."""
        self.select_label(control, label)
        x, y = self.screen_point(fx, fy)
        self.page.mouse.move(x, y)

        def click() -> None:
            if negative:
                self.page.keyboard.down("Alt")
            try:
                self.page.mouse.click(x, y)
            finally:
                if negative:
                    self.page.keyboard.up("Alt")

        return self._expect_suggestion(click, self.suggestion_ids())

    def drag_rectangle(self, start: tuple[float, float], end: tuple[float, float], control: str,
                       label: str) -> Suggestion:
        """A smart rectangle dragged from one corner to the other (fractions of the image)."""
        self.select_label(control, label)
        x0, y0 = self.screen_point(*start)
        x1, y1 = self.screen_point(*end)
        self.page.mouse.move(x0, y0)

        def drag() -> None:
            self.page.mouse.down()
            self.page.mouse.move((x0 + x1) / 2, (y0 + y1) / 2, steps=4)
            self.page.mouse.move(x1, y1, steps=4)
            self.page.mouse.up()

        return self._expect_suggestion(drag, self.suggestion_ids())

    def accept_suggestions(self) -> None:
        """The bottom bar's check mark: the suggestion becomes a region, the smart prompt regions go."""
        self.page.click("[data-testid=bottombar-accept-suggestions-button]")
        self.page.wait_for_function("() => window.Htx.annotationStore.selected.suggestions.size === 0")

    def reject_suggestions(self) -> None:
        """The bottom bar's cross: the suggestion and the smart prompt regions that made it go."""
        self.page.click("[data-testid=bottombar-reject-suggestions-button]")
        self.page.wait_for_function("() => window.Htx.annotationStore.selected.suggestions.size === 0")

    def regions(self) -> list[str]:
        return list(self.page.evaluate(REGIONS_JS))

    def submit(self) -> dict[str, Any]:
        """Submit, and return Label Studio's answer to the POST that stored the annotation."""
        with self.page.expect_response(
                lambda r: r.request.method == "POST" and "/annotations" in r.url,
                timeout=EDITOR_TIMEOUT_MS) as answer:
            self.page.click("[data-testid=bottombar-submit-button]")
        response = answer.value
        if response.status not in (200, 201):
            raise BrowserError(f"Label Studio refused the annotation: {response.status} {response.text()[:2000]}")
        return dict(response.json())

    # -- failure artifacts

    def save_artifacts(self, name: str) -> Path:
        """A screenshot, the page's HTML and its console, under ``artifacts``; returns the folder."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(Exception):
            self.page.screenshot(path=str(self.artifacts / f"{name}.png"), full_page=True)
        with contextlib.suppress(Exception):
            (self.artifacts / f"{name}.html").write_text(self.page.content())
        (self.artifacts / f"{name}.console.txt").write_text("\n".join(self.console))
        return self.artifacts

    @contextlib.contextmanager
    def artifacts_on_failure(self, name: str) -> Iterator[None]:
        """Any failure inside (a timeout of a wait, a wrong mask) keeps a screenshot and says where it is."""
        try:
            yield
        except Exception as error:
            folder = self.save_artifacts(name)
            raise BrowserError(f"{error}\n\nbrowser artifacts (screenshot, HTML, console): {folder}") from error
