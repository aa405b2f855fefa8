"""The vocabulary commands on Apache Beam write the files they write in a process, which are
the vocabularies counted by hand below; the caption sample is the same however it is read.

Four Beam pipelines in all (each starts in seconds): labels and tokenizer on 2 worker
processes, the caption sample on 1 and on 2.
"""

import argparse
import collections
import hashlib
import heapq
import itertools
import random

import numpy as np
import pytest
from PIL import Image

from big_pretrain.data.prepare import vocabulary_job
from big_pretrain.data.sources import source_texts
from big_pretrain.data.sources import synthetic
from big_pretrain.data.text import build_vocabulary
from big_pretrain.data.text import frequent_tokens

TWO_WORKERS = ('--runner=DirectRunner', '--direct_num_workers=2',
               '--direct_running_mode=multi_processing')

# Class folder, image name, caption ('' : a caption file of blanks; None: no caption file).
# Sorted, so the example indices are the positions here.
CAPTIONED_IMAGES = (
    ('birds', 'b1', 'A bird at sunset #bird #Sunset'),
    ('cats', 'c1', 'A cat, sleeping. #cat #Cute'),
    ('cats', 'c2', 'my cat #cat #cat #sunset!'),
    ('cats', 'c3', None),
    ('dogs', 'd1', 'A dog on the beach #dog #beach #cute'),
    ('dogs', 'd2', 'Dog!\nsee https://x.io #dog'),
    ('dogs', 'd3', '   '),
)

# Counted by hand. Labels: the examples carrying each hashtag (a tag repeated in a caption
# counts once): cat 2, cute 2, dog 2, sunset 2, beach 1, bird 1; ties alphabetically.
ALL_LABELS = 'cat\ncute\ndog\nsunset\nbeach\nbird\n'
# --min_count=2 --max_size=3; examples with none of them: b1 and the two without caption.
FREQUENT_LABELS, UNLABELLED = 'cat\ncute\ndog\n', '3 of 7 examples have no label'
# Words (occurrences): '#' 11, cat 5, dog 4, a 3, sunset 3, then 2 each: '!' '.' '/' beach
# bird cute; 11 words seen once. 49 occurrences in all, 22 distinct.
FREQUENT_WORDS = ('<pad>\n<bos>\n<eos>\n<unk>\n#\ncat\ndog\na\nsunset\n!\n.\n/\nbeach\nbird\n'
                  'cute\n')
TOP_4_WORDS = '<pad>\n<bos>\n<eos>\n<unk>\n#\ncat\ndog\na\n'


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  root = tmp_path_factory.mktemp('captioned')
  for class_name, name, caption in CAPTIONED_IMAGES:
    (root / class_name).mkdir(exist_ok=True)
    Image.new('RGB', (2, 2)).save(root / class_name / f'{name}.png')
    if caption is not None:
      (root / class_name / f'{name}.txt').write_text(caption, encoding='utf-8')
  return root


def _build(tmp_path, command, flags, name, *extra):
  output = tmp_path / name
  code = build_vocabulary.main([command, *flags, f'--output={output}', *extra])
  return code, output.read_text(encoding='utf-8') if output.exists() else None


@pytest.mark.beam
def test_labels_on_two_beam_workers_are_the_vocabulary_counted_by_hand(image_folder, tmp_path,
                                                                      capsys):
  source = ['--source=image_folder', f'--path={image_folder}']
  assert _build(tmp_path, 'labels', source, 'all.txt') == (0, ALL_LABELS)
  printed = capsys.readouterr().out
  assert 'Read 7 examples from the image_folder source, with 6 distinct tags.' in printed
  assert '2 of 7 examples have no label' in printed
  frequent = [*source, '--min_count=2', '--max_size=3']
  assert _build(tmp_path, 'labels', frequent, 'frequent.txt') == (0, FREQUENT_LABELS)
  in_process = capsys.readouterr().out
  assert UNLABELLED in in_process
  # One range per example, on 2 processes; the statistic of unlabelled examples needs the
  # vocabulary, a side input, to read the examples again.
  assert _build(tmp_path, 'labels', frequent, 'beam.txt', *TWO_WORKERS) == (0, FREQUENT_LABELS)
  assert capsys.readouterr().out.replace('beam.txt', 'frequent.txt') == in_process


@pytest.mark.beam
def test_tokenizer_on_two_beam_workers_is_the_vocabulary_counted_by_hand(image_folder, tmp_path,
                                                                        capsys):
  source = ['--source=image_folder', f'--path={image_folder}']
  assert _build(tmp_path, 'tokenizer', [*source, '--max_size=4'], 'top4.txt') == (0, TOP_4_WORDS)
  assert '26 of 49 word occurrences are not in the vocabulary' in capsys.readouterr().out
  frequent = [*source, '--min_count=2']
  assert _build(tmp_path, 'tokenizer', frequent, 'frequent.txt') == (0, FREQUENT_WORDS)
  in_process = capsys.readouterr()
  assert 'Read 7 captions from the image_folder source, with 22 distinct words.' in (
      in_process.out)
  assert '11 of 49 word occurrences are not in the vocabulary' in in_process.out
  assert '2 examples have no caption' in in_process.err
  assert _build(tmp_path, 'tokenizer', frequent, 'beam.txt', *TWO_WORKERS) == (0, FREQUENT_WORDS)
  on_beam = capsys.readouterr()
  assert on_beam.out.replace('beam.txt', 'frequent.txt') == in_process.out
  assert '2 examples have no caption' in on_beam.err


@pytest.mark.beam
def test_caption_sample_is_the_same_in_process_and_on_one_or_two_beam_workers(image_folder,
                                                                             tmp_path, capsys):
  source = ['--source=image_folder', f'--path={image_folder}', '--sample_size=3']
  samples = [_build(tmp_path, 'captions', source, f'{name}.txt', *extra)
             for name, extra in (('in_process', ()), ('one', ('--runner=DirectRunner',)),
                                 ('two', TWO_WORKERS))]
  assert samples[0] == samples[1] == samples[2]
  code, text = samples[0]
  lines = text.splitlines()
  # The 3 smallest 64-bit blake2b hashes of (index, caption) among the 5 non-empty captions.
  captions = [(index, caption) for index, (_, _, caption) in enumerate(CAPTIONED_IMAGES)
              if caption and caption.strip()]
  hashes = {index: int.from_bytes(hashlib.blake2b(f'{index}\n{caption}'.encode(),
                                                  digest_size=8).digest(), 'big')
            for index, caption in captions}
  expected = [' '.join(dict(captions)[index].split('\n'))
              for index in sorted(hashes, key=hashes.get)[:3]]
  assert code == 0 and lines == expected
  assert 'Dog! see https://x.io #dog' in {' '.join(c.split('\n')) for _, c in captions}
  printed = capsys.readouterr()
  assert 'Wrote 3 captions' in printed.out and '2 examples have no caption' in printed.err
  # Fewer captions than asked: every one, in the same order.
  code, text = _build(tmp_path, 'captions', [*source[:2], '--sample_size=100'], 'all.txt')
  assert code == 0 and text.splitlines()[:3] == expected and len(text.splitlines()) == 5


@pytest.mark.parametrize('extra, message', [
    (('--runner=NoSuchRunner',), '--runner=NoSuchRunner: Beam has no such runner'),
    (('--runner=DirectRunner', '--no_such_flag=1'), '--no_such_flag=1: neither this command'),
    (('--direct_num_workers=2',), 'unrecognized arguments: --direct_num_workers=2'),
])
@pytest.mark.beam
def test_a_bad_runner_or_beam_flag_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, extra,
                                                                        message):
  for command in ('labels', 'captions'):
    with pytest.raises(SystemExit) as stopped:
      _build(tmp_path, command, ['--source=synthetic', '--num_examples=5'], 'out.txt', *extra)
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f'{build_vocabulary.PROGRAM}: ') and message in lines[0]
    assert not (tmp_path / 'out.txt').exists()


def test_min_count_and_max_size_on_synthetic_captions(tmp_path):
  flags = ['--source=synthetic', '--num_examples=300']
  _, every = _build(tmp_path, 'tokenizer', flags, 'every.txt')
  _, top = _build(tmp_path, 'tokenizer', [*flags, '--max_size=5'], 'top.txt')
  assert top.splitlines() == every.splitlines()[:4 + 5]
  # Exactly the words seen at least 80 times (every caption has 'a' twice, 'on', 'background').
  counts = {}
  source = synthetic.SyntheticShapes(300, 16)
  for index in range(300):
    for word in source.texts(index)['caption'].split():
      counts[word] = counts.get(word, 0) + 1
  _, frequent = _build(tmp_path, 'tokenizer', [*flags, '--min_count=80'], 'frequent.txt')
  assert set(frequent.splitlines()[4:]) == {w for w, c in counts.items() if c >= 80}
  assert len(frequent.splitlines()) < len(every.splitlines())


# --- The pieces the two ways share ---------------------------------------------------------

def test_evenly_spaced_picks_per_range_are_numpys_linspace():
  rng = np.random.default_rng(0)
  cases = [(10, 3), (10, 9), (7, 2), (1000, 999), (1000, 1), (5, 5), (5, 50), (1_281_167, 1000)]
  cases += [(int(n), int(k)) for n, k in zip(rng.integers(2, 10**6, 30), rng.integers(1, 5000, 30))]
  for length, picks in cases:
    expected = (np.arange(length) if picks >= length else
                np.unique(np.linspace(0, length - 1, picks).astype(int)))
    total = min(picks, length)
    ranges = source_texts.text_ranges(total, parts=7)
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    pieces = [source_texts.selected_indices(length, picks, *r) for r in ranges]
    np.testing.assert_array_equal(np.concatenate(pieces), expected, err_msg=f'{length} {picks}')


def test_texts_are_read_one_at_a_time():
  parser = argparse.ArgumentParser()
  source_texts.add_source_arguments(parser)
  texts = source_texts.iter_source_texts(
      parser.parse_args(['--source=synthetic', '--num_examples=10000000']), parser)
  assert not isinstance(texts, (list, tuple))
  first = next(texts)  # Not 10M examples first.
  assert first == synthetic.SyntheticShapes(1, 16).texts(0)
  shapes = synthetic.SyntheticShapes(50, 16, seed=3)
  for index in range(50):
    example = shapes[index]
    assert shapes.texts(index) == {'caption': example['caption'],
                                   'hashtags': example['hashtags']}


def test_the_selection_merges_over_parts_as_a_combiner_applies_it():
  rng = random.Random(0)
  counts = {f'w{i}': rng.randint(1, 40) for i in range(5000)}
  counts.update({'a:b': 99, 'x,y': 98})  # words a label file cannot hold
  pairs = list(counts.items())
  rng.shuffle(pairs)
  for kind in ('labels', 'tokenizer'):
    job = vocabulary_job.VocabularyJob(kind, min_count=3, max_size=50)
    whole = job.totals_of(pairs)
    parts = [job.totals_of(pairs[start:start + 1234]) for start in range(0, len(pairs), 1234)]
    assert job.merge_totals(parts) == whole
    expected = sorted(((t, c) for t, c in counts.items()
                       if c >= 3 and (kind == 'tokenizer' or t not in ('a:b', 'x,y'))),
                      key=lambda pair: (-pair[1], pair[0]))[:50]
    assert whole.kept == expected and whole.distinct == len(counts)
    assert whole.candidates == len(counts) - (2 if kind == 'labels' else 0)
  assert frequent_tokens.most_frequent(
      itertools.chain(frequent_tokens.most_frequent(pairs[:2000], 3, 50),
                      frequent_tokens.most_frequent(pairs[2000:], 3, 50)), 3, 50) == (
                          frequent_tokens.most_frequent(pairs, 3, 50))


def test_caption_samples_of_ranges_merge_to_the_sample_of_all():
  texts = [(index, {'hashtags': [], 'caption': f'caption {index % 97}\nline 2' if index % 5
                    else ' \n'}) for index in range(3000)]
  job = vocabulary_job.CaptionSample(size=40)
  statistics = collections.Counter()
  whole = job.sample(texts, statistics)
  parts = [job.sample(texts[start:start + 500], collections.Counter())
           for start in range(0, 3000, 500)]
  assert heapq.nsmallest(40, itertools.chain(*parts)) == whole and len(whole) == 40
  assert statistics == {'examples': 3000, 'without_caption': 600}
  assert all('\n' not in line and line.endswith(' line 2') for _, _, line in whole)
