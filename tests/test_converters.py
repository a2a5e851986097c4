"""Benchmark converters: tiny fixtures in each official annotation format, real mp4 media, missing files counted;
malformed rows stop the conversion with the file, the line and the reason, writing nothing."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest

from conftest import REPO
from mirasol_jax.data import demo_data
from mirasol_jax.data import sources
from mirasol_jax.data.converters import CONVERTERS
from mirasol_jax.data.converters import common
from mirasol_jax.data.converters import epic_sounds
from mirasol_jax.data.converters import kinetics_sound


@pytest.fixture(scope='module')
def clip(tmp_path_factory):
  """One real tiny mp4 (8 frames of 32x32 at 8 fps, 1 s of sound) that the media folders copy."""
  path = str(tmp_path_factory.mktemp('clip') / 'clip.mp4')
  frames = np.random.default_rng(0).integers(0, 255, (8, 32, 32, 3), dtype=np.uint8)
  audio = 0.3 * np.sin(2 * np.pi * 440 * np.arange(demo_data.SAMPLE_RATE) / demo_data.SAMPLE_RATE)[None]
  demo_data.write_mp4(path, frames, 8, audio.astype(np.float32))
  return path


def make_media(root, clip, names):
  """Copies the clip to each relative path under `root`."""
  for name in names:
    os.makedirs(os.path.dirname(os.path.join(root, name)) or root, exist_ok=True)
    shutil.copy(clip, os.path.join(root, name))


def write_json(path, value):
  with open(path, 'w') as f:
    json.dump(value, f)


def write_csv(path, rows, header=None):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    if header:
      writer.writerow(header)
    writer.writerows(rows)


def read_split(output, split):
  with open(os.path.join(output, f'{split}.jsonl')) as f:
    return [json.loads(line) for line in f]


def folders(tmp_path):
  paths = [str(tmp_path / name) for name in ('annotations', 'media', 'output')]
  for path in paths[:2]:
    os.makedirs(path)
  return paths


def check_common(report, output, media, written, missing):
  """Split files, report file and media paths agree with `written` and `missing` (split -> count)."""
  assert {split: s['written'] for split, s in report['splits'].items()} == written
  assert {split: s['missing'] for split, s in report['splits'].items() if s['missing']} == missing
  with open(os.path.join(output, common.REPORT_FILE)) as f:
    assert json.load(f) == report
  for split in common.SPLITS:
    assert os.path.exists(os.path.join(output, f'{split}.jsonl')) == (split in written)
  for split in written:
    lines = read_split(output, split)
    assert len(lines) == written[split]
    for line in lines:
      assert isinstance(line['id'], str) and list(line)[:2] == ['id', 'video']
      assert os.path.isfile(os.path.join(media, line['video'])), line
    # As the training pipeline reads it: config.data.path = the output, config.data.media_root = the media root.
    source = sources.open_source(dict(source='jsonl', path=output, media_root=media), split)
    assert len(source) == written[split]
    assert all('error' not in source[i] and os.path.isfile(source[i]['video_path']) for i in range(len(source)))


def test_msrvtt_qa(tmp_path, clip):
  annotations, media, output = folders(tmp_path)
  entry = lambda i, video, category: dict(answer=f'answer{i}', category_id=category, id=i, question=f'what {i}?',
                                         video_id=video)
  write_json(f'{annotations}/train_qa.json', [entry(0, 0, 0), entry(1, 0, 1), entry(2, 1, 2), entry(3, 9, 0)])
  write_json(f'{annotations}/val_qa.json', [entry(4, 2, 3)])
  write_json(f'{annotations}/test_qa.json', [entry(5, 3, 4), entry(6, 3, 0), entry(7, 8, 1)])
  make_media(media, clip, ['TrainValVideo/video0.mp4', 'TrainValVideo/video1.mp4', 'TrainValVideo/video2.webm',
                           'TestVideo/video3.mp4', 'TestVideo/video30.mp4'])
  report = CONVERTERS['msrvtt_qa'](annotations, media, output)
  check_common(report, output, media, dict(train=3, validation=1, test=2), dict(train=1, test=1))
  assert report['splits']['train']['missing_examples'] == ['3']
  train = read_split(output, 'train')
  assert train[0] == dict(id='0', video='TrainValVideo/video0.mp4', question='what 0?', answer='answer0', kind='0')
  assert [line['kind'] for line in train] == ['0', '1', '2']
  assert read_split(output, 'validation')[0]['video'] == 'TrainValVideo/video2.webm'
  assert [line['video'] for line in read_split(output, 'test')] == ['TestVideo/video3.mp4'] * 2
  assert not os.path.exists(os.path.join(output, common.CLASSES_FILE))


def test_activitynet_qa(tmp_path, clip):
  annotations, media, output = folders(tmp_path)
  videos = {'train': ['TIEzvhv6xaI', '-7wfTI8Qv1Q', 'gone_video1'], 'val': ['x_FAc0KqMVw'], 'test': ['7X3wPRKuAsU']}
  for split, names in videos.items():
    questions = [dict(video_name=v, question=f'is it {i}', question_id=f'v_{v}_{i}') for i, v in enumerate(names)]
    answers = [dict(answer='yes' if i % 2 else 'no', type=(3, 0, 8)[i % 3], question_id=f'v_{v}_{i}')
               for i, v in enumerate(names)]
    write_json(f'{annotations}/{split}_q.json', questions)
    write_json(f'{annotations}/{split}_a.json', answers[::-1])  # joined by question_id, not by position
  make_media(media, clip, ['v1-3/train_val/v_TIEzvhv6xaI.mp4', 'v1-3/train_val/v_-7wfTI8Qv1Q.mkv',
                           'v1-3/train_val/x_FAc0KqMVw.mp4', 'v1-3/test/v_7X3wPRKuAsU.MP4'])
  report = CONVERTERS['activitynet_qa'](annotations, media, output)
  check_common(report, output, media, dict(train=2, validation=1, test=1), dict(train=1))
  assert report['splits']['train']['missing_examples'] == ['v_gone_video1_2']
  train = read_split(output, 'train')
  assert train[0] == dict(id='v_TIEzvhv6xaI_0', video='v1-3/train_val/v_TIEzvhv6xaI.mp4', question='is it 0',
                          answer='no', kind='yes_no')
  assert train[1]['video'] == 'v1-3/train_val/v_-7wfTI8Qv1Q.mkv' and train[1]['kind'] == 'motion'
  assert read_split(output, 'validation')[0]['video'] == 'v1-3/train_val/x_FAc0KqMVw.mp4'  # no v_ prefix
  assert read_split(output, 'test')[0]['video'] == 'v1-3/test/v_7X3wPRKuAsU.MP4'


def test_activitynet_qa_without_test_answers(tmp_path, clip):
  annotations, media, output = folders(tmp_path)
  write_json(f'{annotations}/test_q.json', [dict(video_name='abc', question='what', question_id='v_abc_0')])
  make_media(media, clip, ['v_abc.mp4'])
  report = CONVERTERS['activitynet_qa'](annotations, media, output)
  assert read_split(output, 'test') == [dict(id='v_abc_0', video='v_abc.mp4', question='what')]
  assert any('test_a.json not found' in note for note in report['notes'])


NEXT_QA_HEADER = ['video', 'frame_count', 'width', 'height', 'question', 'answer', 'qid', 'type', 'a0', 'a1', 'a2',
                  'a3', 'a4']


def test_next_qa(tmp_path, clip):
  annotations, media, output = folders(tmp_path)
  options = ['roll the handle', 'tap their feet', 'strum the string', 'hit with sticks', 'pat with hand']
  write_csv(f'{annotations}/train.csv', [
      ['4010069381', 369, 640, 480, 'how do the two man play the instrument', 2, 6, 'CH', *options],
      ['4010069381', 369, 640, 480, 'why did the boy pick up one present', 0, 1, 'CW', *options],
      ['4882821564', 2697, 640, 480, 'where is this video taken', 4, 4, 'DL', *options],
      ['9999999999', 100, 640, 480, 'what happens at the end', 1, 0, 'TN', *options]], NEXT_QA_HEADER)
  write_csv(f'{annotations}/val.csv', [['2435100235', 1906, 640, 480, 'how many people', 3, 7, 'DC', *options]],
            NEXT_QA_HEADER)
  write_csv(f'{annotations}/test.csv', [['2834146886', 1881, 496, 370, 'what does the dog do after', 1, 8, 'TN',
                                         *options]], NEXT_QA_HEADER)
  write_json(f'{annotations}/map_vid_vidorID.json', {'4010069381': '1006/4010069381', '4882821564': '0016/4882821564',
                                                     '2435100235': '1101/2435100235'})
  make_media(media, clip, ['NExTVideo/1006/4010069381.mp4', 'NExTVideo/0016/4882821564.mp4',
                           'elsewhere/2435100235.mp4', 'other/2834146886.mp4'])
  report = CONVERTERS['next_qa'](annotations, media, output)
  check_common(report, output, media, dict(train=3, validation=1, test=1), dict(train=1))
  assert report['splits']['train']['missing_examples'] == ['9999999999_0']
  train = read_split(output, 'train')
  assert train[0] == dict(id='4010069381_6', video='NExTVideo/1006/4010069381.mp4',
                          question='how do the two man play the instrument', options=options,
                          answer='strum the string', answer_index=2, kind='CH')
  assert [(line['answer_index'], line['answer'], line['kind']) for line in train[1:]] == [
      (0, 'roll the handle', 'CW'), (4, 'pat with hand', 'DL')]
  assert read_split(output, 'validation')[0]['video'] == 'elsewhere/2435100235.mp4'  # by id, not at the mapped path
  assert read_split(output, 'test')[0]['id'] == '2834146886_8'


KINETICS_HEADER = ['label', 'youtube_id', 'time_start', 'time_end', 'split']


def test_kinetics_sound(tmp_path, clip):
  annotations, media, output = folders(tmp_path)
  write_csv(f'{annotations}/train.csv', [
      ['playing drums', '--07WQ2iBlw', 1, 11, 'train'], ['abseiling', '--33Lscn6sk', 4, 14, 'train'],
      ['dribbling basketball', '-01ZTWr27vw', 30, 40, 'train'], ['playing xylophone', 'gone-000001', 0, 10, 'train'],
      ['tapping pen', 'fullVideo01', 95, 105, 'train']], KINETICS_HEADER)
  write_csv(f'{annotations}/validate.csv', [['stomping grapes', '0aBcDeFgHiJ', 12, 22, 'val', 0],
                                             ['typing', 'xYz123_-AbC', 0, 10, 'val', 0]], KINETICS_HEADER + ['is_cc'])
  write_csv(f'{annotations}/test.csv', [['blowing nose', 'tEsTvIdEo01', 5, 15, 'test']], KINETICS_HEADER)
  make_media(media, clip, ['train/playing drums/--07WQ2iBlw_000001_000011.mp4',
                           'train/abseiling/--33Lscn6sk_000004_000014.mp4',
                           'train/dribbling basketball/-01ZTWr27vw_000030_000040.mp4', 'raw/fullVideo01.webm',
                           'val/0aBcDeFgHiJ_000012_000022.mp4', 'test/tEsTvIdEo01_000005_000015.mp4'])
  report = CONVERTERS['kinetics_sound'](annotations, media, output)
  check_common(report, output, media, dict(train=3, validation=1, test=1), dict(train=1))
  assert report['splits']['train']['skipped'] == {'not a Kinetics-Sound class': 1}
  assert report['splits']['train']['missing_examples'] == ['gone-000001_000000_000010']
  assert report['splits']['validation']['skipped'] == {'not a Kinetics-Sound class': 1}  # typing: not in K400
  train = read_split(output, 'train')
  index = kinetics_sound.CLASSES.index
  assert train[0] == dict(id='--07WQ2iBlw_000001_000011', video='train/playing drums/--07WQ2iBlw_000001_000011.mp4',
                          label='playing drums', label_index=index('playing drums'))
  assert train[2] == dict(id='fullVideo01_000095_000105', video='raw/fullVideo01.webm', start=95.0, end=105.0,
                          label='tapping pen', label_index=6)
  assert read_split(output, 'validation')[0]['label_index'] == 12
  assert read_split(output, 'test')[0]['label_index'] == 0
  with open(os.path.join(output, common.CLASSES_FILE)) as f:
    classes = f.read().splitlines()
  assert classes == list(kinetics_sound.CLASSES) and len(classes) == 31


def test_vggsound(tmp_path, clip):
  annotations, media, output = folders(tmp_path)
  write_csv(f'{annotations}/vggsound.csv', [
      ['---g-f_I2yQ', 1, 'people marching', 'test'], ['--0PQM4-hqg', 30, 'waterfall burbling', 'train'],
      ['--9O4XZOge4', 30, 'female speech, woman speaking', 'train'], ['--Aa4M484QM', 0, 'cricket chirping', 'train'],
      ['-0UuUoXQUoI', 107, 'people marching', 'test'], ['fullVideo_1', 250, 'cricket chirping', 'train']])
  make_media(media, clip, ['video/---g-f_I2yQ_000001.mp4', 'video/--0PQM4-hqg_000030.mp4',
                           'video/--9O4XZOge4_000030.mp4', 'video/-0UuUoXQUoI_000107.mp4', 'youtube/fullVideo_1.mp4'])
  with open(f'{annotations}/vggsound.csv') as f:
    assert '"female speech, woman speaking"' in f.read()  # quoted, as in the official file
  report = CONVERTERS['vggsound'](annotations, media, output)
  check_common(report, output, media, dict(train=3, test=2), dict(train=1))
  assert report['splits']['train']['missing_examples'] == ['--Aa4M484QM_000000']
  classes = ['cricket chirping', 'female speech, woman speaking', 'people marching', 'waterfall burbling']
  with open(os.path.join(output, common.CLASSES_FILE)) as f:
    assert f.read().splitlines() == classes
  train = read_split(output, 'train')
  assert train[0] == dict(id='--0PQM4-hqg_000030', video='video/--0PQM4-hqg_000030.mp4', label='waterfall burbling',
                          label_index=3)
  assert train[1]['label'] == 'female speech, woman speaking' and train[1]['label_index'] == 1
  assert train[2] == dict(id='fullVideo_1_000250', video='youtube/fullVideo_1.mp4', start=250.0, end=260.0,
                          label='cricket chirping', label_index=0)
  assert [line['id'] for line in read_split(output, 'test')] == ['---g-f_I2yQ_000001', '-0UuUoXQUoI_000107']


def test_vggsound_classes_from_stat_csv(tmp_path, clip):
  annotations, media, output = folders(tmp_path)
  write_csv(f'{annotations}/vggsound.csv', [['aaaaaaaaaaa', 5, 'dog barking', 'train'],
                                            ['bbbbbbbbbbb', 7, 'cat purring', 'train']])
  write_csv(f'{annotations}/stat.csv', [['dog barking', 1050], ['airplane', 506]])
  make_media(media, clip, ['aaaaaaaaaaa_000005.mp4', 'bbbbbbbbbbb_000007.mp4'])
  report = CONVERTERS['vggsound'](annotations, media, output)
  assert report['splits']['train']['skipped'] == {'label not in stat.csv': 1}
  assert read_split(output, 'train')[0]['label_index'] == 1  # sorted: airplane, dog barking


EPIC_COLUMNS = ['annotation_id', 'participant_id', 'video_id', 'start_timestamp', 'stop_timestamp', 'start_sample',
                'stop_sample']


def test_epic_sounds(tmp_path, clip):
  annotations, media, output = folders(tmp_path)
  labelled = EPIC_COLUMNS + ['description', 'class', 'class_id']
  write_csv(f'{annotations}/EPIC_Sounds_train.csv', [
      ['P01_01_0', 'P01', 'P01_01', '00:00:02.466', '00:00:05.315', 59184, 127560, 'paper rustle', 'rustle', 4],
      ['P01_01_1', 'P01', 'P01_01', '00:01:03.065', '00:01:14.447', 73560, 346728, 'footstep', 'footstep', 7],
      ['P05_02_0', 'P05', 'P05_02', '00:00:01.000', '00:00:02.000', 24000, 48000, 'tap running', 'water', 5]],
      labelled)
  write_csv(f'{annotations}/EPIC_Sounds_validation.csv', [
      ['P01_11_0', 'P01', 'P01_11', '00:00:02.069', '00:00:02.993', 49656, 71832, 'clang / clatter',
       'ceramic / wood collision', 34]], labelled)
  write_csv(f'{annotations}/EPIC_Sounds_recognition_test_timestamps.csv', [
      ['P02_106_0', 'P02', 'P02_106', '00:00:03.855', '00:00:04.142', 92520, 99408]], EPIC_COLUMNS)
  make_media(media, clip, ['EPIC-KITCHENS/P01/videos/P01_01.MP4', 'EPIC-KITCHENS/P01/videos/P01_11.MP4',
                           'EPIC-KITCHENS/P02/videos/P02_106.mp4'])
  report = CONVERTERS['epic_sounds'](annotations, media, output)
  check_common(report, output, media, dict(train=2, validation=1, test=1), dict(train=1))
  assert report['splits']['train']['missing_examples'] == ['P05_02_0']
  train = read_split(output, 'train')
  assert train[0] == dict(id='P01_01_0', video='EPIC-KITCHENS/P01/videos/P01_01.MP4', start=2.466, end=5.315,
                          label='rustle', label_index=4)
  assert (train[1]['start'], train[1]['end'], train[1]['label_index']) == (63.065, 74.447, 7)
  assert read_split(output, 'validation')[0]['label'] == 'ceramic / wood collision'
  assert read_split(output, 'test') == [dict(id='P02_106_0', video='EPIC-KITCHENS/P02/videos/P02_106.mp4',
                                             start=3.855, end=4.142)]
  with open(os.path.join(output, common.CLASSES_FILE)) as f:
    assert f.read().splitlines() == list(epic_sounds.CLASSES) and len(epic_sounds.CLASSES) == 44


def test_epic_sounds_rejects_another_class_list(tmp_path, clip):
  annotations, media, output = folders(tmp_path)
  write_csv(f'{annotations}/EPIC_Sounds_validation.csv', [
      ['P01_11_0', 'P01', 'P01_11', '00:00:02.069', '00:00:02.993', 0, 1, 'x', 'rustle', 3]],
      EPIC_COLUMNS + ['description', 'class', 'class_id'])
  with pytest.raises(common.AnnotationError) as error:
    CONVERTERS['epic_sounds'](annotations, media, output)
  assert str(error.value) == ("EPIC_Sounds_validation.csv, line 2: P01_11_0 has class_id 3 = 'rustle', the official "
                              "list has 'open / close'")


def test_media_index_and_stale_split(tmp_path, clip):
  media = str(tmp_path / 'media')
  make_media(media, clip, ['a/x.mp4', 'b/x.mkv', 'c/notes.txt', 'd/y.AVI'])
  index = common.MediaIndex(media)
  assert len(index) == 3 and index.find('x') == 'a/x.mp4' and index.find('b/x') == 'b/x.mkv'
  assert index.find('y') == 'd/y.AVI' and index.find('notes') is None and index.find('z') is None
  with av.open(os.path.join(media, index.find('x'))) as container:  # a real file: video and sound
    assert container.streams.video and container.streams.audio
  output = str(tmp_path / 'output')
  os.makedirs(output)
  open(os.path.join(output, 'validation.jsonl'), 'w').close()  # from an earlier run
  split = common.Split([common.Annotation('1', [('x', {})], {}), common.Annotation('1', [('x', {})], {})])
  report = common.write_dataset('t', {'train': split}, media, output)
  assert not os.path.exists(os.path.join(output, 'validation.jsonl'))
  assert report['splits']['train']['skipped'] == {'duplicate id': 1} and report['splits']['train']['written'] == 1


def test_command_line(tmp_path, clip):
  annotations, media, output = folders(tmp_path)
  write_csv(f'{annotations}/vggsound.csv', [['aaaaaaaaaaa', 5, 'dog barking', 'train'],
                                            ['bbbbbbbbbbb', 7, 'dog barking', 'test'],
                                            ['ccccccccccc', 9, 'dog barking', 'test']])
  make_media(media, clip, ['aaaaaaaaaaa_000005.mp4', 'bbbbbbbbbbb_000007.mp4'])
  command = [sys.executable, '-m', 'mirasol_jax.data.converters', 'vggsound', f'--annotations={annotations}',
             f'--media={media}', f'--output={output}']
  result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stderr
  assert (f'--config=configs/paper/vggsound.py --workdir=WORKDIR --config.data.path={output} '
          f'--config.data.media_root={media}') in result.stdout
  assert 'missing e.g. ccccccccccc_000009' in result.stdout and 'mirasol_jax.main convert' in result.stdout
  assert [line['id'] for line in read_split(output, 'test')] == ['bbbbbbbbbbb_000007']
  result = subprocess.run(command[:4] + [f'--annotations={media}'] + command[5:], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 1 and 'vggsound.csv not in' in result.stderr


# Malformed annotations: one valid file set per benchmark, then one file replaced by a damaged one. Each must stop the
# conversion with exactly this message (file, line as an editor numbers it or JSON entry, reason) and leave the
# output of an earlier conversion as it was.
NEXT_QA_CSV = ','.join(NEXT_QA_HEADER) + '\n'
NEXT_QA_ROW = '4010069381,369,640,480,how do they play,2,6,CH,a,b,c,d,e\n'
EPIC_CSV = ','.join(EPIC_COLUMNS + ['description', 'class', 'class_id']) + '\n'
EPIC_ROW = 'P01_01_0,P01,P01_01,00:00:02.466,00:00:05.315,59184,127560,paper rustle,rustle,4\n'
KINETICS_CSV = ','.join(KINETICS_HEADER) + '\n'
MSRVTT_ENTRY = dict(answer='a', category_id=0, id=0, question='q?', video_id=0)
VALID = {
    'msrvtt_qa': {'train_qa.json': json.dumps([MSRVTT_ENTRY])},
    'activitynet_qa': {'val_q.json': json.dumps([dict(video_name='abc', question='q', question_id='v_abc_0')]),
                       'val_a.json': json.dumps([dict(answer='yes', type=3, question_id='v_abc_0')])},
    'next_qa': {'train.csv': NEXT_QA_CSV + NEXT_QA_ROW, 'map_vid_vidorID.json': '{"4010069381": "1006/4010069381"}'},
    'kinetics_sound': {'train.csv': KINETICS_CSV + 'playing drums,--07WQ2iBlw,1,11,train\n'},
    'vggsound': {'vggsound.csv': '---g-f_I2yQ,1,people marching,train\n'},
    'epic_sounds': {'EPIC_Sounds_train.csv': EPIC_CSV + EPIC_ROW},
}
MALFORMED = [
    # A required column or field missing: the wrong file or another version of the dataset.
    ('msrvtt_qa', {'train_qa.json': json.dumps([MSRVTT_ENTRY, dict(id=1, question='q', answer='a')])},
     "train_qa.json, entry [1]: no field 'video_id' (fields: id, question, answer)"),
    ('activitynet_qa', {'val_a.json': json.dumps([dict(answer='yes', question_id='v_abc_0')])},
     "val_a.json, entry [0]: no field 'type' (fields: answer, question_id)"),
    ('next_qa', {'train.csv': NEXT_QA_CSV.replace('video,', 'vid,') + NEXT_QA_ROW},
     "train.csv, line 1: no column 'video' (columns: vid, frame_count, width, height, question, answer, qid, type, "
     "a0, a1, a2, a3, a4)"),
    ('kinetics_sound', {'train.csv': 'label,youtube_id,time_end,split\nplaying drums,--07WQ2iBlw,11,train\n'},
     "train.csv, line 1: no column 'time_start' (columns: label, youtube_id, time_end, split)"),
    ('epic_sounds', {'EPIC_Sounds_train.csv': EPIC_CSV.replace(',class_id', '') + EPIC_ROW[:-3] + '\n'},
     "EPIC_Sounds_train.csv, line 1: no column 'class_id' (columns: annotation_id, participant_id, video_id, "
     "start_timestamp, stop_timestamp, start_sample, stop_sample, description, class)"),
    # A value the converter reads, not of its form; line numbers as an editor shows them (a quoted field over two
    # lines and a blank line come before the bad row of kinetics_sound).
    ('msrvtt_qa', {'train_qa.json': json.dumps([dict(MSRVTT_ENTRY, question=None)])},
     'train_qa.json, entry [0]: question is null, not text'),
    ('activitynet_qa', {'val_a.json': json.dumps([dict(answer='yes', type='abc', question_id='v_abc_0')])},
     "val_a.json, entry [0]: type 'abc' is not a whole number"),
    ('activitynet_qa', {'val_q.json': json.dumps([dict(video_name='abc', question='q', question_id='v_abc_0'),
                                                  ['def', 'q', 'v_def_0']])},
     'val_q.json, entry [1]: a JSON object expected, found ["def", "q", "v_def_0"]'),
    ('next_qa', {'train.csv': NEXT_QA_CSV + NEXT_QA_ROW + ',369,640,480,why,1,7,CW,a,b,c,d,e\n'},
     'train.csv, line 3: video is empty'),
    ('next_qa', {'map_vid_vidorID.json': '{"4010069381": 1006}'},
     "map_vid_vidorID.json, entry '4010069381': the VidOR path is 1006, not a path"),
    ('kinetics_sound', {'train.csv': KINETICS_CSV + '"playing\ndrums",--07WQ2iBlw,1,11,train\n\n'
                                                    'bowling,abcdefghijk,1:xx,11,train\n'},
     "train.csv, line 5: time_start '1:xx' is not a number"),
    ('vggsound', {'vggsound.csv': '---g-f_I2yQ,1,people marching,train\n-0UuUoXQUoI,1O7,people marching,test\n'},
     "vggsound.csv, line 2: start seconds (field 2) '1O7' is not a number"),
    ('epic_sounds', {'EPIC_Sounds_train.csv': EPIC_CSV + EPIC_ROW + EPIC_ROW.replace('00:00:02.466', '1:xx')},
     "EPIC_Sounds_train.csv, line 3: start_timestamp '1:xx' is not HH:MM:SS.fff"),
    ('epic_sounds', {'EPIC_Sounds_train.csv': EPIC_CSV + EPIC_ROW.replace('rustle,4', 'rustle,abc')},
     "EPIC_Sounds_train.csv, line 2: class_id 'abc' is not a whole number"),
    # A damaged file: a row cut short, text that is not UTF-8, JSON that does not parse or is not a list.
    ('next_qa', {'train.csv': NEXT_QA_CSV + NEXT_QA_ROW + NEXT_QA_ROW[:40] + '\n'},
     'train.csv, line 3: 6 fields, the header (line 1) has 13'),
    ('vggsound', {'vggsound.csv': b'---g-f_I2yQ,1,people marching,train\n\n-0UuUoXQUoI,1,caf\xe9,test\n'},
     'vggsound.csv, line 3: not UTF-8 text'),
    ('msrvtt_qa', {'train_qa.json': '[{"id": 1,\n  "question": "q" "answer": "a"}]'},
     "train_qa.json, line 2 column 19: not JSON (Expecting ',' delimiter)"),
    ('msrvtt_qa', {'train_qa.json': json.dumps({'0': MSRVTT_ENTRY})},
     'train_qa.json: a JSON list expected, the file holds {"0": {"answer": "a", "category_id": 0, "id": 0, '
     '"questio...'),
]


def write_files(folder, files):
  for name, content in files.items():
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(content if isinstance(content, bytes) else content.encode())


def folder_contents(folder):
  return {name: open(os.path.join(folder, name), 'rb').read() for name in sorted(os.listdir(folder))}


# (pytest-benchmark owns the name `benchmark`)
@pytest.mark.parametrize('name,files,message', MALFORMED, ids=[f'{case[0]}-{i}' for i, case in enumerate(MALFORMED)])
def test_malformed_annotation_names_file_line_and_reason(tmp_path, name, files, message):
  annotations, media, output = folders(tmp_path)
  write_files(annotations, VALID[name])
  earlier = CONVERTERS[name](annotations, media, output)  # the valid files convert
  assert sum(split['annotations'] for split in earlier['splits'].values()) == 1
  before = folder_contents(output)
  write_files(annotations, files)
  with pytest.raises(common.AnnotationError) as error:
    CONVERTERS[name](annotations, media, output)
  assert str(error.value) == message
  assert error.value.path == os.path.join(annotations, message.split(',')[0].split(':')[0])
  assert folder_contents(output) == before  # nothing written: no split of the bad file, no temporary file
  # A first conversion stopped by the bad row leaves no output folder at all.
  with pytest.raises(common.AnnotationError, match=re.escape(message)):
    CONVERTERS[name](annotations, media, str(tmp_path / 'fresh'))
  assert not os.path.exists(tmp_path / 'fresh')


def test_deliberate_skips_stay_skips(tmp_path):
  """Rows the official files hold and a converter does not take are counted, not errors."""
  annotations, media, output = folders(tmp_path)
  write_files(annotations, {'train.csv': NEXT_QA_CSV + NEXT_QA_ROW + NEXT_QA_ROW.replace(',2,6,', ',x,7,')})
  assert CONVERTERS['next_qa'](annotations, media, output)['splits']['train']['skipped'] == {
      'answer is not an option index': 1}
  write_files(annotations, {'EPIC_Sounds_train.csv': EPIC_CSV + EPIC_ROW.replace('00:00:05.315', '00:00:01.000')})
  assert CONVERTERS['epic_sounds'](annotations, media, output)['splits']['train']['skipped'] == {
      'stop_timestamp not after start_timestamp': 1}
  write_files(annotations, {'vggsound.csv': '# comment\n---g-f_I2yQ,1,people marching,train\nonly,three,fields\n'})
  report = CONVERTERS['vggsound'](annotations, media, output)
  assert report['splits']['train']['annotations'] == 1
  assert ("1 lines of vggsound.csv without the 4 fields ytid,start,label,split left out (first: line 3, ['only', "
          "'three', 'fields'])") in report['notes']


def test_rows_are_numbered_as_an_editor_shows_them(tmp_path):
  path = str(tmp_path / 'a.csv')
  # A byte-order mark, a blank line, a quoted field over two lines, CRLF line ends; the header is line 1.
  with open(path, 'wb') as f:
    f.write(b'\xef\xbb\xbfid,text\r\n1,one\r\n\r\n2,"two\r\nlines"\r\n3,three\r\n')
  rows = common.map_rows(path, lambda row: (row.location, row['id'], row.text('text')), required=('id',))
  assert rows == [('line 2', '1', 'one'), ('line 4', '2', 'two\r\nlines'), ('line 6', '3', 'three')]
  with pytest.raises(common.AnnotationError, match=r"^a\.csv, line 4: KeyError: 'x'$"):
    common.map_rows(path, lambda row: {}['x'] if row['id'] == '2' else None)
  with open(path, 'w') as f:
    f.write('')
  with pytest.raises(common.AnnotationError, match=r'^a\.csv: no header line \(expected the columns id\)$'):
    common.map_rows(path, lambda row: row, required=('id',))


def test_timestamps():
  assert common.parse_timestamp('00:01:03.065') == 63.065 and common.parse_timestamp('01:02.5') == 62.5
  assert common.parse_timestamp('7.25') == 7.25
  for bad in ('1:xx', '', '-00:00:01', '1:2:3:4', 'nan', '00: 01:02'):
    with pytest.raises(ValueError, match=re.escape(f"start_timestamp {bad!r} is not HH:MM:SS.fff")):
      common.parse_timestamp(bad, 'start_timestamp')


def test_command_line_bad_row(tmp_path):
  annotations, media, output = folders(tmp_path)
  write_files(annotations, {'EPIC_Sounds_train.csv': EPIC_CSV + EPIC_ROW + EPIC_ROW.replace('00:00:02.466', '1:xx')})
  result = subprocess.run([sys.executable, '-m', 'mirasol_jax.data.converters', 'epic_sounds',
                           f'--annotations={annotations}', f'--media={media}', f'--output={output}'],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1 and result.stdout == ''
  assert result.stderr == ("error: epic_sounds: EPIC_Sounds_train.csv, line 3: start_timestamp '1:xx' is not "
                           'HH:MM:SS.fff\n')
  assert not os.path.exists(output)
