"""Tests for big_pretrain.data.text.labels: the WSP label vocabulary, its command and its
pipeline feature."""

import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from big_pretrain.data import batch_features
from big_pretrain.data import sources
from big_pretrain.data import train_input
from big_pretrain.data.sources import synthetic
from big_pretrain.data.text import build_vocabulary
from big_pretrain.data.text import labels
from helpers.batches import eval_split_batches, first_devices_mesh, small_data_config

MAX_LABELS = 6


def write_vocabulary_file(tmp_path, text, name='vocab.txt'):
  path = tmp_path / name
  path.write_text(text, encoding='utf-8')
  return str(path)


# --- Normalization -------------------------------------------------------------

@pytest.mark.parametrize('tag, normalized', [
    ('#Circle', 'circle'),
    ('circle', 'circle'),
    ('  #RED! ', 'red'),
    ('"quoted",', 'quoted'),
    ('##twice', 'twice'),
    ('#blue_background', 'blue_background'),
    ('(well-known)', 'well-known'),  # Inner punctuation stays.
    ('«Éclair»…', 'éclair'),         # Unicode punctuation and case.
    ('#!?', ''),
    ('', ''),
])
def test_normalize_tag(tag, normalized):
  assert labels.normalize_tag(tag) == normalized


# --- The file format -------------------------------------------------------------

def test_file_round_trip_keeps_labels_ids_and_synonyms(tmp_path):
  vocabulary = labels.LabelVocabulary(
      ['circle', 'square', 'triangle'], {'circle': ['round', '#Disc'], 'triangle': ['trigon']})
  path = str(tmp_path / 'nested' / 'vocab.txt')
  vocabulary.write(path)
  with open(path, encoding='utf-8') as file:
    assert file.read() == 'circle: round, disc\nsquare\ntriangle: trigon\n'
  loaded = labels.LabelVocabulary.from_file(path)
  assert loaded == vocabulary
  assert loaded.labels == ['circle', 'square', 'triangle'] and len(loaded) == 3
  assert loaded.synonyms == {'circle': ('round', 'disc'), 'triangle': ('trigon',)}


def test_synonyms_map_to_their_label_and_labels_to_themselves(tmp_path):
  vocabulary = labels.LabelVocabulary.from_file(
      write_vocabulary_file(tmp_path, 'circle: round, #disc,\nsquare:\nTriangle : #Trigon\n'))
  assert vocabulary.labels == ['circle', 'square', 'triangle']
  assert [vocabulary.label_id(tag) for tag in ('#circle', 'round', '#DISC', 'disc!')] == [0] * 4
  assert vocabulary.label_id('square') == 1
  assert vocabulary.label_id('#trigon') == vocabulary.label_id('triangle') == 2


def test_comment_lines_need_a_space_after_the_hash(tmp_path):
  text = ('# A comment: it is not a label, nor is the next line.\n'
          '#\n'
          '   # indented comment\n'
          '\n'
          '#circle\n'          # A label written as a hashtag, not a comment.
          '\t#\tsquare\n'      # '#' then a tab: a comment.
          'star: #sparkle\n')
  vocabulary = labels.LabelVocabulary.from_file(write_vocabulary_file(tmp_path, text))
  assert vocabulary.labels == ['circle', 'star']  # Ids count label lines only.
  assert vocabulary.label_id('square') is None
  assert vocabulary.label_id('#sparkle') == 1


def test_unknown_tags_give_no_id():
  vocabulary = labels.LabelVocabulary(['circle', 'square'], {'circle': ['round']})
  assert vocabulary.label_id('#hexagon') is None
  assert vocabulary.label_id('') is None and vocabulary.label_id('#') is None
  assert vocabulary.encode(['#hexagon', '#nice']) == []
  assert vocabulary.encode(['#square', '#hexagon', '#round', '#Circle', '#square']) == [0, 1]


def test_caption_words_count_only_when_asked():
  vocabulary = labels.LabelVocabulary(['circle', 'red', 'square'])
  caption = 'A Red circle, on grey.'
  assert vocabulary.encode(['#square'], caption) == [2]
  assert vocabulary.encode(['#square'], caption, use_caption_words=True) == [0, 1, 2]
  assert vocabulary.encode([], caption, use_caption_words=True) == [0, 1]


def test_duplicate_label_names_both_lines(tmp_path):
  path = write_vocabulary_file(tmp_path, 'circle\nsquare\n# comment\nCircle: round\n')
  with pytest.raises(ValueError, match=r"line 4 of .*vocab\.txt: label 'circle' is already"
                     r" defined at line 1 of"):
    labels.LabelVocabulary.from_file(path)
  same_text = write_vocabulary_file(tmp_path, 'square\ncircle\ncircle\n', 'same_text.txt')
  with pytest.raises(ValueError, match=r"line 3 of .*same_text\.txt.*line 2 of"):
    labels.LabelVocabulary.from_file(same_text)


@pytest.mark.parametrize('text, message', [
    ('circle: round\nsquare: #round\n',
     r"line 2 of .*: synonym 'round' of 'square' already maps to label 'circle' \(line 1 of"),
    ('circle: square\nsquare\n',
     r"line 2 of .*: label 'square' is already a synonym of 'circle' \(line 1 of"),
    ('circle\nsquare: circle\n',
     r"line 2 of .*: synonym 'circle' of 'square' already maps to label 'circle' \(line 1 of"),
])
def test_hashtag_claimed_by_two_labels_names_the_lines(tmp_path, text, message):
  with pytest.raises(ValueError, match=message):
    labels.LabelVocabulary.from_file(write_vocabulary_file(tmp_path, text))


def test_labels_that_cannot_be_stored_are_errors(tmp_path):
  with pytest.raises(ValueError, match=r"line 2 of .*'!!!' is empty once normalized"):
    labels.LabelVocabulary.from_file(write_vocabulary_file(tmp_path, 'circle\n!!!\n'))
  with pytest.raises(ValueError, match=r"labels\[1\]: label 'a,b' contains"):
    labels.LabelVocabulary(['circle', 'a,b'])
  with pytest.raises(ValueError, match=r"\['hexagon'\].*not among the labels"):
    labels.LabelVocabulary(['circle'], {'hexagon': ['six']})
  with pytest.raises(ValueError, match='has no labels'):
    labels.LabelVocabulary.from_file(write_vocabulary_file(tmp_path, '# only a comment\n\n'))


def test_missing_vocabulary_file_says_how_to_build_one(tmp_path):
  missing = str(tmp_path / 'no_such_vocab.txt')
  with pytest.raises(FileNotFoundError) as error:
    labels.LabelVocabulary.from_file(missing)
  assert missing in str(error.value)
  assert 'python -m big_pretrain.data.text.build_vocabulary labels' in str(error.value)
  assert f'--output={missing}' in str(error.value)


def test_pad_label_ids_keeps_the_lowest_ids():
  np.testing.assert_array_equal(labels.pad_label_ids([5, 2], 4), [2, 5, -1, -1])
  np.testing.assert_array_equal(labels.pad_label_ids([9, 1, 4, 7], 3), [1, 4, 7])
  assert labels.pad_label_ids([], 2).dtype == np.int32


# --- build_vocabulary ---------------------------------------------------------------

HAND_MADE_EXAMPLES = (
    {'hashtags': ['#cat', '#Cute', '#cat'], 'caption': 'my cat, sleeping #cat'},
    {'hashtags': ['#dog', '#cute'], 'caption': 'a dog'},
    {'hashtags': ['#cat', '#sunset!'], 'caption': 'cat at sunset https://x.io'},
    {'hashtags': ['#bird'], 'caption': ''},
    {'hashtags': [], 'caption': 'no tags at all'},
)


def test_build_vocabulary_counts_each_tag_once_per_example():
  # Counts: cat 2 (repeats within an example count once), cute 2, bird/dog/sunset 1.
  vocabulary = labels.build_vocabulary(HAND_MADE_EXAMPLES, min_count=1, max_size=100)
  assert vocabulary.labels == ['cat', 'cute', 'bird', 'dog', 'sunset']  # Ties alphabetical.
  assert labels.build_vocabulary(HAND_MADE_EXAMPLES, min_count=2, max_size=100).labels == [
      'cat', 'cute']
  assert labels.build_vocabulary(HAND_MADE_EXAMPLES, min_count=1, max_size=3).labels == [
      'cat', 'cute', 'bird']


def test_build_vocabulary_is_deterministic():
  vocabularies = [
      labels.build_vocabulary(examples, min_count=1, max_size=4)
      for examples in (HAND_MADE_EXAMPLES, HAND_MADE_EXAMPLES[::-1], iter(HAND_MADE_EXAMPLES))]
  assert vocabularies[0] == vocabularies[1] == vocabularies[2]


def test_build_vocabulary_with_caption_words():
  vocabulary = labels.build_vocabulary(HAND_MADE_EXAMPLES, min_count=2, max_size=100,
                                       use_caption_words=True)
  # 'at' is a word of 2 captions; 'cat' and 'cute' stay at 2 examples ('sunset' is a
  # hashtag and a word of one example: still 1); the URL is never kept.
  assert vocabulary.labels == ['at', 'cat', 'cute']
  assert 'https://x.io' not in labels.build_vocabulary(
      HAND_MADE_EXAMPLES, min_count=1, max_size=100, use_caption_words=True).labels


def test_build_vocabulary_rejects_bad_limits():
  with pytest.raises(ValueError, match='min_count'):
    labels.build_vocabulary(HAND_MADE_EXAMPLES, min_count=0, max_size=10)
  with pytest.raises(ValueError, match='max_size'):
    labels.build_vocabulary(HAND_MADE_EXAMPLES, min_count=1, max_size=0)


# --- The shipped synthetic vocabulary and the command -----------------------------

def _flag_value(name):
  (value,) = [flag.split('=', 1)[1] for flag in build_vocabulary.SYNTHETIC_BUILD_FLAGS
              if flag.startswith(f'--{name}=')]
  return int(value)


def test_shipped_synthetic_vocabulary_is_in_sync_with_the_source():
  shipped = labels.LabelVocabulary.from_file(labels.synthetic_vocabulary_path())
  source = sources.SyntheticShapes(_flag_value('num_examples'), image_size=16)
  rebuilt = labels.build_vocabulary(
      (source[i] for i in range(len(source))),
      min_count=_flag_value('min_count'), max_size=_flag_value('max_size'))
  assert shipped == rebuilt, (
      'Rebuild the shipped vocabulary: python -m big_pretrain.data.text.build_vocabulary labels '
      + ' '.join(build_vocabulary.SYNTHETIC_BUILD_FLAGS) + ' --output='
      + labels.synthetic_vocabulary_path())


def test_shipped_synthetic_vocabulary_covers_every_synthetic_hashtag():
  vocabulary = labels.LabelVocabulary.from_file(labels.synthetic_vocabulary_path())
  colours = [name for name, _ in synthetic.PALETTE]
  expected = ({f'#{shape}' for shape in synthetic.SHAPE_NAMES}
              | {f'#{colour}' for colour in colours}
              | {f'#{size}' for size, _ in synthetic.SIZES}
              | {f'#{colour}_background' for colour in colours})
  assert {tag for tag in expected if vocabulary.label_id(tag) is None} == set()
  assert len(vocabulary) == len(expected)
  # And every example of another seed, and of the test split, is fully covered.
  for source in (sources.SyntheticShapes(200, 16, seed=7),
                 sources.SyntheticShapes(200, 16, split='test')):
    for index in range(len(source)):
      hashtags = source[index]['hashtags']
      assert len(vocabulary.encode(hashtags)) == len(hashtags), hashtags


def test_command_writes_a_vocabulary_that_loads(tmp_path, capsys):
  output = str(tmp_path / 'vocab.txt')
  exit_code = build_vocabulary.main(
      ['labels', *build_vocabulary.SYNTHETIC_BUILD_FLAGS, f'--output={output}'])
  assert exit_code == 0
  printed = capsys.readouterr().out
  assert 'Read 2000 examples' in printed and '0 of 2000 examples have no label' in printed
  assert 'Wrote 35 labels' in printed
  built = labels.LabelVocabulary.from_file(output)
  assert built == labels.LabelVocabulary.from_file(labels.synthetic_vocabulary_path())


def test_command_over_an_image_folder_with_caption_words(tmp_path, capsys):
  root = _write_image_folder(tmp_path)
  output = str(tmp_path / 'out' / 'vocab.txt')
  assert build_vocabulary.main(['labels', '--source=image_folder', f'--path={root}',
                                '--min_count=2', '--use_caption_words',
                                f'--output={output}']) == 0
  printed = capsys.readouterr().out
  assert 'Read 3 examples' in printed and '1 of 3 examples have no label' in printed
  # 'a' (2 captions) and 'circle' (a hashtag and a word) reach min_count=2.
  assert labels.LabelVocabulary.from_file(output).labels == ['a', 'circle']


def test_command_as_a_module_and_its_errors(tmp_path):
  output = tmp_path / 'vocab.txt'
  completed = subprocess.run(
      [sys.executable, '-m', 'big_pretrain.data.text.build_vocabulary', 'labels',
       '--source=synthetic', '--num_examples=50', f'--output={output}'],
      capture_output=True, text=True, timeout=60, check=False)
  assert completed.returncode == 0, completed.stderr
  assert 'Read 50 examples' in completed.stdout
  assert len(labels.LabelVocabulary.from_file(str(output))) > 10
  with pytest.raises(SystemExit):
    build_vocabulary.main(['labels', '--source=image_folder', f'--output={output}'])  # No --path.
  assert build_vocabulary.main(['labels', '--source=synthetic', '--num_examples=5',
                                '--min_count=10', f'--output={tmp_path / "empty.txt"}']) == 1
  assert not (tmp_path / 'empty.txt').exists()


# --- The pipeline's 'label_ids' ----------------------------------------------------------

def labels_data_config(**overrides):
  """small_data_config over 64 synthetic 32x32 images, at most MAX_LABELS label ids each."""
  config = small_data_config(num_examples=64, source_image_size=32)
  config.labels.max_labels_per_example = MAX_LABELS
  config.update(overrides)
  return config


def test_pipeline_without_vocabulary_has_no_label_ids():
  config = labels_data_config()
  assert config.labels.vocabulary is None
  assert batch_features.device_feature_names(config) == batch_features.DEVICE_FEATURES
  data = train_input.InputPipeline(config, global_batch_size=8, mesh=first_devices_mesh())
  assert set(next(data)) == {'image', 'label'} and data.label_vocabulary is None


def test_pipeline_batches_carry_synthetic_label_ids():
  config = labels_data_config()
  config.labels.vocabulary = labels.synthetic_vocabulary_path()
  data = train_input.InputPipeline(config, global_batch_size=8, mesh=first_devices_mesh())
  vocabulary = data.label_vocabulary
  batch = next(data)
  assert set(batch) == {'image', 'label', 'label_ids'}
  assert batch['label_ids'].shape == (8, MAX_LABELS) and batch['label_ids'].dtype == np.int32
  assert isinstance(batch['label_ids'], jax.Array)
  label_ids, class_labels = np.asarray(batch['label_ids']), np.asarray(batch['label'])
  for row, class_label in zip(label_ids, class_labels):
    assert vocabulary.label_id(synthetic.SHAPE_NAMES[class_label]) in row
    # 4 hashtags per synthetic example: sorted ids, then -1 padding.
    assert np.all(np.diff(row[:4]) > 0) and np.all(row[4:] == -1)


def test_pipeline_truncates_to_the_lowest_ids():
  config = labels_data_config(num_examples=8)
  config.labels.vocabulary = labels.synthetic_vocabulary_path()
  config.labels.max_labels_per_example = 2
  vocabulary = labels.LabelVocabulary.from_file(config.labels.vocabulary)
  source = sources.SyntheticShapes(8, 32)
  (batch,) = eval_split_batches(config, global_batch_size=8)  # as evaluators read them
  rows = batch['label_ids']
  expected = [vocabulary.encode(source[index]['hashtags'])[:2] for index in range(8)]
  # The eval order is shuffled: compare the rows as a multiset.
  assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, expected))


def _write_image_folder(tmp_path):
  """One class, three images: a known hashtag, only unknown hashtags, no caption at all."""
  root = tmp_path / 'images'
  (root / 'shapes').mkdir(parents=True)
  for name in ('a_known', 'b_unknown', 'c_no_caption'):
    Image.new('RGB', (40, 36), (200, 30, 30)).save(root / 'shapes' / f'{name}.png')
  (root / 'shapes' / 'a_known.txt').write_text('a red circle #Circle #red_carpet')
  (root / 'shapes' / 'b_unknown.txt').write_text('a hexagon #hexagon #nofilter circle')
  return root


def test_image_folder_example_without_known_hashtag_has_an_all_padding_row(tmp_path):
  config = labels_data_config(source='image_folder', path=str(_write_image_folder(tmp_path)))
  config.labels.vocabulary = labels.synthetic_vocabulary_path()
  vocabulary = labels.LabelVocabulary.from_file(config.labels.vocabulary)
  circle = vocabulary.label_id('circle')
  (batch,) = eval_split_batches(config, global_batch_size=3)  # as evaluators read them
  rows = batch['label_ids']
  # The eval order is shuffled: compare the rows as a multiset.
  assert sorted(map(tuple, rows.tolist())) == sorted([
      (circle,) + (-1,) * (MAX_LABELS - 1), (-1,) * MAX_LABELS, (-1,) * MAX_LABELS])
  # With caption words, the bare word 'circle' and 'red' count as well.
  config.labels.use_caption_words = True
  (batch,) = eval_split_batches(config, global_batch_size=3)
  rows = batch['label_ids']
  red = vocabulary.label_id('red')
  assert sorted(map(tuple, rows[:, :2].tolist())) == sorted(
      [tuple(sorted([circle, red])), (circle, -1), (-1, -1)])


def test_pipeline_with_missing_vocabulary_names_the_path_and_the_command(tmp_path):
  config = labels_data_config()
  config.labels.vocabulary = str(tmp_path / 'missing_vocab.txt')
  with pytest.raises(FileNotFoundError, match='missing_vocab.txt') as error:
    train_input.InputPipeline(config, global_batch_size=8, mesh=first_devices_mesh())
  assert f'--output={config.labels.vocabulary}' in str(error.value)
  assert 'python -m big_pretrain.data.text.build_vocabulary labels' in str(error.value)
