"""NExT-QA, multiple choice: five candidate answers per question on VidOR videos, accuracy on `validation`.

Mirasol3B (CVPR 2024) reports 72.0% top-1 accuracy on NExT-QA after fine-tuning. NExT-QA results are reported on
its validation split (val.csv), which this config evaluates. To reproduce:

  python -m mirasol_jax.data.converters next_qa --annotations=ANNOTATIONS --media=MEDIA --output=OUT
  python -m mirasol_jax.main train --config=configs/paper/next_qa.py --workdir=W --config.data.path=OUT \\
      --config.data.media_root=MEDIA [--config.init_from=PRETRAINED]
  python -m mirasol_jax.paper W

The converter (mirasol_jax/data/converters/next_qa.py) writes `question`, `options` (five), `answer` (the right
option's text), `answer_index` and `kind` (the question type: CW, CH, TN, TC, TP, DC, DL, DO) per line. Training
teaches the decoder to write the right option after the question; the evaluator `validation` scores each of the
five options by the decoder's length-normalised likelihood after the question and picks the best
(evaluators/multiple_choice.py), accuracy overall and per `kind`: eval/validation/accuracy is the number beside the
paper's (mirasol_jax/paper.py). The prompt leaves the options out: with them, question, options and answer would
not fit the 64 text tokens of the base model. `init_from` also brings the pretrained run's tokenizer.

Arguments (after the colon, comma separated): size, combiner, frames, as mirasol_jax.paper.finetune_config reads them.
"""
from mirasol_jax import paper
from mirasol_jax.evaluators import base as evaluators


def get_config(arg=None):
  evaluator = evaluators.config('multiple_choice', group_by='kind', mode='likelihood', max_options=5)
  # About 20 passes over the training questions at batch 64.
  return paper.finetune_config('next_qa', arg, prompt='{question}', target='answer', eval_split='validation',
                               evaluator=evaluator, total_steps=10_000, eval_every_steps=2_500)
