"""WordNet glosses labelled by lexicographer file: a 45-class text classification task (E7).

The data are WordNet 3.0's ``data.noun``, ``data.verb``, ``data.adj`` and ``data.adv`` from Debian's
``wordnet-base`` (in ``/usr/share/wordnet``).  Each synset line reads (wndb(5))::

    synset_offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [ptr ...] [frames ...] | gloss

The label is ``lex_filenum``, the second field (two digits, 00-44), named as in lexnames(5)
(:data:`LEXNAMES`; the package ships no ``lexnames`` file).  The text is the gloss, everything
after the first ``|``: the definition and any quoted examples (``definition_only=True`` keeps the
definition).  Lines starting with two spaces (the licence) are skipped; a gloss repeated within a
class is kept once.

Splits, per class: a fixed test set of 16 glosses and a fixed validation set of 10, drawn once
with :data:`SPLIT_SEED`, the same for every run; k-shot training (k = 16 by default) drawn from the
rest with the run's seed.  The smallest class, noun.motive, has 42 synsets: 16 + 10 + 16.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

WORDNET_DIR = Path("/usr/share/wordnet")      # Debian's wordnet-base
PACKAGE = "wordnet-base"
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change", "verb.cognition",
    "verb.communication", "verb.competition", "verb.consumption", "verb.contact", "verb.creation",
    "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social", "verb.stative",
    "verb.weather", "adj.ppl",
)
# each data file: its lexname prefix and the ss_type letters its synsets may have
FILES = {"noun": ("noun", "n"), "verb": ("verb", "v"), "adj": ("adj", "as"), "adv": ("adv", "r")}
TEST_PER_CLASS, VAL_PER_CLASS, SHOTS = 16, 10, 16
SPLIT_SEED = 20240417                         # the fixed test / validation draw


@dataclasses.dataclass(frozen=True)
class TextSplit:
    """Texts and integer labels (indices into the class names)."""

    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)


@dataclasses.dataclass(frozen=True)
class WordNetGlosses:
    """The three splits, the 45 class names, and how the training split was drawn."""

    train: TextSplit
    val: TextSplit
    test: TextSplit
    classes: tuple[str, ...]
    shots: int
    seed: int
    source: str


def _data_file(root: Path, pos: str) -> Path:
    path = root / f"data.{pos}"
    if not path.is_file():
        raise FileNotFoundError(
            f"WordNet not found: no {path}. Install Debian's package with `apt-get install {PACKAGE}` (it "
            f"puts data.noun, data.verb, data.adj and data.adv in {WORDNET_DIR}), or pass data_dir= a "
            "folder holding those four files")
    return path


def _parse_line(line: str, pos: str, where: str, definition_only: bool) -> tuple[int, str]:
    """(lex_filenum, gloss) of one synset line, checked against the file it comes from."""
    head, bar, gloss = line.partition("|")
    fields = head.split()
    if not bar or len(fields) < 4:
        raise ValueError(f"{where}: not a wndb(5) synset line (expected 'offset lex_filenum ss_type "
                         f"w_cnt ... | gloss'): {line[:80]!r}")
    offset, lex, ss_type = fields[:3]
    if not (offset.isdigit() and len(lex) == 2 and lex.isdigit()):
        raise ValueError(f"{where}: expected an 8-digit offset and a 2-digit lex_filenum, got {offset!r} {lex!r}")
    label = int(lex)
    if label >= len(LEXNAMES):
        raise ValueError(f"{where}: lex_filenum {label} is not one of WordNet's 45 (00-44)")
    prefix, types = FILES[pos]
    if not LEXNAMES[label].startswith(prefix + ".") or ss_type not in types:
        raise ValueError(f"{where}: {LEXNAMES[label]} (lex_filenum {label}, ss_type {ss_type!r}) "
                         f"does not belong in data.{pos}")
    text = gloss.strip()
    if definition_only:
        text = text.split('; "')[0].strip()
    if not text:
        raise ValueError(f"{where}: empty gloss")
    return label, text


def read_glosses(data_dir: str | Path | None = None, definition_only: bool = False) -> list[list[str]]:
    """Every gloss, by class: ``out[lex_filenum]`` lists that class's glosses in file order
    (data.noun, data.verb, data.adj, data.adv), each text once.  Raises ``FileNotFoundError``
    naming ``wordnet-base`` when a file is missing, ``ValueError`` naming file and line when a
    line is malformed."""
    root = Path(data_dir) if data_dir is not None else WORDNET_DIR
    by_class: list[dict[str, None]] = [{} for _ in LEXNAMES]      # dicts: ordered sets
    for pos in FILES:
        path = _data_file(root, pos)
        with path.open(encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if line.startswith("  ") or not line.strip():
                    continue
                label, text = _parse_line(line.rstrip("\n"), pos, f"{path}:{number}", definition_only)
                by_class[label].setdefault(text)
    return [list(texts) for texts in by_class]


def load_wordnet_glosses(shots: int = SHOTS, seed: int = 0, data_dir: str | Path | None = None, *,
                         definition_only: bool = False, test_per_class: int = TEST_PER_CLASS,
                         val_per_class: int = VAL_PER_CLASS) -> WordNetGlosses:
    """The 45-class gloss task: fixed test and validation sets, and ``shots`` training glosses per
    class drawn with ``seed`` from the rest (see the module docstring).  Each split is ordered by
    class, then by draw.

    Example::

        data = load_wordnet_glosses(shots=16, seed=1)
        data.train.texts[0], data.classes[data.train.labels[0]]    # ('the act of ...', 'noun.act')
    """
    for name, value, low in (("shots", shots, 1), ("seed", seed, 0), ("test_per_class", test_per_class, 1),
                             ("val_per_class", val_per_class, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    glosses = read_glosses(data_dir, definition_only)
    fixed = test_per_class + val_per_class
    splits: dict[str, tuple[list, list]] = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for label, texts in enumerate(glosses):
        if len(texts) < fixed + shots:
            raise ValueError(f"class {LEXNAMES[label]} has {len(texts)} glosses, fewer than the {test_per_class} "
                             f"test + {val_per_class} validation + {shots} training glosses asked for")
        order = np.random.default_rng([SPLIT_SEED, label]).permutation(len(texts))
        rest = order[fixed:]
        train = rest[np.random.default_rng([seed, label, 1]).choice(len(rest), shots, replace=False)]
        for split, idx in (("test", order[:test_per_class]), ("val", order[test_per_class:fixed]), ("train", train)):
            splits[split][0].extend(texts[i] for i in idx)
            splits[split][1].extend([label] * len(idx))
    out = {k: TextSplit(tuple(t), tuple(y)) for k, (t, y) in splits.items()}
    root = Path(data_dir) if data_dir is not None else WORDNET_DIR
    return WordNetGlosses(out["train"], out["val"], out["test"], LEXNAMES, shots, seed, str(root))
