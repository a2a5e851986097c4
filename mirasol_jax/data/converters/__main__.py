"""Command line: converts one benchmark, prints the report and the config overrides to train on the result.

  python -m mirasol_jax.data.converters BENCHMARK --annotations=DIR --media=DIR --output=DIR

BENCHMARK is one of msrvtt_qa, activitynet_qa, next_qa, kinetics_sound, vggsound, epic_sounds. Exits with 1 and
one line saying why, without a traceback, when the annotation files are not there, when a row of them is not of
the expected form (the line names the file, the row's line or entry and what is wrong: `common.AnnotationError`;
every file is read before any is written, so the output folder is left as it was), or when a file cannot be read
or written. Missing media is never an error.
"""
from __future__ import annotations

import argparse
import os
import sys

from mirasol_jax.data.converters import CONVERTERS
from mirasol_jax.data.converters import common


def usage(benchmark: str, report: dict) -> str:
  """How to train on the converted folder and how to pack it into shards. The benchmark's config
  (configs/paper/<benchmark>.py) names the split its paper number is reported on."""
  overrides = f'--config.data.path={report["output"]} --config.data.media_root={report["media_root"]}'
  return '\n'.join([
      'Fine-tune on it with:',
      f'  python -m mirasol_jax.main train --config=configs/paper/{benchmark}.py --workdir=WORKDIR {overrides}',
      'Pack it into ArrayRecord shards or a TFDS dataset (media bytes inside) with:',
      f'  python -m mirasol_jax.main convert --config=... {overrides} --format=array_record|tfds --output=DIR',
  ])


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog='python -m mirasol_jax.data.converters',
                                   description=__doc__.split('\n')[0])
  parser.add_argument('benchmark', choices=sorted(CONVERTERS))
  parser.add_argument('--annotations', required=True, help='folder with the official annotation files')
  parser.add_argument('--media', required=True, help='media root: the folder holding the videos (any depth)')
  parser.add_argument('--output', required=True, help='dataset folder to write')
  args = parser.parse_args(argv)
  try:
    report = CONVERTERS[args.benchmark](args.annotations, args.media, args.output)
  except (OSError, ValueError) as e:  # missing or unreadable files, common.AnnotationError, a full disk
    print(f'error: {args.benchmark}: {e}', file=sys.stderr)
    return 1
  print(common.format_report(report))
  print(f'report: {os.path.join(report["output"], common.REPORT_FILE)}')
  print(usage(args.benchmark, report))
  return 0


if __name__ == '__main__':
  sys.exit(main())
