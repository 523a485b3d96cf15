"""What the example scripts share: running one public `hierdctl` command as a user would.

Each command is printed before it runs (the scripts double as tutorials) and timed into
`times[key]`. With `log_dir`, its own output goes to LOG_DIR/NN-COMMAND.log (shown only if
it fails), so that a script can end with one table of its own.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def hierdctl(*args: str, times: dict, key: str | None = None, log_dir: Path | None = None) -> None:
    print("$ hierdctl " + " ".join(shlex.quote(a) for a in args), flush=True)
    t0 = time.time()
    cmd = [sys.executable, "-m", "hierdctl.cli", *args]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "COLUMNS": "120"}
    if log_dir is None:
        p = subprocess.run(cmd, env=env)
        log = None
    else:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = log_dir / f"{len(list(log_dir.glob('*.log'))):02d}-{args[0]}.log"
        with open(log, "w") as f:
            p = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        if log is not None:
            sys.stderr.write(log.read_text()[-4000:])
        where = f" (log: {log})" if log else ""
        sys.exit(f"`hierdctl {args[0]}` failed with exit code {p.returncode}{where}")
    k = key or args[0]
    times[k] = round(times.get(k, 0.0) + time.time() - t0, 1)
