"""Captioning metrics: the Java-free COCO tokenisation, and BLEU, ROUGE-L and CIDEr-D against independent
implementations of their definitions on a small fixture."""
import collections
import math

import numpy as np
import pytest

from mirasol_jax.evaluators import caption_metrics

# Shorter than their closest references in all (18 words against 19), so BLEU's brevity penalty applies; clip2's
# closest reference length is a tie (3 or 5 words: the shorter counts); clip1 repeats n-grams beyond their reference
# counts (clipping).
PREDICTIONS = {
    'clip0': 'A man is slicing.',
    'clip1': 'a dog on the beach on the beach',
    'clip2': 'Two people are dancing.',
    'clip3': 'Playing guitar.',
}
REFERENCES = {
    'clip0': ['A man slices a tomato on a cutting board.', 'Someone is cutting a tomato.',
              'A man is slicing a red tomato with a knife.'],
    'clip1': ['A dog is running along the beach.', 'The dog runs on the sand.'],
    'clip2': ['Two people dance on stage.', 'A couple is dancing on a stage.', 'Two dancers perform on a stage.',
              'People are dancing.'],
    'clip3': ['A girl plays a guitar.', 'A woman is playing a guitar and singing.',
              'A woman plays the guitar on a sofa.', 'Someone is playing guitar.', 'A lady strums a guitar.'],
}
# The fixture's metric values (as the implementations below compute them).
EXPECTED = {'bleu1': 0.840853, 'bleu2': 0.753759, 'bleu3': 0.544276, 'bleu4': 0.384201, 'rouge_l': 0.644733,
            'cider': 1.630019}


def _words(caption):  # the tokenisation of the fixture's captions: lower case, no full stops
  return caption.lower().replace('.', '').split()


def _ngrams(words, n):
  return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))


def _bleu(hypotheses, references, max_n=4):
  """Corpus BLEU-1..max_n: clipped n-gram counts summed over the corpus, the closest reference length (the shorter
  on a tie) for the brevity penalty."""
  correct, total = np.zeros(max_n), np.zeros(max_n)
  hyp_length = ref_length = 0
  for hyp, refs in zip(hypotheses, references):
    hyp_length += len(hyp)
    ref_length += min((len(r) for r in refs), key=lambda length: (abs(length - len(hyp)), length))
    for n in range(1, max_n + 1):
      most = collections.Counter()
      for r in refs:
        most |= _ngrams(r, n)  # the largest count in any one reference
      correct[n - 1] += sum(min(count, most[g]) for g, count in _ngrams(hyp, n).items())
      total[n - 1] += max(len(hyp) - n + 1, 0)
  penalty = min(1.0, math.exp(1 - ref_length / hyp_length))
  return [penalty * math.exp(np.mean(np.log(correct[:n] / total[:n]))) for n in range(1, max_n + 1)]


def _lcs(a, b):
  table = np.zeros((len(a) + 1, len(b) + 1), int)
  for i, x in enumerate(a):
    for j, y in enumerate(b):
      table[i + 1, j + 1] = table[i, j] + 1 if x == y else max(table[i, j + 1], table[i + 1, j])
  return table[-1, -1]


def _rouge_l(hyp, refs, beta=1.2):
  precision = max(_lcs(hyp, r) / len(hyp) for r in refs)
  recall = max(_lcs(hyp, r) / len(r) for r in refs)
  return (1 + beta**2) * precision * recall / (recall + beta**2 * precision) if precision and recall else 0.0


def _cider_d(hypotheses, references, sigma=6.0):
  """Per-example CIDEr-D: tf-idf vectors over each order's n-gram vocabulary, idf from the references."""
  scores = np.zeros((len(hypotheses), 4))
  for n in range(1, 5):
    vocabulary = sorted({g for refs in references for r in refs for g in _ngrams(r, n)} |
                        {g for hyp in hypotheses for g in _ngrams(hyp, n)})
    index = {g: i for i, g in enumerate(vocabulary)}

    def counts(words):
      vector = np.zeros(len(vocabulary))
      for g, count in _ngrams(words, n).items():
        vector[index[g]] = count
      return vector

    in_refs = np.array([np.max([counts(r) for r in refs], axis=0) > 0 for refs in references])
    idf = np.log(len(references)) - np.log(np.maximum(in_refs.sum(0), 1))
    for i, (hyp, refs) in enumerate(zip(hypotheses, references)):
      h = counts(hyp) * idf
      for r in refs:
        v = counts(r) * idf
        norms = np.linalg.norm(h) * np.linalg.norm(v)
        similarity = np.sum(np.minimum(h, v) * v) / norms if norms else 0.0
        scores[i, n - 1] += similarity * np.exp(-(len(hyp) - len(r))**2 / (2 * sigma**2)) / len(refs)
  return 10 * scores.mean(1)


def test_fixture_matches_independent_implementations():
  keys = list(PREDICTIONS)
  hypotheses = [_words(PREDICTIONS[k]) for k in keys]
  references = [[_words(r) for r in REFERENCES[k]] for k in keys]
  for k in keys:  # the fixture's tokenisation is the simple one above
    assert caption_metrics.tokenize(PREDICTIONS[k]).split() == _words(PREDICTIONS[k])
    assert [caption_metrics.tokenize(r).split() for r in REFERENCES[k]] == [_words(r) for r in REFERENCES[k]]

  scores, per_example = caption_metrics.score(PREDICTIONS, REFERENCES, per_example=True)
  bleu = _bleu(hypotheses, references)
  for n in range(4):
    assert scores[f'bleu{n + 1}'] == pytest.approx(bleu[n], rel=1e-6)
  rouge = [_rouge_l(h, r) for h, r in zip(hypotheses, references)]
  cider = _cider_d(hypotheses, references)
  assert [per_example[k]['rouge_l'] for k in keys] == pytest.approx(rouge, rel=1e-9)
  assert [per_example[k]['cider'] for k in keys] == pytest.approx(cider, rel=1e-9)
  assert scores['rouge_l'] == pytest.approx(np.mean(rouge), rel=1e-9)
  assert scores['cider'] == pytest.approx(np.mean(cider), rel=1e-9)
  for name, value in EXPECTED.items():
    assert scores[name] == pytest.approx(value, abs=1e-6), name
  assert caption_metrics.score(PREDICTIONS, REFERENCES) == scores


def test_identical_prediction_and_references():
  captions = {'a': 'A man is slicing a tomato.', 'b': 'A dog runs on the beach.', 'c': 'Two people are dancing.'}
  scores = caption_metrics.score(captions, {k: [v, v] for k, v in captions.items()})
  assert scores['bleu4'] == pytest.approx(1.0, abs=1e-6)
  assert scores['rouge_l'] == pytest.approx(1.0)
  other = {'a': ['Someone cuts a tomato.', captions['a']], 'b': ['A dog on a beach.', captions['b']],
           'c': ['People dance.', captions['c']]}
  scores = caption_metrics.score(captions, other)  # one reference the same: ROUGE-L and BLEU still 1
  assert scores['bleu4'] == pytest.approx(1.0, abs=1e-6) and scores['rouge_l'] == pytest.approx(1.0)


def test_cider_needs_a_corpus():
  # On a single example every reference n-gram is in every example's references: idf 0, CIDEr-D 0.
  scores = caption_metrics.score({'a': 'a man is slicing a tomato'}, {'a': ['a man is slicing a tomato']})
  assert scores['cider'] == 0.0 and scores['rouge_l'] == pytest.approx(1.0)


@pytest.mark.parametrize('text, tokens', [
    ("A man don't like the colour (red) of his car.", "a man do n't like the colour -lrb- red -rrb- of his car"),
    ("She can't, won't and shouldn't; they'd've gone!", "she ca n't wo n't and should n't they 'd 've gone"),
    ("The dog's bone & the cats' toys.", "the dog 's bone & the cats toys"),
    ('"Quoted" text, and \'single quotes\'...', 'quoted text and single quotes'),
    ("I'm gonna say: cannot.", "i 'm gon na say can not"),
    ('Mr. Smith lives in the U.S. A t-shirt costs $5.50 -- 50% off!',
     'mr. smith lives in the u.s. a t-shirt costs $ 5.50 50 % off'),
    ("It's 3.5 kg, 1,000 people, at 10:30 and 1/2 cup.", "it 's 3.5 kg 1,000 people at 10:30 and 1/2 cup"),
    ("WOW!! What?! At 5 o'clock?", "wow !! what ?! at 5 o'clock"),
    ('A dog.The cat [sits] {here}.', 'a dog.the cat -lsb- sits -rsb- -lcb- here -rcb-'),
    ('etc., e.g. vs. J. Smith and the letter a. The end', 'etc. e.g. vs. j. smith and the letter a the end'),
    ('the letter a.', 'the letter a.'),
    ('it\u2019s don\u2019t \u201ccurly\u201d \u2014 dash\u2026', "it 's do n't curly dash"),
    ('  Hello\tWORLD  ', 'hello world'),
    ('...', ''),
    ('', ''),
])
def test_tokenize_as_the_coco_evaluation(text, tokens):
  # Expected values: the Java PTBTokenizer of the COCO evaluation, then its punctuation removal.
  assert caption_metrics.tokenize(text) == tokens


def test_empty_prediction_scores_zero():
  predictions = dict(PREDICTIONS, clip1='', clip2='...')
  scores, per_example = caption_metrics.score(predictions, REFERENCES, per_example=True)
  for key in ('clip1', 'clip2'):
    assert per_example[key] == {'cider': 0.0, 'rouge_l': 0.0}
  # An empty reference next to others is kept (as the COCO code keeps it); it cannot make "" match.
  scores = caption_metrics.score(predictions, dict(REFERENCES, clip1=['', 'The dog runs.']), per_example=True)[1]
  assert scores['clip1'] == {'cider': 0.0, 'rouge_l': 0.0}
  keys = list(PREDICTIONS)
  bleu = _bleu([_words(predictions[k]) for k in keys], [[_words(r) for r in REFERENCES[k]] for k in keys])
  assert caption_metrics.score(predictions, REFERENCES)['bleu2'] == pytest.approx(bleu[1], rel=1e-6)


def test_input_errors():
  with pytest.raises(ValueError, match="no prediction for \\['clip3'\\]"):
    caption_metrics.score({k: v for k, v in PREDICTIONS.items() if k != 'clip3'}, REFERENCES)
  with pytest.raises(ValueError, match="no references for \\['extra'\\]"):
    caption_metrics.score(dict(PREDICTIONS, extra='a cat'), REFERENCES)
  with pytest.raises(ValueError, match="no references for 'clip1'"):
    caption_metrics.score(PREDICTIONS, dict(REFERENCES, clip1=[]))
  with pytest.raises(ValueError, match="every reference for 'clip2' is empty"):
    caption_metrics.score(PREDICTIONS, dict(REFERENCES, clip2=['', '...']))
  with pytest.raises(TypeError, match="references for 'clip0'"):
    caption_metrics.score(PREDICTIONS, dict(REFERENCES, clip0='a man slices a tomato'))
  with pytest.raises(TypeError, match="prediction for 'clip0'"):
    caption_metrics.score(dict(PREDICTIONS, clip0=None), REFERENCES)
  with pytest.raises(ValueError, match='nothing to score'):
    caption_metrics.score({}, {})
