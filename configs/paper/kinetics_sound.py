"""Kinetics-Sound: Kinetics clips of the actions that can be seen and heard, classified; top-1 accuracy on
`validation`.

Mirasol3B (CVPR 2024) reports 90.1% top-1 accuracy on Kinetics-Sound after fine-tuning. Kinetics results are
reported on its validation split (validate.csv), which this config evaluates. To reproduce:

  python -m mirasol_jax.data.converters kinetics_sound --annotations=ANNOTATIONS --media=MEDIA --output=OUT
  python -m mirasol_jax.main train --config=configs/paper/kinetics_sound.py --workdir=W --config.data.path=OUT \\
      --config.data.media_root=MEDIA [--config.init_from=PRETRAINED]
  python -m mirasol_jax.paper W

The converter (mirasol_jax/data/converters/kinetics_sound.py) writes `label` and `label_index` per line and the
31 class names, in index order, to OUT/classes.txt. Training teaches the decoder to write the class name; the
evaluator `validation` scores every class name of classes.txt by the decoder's likelihood (evaluators/
classification.py): eval/validation/top1 is the number beside the paper's (mirasol_jax/paper.py), top5 beside it.
Clips are mirrored at random in training: no class depends on left and right. `init_from` also brings the
pretrained run's tokenizer.

Arguments (after the colon, comma separated): size, combiner, frames, as mirasol_jax.paper.finetune_config reads them.
"""
from mirasol_jax import paper
from mirasol_jax.evaluators import base as evaluators


def get_config(arg=None):
  evaluator = evaluators.config('classification', classes='', top_k=5)  # classes '': OUT/classes.txt
  # About 30 passes over the training clips at batch 64.
  return paper.finetune_config('kinetics_sound', arg, prompt='what is happening?', target='label',
                               eval_split='validation', evaluator=evaluator, total_steps=10_000,
                               eval_every_steps=2_500, random_flip=True)
