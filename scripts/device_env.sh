# Source on a bare GPU machine of the `device` tool (see docs/micro-model.md): Python wheels from .whl/ and the
# flite / espeak-ng Debian packages from .tts/ (unpacked under /tmp, never over /), for `phi4mm train --recipe micro`.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/tts && for f in .tts/*.deb; do dpkg -x "$f" /tmp/tts; done
L=/tmp/tts/usr/lib/x86_64-linux-gnu
cp .tts/libpcaudio.so.0 "$L/"  # a no-op stub: espeak-ng links pcaudio for playback, we only write WAV files
export PATH=/tmp/tts/usr/bin:$PATH LD_LIBRARY_PATH=$L:${LD_LIBRARY_PATH:-} ESPEAK_DATA_PATH=$L PYTHONUNBUFFERED=1
flite -voice slt -t ok -o /tmp/ok.wav && espeak-ng -w /tmp/ok2.wav ok || return 1
