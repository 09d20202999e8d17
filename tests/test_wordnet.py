"""WordNet glosses (tensorsam.data.wordnet): parsing small files written in the wndb(5) format,
the fixed and seeded splits, the errors, and the real files of Debian's wordnet-base if installed."""

from pathlib import Path

import pytest

from tensorsam.data import LEXNAMES, load_wordnet_glosses, read_glosses
from tensorsam.data.wordnet import WORDNET_DIR

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by  \n  2   \n"
POS = {"noun": "n", "verb": "v", "adj": "a", "adv": "r"}


def synset_line(offset: int, lex: int, pos: str, gloss: str, ss_type: str | None = None) -> str:
    """A synset line as wndb(5) lays it out: words, pointers, verb frames, then '| gloss'."""
    ss_type = ss_type or POS[pos]
    words = f"02 word_{offset} 0 other_word 1"
    pointers = f"002 @ {offset + 1:08d} {POS[pos]} 0000 ~ {offset + 2:08d} {POS[pos]} 0000"
    frames = " 01 + 02 00" if pos == "verb" else ""
    return f"{offset:08d} {lex:02d} {ss_type} {words} {pointers}{frames} | {gloss}  \n"


def write_wordnet(root: Path, per_class: int = 5, extra: dict | None = None) -> Path:
    """data.{noun,verb,adj,adv} with ``per_class`` glosses for each of the 45 classes (adj.all's
    alternating 'a' head and 's' satellite synsets), plus ``extra`` lines per file."""
    root.mkdir(parents=True, exist_ok=True)
    lines = {pos: [LICENCE] for pos in POS}
    offset = 1000
    for lex, name in enumerate(LEXNAMES):
        pos = name.split(".")[0]
        for j in range(per_class):
            ss = "s" if pos == "adj" and j % 2 else None
            lines[pos].append(synset_line(offset, lex, pos, f'gloss {j} of {name}; "an example {j}"', ss))
            offset += 10
    for pos, more in (extra or {}).items():
        lines[pos].extend(more)
    for pos, text in lines.items():
        (root / f"data.{pos}").write_text("".join(text), encoding="utf-8")
    return root


def test_lexnames_are_the_45_standard_names():
    assert len(LEXNAMES) == len(set(LEXNAMES)) == 45
    assert (LEXNAMES[0], LEXNAMES[3], LEXNAMES[16], LEXNAMES[29], LEXNAMES[43], LEXNAMES[44]) == (
        "adj.all", "noun.Tops", "noun.motive", "verb.body", "verb.weather", "adj.ppl")
    assert sum(n.startswith("noun.") for n in LEXNAMES) == 26 and sum(n.startswith("verb.") for n in LEXNAMES) == 15


def test_parses_the_wndb_format(tmp_path):
    dup = synset_line(9_000_000, 16, "noun", 'gloss 0 of noun.motive; "an example 0"')   # same text again
    root = write_wordnet(tmp_path / "wn", extra={"noun": [dup]})
    glosses = read_glosses(root)
    assert len(glosses) == 45 and all(len(g) == 5 for g in glosses)      # the repeated gloss kept once
    assert glosses[16][0] == 'gloss 0 of noun.motive; "an example 0"'
    assert glosses[0][1] == 'gloss 1 of adj.all; "an example 1"'           # an 's' satellite line
    assert read_glosses(root, definition_only=True)[35][2] == "gloss 2 of verb.contact"


def test_splits_are_fixed_and_training_follows_the_seed(tmp_path):
    root = write_wordnet(tmp_path / "wn", per_class=8)
    kw = {"data_dir": root, "shots": 3, "test_per_class": 2, "val_per_class": 1}
    a, b, a2 = (load_wordnet_glosses(seed=s, **kw) for s in (1, 2, 1))
    assert (len(a.train), len(a.val), len(a.test)) == (45 * 3, 45, 45 * 2)
    assert a.test == b.test and a.val == b.val                 # drawn once, whatever the run's seed
    assert a == a2 and a.train != b.train                      # training: the seed's draw
    assert a.classes == LEXNAMES and a.shots == 3 and a.seed == 1
    for split in (a.train, a.val, a.test):
        for text, label in zip(split.texts, split.labels):
            assert text.startswith("gloss ") and text.split(";")[0].endswith(f"of {LEXNAMES[label]}")
    assert not set(a.train.texts) & set(a.test.texts) and not set(a.train.texts) & set(a.val.texts)
    assert not set(a.val.texts) & set(a.test.texts)
    assert sorted(a.train.labels) == sorted(list(range(45)) * 3)


def test_a_missing_wordnet_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"apt-get install wordnet-base"):
        load_wordnet_glosses(data_dir=tmp_path / "nowhere")
    root = write_wordnet(tmp_path / "wn")
    (root / "data.adv").unlink()
    with pytest.raises(FileNotFoundError, match=r"data\.adv.*wordnet-base"):
        read_glosses(root)


@pytest.mark.parametrize("line,match", [
    ("00009999 05 n 01 cat 0 000 no gloss here\n", "not a wndb"),
    (synset_line(9999, 45, "noun", "x"), "not one of WordNet's 45"),
    (synset_line(9999, 35, "noun", "x"), r"verb.contact .*does not belong in data\.noun"),
    (synset_line(9999, 5, "noun", "x", ss_type="v"), "does not belong"),
    ("0000999x 05 n 01 cat 0 000 | a gloss\n", "8-digit offset"),
    (synset_line(9999, 5, "noun", " "), "empty gloss"),
], ids=["no-bar", "lex-45", "verb-in-noun", "ss-type", "offset", "empty"])
def test_a_malformed_line_is_an_error_naming_file_and_line(tmp_path, line, match):
    root = write_wordnet(tmp_path / "wn", per_class=1, extra={"noun": [line]})
    with pytest.raises(ValueError, match=match) as err:
        read_glosses(root)
    assert "data.noun:" in str(err.value)


def test_too_few_glosses_for_the_splits_name_the_class(tmp_path):
    root = write_wordnet(tmp_path / "wn", per_class=5)
    with pytest.raises(ValueError, match=r"adj.all has 5 glosses.*2 test \+ 1 validation \+ 3 training"):
        load_wordnet_glosses(data_dir=root, shots=3, test_per_class=2, val_per_class=1)
    for bad in ({"shots": 0}, {"seed": -1}, {"shots": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            load_wordnet_glosses(data_dir=root, **bad)


@pytest.fixture(scope="module")
def real():
    if not (WORDNET_DIR / "data.noun").is_file():
        pytest.skip(f"WordNet is not installed ({WORDNET_DIR}): apt-get install wordnet-base")
    return read_glosses()


def test_real_wordnet_has_45_classes_smallest_noun_motive(real):
    sizes = {LEXNAMES[i]: len(g) for i, g in enumerate(real)}
    assert min(sizes.values()) == sizes["noun.motive"] == 42 == 16 + 10 + 16
    assert sorted(sizes, key=sizes.get)[:3] == ["noun.motive", "noun.Tops", "adj.ppl"]
    assert 117_000 < sum(sizes.values()) < 117_700         # WordNet 3.0: 117,659 synsets, a few repeated glosses
    assert ("that which is perceived or known or inferred to have its own distinct existence (living or nonliving)"
            in real[LEXNAMES.index("noun.Tops")])
    data = load_wordnet_glosses(seed=1)
    assert (len(data.train), len(data.val), len(data.test)) == (45 * 16, 45 * 10, 45 * 16)
