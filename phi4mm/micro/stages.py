"""The micro recipe's stages: what each trains, on which tasks, for how long, in which phase and branch; the
held-out goals; and how a --max-minutes budget is shared among the stages."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from phi4mm.micro.data import CONDITION_SETS
from phi4mm.micro.voices import heldout_voices, set_name, trained_voices


@dataclass(frozen=True)
class MicroStage:
    name: str  # output folder and report label
    stage: str  # the `phi4mm train` stage
    tasks: tuple[str, ...]  # micro.data task files mixed into this stage's data
    epochs: float
    lr: float
    batch_tokens: int = 16384
    phase: int = 0  # phases run in order; within one, stages of different branches run at once on a GPU
    branch: str = ""  # stages of one branch run in order; branches train disjoint tensors (merged exactly)
    with_lora: bool = False  # an encoder stage also trains its modality's LoRA (train.stages.STAGE_LORA says why)
    warmup: int = 20
    keep_plan: bool = False  # never cut by a --max-minutes budget (a phase of only such stages is unbudgeted)
    max_seconds: float | None = None  # a fixed time cap on GPU runs (its cosine schedule spans it), else epochs


# "scene" names every shape of a scene: the shapes questions alone left circle, square and triangle nearly
# untold apart (0.61), one question naming one shape per image.
# "ocr_line" and "count" (lines of words; how-many questions) feed the goals the first recipe missed: reading
# and counting.
IMAGE_TASKS = ("ocr", "ocr_line", "shapes", "count", "scene", "caption")
SPEECH_TASKS = ("asr", "ast", "sqa")
RECIPE = (
    # Every later stage builds on this decoder, and it is cheap (~45 s on an H200): a budget never cuts it. Cut
    # to 345 of its 720 steps by a 6.8-minute budget, the model scored 0.0 on tool calls (0.99 uncut).
    MicroStage("text", "decoder", ("text", "tools"), 12, 1e-3, 8192, phase=0, keep_plan=True),
    # SigLIP learns letters and shapes first, beside the text stage on the other GPU (they train disjoint
    # tensors): the LM-loss stages never taught the encoder to read (held-out OCR 0.00 in three recipe runs) nor to
    # tell circle, square and triangle apart. Words by CTC on character units (what fixed speech; alone it read
    # 30% of held-out words in 2,500 probe steps); scenes and photos by their caption labels, words and
    # colour-shape pairs (train.ctc.LabelHead; probe: held-out scenes' exact label sets 0.76 in 1,650 steps,
    # where raster-read CTC scene lists reached 0.14 and stopped OCR learning). Capped at 150 s on a GPU.
    MicroStage("vision-ctc", "vision-ctc", ("ocr", "ocr_line", "scene", "caption"), 30, 1e-3, phase=0, branch="vision",
               keep_plan=True, warmup=100, max_seconds=150.0),
    MicroStage("vision-projector", "vision-projector", IMAGE_TASKS, 1, 1e-3, phase=1, branch="vision"),
    MicroStage("vision-encoder", "vision-encoder", IMAGE_TASKS, 12, 5e-4, phase=1, branch="vision",
               with_lora=True, warmup=100),
    # The original's audio encoder starts from an ASR model; the micro one learns to recognise speech first (CTC
    # on the transcripts, in character-BPE units: train.ctc.ctc_units). Without it the encoder's output stayed nearly
    # constant over time after 1,136 LM-loss steps and the model transcribed from its language prior (WER 1.04);
    # with whole-word targets CTC sat on its plateau (loss ~3.0 per word after 2,640 GPU steps); with the units
    # a probe reached held-out WER 0.25 in 385 steps (scripts/micro_ctc_probe.py, docs/micro-model.md).
    MicroStage("speech-ctc", "speech-ctc", ("asr",), 16, 1e-3, 2048, phase=1, branch="speech", warmup=100),
    MicroStage("speech-encoder", "speech-encoder", SPEECH_TASKS, 8, 1e-3, 4096, phase=1, branch="speech",
               with_lora=True, warmup=100),
    MicroStage("vision-lora", "vision-lora", IMAGE_TASKS, 4, 3e-4, phase=2, branch="vision"),
    MicroStage("speech-lora", "speech-lora", SPEECH_TASKS, 5, 3e-4, 4096, phase=2, branch="speech"),
    # Image tasks stay in the mix so the jointly trained encoder and LoRA_V keep reading (the original mixes
    # vision post-training data into this stage too).
    MicroStage("vision-speech", "vision-speech", ("vsqa",) + IMAGE_TASKS, 4, 3e-4, phase=3),
    # The decoder side reads the shapes last. The encoder before it binds each shape to its colour in its merged
    # tokens (one attention query per colour answers "what shape is red" at 0.97-1.00), yet the model answered
    # 26/50. A probe (scripts/micro_lm_probe.py, 240 s from the shipped model) took shapes from 0.665 to 0.845
    # and "what shape is <colour>" to 49/50 with projector + LoRA_V at lr 1e-3 on scenes alone; more of the
    # recipe's own mix (OCR is half of it and still unread) gave 0.68. The towers stay frozen. Typed questions
    # only: spoken questions about scenes (vsqa, same LoRA_V) fell from 0.29 to 0.01 when vsqa was in.
    MicroStage("vision-focus", "vision-projector", ("shapes", "count", "scene"), 14, 1e-3, phase=4, branch="vision",
               with_lora=True, warmup=50, max_seconds=400.0),
)
# Seconds per sample pass on one H200 of a 2-GPU recipe run (docs/micro-model.md#training-time: each
# stage's seconds over its samples x epochs, rounded per kind), used to plan a --max-minutes budget. The old
# H100 profile (GPU step time only) underestimated image stages ~1.9x and speech ~1.3x: loading and start-up.
_COST = {"text": 0.5e-3, "tools": 0.75e-3, "ocr": 3.0e-3, "ocr_line": 3.0e-3, "shapes": 3.0e-3, "count": 3.0e-3,
         "scene": 3.0e-3,
         "caption": 3.0e-3, "vsqa": 3.4e-3,
         "asr": 1.45e-3, "ast": 1.45e-3, "sqa": 1.45e-3}
# Held-out sets: (file, metric, goal, higher is better); None: reported, no goal. Speech is held to WER 0.05 on every
# held-out voice (micro.voices) and on the trained ones; the recording-condition sets (micro.data.CONDITION_SETS)
# have no goal of their own: they say which augmentation paid.
GOALS = (
    ("asr", "wer", 0.10, False), ("asr_heldout_voice", "wer", 0.05, False), ("ast", "bleu", 60.0, True),
    ("ocr", "exact", 0.90, True), ("ocr_line", "exact", 0.70, True), ("shapes", "exact", 0.90, True),
    ("count", "exact", 0.80, True), ("tools", "tool", 0.95, True), ("vsqa_heldout_voice", "exact", 0.80, True),
    ("sqa", "exact", None, True), ("vsqa", "exact", None, True), ("text", "exact", None, True),
    *((set_name(e, v), "wer", 0.05, False) for e, v in heldout_voices() + trained_voices()),
    *((name, "wer", None, False) for name in CONDITION_SETS),
)


def planned_seconds(data_dir: Path, st: MicroStage) -> float:
    """The stage's expected training seconds on the H100 (samples x epochs x per-sample cost)."""
    lines = {t: sum(1 for _ in (data_dir / f"{t}.jsonl").open()) for t in st.tasks}
    plan = st.epochs * sum(n * _COST.get(t, 3.0e-3) for t, n in lines.items())
    return plan if st.max_seconds is None else min(plan, st.max_seconds)


def recipe_phases() -> list[list[list[int]]]:
    """RECIPE indices as phases run in order; a phase is a list of branches, each a chain of stages.

    [[[0], [1]], [[2, 3], [4, 5]], [[6], [7]], [[8]]]: text with vision CTC; (vision projector -> encoder)
    with (speech CTC -> encoder); vision LoRA with speech LoRA; vision-speech.
    """
    phases: dict[int, dict[str, list[int]]] = {}
    for i, st in enumerate(RECIPE):
        phases.setdefault(st.phase, {}).setdefault(st.branch, []).append(i)
    return [list(phases[k].values()) for k in sorted(phases)]


def phase_budgets(phases: list[list[list[int]]], planned: list[float], left: float | None,
                   ) -> dict[int, float | None]:
    """Seconds each stage of phases[0] may train (None: its whole plan), given `left` seconds for all of
    `phases`: the first phase's share of them by planned wall seconds (a phase lasts as long as its longest
    branch). Every branch may use the whole share (the branches run at once), so a branch is cut only by what
    its own plan exceeds the share, each of its stages in proportion to its plan. A phase of keep_plan stages
    is never cut."""
    phase = phases[0]
    budgets: dict[int, float | None] = {n: None for chain in phase for n in chain}
    if left is None or all(RECIPE[n].keep_plan for chain in phase for n in chain):
        return budgets
    wall = [max(sum(planned[n] for n in chain) for chain in ph) for ph in phases]
    share = max(10.0, left * wall[0] / sum(wall))
    for chain in phase:
        # Cutting a shorter branch as much as the longest one left a GPU idle: a 2-GPU run that did so
        # gave the speech chain 30% of the phase, and its encoder stage made 164 of 1,136 planned steps.
        factor = min(1.0, share / sum(planned[n] for n in chain))
        for n in chain:
            budgets[n] = max(10.0, planned[n] * factor)
    return budgets
