"""``RenderConfig``: how an ``EcgRecord`` is drawn as a printout.

Page sizes are chosen per layout so that the page's aspect ratio equals one of PULSE's anyres
grid pinpoints (see ``RenderConfig`` for why that matters).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from ecgvlm.config import ConfigError, check_choice, check_range, config_to_dict

LAYOUTS = ("3x4+II", "6x2", "12x1", "strip", "auto")
STYLES = ("clinical", "ecg_plot")
PAPER_SPEEDS_MM_S = (25, 50)
GAINS_MM_PER_MV = (5, 10, 20)
MISSING_LEADS = ("error", "skip")
# Seeded augmentations, the kinds ECG-Image-Kit and PULSE train with. Only "rotation" moves
# pixels, so only it invalidates the panel geometry (the Printout says so).
AUGMENTATIONS = ("noise", "baseline_wander", "rotation", "blur", "jpeg", "tint", "grid_dropout")

# Page (width, height) in mm per layout. Each aspect equals an anyres pinpoint of PULSE
# (LLaVA-1.6: 336-px tiles, pinpoints 672x336, 336x672, 672x672, 1008x336, 336x1008), so the
# vision tower's best-fit resolution holds the whole page with no padding:
#   3x4+II and 6x2: 2:1 -> 672x336 (two tiles + the base view);
#   12x1: 1:1 -> 672x672; strip (1-2 leads): 3:1 -> 1008x336.
# The width holds 250 mm of trace (10 s at 25 mm/s, as on clinical paper) plus 25 mm margins
# (the left one carries the 1 mV calibration pulse).
DEFAULT_PAGE_MM: dict[str, tuple[float, float]] = {
    "3x4+II": (300.0, 150.0),
    "6x2": (300.0, 150.0),
    "12x1": (300.0, 300.0),
    "strip": (300.0, 100.0),
}
MARGIN_X_MM = 25.0
MARGIN_TOP_MM = 8.0  # room for the caption line
MARGIN_BOTTOM_MM = 4.0


@dataclass(frozen=True)
class RenderConfig:
    """How to draw an ECG printout.

    The default, a 300 x 150 mm page at 100 dpi (1181 x 591 px), is sized for PULSE's
    vision tower: CLIP ViT-L/14-336 with anyres pinpoints [[336,672],[672,336],[672,672],
    [1008,336],[336,1008]]. A 2:1 landscape page matches the 672x336 pinpoint exactly, so
    anyres spends its two 336-px tiles (plus the base view) on paper, not padding; a US-letter
    page (1.29:1), as ECG-Image-Kit draws, picks 672x672 and pads 23% of it. 100 dpi is about
    1.76x the 672-px target: enough that the 1 mm grid (3.9 px) and a 0.3 mm trace survive the
    downscale as a clean box filter, and that ``trace_from_image`` reads 39 px per mV back,
    while the PNG stays around 100 kB and encodes in a few ms. More dpi buys nothing the
    vision tower can see at this aspect; other VLMs (e.g. GPT-4o's 512-px tiles) may want 150.

    Attributes:
        layout: ``"3x4+II"`` (four 2.5 s columns I-III, aVR-aVF, V1-V3, V4-V6 plus a 10 s
            rhythm strip), ``"6x2"``, ``"12x1"``, ``"strip"`` (one row per lead, for 1-4
            lead records such as MIT-BIH), or ``"auto"`` (3x4+II when the 12 standard leads
            are present, else strip).
        dpi: Pixels per inch of paper; ``px_per_mm = dpi / 25.4``.
        paper_speed_mm_s: 25 or 50. The trace width is fixed (page width - 50 mm), so 50 mm/s
            shows half the time.
        mm_per_mv: Gain, 5, 10 or 20 mm per mV.
        style: ``"clinical"`` (red grid, black trace, calibration pulses) or ``"ecg_plot"``
            (the look of ecg_plot 0.2.8, see docs/render.md for what differs).
        augment: False, True (every augmentation in ``AUGMENTATIONS``), or a tuple of their
            names. Seeded by ``render_printout``'s ``seed``.
        augment_strength: Scales every augmentation's magnitude (1.0 = defaults).
        caption: Print speed and gain on the page (never the record id or labels).
        page_mm: Page (width, height) in mm; None picks the layout's default.
        rhythm_lead: Lead drawn as the 10 s rhythm strip of ``3x4+II``.
        center_leads: Draw each panel centred on its median, moving ``baseline_y_px`` to
            match, so offsets and wander do not push a lead out of its row.
        clip_to_panel: Amplitudes beyond a row's band are clipped flat at the band's edge
            when True; when False (default, as on clinical paper) they overlap the
            neighbouring rows and are clipped only at the page edge.
        missing_leads: For layouts naming leads: ``"error"`` raises naming the missing lead,
            ``"skip"`` leaves its panel blank (no Panel is returned for it).
        line_width_mm: Trace width; None uses the style's default.
    """

    layout: str = "3x4+II"
    dpi: int = 100
    paper_speed_mm_s: float = 25.0
    mm_per_mv: float = 10.0
    style: str = "clinical"
    augment: bool | tuple[str, ...] = False
    augment_strength: float = 1.0
    caption: bool = True
    page_mm: tuple[float, float] | None = None
    rhythm_lead: str = "II"
    center_leads: bool = True
    clip_to_panel: bool = False
    missing_leads: str = "error"
    line_width_mm: float | None = None

    def __post_init__(self) -> None:
        check_choice("layout", self.layout, LAYOUTS)
        check_choice("style", self.style, STYLES)
        check_choice("paper_speed_mm_s", self.paper_speed_mm_s, PAPER_SPEEDS_MM_S)
        check_choice("mm_per_mv", self.mm_per_mv, GAINS_MM_PER_MV)
        check_choice("missing_leads", self.missing_leads, MISSING_LEADS)
        if isinstance(self.dpi, bool) or not isinstance(self.dpi, int):
            raise ConfigError(f"dpi must be an int, got {self.dpi!r}")
        check_range("dpi", self.dpi, 30, 600)
        check_range("augment_strength", self.augment_strength, 0.0, 3.0)
        if self.line_width_mm is not None:
            check_range("line_width_mm", self.line_width_mm, 0.01, 2.0)
        if not isinstance(self.augment, bool):
            names = (self.augment,) if isinstance(self.augment, str) else tuple(self.augment)
            for name in names:
                check_choice("augment", name, AUGMENTATIONS)
            object.__setattr__(self, "augment", names)
        if self.page_mm is not None:
            page = tuple(float(v) for v in self.page_mm)
            if len(page) != 2:
                raise ConfigError(f"page_mm must be (width, height), got {self.page_mm!r}")
            check_range("page_mm width", page[0], 2 * MARGIN_X_MM + 20, 2000)
            check_range("page_mm height", page[1], MARGIN_TOP_MM + MARGIN_BOTTOM_MM + 10, 2000)
            object.__setattr__(self, "page_mm", page)

    @property
    def px_per_mm(self) -> float:
        return self.dpi / 25.4

    def augmentations(self) -> tuple[str, ...]:
        """The resolved augmentation names, in the order they are applied."""
        if self.augment is True:
            return AUGMENTATIONS
        if self.augment is False:
            return ()
        return tuple(a for a in AUGMENTATIONS if a in self.augment)

    def page_size_mm(self, layout: str) -> tuple[float, float]:
        """Page (width, height) in mm for a resolved layout."""
        return self.page_mm if self.page_mm is not None else DEFAULT_PAGE_MM[layout]

    def config_hash(self) -> str:
        """Short stable hash of the resolved config (12 hex digits), stored per data row."""
        data = config_to_dict(self)
        data["augment"] = list(self.augmentations())
        blob = json.dumps(data, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]
