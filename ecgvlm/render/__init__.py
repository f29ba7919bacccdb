"""Stage 2: EcgRecord -> Printout, a clinical ECG printout PNG plus the geometry of every lead.

Draws straight into an 8-bit palette image (no matplotlib figure): the grid is drawn once per
page size and style and cached, the trace is an antialiased polyline rasterised with numpy,
and the page is written as a palette PNG at deflate level 1 (libdeflate when the ``deflate``
package is installed, else zlib). ``trace_from_image`` reads a panel back to a
signal. Imports numpy and Pillow only (never torch or ray).
"""

from ecgvlm.render.config import AUGMENTATIONS, LAYOUTS, RenderConfig
from ecgvlm.render.digitise import trace_from_image
from ecgvlm.render.printout import STANDARD_LEADS, RenderError, render_printout, resolve_layout
from ecgvlm.render.raster import PngError

__all__ = [
    "AUGMENTATIONS",
    "LAYOUTS",
    "STANDARD_LEADS",
    "PngError",
    "RenderConfig",
    "RenderError",
    "render_printout",
    "resolve_layout",
    "trace_from_image",
]
