"""A TFDS dataset (`array_record` files, no TensorFlow needed) built from a jsonl dataset folder, and its source.

`prepare(folder, data_dir)` writes every split of the folder (`train.jsonl`, `validation.jsonl`, `test.jsonl`) with
the media bytes inside; `TfdsSource(data_dir, split)` (config.data.source='tfds') reads it through `tfds` random access and gives the same
records, in the same order, as the jsonl folder. Media stay encoded and are decoded in the grain pipeline.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds

from mirasol_jax.data import sources

NAME = 'mirasol_dataset'
SPLITS = ('train', 'validation', 'test')
TEXT_FIELDS = ('id', 'title', 'question', 'answer', 'caption', 'label', 'kind', 'error', 'video_name')
# Fields with a feature of their own; every other field of a record travels as JSON in `extra_json`.
_STORED = TEXT_FIELDS + ('video_bytes', 'options', 'start', 'end')


class MirasolDataset(tfds.core.GeneratorBasedBuilder):
  """Contract-1 examples with their media bytes. Built with `prepare`, never downloaded."""
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.1.0': 'every other field of a record (captions, answer_index, ...) kept in extra_json'}

  def __init__(self, *, source_folder: str | None = None, media_root: str | None = None,
               allow_outside_media: bool = False, max_media_bytes: int = 0, **kwargs):
    self._source_folder, self._media_root = source_folder, media_root
    self._allow_outside_media, self._max_media_bytes = allow_outside_media, max_media_bytes
    super().__init__(file_format='array_record', **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    bytes_feature = lambda: tfds.features.Tensor(shape=(), dtype=np.object_)
    features = {name: bytes_feature() for name in TEXT_FIELDS + ('video_bytes', 'options_json', 'extra_json')}
    features.update(start=tfds.features.Scalar(dtype=np.float32), end=tfds.features.Scalar(dtype=np.float32))
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                 disable_shuffling=True)  # keep the jsonl order

  def _split_generators(self, dl_manager):
    del dl_manager
    if self._source_folder is None:
      raise ValueError('MirasolDataset is built from a folder: use mirasol_jax.data.tfds_source.prepare()')
    return {split: self._generate_examples(split) for split in SPLITS
            if os.path.exists(os.path.join(self._source_folder, f'{split}.jsonl'))}

  def _generate_examples(self, split: str):
    source = sources.JsonlSource(self._source_folder, split, self._media_root, self._allow_outside_media)
    for index in range(len(source)):
      record = sources.decode_record(sources.encode_record(source[index], self._max_media_bytes))
      example = {name: str(record.get(name) or '').encode() for name in TEXT_FIELDS}
      example['video_bytes'] = record.get('video_bytes') or b''
      example['options_json'] = json.dumps(record['options']).encode() if record.get('options') else b''
      extra = {k: v for k, v in record.items() if k not in _STORED}
      example['extra_json'] = json.dumps(extra).encode() if extra else b''
      for bound in ('start', 'end'):
        example[bound] = float(record[bound]) if record.get(bound) is not None else math.nan
      yield index, example


def prepare(folder: str, data_dir: str, media_root: str | None = None, allow_outside_media: bool = False,
            max_media_bytes: int = 0, overwrite: bool = False) -> str:
  """Builds the TFDS dataset of `folder` (media relative to media_root, default the folder) under `data_dir`: a
  no-op if it is already there, unless `overwrite` (TFDS then deletes the earlier build before writing the new
  one). Media outside the folder and media files that are not regular files are not embedded (see
  sources.write_array_record)."""
  builder = MirasolDataset(source_folder=folder, media_root=media_root, allow_outside_media=allow_outside_media,
                           max_media_bytes=max_media_bytes, data_dir=data_dir)
  mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite else None
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode) if mode else None)
  return builder.data_dir


class TfdsSource(grain.sources.RandomAccessDataSource):
  """Records of a prepared MirasolDataset split, in the form every source yields."""

  def __init__(self, data_dir: str, split: str):
    builder = MirasolDataset(data_dir=data_dir)
    if not os.path.exists(os.path.join(builder.data_dir, 'dataset_info.json')):
      raise FileNotFoundError(f'no prepared {NAME} dataset in {data_dir!r}; build one with '
                              f'`python -m mirasol_jax.main convert --format=tfds`')
    self._source = builder.as_data_source(split)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    """The stored example as a record, checked (sources.check_record); one that cannot be read is an error record."""
    where = f'record {index}'
    try:
      raw = self._source[index]
      record = {name: raw[name].decode() for name in TEXT_FIELDS if raw[name]}
      if raw['video_bytes']:
        record['video_bytes'] = raw['video_bytes']
      if raw['options_json']:
        record['options'] = json.loads(raw['options_json'])
      if raw['extra_json']:
        extra = json.loads(raw['extra_json'])
        # The fields a source sets (media, the pipeline's tags) never come from the stored extras.
        record.update({k: v for k, v in extra.items() if k not in sources.RESERVED_FIELDS or k == 'error_kind'}
                      if isinstance(extra, dict) else {'error': f'{where}: extra_json is not a map'})
      for bound in ('start', 'end'):
        if not math.isnan(raw[bound]):
          record[bound] = float(raw[bound])
    except Exception as e:  # damaged storage: invalid UTF-8 or JSON, a reader error
      return {'id': where, 'error': f'{where}: cannot be read ({type(e).__name__}: {e})'[:500],
              'error_kind': 'bad_record'}
    return sources.check_record(record, where)

  def __repr__(self) -> str:
    return f'TfdsSource({self._source!r})'


sources.register('tfds', lambda data_config, split: TfdsSource(sources.dataset_folder(data_config), split))
