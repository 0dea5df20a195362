"""libfluidsynth through ctypes: a fresh General MIDI synthesizer per clip, played offline.

The Debian package ``fluidsynth`` provides the library and ``fluid-soundfont-gm`` the soundfont; only the
few functions used are declared (:func:`load_libfluidsynth`). Events (:data:`Event`, made by
:mod:`examples.demo_model.rendering`) are played at their sample positions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from examples.demo_model.errors import DemoDataError
from examples.demo_model.facts import CLIP_SAMPLES
from mullama_sdk.constants import SAMPLE_RATE_HZ

#: Debian's fluid-soundfont-gm.
SOUNDFONT = Path("/usr/share/sounds/sf2/FluidR3_GM.sf2")

#: An event of a clip: (sample, order, status byte with channel, data 1, data 2); ``order`` puts
#: set-up (0) before note-offs (1) before note-ons (2) at the same sample.
Event = tuple[int, int, int, int, int]


@functools.lru_cache(maxsize=1)
def load_libfluidsynth():
    """ctypes mirror of the few libfluidsynth 2.x functions used (declarations from fluidsynth/*.h)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("fluidsynth")
    if name is None:
        raise DemoDataError("libfluidsynth not found; install it: apt-get install fluidsynth fluid-soundfont-gm")
    lib = ctypes.CDLL(name)
    P, I, D, S = ctypes.c_void_p, ctypes.c_int, ctypes.c_double, ctypes.c_char_p
    signatures = {
        # fluid_settings_t *new_fluid_settings(void);
        "new_fluid_settings": (P, []),
        # void delete_fluid_settings(fluid_settings_t *settings);
        "delete_fluid_settings": (None, [P]),
        # int fluid_settings_setnum(fluid_settings_t *settings, const char *name, double val);
        "fluid_settings_setnum": (I, [P, S, D]),
        # int fluid_settings_setint(fluid_settings_t *settings, const char *name, int val);
        "fluid_settings_setint": (I, [P, S, I]),
        # fluid_synth_t *new_fluid_synth(fluid_settings_t *settings);
        "new_fluid_synth": (P, [P]),
        # void delete_fluid_synth(fluid_synth_t *synth);
        "delete_fluid_synth": (None, [P]),
        # int fluid_synth_sfload(fluid_synth_t *synth, const char *filename, int reset_presets);
        "fluid_synth_sfload": (I, [P, S, I]),
        # int fluid_synth_noteon(fluid_synth_t *synth, int chan, int key, int vel);
        "fluid_synth_noteon": (I, [P, I, I, I]),
        # int fluid_synth_noteoff(fluid_synth_t *synth, int chan, int key);
        "fluid_synth_noteoff": (I, [P, I, I]),
        # int fluid_synth_cc(fluid_synth_t *synth, int chan, int ctrl, int val);
        "fluid_synth_cc": (I, [P, I, I, I]),
        # int fluid_synth_program_change(fluid_synth_t *synth, int chan, int program);
        "fluid_synth_program_change": (I, [P, I, I]),
        # int fluid_synth_write_float(fluid_synth_t *synth, int len, void *lout, int loff, int lincr,
        #                             void *rout, int roff, int rincr);
        "fluid_synth_write_float": (I, [P, I, P, I, I, P, I, I]),
        # fluid_log_function_t fluid_set_log_function(int level, fluid_log_function_t fun, void *data);
        "fluid_set_log_function": (P, [I, P, P]),
    }
    for fn, (restype, argtypes) in signatures.items():
        getattr(lib, fn).restype = restype
        getattr(lib, fn).argtypes = argtypes
    for level in range(5):                       # FLUID_PANIC .. FLUID_DBG: the library stays quiet
        lib.fluid_set_log_function(level, None, None)
    return lib


class _Synth:
    """One fluidsynth synthesizer with the GM soundfont loaded; renders ONE clip, then is closed.

    A fresh synthesizer per clip (about 50 ms to make) keeps every clip a function of its own events
    only: ``fluid_synth_system_reset`` leaves voices releasing and the reverb ringing. Settings are
    fixed: 24 kHz, gain 0.5, reverb on with fluidsynth's default room, chorus off, one core, samples
    loaded on demand.
    """

    def __init__(self, soundfont: Path) -> None:
        self._lib = lib = load_libfluidsynth()
        self._synth = None
        self._settings = lib.new_fluid_settings()
        for key, value in (("synth.sample-rate", float(SAMPLE_RATE_HZ)), ("synth.gain", 0.5),
                           ("synth.reverb.room-size", 0.2), ("synth.reverb.damp", 0.0),
                           ("synth.reverb.width", 0.5), ("synth.reverb.level", 0.9)):
            lib.fluid_settings_setnum(self._settings, key.encode(), value)
        for key, value in (("synth.reverb.active", 1), ("synth.chorus.active", 0), ("synth.cpu-cores", 1),
                           ("synth.dynamic-sample-loading", 1)):
            lib.fluid_settings_setint(self._settings, key.encode(), value)
        self._synth = lib.new_fluid_synth(self._settings)
        if not self._synth:
            self.close()
            raise DemoDataError("fluidsynth: new_fluid_synth failed")
        if lib.fluid_synth_sfload(self._synth, str(soundfont).encode(), 1) < 0:
            self.close()
            raise DemoDataError(f"fluidsynth cannot load the soundfont {soundfont}")

    def render(self, events: Sequence[Event], n_samples: int) -> np.ndarray:
        lib, synth = self._lib, self._synth
        if synth is None:
            raise RuntimeError("this synthesizer is closed")
        stereo = np.zeros((n_samples, 2), dtype=np.float32)
        ptr = stereo.ctypes.data
        pos = 0
        for sample, _, status, d1, d2 in [*events, (n_samples, 9, 0, 0, 0)]:
            sample = min(sample, n_samples)
            if sample > pos:
                if lib.fluid_synth_write_float(synth, sample - pos, ptr, 2 * pos, 2, ptr, 2 * pos + 1, 2) != 0:
                    raise DemoDataError("fluidsynth: fluid_synth_write_float failed")
                pos = sample
            kind, ch = status & 0xF0, status & 0x0F
            if kind == 0x90:
                lib.fluid_synth_noteon(synth, ch, d1, d2)
            elif kind == 0x80:
                lib.fluid_synth_noteoff(synth, ch, d1)
            elif kind == 0xB0:
                lib.fluid_synth_cc(synth, ch, d1, d2)
            elif kind == 0xC0:
                lib.fluid_synth_program_change(synth, ch, d1)
        self.close()
        return stereo.mean(axis=1, dtype=np.float64)

    def close(self) -> None:
        if self._synth:
            self._lib.delete_fluid_synth(self._synth)
            self._synth = None
        if self._settings:
            self._lib.delete_fluid_settings(self._settings)
            self._settings = None


def synthesize(events: Sequence[Event], soundfont: Path = SOUNDFONT, n_samples: int = CLIP_SAMPLES) -> np.ndarray:
    """Mono float64 audio of ``events`` (sorted; sample positions past ``n_samples`` are clamped),
    rendered by a fresh fluidsynth synthesizer."""
    synth = _Synth(Path(soundfont))
    try:
        return synth.render(events, n_samples)
    finally:
        synth.close()
