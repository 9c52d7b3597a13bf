"""Rendered text for the micro model's reading tasks: a word or a short line of words in a font and size drawn
from the split's side of the font and size split.

Fonts are split by name (`TRAIN_FONTS`, `HELDOUT_FONTS`): the held-out sets read whole font families that no
training image uses (Liberation: metric copies of Arial, Times and Courier), at sizes no training image uses
either, so a held-out score measures reading, not recall of the training pictures.
"""
from __future__ import annotations

import random
from functools import cache, lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from phi4mm.micro.speech import MissingTool
from phi4mm.micro.text import VOCAB

OCR_SIZE = (448, 112)  # a word or a line: one 448-px crop, 8 of its 32 patch rows
OCR_TEST_SIZES = (27, 33, 40, 48, 56)
# Training draws every other whole size of 22-62 pt: with six trained sizes the encoder read the training words
# but not the sizes between them (an OCR probe: 25-30% held-out exact, docs/micro-model.md). The test sizes are
# still never trained on.
OCR_FONT_SIZES = {"train": tuple(s for s in range(22, 63) if s not in OCR_TEST_SIZES), "test": OCR_TEST_SIZES}
# A line is LINE_WORDS random OCR words, smaller so it fits 448 px: ~1-2 letters per 14-px patch column, which
# the vision CTC's two outputs per column can still emit.
LINE_WORDS = (2, 4)
LINE_TEST_SIZES = (17, 21, 26)
LINE_FONT_SIZES = {"train": tuple(s for s in range(14, 32) if s not in LINE_TEST_SIZES), "test": LINE_TEST_SIZES}
MARGIN = 4  # px of background kept around the text
OCR_EXTRA = ["about", "above", "after", "air", "all", "also", "always", "animal", "answer", "apple", "ask", "away", "baby", "back", "bad", "bag", "bank", "bed", "before", "begin", "best", "better", "body", "bread", "bring", "build", "busy", "buy", "call", "camp", "card", "care", "catch", "cheap", "child", "class", "clean", "clear", "close", "cloud", "coat", "cold", "come", "cook", "cool", "corn", "count", "country", "cover", "cross", "dark", "day", "deep", "desk", "dinner", "door", "down", "draw", "dream", "dress", "drink", "drive", "dry", "earth", "east", "easy", "eat", "egg", "end", "enough", "even", "evening", "face", "fall", "family", "far", "fast", "father", "field", "fill", "fine", "fire", "first", "floor", "flower", "fly", "food", "foot", "friend", "front", "fruit", "full", "funny", "game", "gate", "gift", "girl", "give", "glass", "gold", "good", "great", "ground", "group", "grow", "hair", "hand", "happy", "hard", "head", "hear", "heart", "heavy", "help", "here", "high", "hill", "hold", "home", "hope", "hot", "hour", "idea", "island", "jacket", "juice", "keep", "key", "kind", "king", "lake", "lamp", "land", "large", "last", "late", "laugh", "leaf", "learn", "left", "letter", "light", "line", "lion", "list", "long", "look", "love", "low", "lunch", "make", "man", "map", "market", "milk", "money", "moon", "morning", "mother", "mountain", "music", "name", "new", "next", "nice", "night", "north", "nose", "number", "ocean", "open", "page", "paper", "party", "pencil", "people", "piano", "picture", "place", "plant", "plate", "pocket", "queen", "quiet", "rain", "read", "ready", "right", "ring", "road", "rock", "room", "round", "salt", "sand", "sea", "seat", "shirt", "shoe", "short", "sing", "sister", "sky", "sleep", "slow", "smile", "snow", "soft", "song", "soon", "sound", "south", "space", "spring", "star", "start", "stone", "story", "sugar", "summer", "sun", "sweet", "table", "talk", "teacher", "thank", "thing", "think", "time", "town", "toy", "train", "travel", "true", "turn", "voice", "wall", "warm", "watch", "water", "west", "wheel", "wind", "window", "winter", "wood", "word", "work", "world", "write", "year", "zoo"]
OCR_WORDS = tuple(sorted({*VOCAB, *OCR_EXTRA}))

# ---- the font split, by file name ---------------------------------------------------------------------------
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/truetype/freefont",
             "/usr/share/fonts/truetype/liberation", "/usr/share/fonts/truetype/liberation2")
# DejaVu (the first recipe's eight faces and their condensed / bold-oblique siblings) and GNU FreeFont, plus
# Pillow's own scalable font ("default"): three families of sans, serif and mono for training.
TRAIN_FONTS = ("DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-BoldOblique", "DejaVuSans-Oblique",
               "DejaVuSansCondensed", "DejaVuSansCondensed-Bold", "DejaVuSansMono", "DejaVuSansMono-Bold",
               "DejaVuSansMono-Oblique", "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-BoldItalic",
               "DejaVuSerif-Italic", "DejaVuSerifCondensed", "FreeMono", "FreeMonoBold", "FreeMonoOblique",
               "FreeSans", "FreeSansBold", "FreeSansBoldOblique", "FreeSansOblique", "FreeSerif", "FreeSerifBold",
               "FreeSerifBoldItalic", "FreeSerifItalic", "default")
HELDOUT_FONTS = ("LiberationMono-Bold", "LiberationMono-Italic", "LiberationMono-Regular", "LiberationSans-Bold",
                 "LiberationSans-BoldItalic", "LiberationSans-Italic", "LiberationSans-Regular",
                 "LiberationSansNarrow-Regular", "LiberationSerif-Bold", "LiberationSerif-BoldItalic",
                 "LiberationSerif-Italic", "LiberationSerif-Regular")
FONT_PACKAGES = {"train": "fonts-dejavu-core fonts-freefont-ttf", "test": "fonts-liberation"}


@cache
def fonts(split: str = "train") -> tuple[str, ...]:
    """The split's font files found on this machine, sorted by name (index i is the same font on every machine
    that has them all), plus "default" (Pillow's font) for training. Test: the held-out families."""
    names = TRAIN_FONTS if split == "train" else HELDOUT_FONTS
    dirs = list(FONT_DIRS)
    # matplotlib bundles DejaVu; find its folder without importing matplotlib (slow, and not needed here).
    from importlib.util import find_spec
    spec = find_spec("matplotlib")
    if spec is not None and spec.origin:
        dirs.insert(0, str(Path(spec.origin).parent / "mpl-data" / "fonts" / "ttf"))
    found = {}
    for name in names:
        for d in dirs:
            if (Path(d) / f"{name}.ttf").is_file():
                found[name] = str(Path(d) / f"{name}.ttf")
                break
    default = False
    if "default" in names:
        try:  # Pillow's own scalable font (Pillow >= 10.1 with FreeType); a bitmap fallback would ignore the size
            default = isinstance(ImageFont.load_default(12), ImageFont.FreeTypeFont)
        except TypeError:
            pass
    out = [found[n] for n in sorted(found)] + (["default"] if default else [])
    if not out:
        raise MissingTool(f"no {split} fonts for the OCR tasks: install {FONT_PACKAGES[split]} (Debian/Ubuntu "
                          "apt-get), or matplotlib (it bundles DejaVu), and a Pillow built with FreeType")
    return tuple(out)


@lru_cache(maxsize=256)
def font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size) if path == "default" else ImageFont.truetype(path, size)


def render_text(rng: random.Random, text: str, split: str, sizes: tuple[int, ...]) -> Image.Image:
    """`text` in dark ink on a light OCR_SIZE background, in a font of the split and a size drawn from `sizes`
    (the next smaller one while it does not fit), at a random position."""
    path = rng.choice(fonts(split))
    img = Image.new("RGB", OCR_SIZE, tuple(rng.randint(200, 255) for _ in range(3)))
    draw = ImageDraw.Draw(img)
    for size in sorted(sizes[:sizes.index(rng.choice(sizes)) + 1], reverse=True):  # shrink until it fits
        f = font(path, size)
        l, t, r, b = draw.textbbox((0, 0), text, font=f)
        if r - l <= OCR_SIZE[0] - 2 * MARGIN and b - t <= OCR_SIZE[1] - 2 * MARGIN:
            break
    x = rng.randint(MARGIN - l, max(MARGIN - l, OCR_SIZE[0] - MARGIN - r))
    y = rng.randint(MARGIN - t, max(MARGIN - t, OCR_SIZE[1] - MARGIN - b))
    draw.text((x, y), text, font=f, fill=tuple(rng.randint(0, 80) for _ in range(3)))
    return img


def line_text(rng: random.Random) -> str:
    """LINE_WORDS random OCR words: no grammar, so a line is read, not guessed from the language."""
    return " ".join(rng.choice(OCR_WORDS) for _ in range(rng.randint(*LINE_WORDS)))
