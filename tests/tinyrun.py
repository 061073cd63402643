"""A tiny run directory for the stage-3 tests: the tiny model and SAE over HH-RLHF pairs plus
pairs whose text is an XSS attempt, extracted and hypothesized (seconds)."""

from __future__ import annotations

import json
from pathlib import Path

XSS = [
    {
        "id": f"xss-{i}",
        "prompt": f"<script>window.__pwned=1</script> question {i}",
        "chosen": f'<img src=x onerror="window.__pwned=2"> fine answer {i} ' + "more words here " * (i + 2),
        "rejected": f"[click](javascript:window.__pwned=3) **bold** <b>raw</b> {i}",
    }
    for i in range(8)
]
RAW = ["<script>window.__pwned", "<img src=x onerror", "<b>raw</b>"]  # must never appear unescaped


def make_run(root: Path, lm, sae, n_hh: int = 24) -> Path:
    from anatomy_nb.config import ConceptConfig, ExtractConfig, HypothesizeConfig
    from anatomy_nb.data.pairs import load_pairs
    from anatomy_nb.stages.extract import extract
    from anatomy_nb.stages.hypothesize import hypothesize

    root.mkdir(parents=True, exist_ok=True)
    hh = load_pairs("hh-rlhf", limit=n_hh)
    data = root / "pairs.jsonl"
    rows = [{k: v for k, v in p.to_dict().items() if k != "metadata"} for p in hh] + XSS
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_pairs(str(data))
    run = root / "run"
    extract(pairs, lm, sae, run, ExtractConfig(shard_size=16, progress=False))
    hypothesize(
        run,
        HypothesizeConfig(concepts=ConceptConfig(min_support=3), promoted_tokens=4, linear_baseline=False),
        model=lm,
        sae=sae,
    )
    return run
