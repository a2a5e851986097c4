"""ActivityNet-QA: open-ended questions on long ActivityNet videos, answered by generation, exact-match accuracy on
`test`.

Mirasol3B (CVPR 2024) reports 51.13% top-1 accuracy on the ActivityNet-QA test split after fine-tuning. To
reproduce:

  python -m mirasol_jax.data.converters activitynet_qa --annotations=ANNOTATIONS --media=MEDIA --output=OUT
  python -m mirasol_jax.main train --config=configs/paper/activitynet_qa.py --workdir=W --config.data.path=OUT \\
      --config.data.media_root=MEDIA [--config.init_from=PRETRAINED]
  python -m mirasol_jax.paper W

The converter (mirasol_jax/data/converters/activitynet_qa.py) writes `question`, `answer` and `kind` (motion,
spatial, temporal, yes_no, color, object, location, number, other) per line. The evaluator `test` generates each
answer and scores it by exact match after normalisation (evaluators/vqa.py), overall and per `kind`:
eval/test/accuracy is the number beside the paper's (mirasol_jax/paper.py). The videos last minutes: more frames
(`frames=`) cover them more densely at the same parameter count. `init_from` also brings the pretrained run's
tokenizer.

Arguments (after the colon, comma separated): size, combiner, frames, as mirasol_jax.paper.finetune_config reads them.
"""
from mirasol_jax import paper
from mirasol_jax.evaluators import base as evaluators


def get_config(arg=None):
  # Answers are short. No grounding diagnostics: they decode each question four more times.
  evaluator = evaluators.config('vqa', group_by='kind', max_new_tokens=8, diagnostics=False)
  # About 20 passes over the training questions at batch 64.
  return paper.finetune_config('activitynet_qa', arg, prompt='{question}', target='answer', eval_split='test',
                               evaluator=evaluator, total_steps=10_000, eval_every_steps=2_500)
