"""The Python API prints its progress as the CLI does (phases, one line per epoch) when the caller has not
configured logging, keeps quiet with verbose=False, and leaves a caller's logging to the caller."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import TINY, make_image_folder

SCRIPT = textwrap.dedent("""
    import sys
    import transferlab
    data, out, options = sys.argv[1], sys.argv[2], eval(sys.argv[3])
    print("== verbose", file=sys.stderr, flush=True)
    transferlab.train(data, out=out + "/a", **options)
    print("== quiet", file=sys.stderr, flush=True)
    transferlab.train(data, out=out + "/b", verbose=False, **options)
    print("== configured", file=sys.stderr, flush=True)
    import logging
    logging.basicConfig(level=logging.INFO, format="CALLER %(message)s")
    transferlab.train(data, out=out + "/c", **options)
""")


def test_the_api_prints_epoch_lines_unless_quiet_or_the_caller_configured_logging(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=(4, 2))
    options = {**TINY, "epochs_frozen": 2, "epochs_finetune": 1}
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(data), str(tmp_path), repr(options)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    verbose, rest = p.stderr.split("== quiet", 1)
    quiet, configured = rest.split("== configured", 1)
    assert "frozen   epoch  1" in verbose and "finetune epoch  1" in verbose and "run directory:" in verbose
    assert "epoch" not in quiet and "run directory" not in quiet
    # the caller's handler and format carry the lines; ours is not added beside it (no line twice)
    lines = [line for line in configured.splitlines() if "epoch" in line]
    assert lines and all(line.startswith("CALLER ") for line in lines)
