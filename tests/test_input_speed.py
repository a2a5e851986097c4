"""The fast input paths give what the slow ones give: frames found by seeking and skipping are the frames decoding
everything shows, and a dataset converted to training's size and frame rate (data/resample.py) trains the same way."""
import fractions
import io
import json
import os

import av
import numpy as np
import pytest
from absl import flags
from av.video.reformatter import VideoReformatter

from conftest import tiny_config
from mirasol_jax.data import demo_data
from mirasol_jax.data import media
from mirasol_jax.data import pipeline
from mirasol_jax.data import resample
from mirasol_jax.data import sources
from mirasol_jax.data import tokenizer

flags.FLAGS.mark_as_parsed()

W, H = 64, 48
PERIOD = 28  # frame numbers are read modulo this


def moving_frames(count: int, seed: int = 0) -> np.ndarray:
  """A texture sliding a pixel a frame, slowly brightening: content that x264 codes with B-frames."""
  texture = np.random.default_rng(seed).integers(0, 255, (H, W, 3), dtype=np.uint8) // 2
  return np.stack([np.roll(texture, i, axis=1) + np.uint8(i % 100) for i in range(count)])


def numbered_frames(count: int, seed: int = 0) -> np.ndarray:
  """Frame i is grey level 20 + 8 (i mod PERIOD) under a texture that moves a pixel a frame (zero mean over any
  large window), so that read_numbers finds i in any crop, through re-encoding and FFmpeg's resizing (which
  shifts levels by up to 2 at some sizes)."""
  rng = np.random.default_rng(seed)
  texture = rng.integers(-6, 7, (H, W * 2, 1))
  return np.stack([np.clip(20 + 8 * (i % PERIOD) + texture[:, i % W:i % W + W], 0, 255).repeat(3, -1)
                   for i in range(count)]).astype(np.uint8)


def read_numbers(frames: np.ndarray) -> np.ndarray:
  """The frame numbers (mod PERIOD) of decoded (lossy, resized, cropped) numbered_frames [N, h, w, 3]."""
  return np.round((frames.astype(np.float32).mean(axis=(1, 2, 3)) - 20) / 8).astype(int) % PERIOD


def encode(pts, options, container='mp4', time_base=None, audio_seconds=None, frames=moving_frames) -> bytes:
  """H.264 frames(len(pts)) at timestamps `pts` (in time_base, default 1/30 s), and a tone of audio_seconds."""
  buffer = io.BytesIO()
  time_base = time_base or fractions.Fraction(1, 30)
  with av.open(buffer, 'w', format=container) as output:
    video = output.add_stream('libx264', rate=30)
    video.width, video.height, video.pix_fmt, video.options = W, H, 'yuv420p', options
    video.codec_context.time_base = time_base
    sound = output.add_stream('aac', rate=16_000, layout='mono') if audio_seconds else None
    for t, array in zip(pts, frames(len(pts))):
      frame = av.VideoFrame.from_ndarray(array, format='rgb24')
      frame.pts, frame.time_base = t, time_base
      output.mux(video.encode(frame))
    output.mux(video.encode(None))
    if sound is not None:
      samples = 0.3 * np.sin(2 * np.pi * 440 * np.arange(int(audio_seconds * 16_000)) / 16_000)
      for offset in range(0, len(samples), 1024):
        frame = av.AudioFrame.from_ndarray(samples[None, offset:offset + 1024].astype(np.float32), format='fltp',
                                           layout='mono')
        frame.sample_rate, frame.pts = 16_000, offset
        output.mux(sound.encode(frame))
      output.mux(sound.encode(None))
  return buffer.getvalue()


def decode_everything(data: bytes, times, size) -> np.ndarray:
  """The reference: every frame from the start of the file; at time t the last frame whose timestamp is <= t (the
  first frame before it)."""
  with av.open(io.BytesIO(data)) as container:
    frames = list(container.decode(video=0))
  stamps = np.array([f.time for f in frames])
  reformatter = VideoReformatter()
  chosen = [frames[max(int(np.searchsorted(stamps, t, side='right')) - 1, 0)] for t in times]
  return np.stack([media._to_rgb(reformatter, f, size) for f in chosen])  # pylint: disable=protected-access


STREAMS = {  # name: (timestamps, x264 options, container, time base)
    'long GOP, no B-frames': (range(240), {'tune': 'zerolatency', 'g': '250', 'x264-params': 'scenecut=0'}, 'mp4',
                              None),
    'short GOP, B-frames': (range(240), {'bf': '3', 'g': '6'}, 'mp4', None),
    'B-frame pyramid': (range(240), {'bf': '3', 'g': '24', 'x264-params': 'b-pyramid=normal:b-adapt=0'}, 'mp4',
                        None),
    'open GOP': (range(240), {'bf': '2', 'g': '15', 'x264-params': 'open-gop=1'}, 'mp4', None),
    'variable frame rate': (np.cumsum(np.random.default_rng(1).integers(1, 30, 240)), {'bf': '2', 'g': '10'}, 'mp4',
                            fractions.Fraction(1, 300)),
    'starts at 1.5 s': (range(45, 285), {'bf': '2', 'g': '30'}, 'mp4', None),
    'Matroska': (range(240), {'bf': '3', 'g': '8'}, 'matroska', None),
}


@pytest.fixture(scope='module')
def streams():
  return {name: encode(list(pts), dict(options, preset='veryfast'), container, time_base)
          for name, (pts, options, container, time_base) in STREAMS.items()}


def sample_times(duration: float) -> list[np.ndarray]:
  rng = np.random.default_rng(0)
  spans = [(0.0, duration, 64),  # dense: decoded through
           (0.0, duration, 6),  # sparse: seeks
           (duration * 0.4, duration * 0.85, 5),  # a clip starting mid-file
           (duration - 0.3, duration + 0.4, 4),  # near and past the end
           (0.0, duration * 0.2, 9)]
  return [media.segment_times(a, b, n, r) for a, b, n in spans for r in (None, rng)]


OPTIONS = [media.DecodeOptions(seek=False, skip_unneeded=False),
           media.DecodeOptions(),
           media.DecodeOptions(seek_min_frames=1),
           media.DecodeOptions(skip_unneeded=False, seek_min_frames=1),
           media.DecodeOptions(thread_type='AUTO', thread_count=2)]


@pytest.mark.parametrize('name', list(STREAMS))
def test_seeking_and_skipping_return_the_frames_of_decoding_everything(streams, name):
  data = streams[name]
  duration = media.probe(data).duration
  for times in sample_times(duration):
    expected = decode_everything(data, times, (W, H))
    for options in OPTIONS:
      with media.MediaFile(data, options=options) as clip:
        got = clip.frames_of_size(times, (W, H))
      assert np.array_equal(got, expected), (name, times.round(3).tolist(), options)


def test_sparse_samples_decode_a_fraction_of_the_frames(streams):
  def decoded(data, times, **options):
    with media.MediaFile(data, options=media.DecodeOptions(**options)) as clip:
      clip.frames(times, 32)
      return clip.frames_decoded

  short_gop = streams['short GOP, B-frames']  # 240 frames, a key frame every 6
  sparse = media.segment_times(0.0, 8.0, 6)
  assert decoded(short_gop, sparse, seek=False, skip_unneeded=False) > 200  # through to the last sample
  assert decoded(short_gop, sparse, seek=True) <= 6 * 6  # from the key frame before each sample to it
  # A key frame every 250 frames: nothing to seek to, and every frame is a reference frame.
  assert decoded(streams['long GOP, no B-frames'], sparse, seek=True) > 200
  # Dense samples of a B-frame stream (3 B-frames to a P-frame, 2 of them unreferenced): the unreferenced B-frames
  # no sample shows are not decoded.
  pyramid, dense = streams['B-frame pyramid'], media.segment_times(0.0, 8.0, 40)
  assert decoded(pyramid, dense, seek=True) < 0.75 * decoded(pyramid, dense, seek=False, skip_unneeded=False)


def test_decode_threads_follow_the_workers():
  assert media.DecodeOptions.from_config({'num_workers': 4}).thread_count == 1
  assert media.DecodeOptions.from_config({'num_workers': 4, 'decode_threads': 3}) == media.DecodeOptions(
      thread_type='AUTO', thread_count=3)
  assert not media.DecodeOptions.from_config({'decode_seek': False, 'decode_skip_unneeded': False}).seek


# ---------------------------------------------------------------------------------------------------------------
# Conversion to training's size and frame rate.

FPS = 25


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """Clips of numbered frames at 25 fps: with sound, without, a clip inside a file, and a missing file."""
  folder = str(tmp_path_factory.mktemp('source'))
  os.makedirs(os.path.join(folder, 'videos'))
  for name, audio in (('talk', 4.0), ('mute', None)):
    with open(os.path.join(folder, 'videos', f'{name}.mp4'), 'wb') as f:
      f.write(encode(list(range(100)), {'preset': 'veryfast', 'bf': '2', 'g': '12', 'crf': '12'},
                     time_base=fractions.Fraction(1, FPS), audio_seconds=audio, frames=numbered_frames))
  lines = [dict(id='whole', video='videos/talk.mp4', question='what number?', answer='seven'),
           dict(id='inside', video='videos/talk.mp4', start=0.9, end=3.3, question='which part?', answer='middle'),
           dict(id='again', video='videos/talk.mp4', start=0.9, end=3.3, question='the same clip?', answer='yes'),
           dict(id='mute', video='videos/mute.mp4', question='is it quiet?', answer='yes'),
           dict(id='gone', video='videos/nowhere.mp4', question='q', answer='a')]
  with open(os.path.join(folder, 'train.jsonl'), 'w') as f:
    f.writelines(json.dumps(line) + '\n' for line in lines)
  path = os.path.join(folder, 'tokenizer.model')
  source = sources.JsonlSource(folder, 'train')
  tokenizer.train([t for i in range(len(source)) for t in tokenizer.text_fields(source[i])], 300, path)
  return folder


def _config(folder):
  config = tiny_config('ttm')
  config.model.num_frames, config.model.num_chunks, config.model.image_size = 8, 4, (32, 32)
  config.model.video.tubes = (((2, 16, 16), (2, 16, 16), (0, 0, 0)),)
  config.model.video_recon_size = (8, 8)
  config.model.vocab_size = 512
  config.data.path, config.data.tokenizer = folder, os.path.join(folder, 'tokenizer.model')
  config.batch_size = 2
  return config


def _examples(config, train: bool, seed: int = 0) -> dict[str, dict]:
  decode = pipeline.DecodeExample(config.model, config.data, train)
  source = sources.open_source(config.data, 'train')
  out = {}
  for i in range(len(source)):
    record = dict(source[i], _index=i)
    out[record['id']] = decode.decode(record, np.random.default_rng(seed + i) if train else None)
  return out


@pytest.mark.parametrize('codec,frames_per_segment', [('h264', 1), ('h264', 3), ('raw', 1)])
def test_a_converted_dataset_trains_the_same_way(dataset, tmp_path, codec, frames_per_segment):
  config = _config(dataset)
  output = str(tmp_path / 'converted')
  settings = resample.ResampleSettings.from_config(config, frames_per_segment=frames_per_segment, video_codec=codec)
  assert settings.short_side == round(32 * 1.15)  # training's resize
  report = resample.convert(config, output, settings=settings, workers=1)
  train = report['splits']['train']
  assert train['written'] == 4 and train['clips_converted'] == 3  # 'inside' and 'again' share their clip
  assert train['skipped']['missing_file']['examples'] == ['gone']
  converted = config.copy_and_resolve_references()
  converted.data.path = output
  lines = [json.loads(line) for line in open(os.path.join(output, 'train.jsonl'))]
  duration = {name: media.probe(os.path.join(dataset, 'videos', f'{name}.mp4')).duration for name in ('talk', 'mute')}
  assert [(line['id'], line['start'], line['end']) for line in lines] == [  # the clips the pipeline reads
      ('whole', 0.0, duration['talk']), ('inside', 0.0, 3.3 - 0.9), ('again', 0.0, 3.3 - 0.9),
      ('mute', 0.0, duration['mute'])]
  assert lines[1]['video'] == lines[2]['video'] and lines[1]['question'] == 'which part?'
  for line in lines:  # the pipeline would clamp a clip longer than its file
    assert media.probe(os.path.join(output, line['video'])).duration > line['end']

  for train_mode in (False, True):
    before, after = _examples(config, train_mode), _examples(converted, train_mode)
    for name, example in after.items():
      reference = before[name]
      assert not example['skipped'] and set(example) == set(reference)
      for key, value in example.items():
        assert value.shape == reference[key].shape and value.dtype == reference[key].dtype, key
      np.testing.assert_array_equal(example['text_tokens'], reference['text_tokens'])
      assert example['audio_mask'] == reference['audio_mask'] == (name != 'mute')
      # The same source frames, up to the re-encoding error: read back their numbers.
      shown, expected = (read_numbers(e['video'].reshape(-1, 32, 32, 3)) for e in (example, reference))
      if not train_mode:
        np.testing.assert_array_equal(shown, expected)
        assert np.abs(example['video'].astype(int) - reference['video']).mean() < 3
        continue
      # Training: the stored frame of a jittered time is the source frame at the middle of the time's part of its
      # segment (parts start on whole milliseconds in the file: a time within one of a part's start may read the
      # part next to it).
      start, end = (0.9, 3.3) if name in ('inside', 'again') else (0.0, duration['mute' if name == 'mute' else 'talk'])
      times = media.segment_times(start, end, 8, np.random.default_rng(list(after).index(name)))
      part = (end - start) / (8 * frames_per_segment)
      candidates = [np.floor((start + (np.floor((times + d - start) / part) + 0.5) * part) * FPS + 1e-9) % PERIOD
                    for d in (-1e-3, 0.0, 1e-3)]
      assert all(s in c for s, c in zip(shown, zip(*candidates))), (shown, candidates)
      if frames_per_segment == 3:  # within half a part of the jittered frame
        assert np.abs((shown - expected + PERIOD // 2) % PERIOD - PERIOD // 2).max() <= 3
    for name, example in after.items():
      if example['audio_mask']:
        assert np.abs(example['audio'] - before[name]['audio']).mean() < 1.0  # dB; 16-bit samples

  iterator = pipeline.build(converted, 'train')  # the pipeline reads it as any dataset
  assert next(iterator)['video'].shape == (2, 4, 2, 32, 32, 3)


def test_converting_again_keeps_the_clips_already_converted(dataset, tmp_path):
  config = _config(dataset)
  output = str(tmp_path / 'converted')
  settings = resample.ResampleSettings.from_config(config)
  assert resample.convert(config, output, settings=settings, workers=1)['splits']['train']['clips_converted'] == 3
  media_files = sorted(os.listdir(os.path.join(output, resample.MEDIA_FOLDER)))
  again = resample.convert(config, output, settings=settings, workers=1)['splits']['train']
  assert again['clips_converted'] == 0 and again['written'] == 4
  assert sorted(os.listdir(os.path.join(output, resample.MEDIA_FOLDER))) == media_files
  with pytest.raises(ValueError, match='odd'):
    resample.ResampleSettings.from_config(config, frames_per_segment=2)


def test_the_default_options_give_exact_frames_where_key_frame_flags_mislead(tmp_path):
  """x264 marks scene-cut I-frames of noise as key frames in the mp4 that a decoder cannot start from: seeking or
  skipping packets up to them gives wrong frames, so the default does not seek."""
  path = str(tmp_path / 'noise.mp4')
  demo_data.write_mp4(path, np.random.default_rng(0).integers(0, 256, (20, 40, 56, 3), dtype=np.uint8), fps=10)
  times, size = media.segment_times(0.0, 2.0, 8), media.resize_shape(56, 40, 32)
  with media.MediaFile(path, options=media.DecodeOptions(seek=False, skip_unneeded=False)) as f:
    everything = f.frames_of_size(times, size)
  with media.MediaFile(path, options=media.DecodeOptions.from_config({})) as f:
    default = f.frames_of_size(times, size)
  assert all(np.array_equal(a, b) for a, b in zip(everything, default))
