"""VGG-Sound: 10 s YouTube clips, each of one of about 300 sound classes, classified; top-1 accuracy on `test`.

Mirasol3B (CVPR 2024) reports 69.8% top-1 accuracy on VGG-Sound after fine-tuning. VGG-Sound has a train and a
test split and no validation split, so this config evaluates `test`. To reproduce:

  python -m mirasol_jax.data.converters vggsound --annotations=ANNOTATIONS --media=MEDIA --output=OUT
  python -m mirasol_jax.main train --config=configs/paper/vggsound.py --workdir=W --config.data.path=OUT \\
      --config.data.media_root=MEDIA [--config.init_from=PRETRAINED]
  python -m mirasol_jax.paper W

The converter (mirasol_jax/data/converters/vggsound.py) writes `label` and `label_index` per line and the class
names, in index order, to OUT/classes.txt. Training teaches the decoder to write the class name; the evaluator
`test` scores every class name of classes.txt by the decoder's likelihood (evaluators/classification.py):
eval/test/top1 is the number beside the paper's (mirasol_jax/paper.py), top5 beside it. Clips are mirrored at
random in training: no class depends on left and right. `init_from` also brings the pretrained run's tokenizer.

Arguments (after the colon, comma separated): size, combiner, frames, as mirasol_jax.paper.finetune_config reads them.
"""
from mirasol_jax import paper
from mirasol_jax.evaluators import base as evaluators


def get_config(arg=None):
  evaluator = evaluators.config('classification', classes='', top_k=5)  # classes '': OUT/classes.txt
  # About 10 passes over the training clips at batch 64.
  return paper.finetune_config('vggsound', arg, prompt='what makes the sound?', target='label', eval_split='test',
                               evaluator=evaluator, total_steps=30_000, eval_every_steps=5_000, random_flip=True)
