"""Converters from the official annotation files of public benchmarks, plus a local copy of their media, into this
project's dataset folder form, keeping the official splits.

  python -m mirasol_jax.data.converters BENCHMARK --annotations=DIR --media=DIR --output=DIR

writes `{output}/train.jsonl`, `validation.jsonl`, `test.jsonl` (those the benchmark has), one example a line with
`id`, `video` (the media file, relative to the media root), optional `start` / `end` in seconds, and the task
fields: `question`, `answer`, `kind` for open-ended QA; `question`, `options`, `answer`, `answer_index`, `kind` for
multiple choice; `label`, `label_index` for classification (with `{output}/classes.txt`, the class names in index
order). Annotations whose media file is not under the media root (much of a YouTube-sourced set is gone) are left
out and counted: the report, printed and written to `{output}/conversion_report.json`, gives per split the lines
written, the media missing (with example ids) and the annotations skipped. Train on the folder with
`--config.data.path=OUTPUT --config.data.media_root=MEDIA`.

Each module's docstring names the files it expects, where their format is documented, how ids map to media file
names and how the official splits map onto train / validation / test. `CONVERTERS` maps a benchmark name to its
`convert(annotations, media, output) -> report` function.
"""
from mirasol_jax.data.converters import activitynet_qa
from mirasol_jax.data.converters import epic_sounds
from mirasol_jax.data.converters import kinetics_sound
from mirasol_jax.data.converters import msrvtt_qa
from mirasol_jax.data.converters import next_qa
from mirasol_jax.data.converters import vggsound

CONVERTERS = {
    'msrvtt_qa': msrvtt_qa.convert,
    'activitynet_qa': activitynet_qa.convert,
    'next_qa': next_qa.convert,
    'kinetics_sound': kinetics_sound.convert,
    'vggsound': vggsound.convert,
    'epic_sounds': epic_sounds.convert,
}
