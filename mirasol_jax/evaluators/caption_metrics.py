"""Captioning metrics: corpus-level CIDEr-D, BLEU-1..4 and ROUGE-L, as the COCO caption evaluation defines them.

Every caption (prediction or reference) is first tokenised (`tokenize`), then scored by the pure-Python scorers of
pycocoevalcap (the maintained Python 3 port of the COCO caption evaluation code):

  BLEU-n   corpus BLEU: n-gram precisions clipped by the largest count in any one reference, summed over the whole
           corpus before the geometric mean of orders 1..n, times one brevity penalty from the summed prediction
           length and the summed reference lengths, each example contributing its reference length closest to its
           prediction's length. Not a mean over examples.
  ROUGE-L  per example: the LCS-based F-measure (beta 1.2) from the largest LCS precision and the largest LCS recall
           over its references; the corpus value is the mean over examples.
  CIDEr-D  per example: tf-idf vectors of the 1..4-grams, idf from the references of the evaluated set (the number of
           examples over the number of examples with the n-gram in a reference), prediction counts clipped by the
           reference counts, a Gaussian penalty (sigma 6) on the length difference, cosine similarities averaged over
           n and references, times 10; the corpus value is the mean over examples. CIDEr needs a corpus: n-grams that
           are in every example's references weigh nothing, so a single example always scores 0, and scores from
           differently sized sets are not comparable.

The COCO evaluation tokenises with Stanford's PTBTokenizer, a Java program (so do METEOR and SPICE, which we do not
compute). `tokenize` reproduces that step in pure Python, so no Java is needed: lower case; Penn-Treebank splitting of
punctuation and clitics ("don't" -> "do n't", "can't" -> "ca n't", "man's" -> "man 's", "cannot" -> "can not",
"gonna" -> "gon na"); numbers ("3.5", "1,000", "10:30", "1/2"), hyphenated and dotted words ("t-shirt",
"www.example.com") and abbreviations ("mr.", "etc.", "u.s.", a single letter) kept whole; brackets written "-lrb-",
"-rrb-", "-lsb-", "-rsb-", "-lcb-", "-rcb-" (the COCO code removes "-LRB-", "-RRB-", "-LCB-", "-RCB-" in upper case,
after the tokenizer has lower-cased them, so all six stay in the COCO evaluation too); "!!" or "?!" one token (kept);
then the punctuation tokens the COCO code removes are removed (quotes, ". , : ; ? ! - -- ...").

On captions of ordinary English it gives what the Java tokenizer gives; where they differ:
  * "the letter a." at the end of a caption keeps "a." here; the COCO code writes all captions into one file and the
    Java tokenizer splits the full stop off when the next caption starts with a sentence-start word ("The", "A", ...).
  * Abbreviations: we keep the full stop of titles, months, weekdays, US states, company suffixes, "etc.", "vs.",
    and "no." or "fig." before a number; its list is longer, and so is its list of sentence-start words after "x."
    ("the letter a. The" -> "a .").
  * Rare forms it treats specially and we do not: SGML tags ("<b>"), HTML entities ("&amp;"), "us$5", "x@y.com?",
    "etc.The", apostrophes in forms such as "rockin'", "ol'", "'cos" or an upper-case letter after the apostrophe.
  Characters outside the Basic Multilingual Plane (emoji), which it drops, are dropped here too.

Empty predictions (or ones with nothing but punctuation) score 0 CIDEr-D and 0 ROUGE-L, and count in BLEU as a
prediction of length 0 with no matches (the COCO ROUGE-L scorer would split "" into one empty token).
"""
from __future__ import annotations

import re
from typing import Hashable, Mapping, Sequence

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

# Tokens the COCO evaluation removes after tokenising (in the case its code writes them).
COCO_REMOVED = frozenset(["''", "'", '``', '`', '-LRB-', '-RRB-', '-LCB-', '-RCB-', '.', '?', '!', ',', ':', '-', '--',
                          '...', ';'])

_A = "'\u2019"  # apostrophes
_L = r'[^\W\d_]'  # a letter
_AN = r'[^\W_]'  # a letter or a digit
_CLITIC = r'[sSmMdD]|[rR][eE]|[vV][eE]|[lL][lL]'
_SEG = rf'(?:\d+(?:[.,:]\d+)+|{_AN}+)'  # a number with separators ("3.5", "1,000", "10:30") or a run of alphanumerics
_PATTERNS = [(kind, re.compile(pattern)) for kind, pattern in [
    ('word', rf'{_SEG}(?:[-/_@!?]{_SEG})*'),  # "t-shirt", "3-year-old", "and/or", "1/2"; "hey!you"
    ('word', r'[A-Z]+(?:&[A-Z]+)+'),  # "AT&T"
    ('word', rf'{_L}{_AN}*(?:-{_AN}+)*(?:\.{_L}{_AN}*(?:-{_AN}+)*)+'),  # "www.example.com", "bike.a" (no space)
    ('word', rf"[dlnoA-HJ-XZ][{_A}]{_L}{{2,}}|{_L}*[aeiouAEIOU][{_A}][aeiouAEIOU]{_L}*|[cC][{_A}]mon"),  # "o'clock"
    ('word', rf"(?:[dDjJlL]|[yY](?=[{_A}]{_L}))[{_A}](?!(?:{_CLITIC})(?!{_AN}))"),  # "y'" of "y'all"
    ('word', r'(?:https?|ftp)://\S*[^\s.,;:!?"\')\]}]'),
    ('word', r'[\w.+-]+@[\w-]+(?:\.[\w-]+)*\.[A-Za-z]{2,}'),  # e-mail
    ('word', rf'[@#]{_L}\w*|[cCfF](?:\+\+|#)'),  # "@user", "#tag", "c++", "c#"
    ('number', r'[+-]?(?:\d+(?:[.,:]\d+)*|[.,:]\d+)'),  # "-5", "+5", ".5"
    ('acronym', rf'(?:{_L}\.)+|[pP][hH]\.[dD]\.'),  # "u.s.", "e.g.", "a.", "ph.d."
    ('clitic', rf"'(?:{_CLITIC})(?!{_AN})|\u2019(?:{_CLITIC})"),  # "'s", "'re"; curly: even before a letter
    ('tis', rf"[{_A}][tT](?=(?:[iI][sS]|[wW][aA][sS])(?!{_AN}))"),  # "'t" of "'tis", "'twas"
    ('lead', rf"[{_A}][nN][{_A}]|[{_A}](?:[eE][mM]|[tT][iI][lL][lL]?|[cC][aA][uU][sS][eE]|[nN]|\d0[sS]|\d\d)(?!{_AN})"
             r'|\u2019[nN]'),  # "'em", "'til", "'cause", "'n'", "'90s"
    ('emoticon', rf"[:;=]-?(?:[()DPdp|\[\]]|'\()(?!{_AN})"),  # ":)" -> ":-RRB-"
    ('run', r'\.{2,}|[!?]+|-{2,}|\*+|_+'),
]]
_NT = re.compile(rf"[{_A}][tT]{_L}*")  # "n't" after a word ending in n (letters after it stay with it, as in Java)
_SPLIT_WORDS = {'cannot': 3, 'gonna': 3, 'gotta': 3, 'wanna': 3, 'gimme': 3, 'lemme': 3}  # -> "can not", "gon na"
_ABBREVIATIONS = frozenset(
    'mr mrs ms messrs mme mlle dr prof gen sen rep gov pres capt col lt sgt cpl pvt maj brig adm cmdr det supt rev hon '
    'sr jr esq st mt ave blvd rd dept ft mo etc vs cf al inc co corp ltd bros assn cos plc univ intl natl '
    'jan feb mar apr jun jul aug sep sept oct nov dec mon tue tues wed thu thurs fri '
    'calif conn fla va ala ariz colo ga ind kan kans ky md mich minn mont neb nev okla tenn vt wis wisc wyo'.split())
_CAPITALISED_ABBREVIATIONS = frozenset('mass ill pa tex ark del la miss ore wash'.split())  # "Mass." but "a mass ."
_NUMBER_ABBREVIATIONS = frozenset('no nos art fig figs pp ca op tel'.split())  # "no. 5", "no.," but "say no ."
# Capitalised words after which "x." (a single letter) ends a sentence: "the letter a. The" -> "a ." but "J. Smith".
_SENTENCE_STARTS = frozenset(
    'the a an he she it they we there this that these in at but so if when while as after one some her their our you '
    'what then now here many yet other such however'.split())
_SYMBOLS = {'(': '-LRB-', ')': '-RRB-', '[': '-LSB-', ']': '-RSB-', '{': '-LCB-', '}': '-RCB-', '"': "''",
            '\u201c': '``', '\u201d': "''", '\u2018': '`', '\u2019': "'", '\u00ab': '``', '\u00bb': "''",
            '\u2013': '--', '\u2014': '--', '\u2026': '...', '\u20ac': '$', '\u00a3': '#'}
_FRACTIONS = str.maketrans({'\u00bc': ' 1/4 ', '\u00bd': ' 1/2 ', '\u00be': ' 3/4 ', '\u2153': ' 1/3 '})
_SIMPLE = re.compile(r'[a-z0-9]+')


def _abbreviation(word: str, after: str) -> bool:
  """Whether the full stop after `word` (a run of letters) belongs to it; `after` is the rest of the line after it."""
  lower = word.lower()
  if lower in _ABBREVIATIONS:
    return True
  if lower in _CAPITALISED_ABBREVIATIONS:
    return word[0].isupper()
  return lower in _NUMBER_ABBREVIATIONS and re.match(r'\s*\d|[,:;]', after) is not None


def _ends_sentence(after: str) -> bool:
  """Whether "x." (a single letter) ends a sentence, given the text after it: "the letter a. The" but "J. Smith"."""
  m = re.match(r'\s+([A-Z][A-Za-z]*)(?:\s|$)', after)
  return m is not None and m.group(1).lower() in _SENTENCE_STARTS


def _chunk_tokens(chunk: str, after: str) -> list[str]:
  """PTB tokens of one whitespace-free piece of a caption; `after` is the text following it (for full stops)."""
  if _SIMPLE.fullmatch(chunk) and chunk not in _SPLIT_WORDS:
    return [chunk]
  tokens, pos = [], 0
  while pos < len(chunk):
    kind, match = None, None
    for k, pattern in _PATTERNS:  # the longest match wins, the first pattern on a tie (as in a lexer)
      m = pattern.match(chunk, pos)
      if m and (match is None or m.end() > match.end()):
        kind, match = k, m
    if match is None:
      char = chunk[pos]
      if ord(char) <= 0xFFFF:
        tokens.append(_SYMBOLS.get(char, char))
      pos += 1
      continue
    token, pos = match.group(), match.end()
    rest = chunk[pos:] + after
    if kind == 'word' and token[-1] in 'nN' and (nt := _NT.match(chunk, pos)):
      tokens += [token[:-1]] * (len(token) > 1) + ["n'" + nt.group()[1:]]
      pos = nt.end()
    elif kind == 'word' and token.lower() in _SPLIT_WORDS and rest[:1] not in ("'", '\u2019'):
      split = _SPLIT_WORDS[token.lower()]
      tokens += [token[:split], token[split:]]
    elif kind == 'word' and rest[:1] == '.' and token.isalpha() and _abbreviation(token, rest[1:]):
      tokens.append(token + '.')
      pos += 1
    elif kind == 'acronym' and len(token) == 2 and _ends_sentence(rest):
      tokens += [token[0], '.']
    elif kind in ('clitic', 'tis'):
      tokens.append("'" + token[1:])
    elif kind == 'emoticon':
      tokens.append(token.replace('(', '-LRB-').replace(')', '-RRB-'))
    elif kind == 'run':  # "..." for 3 or more full stops, "--" for 2 or more hyphens
      tokens += ['.', '.'] if token == '..' else ['...' if token[0] == '.' else '--' if token[0] == '-' else token]
    else:
      tokens.append(token)
  return tokens


def ptb_tokens(text: str) -> list[str]:
  """The tokens Stanford's PTBTokenizer (as the COCO evaluation runs it) gives `text`, in lower case, none removed.

  Quotes, which `tokenize` removes, are not told apart as the Java tokenizer does (opening `` and `, closing '' and ').
  """
  tokens, text = [], text.translate(_FRACTIONS)
  for chunk in re.finditer(r'\S+', text):
    tokens += _chunk_tokens(chunk.group(), text[chunk.end():])
  return [token.lower() for token in tokens]


def tokenize(text: str) -> str:
  """`text` as the COCO evaluation scores it: PTB tokens in lower case, joined by single spaces, punctuation removed."""
  return ' '.join(token for token in ptb_tokens(text) if token not in COCO_REMOVED)


def score(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]], per_example: bool = False
          ) -> dict[str, float] | tuple[dict[str, float], dict[Hashable, dict[str, float]]]:
  """Corpus-level captioning metrics of `predictions` (key -> caption) against `references` (key -> captions).

  Returns {'bleu1', 'bleu2', 'bleu3', 'bleu4', 'rouge_l', 'cider'} (CIDEr-D on the COCO code's scale, 0 to 10);
  with per_example, also {key: {'cider', 'rouge_l'}}, whose means over the keys are the corpus values (BLEU is not a
  mean over examples). Both mappings must have the same keys and every key at least one reference with a word in it.
  """
  keys = list(predictions)
  if set(keys) != set(references):
    missing, extra = [k for k in references if k not in predictions], [k for k in keys if k not in references]
    raise ValueError(f'predictions and references have different keys: no prediction for {missing[:5]}, '
                     f'no references for {extra[:5]}')
  if not keys:
    raise ValueError('nothing to score: no predictions')
  hypotheses, gts = {}, {}
  for key in keys:
    prediction, refs = predictions[key], references[key]
    if not isinstance(prediction, str):
      raise TypeError(f'the prediction for {key!r} is a {type(prediction).__name__}, not a str')
    if isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
      raise TypeError(f'the references for {key!r} must be a sequence of str, got {refs!r}')
    if len(refs) == 0:
      raise ValueError(f'no references for {key!r}')
    gts[key] = [tokenize(r) for r in refs]
    if not any(gts[key]):
      raise ValueError(f'every reference for {key!r} is empty after tokenisation: {list(refs)!r}')
    hypotheses[key] = [tokenize(prediction)]
  bleu, _ = Bleu(4).compute_score(gts, hypotheses, verbose=0)
  _, rouge = Rouge().compute_score(gts, hypotheses)
  _, cider = Cider().compute_score(gts, hypotheses)
  empty = np.array([not hypotheses[key][0] for key in keys])
  rouge = np.where(empty, 0.0, rouge)  # the COCO scorer reads "" as one empty token, which matches an empty reference
  scores = {f'bleu{n + 1}': float(b) for n, b in enumerate(bleu)}
  scores.update(rouge_l=float(np.mean(rouge)), cider=float(np.mean(cider)))
  if not per_example:
    return scores
  return scores, {key: {'cider': float(c), 'rouge_l': float(r)} for key, c, r in zip(keys, cider, rouge)}
