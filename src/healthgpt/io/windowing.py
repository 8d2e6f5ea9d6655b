"""Display windows: map physical values (CT Hounsfield units, MR signal) to 8-bit grey levels.

The grey mapping is DICOM's `LINEAR_EXACT` VOI function (PS3.3 C.11.2.1.3.2): values at or below
C - W/2 give 0, values above C + W/2 give 255, and in between y = ((x - C) / W + 0.5) * 255, computed as
(x - (C - W/2)) / W * 255 (exact for integer HU at half-grey ties) and rounded half to even. It is the
variant meant for real-valued input such as HU after rescale; the older `LINEAR` variant (C - 0.5, W - 1,
for integer stored values) differs from it by less than one grey level.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from healthgpt.errors import ImageInputError


@dataclass(frozen=True)
class Window:
    """A centre/width window (same units as the image) giving one 8-bit grey channel."""

    center: float
    width: float

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Window `values` to uint8 of the same shape; NaN maps to black."""
        scaled = (np.asarray(values, dtype=np.float64) - (self.center - self.width / 2)) / self.width * 255.0
        return np.rint(np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 255.0)).astype(np.uint8)


PRESETS: dict[str, Window] = {
    "lung": Window(-600, 1500),
    "mediastinum": Window(50, 350),
    "soft_tissue": Window(40, 400),
    "brain": Window(40, 80),
    "bone": Window(400, 1800),
    "liver": Window(60, 160),
}


@dataclass(frozen=True)
class PercentileWindow:
    """Min-max between two percentiles of the image: the default where values have no fixed scale (MR)."""

    low: float = 0.5
    high: float = 99.5

    def window_for(self, values: np.ndarray) -> Window:
        """The linear window spanning the percentiles of `values` (width 1 for a constant image)."""
        lo, hi = (float(v) for v in np.nanpercentile(values, [self.low, self.high]))
        return Window((lo + hi) / 2, hi - lo if hi > lo else 1.0)

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Window `values` to uint8 with the window of their own percentiles."""
        return self.window_for(values).apply(values)


@dataclass(frozen=True)
class MultiWindow:
    """Three CT windows as R, G, B (default lung, mediastinum, bone), as some CT models expect."""

    channels: tuple[Window, Window, Window] = field(default=(PRESETS["lung"], PRESETS["mediastinum"], PRESETS["bone"]))

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Window `values` once per channel: shape (..., 3) uint8."""
        return np.stack([w.apply(values) for w in self.channels], axis=-1)


DisplayWindow = Window | PercentileWindow | MultiWindow
WindowSpec = DisplayWindow | str | tuple[float, float] | None


def parse_window(spec: WindowSpec, source: str | Path = "window") -> DisplayWindow | None:
    """Turn a preset name, "multi", "percentile", "C,W", a (C, W) pair or a window into a window.

    `source` names the file in the error message. None stays None (the caller's default applies).
    """
    if spec is None or isinstance(spec, DisplayWindow):
        return spec
    if isinstance(spec, str):
        return _parse_window_text(spec.strip().lower(), spec, source)
    return _checked(Window(*(float(v) for v in spec)), spec, source)


def default_window(modality: str) -> DisplayWindow:
    """CT shows soft tissue (organs, the most common reading); other modalities use percentiles (0.5-99.5)."""
    return PRESETS["soft_tissue"] if modality.upper() == "CT" else PercentileWindow()


def _parse_window_text(text: str, spec: str, source: str | Path) -> DisplayWindow:
    if text in PRESETS:
        return PRESETS[text]
    if text == "multi":
        return MultiWindow()
    if text == "percentile":
        return PercentileWindow()
    try:
        center, width = (float(part) for part in text.split(","))
    except ValueError:
        raise ImageInputError(
            source,
            f"unknown window {spec!r}",
            f"use one of {', '.join(PRESETS)}, 'multi', 'percentile' or 'center,width' such as '40,400'",
        ) from None
    return _checked(Window(center, width), spec, source)


def _checked(window: Window, spec: object, source: str | Path) -> Window:
    if not window.width > 0:
        raise ImageInputError(source, f"window {spec!r} has width {window.width}", "give a width above 0")
    return window
