"""The documented API is typed for static tools (issue #17, point 7): `from mullama_sdk import Captioner` is the
real class for mypy and IDEs, not `Any`, although the package still loads it lazily at run time."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

USER_SCRIPT = textwrap.dedent("""
    from pathlib import Path

    from mullama_sdk import Caption, Captioner, GenerationOptions, MusicVectors


    def describe(bundle: Path, audio: Path) -> str:
        with Captioner.from_pretrained(bundle) as cap:
            vectors: MusicVectors = cap.encode(audio)
            result: Caption = cap.caption(vectors, max_new_tokens=32, temperature=0)
            reveal_type(cap)
            reveal_type(result.timings.tokens_per_s)
            return result.text


    options = GenerationOptions(max_new_tokens=8)
    reveal_type(options.max_new_tokens)
""")


def test_mypy_strict_sees_the_real_types_of_the_documented_api(tmp_path):
    pytest.importorskip("mypy", reason="mypy is part of the dev extra")
    script = tmp_path / "user_app.py"
    script.write_text(USER_SCRIPT)
    # follow_imports=silent: the user's script is checked strictly; our modules are read for their types only.
    out = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-incremental",
                          "--cache-dir", str(tmp_path / "cache"), str(script)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={"PATH": "/usr/bin:/bin", "MYPYPATH": str(ROOT)})
    notes = [line for line in out.stdout.splitlines() if "Revealed type" in line]
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert not errors, out.stdout
    assert len(notes) == 3, out.stdout
    assert '"mullama_sdk.captioner.Captioner"' in notes[0], notes[0]
    assert notes[1].endswith('"float"'), notes[1]
    assert notes[2].endswith('"int | None"'), notes[2]
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
