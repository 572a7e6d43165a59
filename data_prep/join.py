"""Joins MovieLens-100k items to MovieLens-1M movies by normalised title and year.

The two data sets number their movies independently, so the ML-1M posters can only be attached
to ML-100k items through the title. Both use the same MovieLens title conventions
("Usual Suspects, The", "Seven (Se7en)", "Postino, Il"), but with small differences in
punctuation, accents, alternative titles and release year, hence the normalisation below.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import unicodedata

# Articles that MovieLens moves to the end of a title ("Usual Suspects, The"). Only the last
# comma-separated part is checked, so "I, Worst of All" or "Bye Bye, Love" are left alone.
TRAILING_ARTICLES: frozenset[str] = frozenset({
    # English
    "the", "a", "an",
    # French / Italian / Spanish / Portuguese
    "le", "la", "les", "l'", "un", "une", "il", "lo", "i", "gli", "el", "los", "las", "o", "os",
    "as", "una",
    # German / Dutch / Scandinavian
    "der", "die", "das", "den", "det", "ein", "eine", "de", "het", "een", "en", "ett",
})

_YEAR_AT_END = re.compile(r"\s*\((\d{4})\)\s*$")
_PAREN = re.compile(r"\(([^()]*)\)")
_AKA = re.compile(r"^\s*a\.?k\.?a\.?\s+", re.IGNORECASE)
_NON_ALNUM = re.compile(r"[^0-9a-z]+")


def split_title_year(title: str) -> tuple[str, int | None]:
  """Splits "Toy Story (1995)" into ("Toy Story", 1995); the year is None when absent."""
  match = _YEAR_AT_END.search(title)
  if match is None:
    return title.strip(), None
  return title[:match.start()].strip(), int(match.group(1))


def _strip_accents(text: str) -> str:
  # "Cérémonie" in one file and "Ceremonie" in another must meet.
  decomposed = unicodedata.normalize("NFKD", text)
  return "".join(c for c in decomposed if not unicodedata.combining(c))


def _move_trailing_article(text: str) -> str:
  head, sep, tail = text.rpartition(",")
  if sep and tail.strip().lower() in TRAILING_ARTICLES:
    article = tail.strip()
    # "Enfer, L'" -> "L'Enfer"; other articles are separate words.
    joiner = "" if article.endswith("'") else " "
    return f"{article}{joiner}{head.strip()}"
  return text


def normalise_title(title: str) -> str:
  """Canonical form of one title (no alternatives): article first, lowercase, no punctuation.

  "Usual Suspects, The" -> "the usual suspects"; "Cérémonie, La" -> "la ceremonie".
  """
  text = _strip_accents(title).replace("&", " and ")
  text = _move_trailing_article(text.strip())
  text = text.lower().replace("'", "")  # "L'Enfer" / "Schindler's" without a gap
  return _NON_ALNUM.sub(" ", text).strip()


def title_variants(title: str) -> tuple[str, ...]:
  """All normalised names of a title: the main one first, then each parenthesised alternative.

  "Seven (Se7en)" -> ("seven", "se7en"); "Horseman on the Roof, The (Hussard sur le toit, Le)"
  -> ("the horseman on the roof", "le hussard sur le toit"); "(a.k.a. X)" yields X.
  A trailing "(1995)" year, if present, is ignored.
  """
  title, _ = split_title_year(title)
  alternatives = [_AKA.sub("", alt) for alt in _PAREN.findall(title)]
  main = _PAREN.sub(" ", title)
  out: list[str] = []
  for name in [main, *alternatives, title]:  # the whole string last, for odd parentheses
    norm = normalise_title(name)
    if norm and norm not in out:
      out.append(norm)
  return tuple(out)


@dataclasses.dataclass
class JoinResult:
  """Outcome of matching one list of items against a reference list."""

  match: dict[int, int]                   # left id -> right id
  how: dict[int, str]                     # left id -> "exact" | "year_fallback"
  unmatched: list[int]                    # left ids without a match
  ambiguous: list[int]                    # left ids with several equally good candidates

  def report(self, titles: dict[int, str] | None = None, examples: int = 10) -> dict:
    counts = collections.Counter(self.how.values())
    out = {
        "matched_exact": counts.get("exact", 0),
        "matched_year_fallback": counts.get("year_fallback", 0),
        "unmatched": len(self.unmatched),
        "ambiguous_resolved": len(self.ambiguous),
    }
    if titles is not None:
      out["unmatched_examples"] = [f"{i}: {titles[i]}" for i in self.unmatched[:examples]]
    return out


def join_by_title(
    left: dict[int, tuple[str, int | None]],
    right: dict[int, tuple[str, int | None]],
    year_tolerance: int = 1,
    prefer_right: set[int] | None = None,
) -> JoinResult:
  """Matches each ``left`` item to one ``right`` item by normalised title and year.

  Args:
    left: id -> (title, year) of the items to annotate (ML-100k).
    right: id -> (title, year) of the reference items (ML-1M).
    year_tolerance: years of difference accepted when no exact-year match exists.
    prefer_right: right ids to prefer among several candidates (those with a poster file).

  Returns:
    A JoinResult; an item without a known year can only be unmatched.
  """
  prefer_right = prefer_right or set()
  index: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
  for rid, (title, year) in right.items():
    if year is None:
      continue
    for variant in title_variants(title):
      index[(variant, year)].append(rid)

  def best(candidates: list[int], variant_rank: dict[int, int]) -> tuple[int, bool]:
    # Main-title matches beat alternative-title matches; then poster files; then the lowest id.
    order = sorted(set(candidates), key=lambda r: (variant_rank[r], r not in prefer_right, r))
    top = order[0]
    tied = [r for r in order if (variant_rank[r], r not in prefer_right)
            == (variant_rank[top], top not in prefer_right)]
    return top, len(tied) > 1

  result = JoinResult({}, {}, [], [])
  for lid in sorted(left):
    title, year = left[lid]
    if year is None:
      result.unmatched.append(lid)
      continue
    variants = title_variants(title)
    found = False
    offsets = [0] + [d for k in range(1, year_tolerance + 1) for d in (-k, k)]
    for offset in offsets:
      rank: dict[int, int] = {}
      for position, variant in enumerate(variants):
        for rid in index.get((variant, year + offset), ()):
          rank[rid] = min(rank.get(rid, position), position)
      if rank:
        rid, tied = best(list(rank), rank)
        result.match[lid] = rid
        result.how[lid] = "exact" if offset == 0 else "year_fallback"
        if tied:
          result.ambiguous.append(lid)
        found = True
        break
    if not found:
      result.unmatched.append(lid)
  return result
