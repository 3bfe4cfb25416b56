"""WordNet noun definitions, real text with labels, from Debian's `wordnet-base` (no download).

    items = noun_definitions(200)        # [Definition(word="river", text="a large natural stream ...", category="noun.object")]

`apt-get install wordnet-base` puts the database in /usr/share/wordnet; each noun synset has a
gloss (its definition, then quoted examples) and a lexicographer file, one of 26 noun categories
(41 with the verbs') such as noun.animal or noun.artifact.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")

# lexicographer file number -> name (WordNet's lexnames(5WN)); 03-28 are the noun categories
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
    "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
    "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
    "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
    "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()


@dataclass(frozen=True)
class Definition:
    word: str  # the synset's first lemma, a single word
    text: str  # its definition (the gloss before the examples)
    category: str  # its lexicographer file, e.g. "noun.animal"


def available(path: Path = WORDNET) -> bool:
    return (path / "data.noun").is_file()


def _parse(line: str) -> Definition | None:
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    if len(fields) < 5 or not fields[0].isdigit():
        return None
    text = gloss.split('; "')[0].split(' "')[0].strip().rstrip(";").strip()
    return Definition(fields[4].lower(), text, LEXNAMES[int(fields[1])])


def noun_definitions(limit: int = 200, min_words: int = 6, max_words: int = 24,
                     path: Path = WORDNET) -> list[Definition]:
    """`limit` noun definitions spread evenly over the database (every k-th eligible synset):
    single-word lemmas, each word once, definitions of `min_words` to `max_words` words."""
    if not available(path):
        raise FileNotFoundError(f"no WordNet database in {path}: apt-get install wordnet-base")
    eligible, seen = [], set()
    with open(path / "data.noun", encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.startswith(" "):
                continue
            item = _parse(line)
            if item is None or not item.word.isalpha() or item.word in seen:
                continue
            if min_words <= len(item.text.split()) <= max_words:
                seen.add(item.word)
                eligible.append(item)
    stride = max(1, len(eligible) // limit)
    return eligible[::stride][:limit]
