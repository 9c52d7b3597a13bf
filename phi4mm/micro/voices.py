"""Which synthetic voices the micro model trains on and which score it, split by name.

A voice is an engine plus a name: flite's `slt`, or espeak-ng's English accent (`en-us`) with an optional
variant (`en-us+f3`: the variant changes pitch, formants and breathiness; the accent changes the phonemes).
Training draws an accent and a variant from the TRAIN tuples below; nothing in HELDOUT is ever heard in training,
so the held-out sets measure new speakers, not new sentences. Both axes are split: a held-out variant is scored
on a training accent (the voice is new, the accent is not) and a held-out accent without a variant.

`installed_*` ask the engines what this machine has; tests/micro checks that every installed English accent and
variant sits in exactly one of train, held-out or excluded, so a newer espeak-ng cannot add voices unnoticed.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from functools import cache

INSTALL_HINT = "install it (Debian/Ubuntu: apt-get install flite espeak-ng)"


class MissingTool(OSError):
    """A program, font or package the micro data needs is not installed; the message says what to install.
    An OSError, so the CLI reports it in one sentence with exit code 2."""


def find_binary(name: str) -> str:
    """Path of `flite` or `espeak-ng`; env PHI4MM_FLITE / PHI4MM_ESPEAK override the PATH lookup."""
    env = {"flite": "PHI4MM_FLITE", "espeak-ng": "PHI4MM_ESPEAK"}[name]
    path = os.environ.get(env) or shutil.which(name)
    if not path or not os.access(path, os.X_OK):
        where = f"${env}={os.environ[env]!r} is not an executable" if os.environ.get(env) else f"{name} is not on PATH"
        raise MissingTool(f"speech synthesis needs {name}, but {where}; {INSTALL_HINT}, or set ${env} to its path")
    return path


def check_binaries() -> None:
    """Fail early (before any worker starts) when a synthesiser is missing."""
    find_binary("flite")
    find_binary("espeak-ng")


# ---- espeak-ng English accents (the gmw/en* voice files) ----------------------------------------------------
# en-gb-x-rp was the held-out voice of the first recipe; en-us-nyc was never trained on by any recipe.
ESPEAK_ACCENTS_TRAIN = ("en-029", "en-gb", "en-gb-scotland", "en-gb-x-gbclan", "en-gb-x-gbcwmd", "en-us")
ESPEAK_ACCENTS_HELDOUT = ("en-gb-x-rp", "en-us-nyc")
# The mbrola voices (mb/*: en-uk, en-german-1 ...) need the separate mbrola program and its voice data.
ESPEAK_ACCENTS_EXCLUDED = ("en-uk",)

# ---- espeak-ng variants (the !v/* files; any of them can follow an accent after "+") -------------------------
# The numbered ones are the classic male / female variants; held out: two of each (f3 was the worst unseen one
# for the first micro model: WER 0.48). The named ones are mostly klatt-synthesiser people with their own pitch
# and formants: more speakers for training, and a held-out set of them to score.
ESPEAK_VARIANTS_TRAIN = (
    "m1", "m2", "m4", "m5", "m6", "m8", "f1", "f2", "f4",
    "Alex", "Alicia", "Andrea", "Andy", "AnxiousAndy", "Denis", "Diogo", "Gene", "Gene2", "Henrique", "Hugo",
    "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike", "Nguyen", "RicishayMax", "RicishayMax2", "RicishayMax3",
    "Storm", "adam", "anika", "antonio", "aunty", "belinda", "boris", "caleb", "david", "ed", "edward2",
    "grandma", "grandpa", "gustave", "iven", "iven2", "iven3", "iven4", "john", "kaukovalta", "klatt", "klatt2",
    "klatt3", "klatt4", "klatt5", "klatt6", "marcelo", "michel", "miguel", "norbert", "pablo", "paul", "pedro",
    "rob", "robert", "sandro", "steph", "steph2", "steph3", "travis", "zac",
)
ESPEAK_VARIANTS_HELDOUT = ("m3", "m7", "f3", "f5", "Annie", "benjamin", "edward", "linda", "max", "quincy",
                           "shelby", "victor")
# Not a speaking voice to be held to a WER goal: whispers, robots, effects and a test speed. `Mr serious` has a
# space in its file name, which the "+variant" syntax cannot name.
ESPEAK_VARIANTS_EXCLUDED = ("Demonic", "Mr serious", "Tweaky", "UniRobot", "anikaRobot", "announcer", "croak",
                            "fast", "robosoft", "robosoft2", "robosoft3", "robosoft4", "robosoft5", "robosoft6",
                            "robosoft7", "robosoft8", "whisper", "whisperf")
FLITE_SHARE = 0.45  # share of training utterances spoken by flite (4 voices); the rest by espeak-ng (many)
VARIANT_SHARE = 0.7  # of espeak-ng training utterances, the share with a variant (the rest: the plain accent)

# ---- flite (its compiled-in voices) --------------------------------------------------------------------------
# kal and kal16 are one speaker at two rates, so they stay on one side; rms (US male) is the unseen speaker.
FLITE_TRAIN = ("awb", "kal", "kal16", "slt")
FLITE_HELDOUT = ("rms",)
FLITE_EXCLUDED = ("awb_time",)  # a limited-domain voice: it only speaks the time of day

# The accent a held-out variant is scored on: a training accent, so only the speaker is new.
SCORING_ACCENT = "en-us"


def espeak_name(accent: str, variant: str | None) -> str:
    """espeak-ng's -v argument: "en-us" or "en-us+f3"."""
    return accent if not variant else f"{accent}+{variant}"


def heldout_voices() -> tuple[tuple[str, str], ...]:
    """Every (engine, voice) the held-out sets score, one set each: held-out accents, held-out variants on
    SCORING_ACCENT and held-out flite voices."""
    return (tuple(("espeak-ng", a) for a in ESPEAK_ACCENTS_HELDOUT)
            + tuple(("espeak-ng", espeak_name(SCORING_ACCENT, v)) for v in ESPEAK_VARIANTS_HELDOUT)
            + tuple(("flite", v) for v in FLITE_HELDOUT))


def trained_voices() -> tuple[tuple[str, str], ...]:
    """One set each for the training accents, numbered training variants and flite voices: the same sentences as
    the held-out sets, so a held-out voice's score compares with the trained ones'."""
    numbered = tuple(v for v in ESPEAK_VARIANTS_TRAIN if re.fullmatch(r"[mf]\d", v))
    return (tuple(("espeak-ng", a) for a in ESPEAK_ACCENTS_TRAIN)
            + tuple(("espeak-ng", espeak_name(SCORING_ACCENT, v)) for v in numbered)
            + tuple(("flite", v) for v in FLITE_TRAIN))


def draw_voice(rng: random.Random, heldout: bool) -> tuple[str, str]:
    """(engine, voice) for one utterance: a training voice, or (heldout) any held-out one, uniformly by set."""
    if heldout:
        return rng.choice(heldout_voices())
    if rng.random() < FLITE_SHARE:
        return "flite", rng.choice(FLITE_TRAIN)
    variant = rng.choice(ESPEAK_VARIANTS_TRAIN) if rng.random() < VARIANT_SHARE else None
    return "espeak-ng", espeak_name(rng.choice(ESPEAK_ACCENTS_TRAIN), variant)


def set_name(engine: str, voice: str) -> str:
    """The file stem of a voice's set: "asr@en-us+f3", "asr@flite-rms"."""
    return f"asr@{voice}" if engine == "espeak-ng" else f"asr@flite-{voice}"


# ---- what this machine has ----------------------------------------------------------------------------------
def _espeak_list(kind: str) -> list[tuple[str, str]]:
    """(language, file) rows of `espeak-ng --voices=<kind>`."""
    out = subprocess.run([find_binary("espeak-ng"), f"--voices={kind}"], capture_output=True, text=True,
                         check=True).stdout.splitlines()[1:]
    rows = []
    for line in out:
        # Pty Language Age/Gender VoiceName File [Other languages]; a VoiceName has no spaces, a File may.
        m = re.match(r"\s*\d+\s+(\S+)\s+\S+\s+\S+\s+(\S.*?)(?:\s+\(.*\))?\s*$", line)
        if m:
            rows.append((m.group(1), m.group(2)))
    return rows


@cache
def installed_espeak_accents() -> tuple[str, ...]:
    """espeak-ng's English accents on this machine (its own voices and mbrola ones), by language code."""
    return tuple(sorted({lang for lang, f in _espeak_list("en") if lang.startswith("en-")}))


@cache
def installed_espeak_variants() -> tuple[str, ...]:
    """espeak-ng's variant names on this machine (the !v/ file names, which "+name" selects)."""
    return tuple(sorted(f.split("/", 1)[1] for _, f in _espeak_list("variant") if f.startswith("!v/")))


@cache
def installed_flite_voices() -> tuple[str, ...]:
    out = subprocess.run([find_binary("flite"), "-lv"], capture_output=True, text=True, check=True).stdout
    return tuple(sorted(out.split(":", 1)[1].split()))
