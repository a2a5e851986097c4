"""EPIC-SOUNDS: segments of the EPIC-KITCHENS-100 videos' audio, each of one of 44 sound classes, classified; top-1
accuracy and mean average precision on `validation`.

Mirasol3B (CVPR 2024) reports 78.2% top-1 accuracy on EPIC-Sounds after fine-tuning. The test labels of
EPIC-SOUNDS are not public, so results are reported on its validation split, which this config evaluates; the
dataset also reports mAP (the mean over classes of the average precision), computed here beside it. To reproduce:

  python -m mirasol_jax.data.converters epic_sounds --annotations=ANNOTATIONS --media=MEDIA --output=OUT
  python -m mirasol_jax.main train --config=configs/paper/epic_sounds.py --workdir=W --config.data.path=OUT \\
      --config.data.media_root=MEDIA [--config.init_from=PRETRAINED]
  python -m mirasol_jax.paper W

The converter (mirasol_jax/data/converters/epic_sounds.py) writes `start`, `end`, `label` and `label_index` per
line and the 44 class names, in index order, to OUT/classes.txt. Training teaches the decoder to write the class
name; the evaluator `validation` scores every class name of classes.txt by the decoder's likelihood
(evaluators/classification.py): eval/validation/top1 is the number beside the paper's (mirasol_jax/paper.py),
top5 and mean_ap beside it. Clips are mirrored at random in training: no class depends on left and right.
`init_from` also brings the pretrained run's tokenizer.

Arguments (after the colon, comma separated): size, combiner, frames, as mirasol_jax.paper.finetune_config reads them.
"""
from mirasol_jax import paper
from mirasol_jax.evaluators import base as evaluators


def get_config(arg=None):
  evaluator = evaluators.config('classification', classes='', top_k=5, mean_ap=True)  # classes '': OUT/classes.txt
  # About 15 passes over the training segments at batch 64.
  return paper.finetune_config('epic_sounds', arg, prompt='what sound is this?', target='label',
                               eval_split='validation', evaluator=evaluator, total_steps=15_000,
                               eval_every_steps=5_000, random_flip=True)
