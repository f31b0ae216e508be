"""`lmk ensemble RUN... -o DIR`: several fine-tuned classifiers (runs or model directories) as one model
directory whose predictions average the members' probabilities (`models/ensemble.py`). DIR holds a copy
of every member, so it moves as one; `LLM(DIR)`, `lmk eval classify DIR` and `lmk serve
--embedding-model DIR` load it like any model."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lmkernel.errors import LmkError
from lmkernel.loader.hf_export import prepare_output, publish
from lmkernel.loading import load_model
from lmkernel.registry import ENSEMBLE_FILE, resolve


def make_ensemble(members: Sequence[str], output: Path, overwrite: bool = False) -> Path:
    """Copy the members' models into `output/members/N` beside an ensemble.json, check that they load as
    one (the same labels and tokenizer), and publish the directory whole."""
    if len(members) < 2:
        raise LmkError(f"an ensemble needs two or more members; got {len(members)}")
    sources = [resolve(m) for m in members]
    for name, source in zip(members, sources):
        if source.kind not in ("hf_dir", "lora_adapter"):
            raise LmkError(f"{name}: an ensemble member must be a fine-tuned classifier directory (a run or a model "
                           f"directory); this is a {source.kind}")
    prepare_output(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        names = []
        for i, source in enumerate(sources):
            names.append(f"members/{i}")
            shutil.copytree(source.path, tmp / names[-1])
        (tmp / ENSEMBLE_FILE).write_text(json.dumps({"members": names, "combine": "mean probability",
                                                     "from": [str(m) for m in members]}, indent=2) + "\n")
        load_model(tmp, quantization=None)  # refuses members that do not fit together, naming them
        publish(tmp, output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output
