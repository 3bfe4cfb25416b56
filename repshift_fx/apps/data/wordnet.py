"""WordNet synsets, real text with labels, from Debian's `wordnet-base` (no download).

    for synset in synsets("noun"): ...   # Synset(offset=1740, pos="n", category="noun.Tops", ...)
    items = noun_definitions(200)        # [Definition(word="river", text="a large natural stream ...", category="noun.object")]

`apt-get install wordnet-base` puts the database in /usr/share/wordnet; each synset has a gloss
(its definition, then quoted examples) and a lexicographer file, its category: 26 noun categories
and 15 verb ones (41 in all) such as noun.animal, noun.artifact or verb.motion. `synsets` is the
one reader of the data files; `noun_definitions` (tools/minilm_figures.py) and
`repshift_fx.apps.data.datasets.wordnet_definitions` (tools/evaluate.py) select from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from repshift_fx.errors import ConfigError, RepShiftError

WORDNET = Path("/usr/share/wordnet")
PARTS = ("noun", "verb", "adj", "adv")

# lexicographer file number -> name (WordNet's lexnames(5WN)); 03-28 are the noun categories, 29-43 the verb ones
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


class WordNetMissing(RepShiftError, FileNotFoundError):
    """The WordNet database is not installed where it was looked for."""


@dataclass(frozen=True)
class Synset:
    offset: int  # byte offset in its data file: unique within a part of speech
    pos: str  # "n", "v", "a", "s" or "r"
    category: str  # its lexicographer file, e.g. "noun.animal"
    words: tuple[str, ...]  # its lemmas, as written (underscores for spaces)
    definition: str  # the gloss before the quoted examples
    gloss: str  # the whole gloss


@dataclass(frozen=True)
class Definition:
    word: str  # the synset's first lemma, a single word
    text: str  # its definition (the gloss before the examples)
    category: str  # its lexicographer file, e.g. "noun.animal"


def available(path: Path = WORDNET) -> bool:
    return (path / "data.noun").is_file()


def parse_line(line: str) -> Synset | None:
    """One line of a data.* file (wndb(5WN)); None for the licence header and malformed lines.

    offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt [pointers] [frames] | gloss"""
    if line.startswith(" "):
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    if len(fields) < 5 or not fields[0].isdigit() or not fields[1].isdigit():
        return None
    count = int(fields[3], 16)
    words = tuple(fields[4:4 + 2 * count:2])
    gloss = gloss.strip()
    definition = gloss.split('; "')[0].split(' "')[0].strip().rstrip(";").strip()
    return Synset(int(fields[0]), fields[2], LEXNAMES[int(fields[1])], words, definition, gloss)


def synsets(part: str = "noun", path: Path = WORDNET) -> Iterator[Synset]:
    """Every synset of data.<part> (noun, verb, adj, adv), in file order (grouped by category)."""
    if part not in PARTS:
        raise ConfigError(f"part of speech must be one of {PARTS}, got {part!r}")
    file = Path(path) / f"data.{part}"
    if not file.is_file():
        raise WordNetMissing(f"no WordNet database in {path} ({file.name} is missing): apt-get install wordnet-base")
    with open(file, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            synset = parse_line(line)
            if synset is not None:
                yield synset


def noun_definitions(limit: int = 200, min_words: int = 6, max_words: int = 24,
                     path: Path = WORDNET) -> list[Definition]:
    """`limit` noun definitions spread evenly over the database (every k-th eligible synset):
    single-word lemmas, each word once, definitions of `min_words` to `max_words` words."""
    eligible, seen = [], set()
    for synset in synsets("noun", path):
        word = synset.words[0].lower()
        if not word.isalpha() or word in seen:
            continue
        if min_words <= len(synset.definition.split()) <= max_words:
            seen.add(word)
            eligible.append(Definition(word, synset.definition, synset.category))
    return every_kth(eligible, limit)


def every_kth(items: list, limit: int) -> list:
    """At most `limit` of `items`, spread evenly: every k-th, k = len(items) // limit (at least 1)."""
    return items[::max(1, len(items) // limit)][:limit]
