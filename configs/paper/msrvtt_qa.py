"""MSRVTT-QA: open-ended questions on the MSR-VTT clips, answered by generation, exact-match accuracy on `test`.

Mirasol3B (CVPR 2024) reports 50.42% top-1 accuracy on the MSRVTT-QA test split after fine-tuning. To reproduce:

  python -m mirasol_jax.data.converters msrvtt_qa --annotations=ANNOTATIONS --media=MEDIA --output=OUT
  python -m mirasol_jax.main train --config=configs/paper/msrvtt_qa.py --workdir=W --config.data.path=OUT \\
      --config.data.media_root=MEDIA [--config.init_from=PRETRAINED]
  python -m mirasol_jax.paper W

The converter (mirasol_jax/data/converters/msrvtt_qa.py) writes `question`, `answer` and `kind` (the release's
question category number) per line. The evaluator `test` generates each answer and scores it by exact match after
normalisation (evaluators/vqa.py), overall and per `kind`: eval/test/accuracy is the number beside the paper's
(mirasol_jax/paper.py). `init_from` also brings the pretrained run's tokenizer.

Arguments (after the colon, comma separated): size, combiner, frames, as mirasol_jax.paper.finetune_config reads them.
"""
from mirasol_jax import paper
from mirasol_jax.evaluators import base as evaluators


def get_config(arg=None):
  # Answers are a word or two. No grounding diagnostics: they decode each question four more times.
  evaluator = evaluators.config('vqa', group_by='kind', max_new_tokens=8, diagnostics=False)
  # About 8 passes over the training questions at batch 64.
  return paper.finetune_config('msrvtt_qa', arg, prompt='{question}', target='answer', eval_split='test',
                               evaluator=evaluator, total_steps=20_000, eval_every_steps=5_000)
