"""Video: frames sampled by time, sized to a token budget, the sound track as audio, video parts in chat messages
and prepared prompts (a generated mp4 with frames and an AAC track)."""
from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from phi4mm.inputs.audio import load_audio
from phi4mm.inputs.chat import flatten_content
from phi4mm.inputs.image import num_image_tokens
from phi4mm.inputs.video import VideoError, expand_videos, load_video
from tests.inputs.media_files import write_video

SPOKEN = Path(__file__).parents[2] / "examples" / "spoken.flac"


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    """6 s at 10 fps, 640x360, colour changing every second (red, green, blue, ...), the spoken clip as sound."""
    return write_video(tmp_path_factory.mktemp("video") / "clip.mp4", seconds=6, fps=10, size=(640, 360),
                       audio=load_audio(SPOKEN))


def test_frames_by_fps(clip):
    c = load_video(clip, fps=1.0)
    assert c.times == pytest.approx([0, 1, 2, 3, 4, 5], abs=0.051) and c.duration == pytest.approx(6, abs=0.1)
    # Frame k is coloured channel k % 3: sampling by time picks one frame of each second.
    assert [int(np.argmax(np.asarray(f).reshape(-1, 3).mean(0))) for f in c.frames] == [0, 1, 2, 0, 1, 2]
    assert c.audio is None
    c2 = load_video(clip, fps=2.0)
    assert len(c2.frames) == 12 and c2.times[1] == pytest.approx(0.5, abs=0.051)


def test_max_frames_spread_over_the_whole_clip(clip):
    c = load_video(clip, fps=10.0, max_frames=4)
    assert len(c.frames) == 4 and c.times[0] < 1.0 and c.times[-1] > 5.0
    assert all(a < b for a, b in zip(c.times, c.times[1:]))


def test_token_budget_shrinks_then_thins(clip):
    full = load_video(clip, fps=1.0, max_image_tokens=10**6)
    assert full.frames[0].size == (640, 360)
    per = num_image_tokens(448, 252)
    fit = load_video(clip, fps=1.0, max_image_tokens=6 * per)  # room for 6 one-crop frames
    assert len(fit.frames) == 6 and fit.frames[0].size == (448, 252)
    assert sum(num_image_tokens(*f.size) for f in fit.frames) <= 6 * per
    few = load_video(clip, fps=1.0, max_image_tokens=3 * per)  # not even that: fewer frames
    assert len(few.frames) == 3 and few.times[0] == 0 and few.times[-1] == pytest.approx(5, abs=0.051)


def test_sound_track(clip):
    c = load_video(clip, fps=0.5, use_audio=True)
    spoken = load_audio(SPOKEN)
    assert c.audio is not None and abs(c.audio.size - spoken.size) < 1600


def test_bad_videos_say_why(tmp_path, clip):
    silent = write_video(tmp_path / "mute.mp4", seconds=1)
    with pytest.raises(VideoError, match="has no audio track"):
        load_video(silent, use_audio=True)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(clip.read_bytes()[:2000])
    with pytest.raises(VideoError, match="MP4/M4A file but ends early"):
        load_video(cut)
    with pytest.raises(VideoError, match="no video track"):
        load_video(SPOKEN)
    with pytest.raises(VideoError, match="fps must be"):
        load_video(clip, fps=0)
    with pytest.raises(VideoError, match="no such file"):
        load_video(tmp_path / "missing.mp4")


def test_video_url_parts_and_expansion(clip):
    url = "data:video/mp4;base64," + base64.b64encode(clip.read_bytes()).decode()
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "a.jpg"}},
        {"type": "video_url", "video_url": {"url": url, "fps": 0.5, "use_audio": True}},
        {"type": "text", "text": "What changes?"},
        {"type": "image_url", "image_url": {"url": "b.jpg"}}]}]
    flat, images, audios = flatten_content(messages)
    assert flat[0]["content"] == "<|image_1|><|image_2|>What changes?<|image_3|>"
    assert images[1] == {"video": url, "fps": 0.5, "use_audio": True} and audios == []
    text, images, audios = expand_videos(flat[0]["content"], images, audios)
    # The video's 3 frames take numbers 2..4, the last image becomes 5, the sound track is audio 1.
    assert text == "<|image_1|><|image_2|><|image_3|><|image_4|><|audio_1|>What changes?<|image_5|>"
    assert images[0] == "a.jpg" and images[4] == "b.jpg" and len(audios) == 1


def test_prepare_counts_frame_tokens(tiny_official, clip):
    import phi4mm
    model = phi4mm.load(tiny_official)
    prep = model.prepare([{"role": "user", "content": [
        {"type": "video", "video": str(clip), "fps": 1.0, "max_frames": 3},
        {"type": "text", "text": "Describe."}]}])
    assert prep.images is not None and len(prep.images.num_tokens) == 3
    assert prep.input_ids.count(model.config.image_token_id) == sum(prep.images.num_tokens)
    with pytest.raises(ValueError, match="unknown option"):
        model.prepare("<|image_1|>x", images=[{"video": str(clip), "frames": 3}])
